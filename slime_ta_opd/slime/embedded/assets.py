"""Build (once) and cache the embedded defaults: a teacher, a cold student and the task's prompt files.

The teacher and the student are tiny Qwen3 models (``slime.embedded.models``) trained here, in
process, by supervised fine-tuning on correct answer chains of the arithmetic task
(``slime.embedded.task``). The teacher trains to high held-out accuracy (a 900-step schedule); the student
is smaller and stops mid-learning, on a prefix of a longer LR schedule, once it gets ~30 % of held-out dev
prompts right: past the plateau where it writes the format but gets the digits wrong, with most
answers still wrong, which leaves on-policy distillation room (and a gradient) to improve it. With 2 or more
CPUs the two train at once, in two processes, one thread each on 2 cores, and once the student is done the
building process computes half of every teacher batch (``slime.embedded.sft``; the weights are the same).

Everything is cached under ``$SLIME_TA_OPD_CACHE`` (default ``~/.cache/slime-ta-opd/embedded-v1``)
in a directory named by a hash of the recipe, so a second call returns at once and a changed
recipe builds afresh. A build writes into a temp directory and renames it into place, and holds a
file lock, so an interrupted or concurrent build never leaves a half-written cache.

Usage::

    python -m slime.embedded.assets                       # build or reuse, print the paths as JSON
    python -m slime.embedded.assets --cache-dir DIR --force
    python -m slime.embedded.assets --print teacher_dir   # one path (for shell scripts)
    python -m slime.embedded.assets --recipe fast-test    # seconds; weak models (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slime.embedded.sft import JoinListener, JoinPoint, ModelRecipe, join_sft, lr_at, sft_train
from slime.embedded.task import TaskConfig, build_prompt, generate_splits, read_jsonl, to_record, write_jsonl
from ta_opd.atomic_io import atomic_dir

logger = logging.getLogger(__name__)

# Bump when the builder's code changes in a way that changes its output for the same recipe.
# 2: dev split drawn after eval (changes the SFT pool), SFT recipe in the manifest; 3: the teacher stops at a dev
# accuracy, CPU seconds per model in the manifest; 4: the teacher's gradient is the sum of two half-batch gradients
# (grad_shards=2), which the building process helps compute once the student is done
BUILDER_VERSION = 4
CACHE_ENV = "SLIME_TA_OPD_CACHE"
DEFAULT_CACHE = Path("~/.cache/slime-ta-opd/embedded-v1")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the cached assets; its hash names the cache directory."""

    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 0
    num_train_prompts: int = 4000  # train.jsonl: the OPD prompt set
    num_eval_prompts: int = 200  # eval.jsonl: held-out prompts (never trained on)
    num_dev_prompts: int = 400  # for ModelRecipe.stop_at_dev_accuracy; disjoint from SFT and eval, not saved
    sft_pool: int = 30000  # distinct SFT examples drawn from the training distribution
    # The teacher trains its whole 900-step schedule: 96.0 % held-out greedy accuracy on the default seed. (A stop
    # at 94 % dev accuracy from step 750 never fired: 91.75/93.25/91.25 % at steps 750/800/850.) Each step sums
    # the gradients of two half-batches, which two processes compute once the student is done.
    teacher: ModelRecipe = field(default_factory=lambda: ModelRecipe("teacher", steps=900, lr=3e-3, grad_shards=2))
    # The student trains on a 1,350-step schedule (which would take it to ~92 %) and stops at the
    # first check where it gets 30 % of the dev prompts right: past the "format right, digits wrong"
    # plateau (~10 %, loss ~0.27), mid-learning. On the default seed that is step 540 (28.5 % on the
    # eval prompts); the climb starts anywhere from step ~440 to ~680 depending on the seed and data
    # (docs/quickstart.md), hence a target, not a fixed step; 1,000 steps is a cap.
    student: ModelRecipe = field(
        default_factory=lambda: ModelRecipe(
            "student",
            steps=1000,
            lr=3e-3,
            schedule_steps=1350,
            stop_at_dev_accuracy=0.30,
            dev_check_every=10,
            dev_check_from=300,
        )
    )
    eval_max_new_tokens: int = 32

    def key(self) -> str:
        blob = json.dumps({"builder": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A recipe for tests: seconds, not minutes (the models learn the format, not the arithmetic).
FAST_TEST_RECIPE = Recipe(
    num_train_prompts=64,
    num_eval_prompts=16,
    num_dev_prompts=16,
    sft_pool=512,
    teacher=ModelRecipe("nano", steps=30, lr=5e-3, batch_size=16),
    student=ModelRecipe("nano", steps=10, lr=5e-3, batch_size=16),
)


RECIPES = {"demo": Recipe(), "fast-test": FAST_TEST_RECIPE}


@dataclass(frozen=True)
class Assets:
    teacher_dir: Path
    student_dir: Path
    train_jsonl: Path
    eval_jsonl: Path
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "teacher_dir": str(self.teacher_dir),
            "student_dir": str(self.student_dir),
            "train_jsonl": str(self.train_jsonl),
            "eval_jsonl": str(self.eval_jsonl),
            **self.info,
        }


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


# --------------------------------------------------------------------------- SFT


def _encode_examples(tokenizer: Any, problems: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``input_ids [B, L]`` of prompt + chain + EOS and a bool ``loss_mask [B, L]`` on the response.

    The chat template's fixed parts are tokenized once by the tokenizer; questions and chains are
    plain ASCII, one token per character, so they map through the vocabulary directly (tens of
    thousands of examples in a second). The first example is checked against the tokenizer.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    marker = "\x00"
    head, tail = build_prompt(marker, tokenizer).split(marker)
    head_ids = tokenizer.encode(head, add_special_tokens=False)
    tail_ids = tokenizer.encode(tail, add_special_tokens=False)
    seqs, prompt_lens = [], []
    for p in problems:
        prompt = head_ids + [vocab[c] for c in p.question] + tail_ids
        seqs.append(prompt + [vocab[c] for c in p.chain] + [eos])
        prompt_lens.append(len(prompt))
    if problems:
        reference = tokenizer.encode(build_prompt(problems[0].question, tokenizer) + problems[0].chain)
        if reference != seqs[0][:-1]:
            raise ValueError("fast char-level encoding disagrees with the tokenizer; is it the embedded tokenizer?")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (n_prompt, s) in enumerate(zip(prompt_lens, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, n_prompt : len(s)] = True
    return input_ids, loss_mask


# --------------------------------------------------------------------------- build + cache


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _assets_in(root: Path, info: dict[str, Any]) -> Assets:
    return Assets(
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        train_jsonl=root / "data" / "train.jsonl",
        eval_jsonl=root / "data" / "eval.jsonl",
        info=info,
    )


def _is_complete(root: Path) -> bool:
    a = _assets_in(root, {})
    return (root / "manifest.json").is_file() and all(
        p.exists() for p in (a.teacher_dir / "config.json", a.student_dir / "config.json", a.train_jsonl, a.eval_jsonl)
    )


def _train_role(
    role: str,
    r: ModelRecipe,
    seed: int,
    out_dir: str,
    recipe: Recipe,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    dev_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    threads: int | None,
    join_address: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and save one model of the pair into ``out_dir/role``; returns its manifest entry. Runs in
    the building process or in a spawned one (``threads``: torch threads for it; None leaves them;
    ``join_address``: a :class:`JoinPoint` where the building process may join the SFT once it is free)."""
    from slime.embedded.evaluate import evaluate_model
    from slime.embedded.models import build_tiny_model, save_model
    from slime.embedded.tokenizer import load_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    tokenizer = load_tokenizer(out / "tokenizer")
    t_model, cpu_model = time.perf_counter(), time.process_time()
    model = build_tiny_model(r.size, seed=seed)
    dev_history: list[tuple[int, float]] = []

    def dev_accuracy(m: Any, step: int) -> float:
        acc = evaluate_model(m, tokenizer, dev_rows, max_new_tokens=recipe.eval_max_new_tokens, temperature=0.0)
        dev_history.append((step, acc.accuracy))
        return acc.accuracy

    listener = JoinListener(join_address) if join_address is not None else None
    losses = sft_train(
        model, input_ids, loss_mask, r, seed=seed, desc=f"train {role} ({r.size})", dev_accuracy=dev_accuracy,
        join=listener,
    )  # fmt: skip
    result = evaluate_model(model, tokenizer, eval_rows, max_new_tokens=recipe.eval_max_new_tokens, temperature=0.0)
    save_model(model, out / role, tokenizer_dir=out / "tokenizer")
    steps_done = len(losses)
    if r.stop_at_dev_accuracy is None:
        stop_reason = "all steps"
    elif dev_history and dev_history[-1][1] >= r.stop_at_dev_accuracy:
        stop_reason = f"dev accuracy {dev_history[-1][1]:.1%} >= {r.stop_at_dev_accuracy:.1%}"
    else:
        stop_reason = f"all steps (dev accuracy never reached {r.stop_at_dev_accuracy:.1%})"
        print(
            f"[assets] warning: {role} stopped at its {r.steps} steps without reaching the target dev accuracy",
            file=sys.stderr,
        )
    logger.info("%s: held-out greedy accuracy %.3f", role, result.accuracy)
    schedule = f"{steps_done} steps" + (
        f" of a {r.schedule_len}-step schedule" if r.schedule_len != steps_done else ""
    )
    why = "" if stop_reason == "all steps" else f"; stopped: {stop_reason}"
    # stderr: this line also comes from the spawned teacher process, whose stdout is the caller's (--print)
    print(
        f"[assets] {role}: held-out greedy accuracy {result.accuracy:.1%} ({r.size}, {schedule}{why})",
        file=sys.stderr,
        flush=True,
    )
    return {
        "size": r.size,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps_done,
        "stop_reason": stop_reason,
        "sft": r.sft_summary(),
        "lr_at_stop": lr_at(steps_done - 1, r),
        "final_sft_loss": losses[-1],  # the last step's batch
        "final_sft_loss_mean_last20": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_accuracy_greedy": result.accuracy,
        "dev_accuracy_checks": [[step, acc] for step, acc in dev_history],
        # the step from which a second process shared the SFT (None: one process); the weights are the same either way
        "second_process_from_step": None if listener is None else listener.joined_at,
        "build_seconds": round(time.perf_counter() - t_model, 1),
        "cpu_seconds": round(time.process_time() - cpu_model, 1),  # this process's CPU time, all its threads
        "example": {"prompt": eval_rows[0]["prompt"], "response": result.responses[0]},
    }


def build_assets(out_dir: str | os.PathLike, recipe: Recipe, parallel: bool = True) -> dict[str, Any]:
    """Build every asset into ``out_dir`` (not atomic by itself; see ``ensure_assets``); returns the manifest.

    ``parallel`` (with 2 or more CPUs): the teacher trains in a spawned process while the student trains here,
    each on half of torch's threads; once the student is done, this process computes half of every teacher
    batch (data parallel, when the teacher's recipe has ``grad_shards=2``; the weights do not change). (Not a
    second thread for the teacher: measured on 2 cores, 2 threads made its steps 1.2x faster at a load average
    of ~1 but 3-8x slower at ~2, OpenMP threads waiting on each other.)"""
    from slime.embedded.tokenizer import build_tokenizer

    out = Path(out_dir)
    t0 = time.perf_counter()
    recipe.task.validate()
    # The SFT pool and the OPD prompt set come from one seeded stream that never yields a held-out question.
    # Held-out problems are drawn first (so eval.jsonl does not depend on the dev or pool sizes): eval, then dev.
    pool, held_out_all = generate_splits(
        recipe.sft_pool, recipe.num_eval_prompts + recipe.num_dev_prompts, recipe.seed, recipe.task
    )
    held_out, dev = held_out_all[: recipe.num_eval_prompts], held_out_all[recipe.num_eval_prompts :]
    dev_rows = [to_record(p) for p in dev]
    rng = random.Random(recipe.seed + 1)
    opd_prompts = [pool[rng.randrange(len(pool))] for _ in range(recipe.num_train_prompts)]
    write_jsonl((to_record(p) for p in opd_prompts), out / "data" / "train.jsonl")
    write_jsonl((to_record(p) for p in held_out), out / "data" / "eval.jsonl")
    eval_rows = read_jsonl(out / "data" / "eval.jsonl")

    tokenizer = build_tokenizer(out / "tokenizer")
    input_ids, loss_mask = _encode_examples(tokenizer, pool)
    manifest: dict[str, Any] = {"recipe": asdict(recipe), "recipe_key": recipe.key(), "builder": BUILDER_VERSION}
    jobs = [("teacher", recipe.teacher, recipe.seed), ("student", recipe.student, recipe.seed + 100)]
    for role, r, _ in jobs:
        if r.stop_at_dev_accuracy is not None and not dev_rows:
            raise ValueError(f"the {role} recipe stops at a dev accuracy, but the recipe has num_dev_prompts=0")
    shared = (str(out), recipe, input_ids, loss_mask, dev_rows, eval_rows)
    if parallel and (os.cpu_count() or 1) >= 2:
        # The teacher (most of the build) trains in a second process while the student trains here: each model
        # depends only on its own seed and data (with one thread each, the sequential build's exact weights).
        # Once the student is done, this process joins the teacher's SFT and computes half of each batch
        # (recipe.teacher.grad_shards == 2; slime.embedded.sft: the weights do not change).
        import multiprocessing

        threads = torch.get_num_threads()
        per_process = max(1, threads // 2)
        point = JoinPoint() if recipe.teacher.grad_shards == 2 else None
        with multiprocessing.get_context("spawn").Pool(1) as pool_:
            address = None if point is None else point.address
            teacher = pool_.apply_async(_train_role, (*jobs[0], *shared, per_process, address))
            manifest["student"] = _train_role(*jobs[1], *shared, per_process)
            if point is not None:
                print("[assets] student done: this process now shares the teacher's SFT", file=sys.stderr, flush=True)
                join_sft(point, recipe.teacher, input_ids, loss_mask)
            manifest["teacher"] = teacher.get()
        torch.set_num_threads(threads)
    else:
        for job in jobs:
            manifest[job[0]] = _train_role(*job, *shared, None)
    manifest = {k: manifest[k] for k in ("recipe", "recipe_key", "builder", "teacher", "student")}
    shutil.rmtree(out / "tokenizer")
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure_assets(
    cache_dir: str | os.PathLike | None = None, force: bool = False, recipe: Recipe | None = None
) -> Assets:
    """The cached assets for ``recipe`` (default: the demo recipe), building them first if needed.

    ``cache_dir`` defaults to ``$SLIME_TA_OPD_CACHE`` or ``~/.cache/slime-ta-opd/embedded-v1``;
    the assets live in ``cache_dir/<recipe hash>/``. ``force`` rebuilds even when cached.
    """
    recipe = recipe or Recipe()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / recipe.key()
    with _locked(cache / f".{recipe.key()}.lock"):
        for stale in cache.glob(f".{root.name}.tmp*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if force or not _is_complete(root):
            print(f"[assets] building the embedded pair into {root} (cached for later runs)", file=sys.stderr)
            with atomic_dir(root) as tmp:  # ".{root.name}.tmp*", what the sweep above removes
                build_assets(tmp, recipe)
        info = json.loads((root / "manifest.json").read_text())
    return _assets_in(root, info)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help=f"default ${CACHE_ENV} or {DEFAULT_CACHE}")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--seed", type=int, default=Recipe().seed)
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="demo", help="demo: the real one; fast-test: seconds, weak models"
    )
    parser.add_argument(
        "--print",
        dest="print_key",
        choices=["teacher_dir", "student_dir", "train_jsonl", "eval_jsonl"],
        default=None,
        help="print only this path (for shell scripts); progress goes to stderr",
    )
    ns = parser.parse_args(argv)
    recipe = replace(RECIPES[ns.recipe], seed=ns.seed)
    if ns.print_key:
        with contextlib.redirect_stdout(sys.stderr):  # progress of anything this process prints
            assets = ensure_assets(ns.cache_dir, ns.force, recipe)
        print(assets.as_dict()[ns.print_key])
    else:
        assets = ensure_assets(ns.cache_dir, ns.force, recipe)
        d = assets.as_dict()
        print(json.dumps({k: d[k] for k in ("teacher_dir", "student_dir", "train_jsonl", "eval_jsonl")}, indent=2))
        for role in ("teacher", "student"):
            print(f"{role}: held-out greedy accuracy {d[role]['heldout_accuracy_greedy']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
