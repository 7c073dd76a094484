"""Build (once) and cache the embedded defaults: a teacher, a cold student and the task's prompt files.

The teacher and the student are tiny Qwen3 models (``slime.embedded.models``) trained here, in
process, by supervised fine-tuning on correct answer chains of the arithmetic task
(``slime.embedded.task``). The teacher trains to high held-out accuracy; the student is smaller
and stops early, so it writes the answer format but gets many answers wrong, which leaves
on-policy distillation room to improve it.

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
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slime.embedded.task import TaskConfig, build_prompt, generate_splits, read_jsonl, to_record, write_jsonl
from ta_opd.atomic_io import atomic_dir

logger = logging.getLogger(__name__)

# Bump when the builder's code changes in a way that changes its output for the same recipe.
BUILDER_VERSION = 1
CACHE_ENV = "SLIME_TA_OPD_CACHE"
DEFAULT_CACHE = Path("~/.cache/slime-ta-opd/embedded-v1")


@dataclass(frozen=True)
class ModelRecipe:
    size: str  # a key of slime.embedded.models.SIZES
    steps: int
    lr: float
    batch_size: int = 64
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1  # cosine decay to lr * final_lr_frac


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the cached assets; its hash names the cache directory."""

    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 0
    num_train_prompts: int = 4000  # train.jsonl: the OPD prompt set
    num_eval_prompts: int = 200  # eval.jsonl: held-out prompts (never trained on)
    sft_pool: int = 30000  # distinct SFT examples drawn from the training distribution
    teacher: ModelRecipe = field(default_factory=lambda: ModelRecipe("teacher", steps=900, lr=3e-3))
    student: ModelRecipe = field(default_factory=lambda: ModelRecipe("student", steps=450, lr=3e-3))
    eval_max_new_tokens: int = 32

    def key(self) -> str:
        blob = json.dumps({"builder": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# A recipe for tests: seconds, not minutes (the models learn the format, not the arithmetic).
FAST_TEST_RECIPE = Recipe(
    num_train_prompts=64,
    num_eval_prompts=16,
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


def _lr_at(step: int, r: ModelRecipe) -> float:
    warmup = max(1, int(r.warmup_frac * r.steps))
    if step < warmup:
        return r.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, r.steps - warmup)
    return r.lr * (r.final_lr_frac + (1 - r.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_train(
    model: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor, r: ModelRecipe, seed: int, desc: str = "sft"
) -> list[float]:
    """Supervised fine-tuning on response tokens (token-mean NLL); returns the loss per step."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(r.steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, r)
        idx = torch.randint(0, input_ids.shape[0], (r.batch_size,), generator=gen)
        ids, mask = input_ids[idx], loss_mask[idx]
        width = int(mask.any(0).nonzero().max()) + 1  # drop all-padding columns
        ids, mask = ids[:, :width], mask[:, :width]
        # right padding + causal attention: real tokens never see the pads, whose loss is masked
        logits = model(input_ids=ids).logits  # [B, L, V]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]: token t+1 predicted at t
        target_mask = mask[:, 1:]
        loss = (nll * target_mask).sum() / target_mask.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == r.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


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


def build_assets(out_dir: str | os.PathLike, recipe: Recipe) -> dict[str, Any]:
    """Build every asset into ``out_dir`` (not atomic by itself; see ``ensure_assets``); returns the manifest."""
    from slime.embedded.evaluate import evaluate_model
    from slime.embedded.models import build_tiny_model, save_model
    from slime.embedded.tokenizer import build_tokenizer

    out = Path(out_dir)
    t0 = time.perf_counter()
    recipe.task.validate()
    # The SFT pool and the OPD prompt set come from one seeded stream that never yields a held-out question.
    pool, held_out = generate_splits(recipe.sft_pool, recipe.num_eval_prompts, recipe.seed, recipe.task)
    rng = random.Random(recipe.seed + 1)
    opd_prompts = [pool[rng.randrange(len(pool))] for _ in range(recipe.num_train_prompts)]
    write_jsonl((to_record(p) for p in opd_prompts), out / "data" / "train.jsonl")
    write_jsonl((to_record(p) for p in held_out), out / "data" / "eval.jsonl")
    eval_rows = read_jsonl(out / "data" / "eval.jsonl")

    tokenizer = build_tokenizer(out / "tokenizer")
    input_ids, loss_mask = _encode_examples(tokenizer, pool)
    manifest: dict[str, Any] = {"recipe": asdict(recipe), "recipe_key": recipe.key(), "builder": BUILDER_VERSION}
    for role, r, seed in (("teacher", recipe.teacher, recipe.seed), ("student", recipe.student, recipe.seed + 100)):
        t_model = time.perf_counter()
        model = build_tiny_model(r.size, seed=seed)
        losses = sft_train(model, input_ids, loss_mask, r, seed=seed, desc=f"train {role} ({r.size})")
        result = evaluate_model(
            model, tokenizer, eval_rows, max_new_tokens=recipe.eval_max_new_tokens, temperature=0.0
        )
        save_model(model, out / role, tokenizer_dir=out / "tokenizer")
        manifest[role] = {
            "size": r.size,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": r.steps,
            "final_sft_loss": losses[-1] if losses else None,
            "heldout_accuracy_greedy": result.accuracy,
            "build_seconds": round(time.perf_counter() - t_model, 1),
            "example": {"prompt": eval_rows[0]["prompt"], "response": result.responses[0]},
        }
        logger.info("%s: held-out greedy accuracy %.3f", role, result.accuracy)
        print(f"[assets] {role}: held-out greedy accuracy {result.accuracy:.1%} ({r.size}, {r.steps} steps)")
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
            print(f"[assets] building the embedded teacher/student into {root} (cached for later runs)")
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
        with contextlib.redirect_stdout(__import__("sys").stderr):
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
