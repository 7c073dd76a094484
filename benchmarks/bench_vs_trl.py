"""One on-policy distillation step: this stack vs Hugging Face TRL's GKDTrainer, same models and work.

Usage::

    pip install -e '.[bench]'      # TRL (benchmark-only extra)
    python benchmarks/bench_vs_trl.py [--prompts 8] [--samples 4] [--new-tokens 64] [--temperature 1.0]
        [--repeats 5] [--recipe demo] [--out FILE]

Both sides start from the embedded assets (``slime.embedded.assets``: the SFT'd tiny Qwen3 teacher and
cold student, HF checkpoints) and the first ``--prompts`` prompts of its ``train.jsonl``, each prompt
repeated ``--samples`` times; both sample ``--new-tokens`` tokens per response at ``--temperature``,
ignoring EOS (every response has exactly that many tokens, so both train on the same token count),
CPU float32, one torch thread per process, AdamW at the same learning rate.

* **this stack** (as ``train.py`` runs it, phases serial): ``generation`` (the rollout's ``generate``
  on an embedded student server: continuous batching, KV cache, student top-K), ``teacher_scoring``
  (the OPD ``reward_func``: a prefill on an embedded teacher server), ``post_process``
  (``post_process_rewards``: teacher log-probs, token selection), ``train`` (``TorchTrainRayActor.train``:
  old log-probs, OPD advantage, fwd + bwd with the sparse LM head, optimizer step) and ``weight_sync``
  (the new weights to the student server; TRL samples from the trained model in process and needs none).
  The samples of a step are in flight together and go out as batched ``/generate`` requests
  (``--sglang-batch-requests``, as the launchers run it).
  Two selections, same step otherwise: ``full`` (the OPD loss on every response token, as TRL) and
  ``dlearn_high`` at ρ = 0.1 (the loss on the kept 10 %).
* **TRL**: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda = 1`` (always on-policy) and ``beta = 1``
  (reverse KL), its own training loop (``Trainer.train``): ``generation`` (HF ``generate`` on the student,
  KV cache), ``teacher_scoring`` (teacher forward, no grad), ``train`` (student forward, full-vocabulary
  loss, backward, then the optimizer step, timed on its own as ``optimizer``).

Difference in work, stated: TRL's loss is the full-vocabulary reverse KL at every response position
(student and teacher logits over the whole sequence, [B, L, V]); this stack's OPD loss is the
sampled-token estimator of the same reverse KL (advantage = log p_T(y) − log p_S(y), policy gradient
on the sampled token); this stack's generation and teacher scoring also return the top-K lists
(K = 16 per token) that selection reads. TRL's teacher reads every
sequence in the training process; here the teacher is a separate server. TRL has no weight sync.

Measured in one process, interleaved: TRL's loop runs ``1 + --repeats`` steps and after each one
this stack runs one step of each selection (the first of each is a warm-up). Per step: response
tokens trained per second (``prompts × samples × new_tokens`` / step seconds), the phase seconds and
the CPU seconds (this process plus the two servers for this stack); median, min and max over the
repeats. ``opd_step_tokens_per_s_vs_trl`` = median tokens/s of this stack (``full``) / TRL's.
Without ``trl`` installed, ``run()`` returns ``{"skipped": reason}``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for common.py
from common import add_run_options, emit, met, parser, spread, train_data  # noqa: E402

FULL = {"prompts": 8, "samples": 4, "new_tokens": 64, "repeats": 5}
QUICK_KWARGS = {"prompts": 2, "samples": 2, "new_tokens": 8, "repeats": 1, "recipe": "fast-test"}
OURS_PHASES = ("generation", "teacher_scoring", "post_process", "train", "weight_sync")
TRL_PHASES = ("generation", "teacher_scoring", "train", "optimizer")
SELECTIONS = {"full": ("full", 1.0), "dlearn_high": ("dlearn_high", 0.1)}
TARGET_RATIO = 1.5
LR = 1e-5


def trl_missing() -> str | None:
    """Why TRL cannot run here, or None."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e '.[bench]')"
    return None


def _assets(recipe: str):
    from slime.embedded.assets import RECIPES, ensure_assets

    if recipe not in RECIPES:
        raise ValueError(f"unknown assets recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return ensure_assets(recipe=RECIPES[recipe])


def _prompt_ids(assets, tokenizer, prompts: int) -> list[list[int]]:
    from slime.embedded.task import build_prompt, read_jsonl

    rows = read_jsonl(assets.train_jsonl)[:prompts]
    if len(rows) < prompts:
        raise ValueError(f"--prompts {prompts}: the assets' train.jsonl has only {len(rows)} prompts")
    return [tokenizer.encode(build_prompt(r["prompt"], tokenizer), add_special_tokens=False) for r in rows]


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = time.process_time()
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class OurStack:
    """The embedded servers, the torch trainer and one OPD step per ``step()`` call (phases serial)."""

    def __init__(self, tmp: str, assets, size: dict, temperature: float):
        from slime.backends.embedded_sglang.launch import launch_server
        from slime.backends.torch_utils.actor import TorchTrainRayActor
        from slime.utils.http_utils import init_http_client

        models = os.path.join(tmp, "models")  # the engines accept weight pushes below the model's parent
        student = shutil.copytree(assets.student_dir, os.path.join(models, "student"))
        teacher = shutil.copytree(assets.teacher_dir, os.path.join(models, "teacher"))
        env = {"OMP_NUM_THREADS": "1"}
        self.servers = []
        self.servers.append(launch_server(student, log_file=os.path.join(tmp, "student.log"), env=env))
        self.servers.append(launch_server(teacher, log_file=os.path.join(tmp, "teacher.log"), env=env))
        self.size = size
        self.args = {
            name: self._args(student, self.servers[1].url, self.servers[0].url, models, mask, ratio, temperature)
            for name, (mask, ratio) in SELECTIONS.items()
        }
        self.trainer = TorchTrainRayActor(1, 0)
        self.trainer.init(self.args["full"])
        init_http_client(self.args["full"])  # timeouts, retries and request batching, as the RolloutManager does
        self.pids = [s.pid for s in self.servers if s.pid is not None]

    def _args(self, student, teacher_url, student_url, models, mask, ratio, temperature):
        from slime.utils.arguments import parse_args

        host, _, port = student_url.split("://", 1)[-1].rstrip("/").rpartition(":")
        n = self.size["prompts"] * self.size["samples"]
        return parse_args(
            [
                "--hf-checkpoint", str(student),
                "--rollout-batch-size", str(self.size["prompts"]),
                "--n-samples-per-prompt", str(self.size["samples"]),
                "--rollout-max-response-len", str(self.size["new_tokens"]),
                "--rollout-temperature", str(temperature),
                "--sglang-router-ip", host, "--sglang-router-port", port,
                "--use-opd", "--opd-type", "sglang", "--rm-url", f"{teacher_url.rstrip('/')}/generate",
                "--opd-budget-mask", mask, "--opd-budget-ratio", str(ratio), "--opd-topk-metrics-k", "16",
                "--micro-batch-size", str(n), "--global-batch-size", str(n),
                "--train-dtype", "float32", "--lr", str(LR), "--output-dir", os.path.join(models, "out"),
                "--sglang-batch-requests",  # as the launchers run it: the samples in flight go out as batches
            ]
        )  # fmt: skip

    def step(self, prompt_ids: list[list[int]], selection: str, step: int) -> dict:
        import slime.rollout.on_policy_distillation as opd
        from slime.rollout.sglang_rollout import build_sampling_params, generate
        from slime.utils.async_utils import run as run_async
        from slime.utils.http_utils import post
        from slime.utils.types import Sample

        args = self.args[selection]
        params = dict(build_sampling_params(args), ignore_eos=True)
        n = self.size["samples"]
        rows = range(len(prompt_ids) * n)
        batch = [Sample(group_index=i // n, index=i, tokens=list(prompt_ids[i // n])) for i in rows]
        seconds: dict[str, float] = {}
        t_start, c_start = time.perf_counter(), _cpu_seconds(self.pids)

        t0 = time.perf_counter()

        async def generate_all():
            return await asyncio.gather(*(generate(args, s, dict(params)) for s in batch))

        batch = list(run_async(generate_all()))
        seconds["generation"] = time.perf_counter() - t0

        t0 = time.perf_counter()

        async def score_all():
            return await asyncio.gather(*(opd.reward_func(args, s) for s in batch))

        for s, answer in zip(batch, run_async(score_all()), strict=True):
            s.reward = answer
        seconds["teacher_scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        opd.post_process_rewards(args, batch, rollout_id=step)
        seconds["post_process"] = time.perf_counter() - t0

        data = train_data(batch)
        t0 = time.perf_counter()
        self.trainer.train(step, data)
        seconds["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        path = self.trainer.update_weights()
        url = f"{self.servers[0].url.rstrip('/')}/update_weights_from_disk"
        answer = run_async(post(url, {"model_path": path}))
        if not (isinstance(answer, dict) and answer.get("success")):
            raise RuntimeError(f"weight push failed: {answer}")
        seconds["weight_sync"] = time.perf_counter() - t0
        tokens = sum(data["response_lengths"])
        kept = sum(map(sum, data["loss_masks"]))
        return {
            "seconds": seconds,
            "step_s": time.perf_counter() - t_start,
            "cpu_s": _cpu_seconds(self.pids) - c_start,
            "response_tokens": tokens,
            "kept_tokens": kept,
        }

    def close(self) -> None:
        from slime.utils.async_utils import run as run_async
        from slime.utils.http_utils import close_session

        run_async(close_session())
        for server in self.servers:
            server.stop()


def _trl_trainer(tmp: str, assets, prompt_ids: list[list[int]], size: dict, temperature: float, steps: int):
    """GKDTrainer (lmbda 1, beta 1) on the same prompts, each repeated ``samples`` times per batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(assets.student_dir)
    student = AutoModelForCausalLM.from_pretrained(assets.student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32)
    # ignore EOS, as this stack's rollout here: every response has exactly new_tokens tokens
    pad = tokenizer.pad_token_id
    rows = [ids for ids in prompt_ids for _ in range(size["samples"])]
    width = max(len(r) for r in rows)

    def collate(features):
        # left-padded prompts for generate; the trainer replaces input_ids/labels with the on-policy samples
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            r = rows[f["row"]]
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask, "labels": ids}

    batch = len(rows)
    dataset = Dataset.from_dict({"row": list(range(batch)) * steps})
    config = GKDConfig(
        output_dir=os.path.join(tmp, "trl"),
        lmbda=1.0,
        beta=1.0,
        temperature=temperature,
        max_new_tokens=size["new_tokens"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # TRL's SFT default recomputes activations in backward and, in GKD, then generates without a KV cache
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collate,
    )
    return trainer


def run(
    prompts: int = FULL["prompts"],
    samples: int = FULL["samples"],
    new_tokens: int = FULL["new_tokens"],
    temperature: float = 1.0,
    repeats: int = FULL["repeats"],
    recipe: str = "demo",
    threads: int = 1,
) -> dict:
    why = trl_missing()
    if why:
        print(f"bench_vs_trl: skipped: {why}")
        return {"benchmark": "vs_trl", "skipped": why}
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    size = {"prompts": prompts, "samples": samples, "new_tokens": new_tokens}
    assets = _assets(recipe)
    prompt_ids = _prompt_ids(assets, AutoTokenizer.from_pretrained(assets.student_dir), prompts)
    tokens_per_step = prompts * samples * new_tokens
    ours: dict[str, list[dict]] = {name: [] for name in SELECTIONS}
    trl_steps: list[dict] = []

    with tempfile.TemporaryDirectory() as tmp:
        stack = OurStack(tmp, assets, size, temperature)
        try:
            trainer = _trl_trainer(tmp, assets, prompt_ids, size, temperature, 1 + repeats)
            phase: dict[str, float] = {}

            def timed(name, fn):
                def wrapper(*a, **kw):
                    t0 = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        phase[name] = phase.get(name, 0.0) + time.perf_counter() - t0

                return wrapper

            trainer.generate_on_policy_outputs = timed("generation", trainer.generate_on_policy_outputs)
            trainer.teacher_model.forward = timed("teacher_scoring", trainer.teacher_model.forward)
            marks: dict[str, float] = {}
            lengths: list[int] = []
            inner_generate = trainer.generate_on_policy_outputs

            def generate_and_count(model, inputs, generation_config):
                # Trainer.train() aligns the model's EOS with the tokenizer's again: ignore EOS, as this stack
                model.generation_config.eos_token_id = generation_config.eos_token_id = None
                out = inner_generate(model, inputs, generation_config)
                lengths.append(int((out[2] != -100).sum()))  # response tokens the loss reads
                return out

            trainer.generate_on_policy_outputs = generate_and_count

            class Interleave(TrainerCallback):
                def on_step_begin(self, args, state, control, **kw):
                    phase.clear()
                    marks["step"], marks["cpu"] = time.perf_counter(), time.process_time()

                def on_pre_optimizer_step(self, args, state, control, **kw):
                    marks["opt"] = time.perf_counter()

                def on_optimizer_step(self, args, state, control, **kw):
                    phase["optimizer"] = time.perf_counter() - marks["opt"]

                def on_step_end(self, args, state, control, **kw):
                    step_s = time.perf_counter() - marks["step"]
                    cpu_s = time.process_time() - marks["cpu"]
                    train = step_s - sum(phase.get(p, 0.0) for p in ("generation", "teacher_scoring", "optimizer"))
                    trl_steps.append(
                        {
                            "seconds": {**{p: phase.get(p, 0.0) for p in TRL_PHASES if p != "train"}, "train": train},
                            "step_s": step_s,
                            "cpu_s": cpu_s,
                            "response_tokens": lengths[-1] if lengths else 0,
                        }
                    )
                    for name in SELECTIONS:  # this stack's step right after TRL's, same load
                        ours[name].append(stack.step(prompt_ids, name, state.global_step))

            trainer.add_callback(Interleave())
            trainer.train()
        finally:
            stack.close()

    def side(steps: list[dict], phases: tuple[str, ...]) -> dict:
        measured = steps[1:]  # the first step is a warm-up
        return {
            "tokens_per_s": spread([s["response_tokens"] / s["step_s"] for s in measured]),
            "step_s": spread([s["step_s"] for s in measured]),
            "cpu_s": spread([s["cpu_s"] for s in measured]),
            "seconds": {p: spread([s["seconds"][p] for s in measured]) for p in phases},
            "response_tokens": measured[0]["response_tokens"],
            **({"kept_tokens": measured[0]["kept_tokens"]} if "kept_tokens" in measured[0] else {}),
        }

    res_ours = {name: side(steps, OURS_PHASES) for name, steps in ours.items()}
    res_trl = side(trl_steps, TRL_PHASES)
    if res_trl["response_tokens"] != tokens_per_step:
        raise RuntimeError(f"TRL trained on {res_trl['response_tokens']} response tokens, expected {tokens_per_step}")
    ratio = res_ours["full"]["tokens_per_s"]["median"] / res_trl["tokens_per_s"]["median"]
    ratio_sel = res_ours["dlearn_high"]["tokens_per_s"]["median"] / res_trl["tokens_per_s"]["median"]
    cpu_ratio = res_trl["cpu_s"]["median"] / res_ours["full"]["cpu_s"]["median"]
    return {
        "benchmark": "vs_trl",
        **size,
        "temperature": temperature,
        "repeats": repeats,
        "recipe": recipe,
        "torch_threads": threads,
        "tokens_per_step": tokens_per_step,
        "ours": res_ours,
        "trl": res_trl,
        "tokens_per_s_ratio": ratio,
        "tokens_per_s_ratio_selected": ratio_sel,
        "cpu_time_ratio_trl_vs_ours": cpu_ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "ratios": {"opd_step_tokens_per_s_vs_trl": ratio},
    }


def table(res: dict) -> str:
    if "skipped" in res:
        return f"bench_vs_trl skipped: {res['skipped']}"
    lines = [
        f"one OPD step, {res['prompts']} prompts x {res['samples']} samples x {res['new_tokens']} tokens "
        f"(T={res['temperature']}), embedded assets '{res['recipe']}', median of {res['repeats']} (min-max)",
        f"{'':<22} {'tokens/s':>22} {'step s':>8} {'cpu s':>8}  phases (median s)",
    ]
    rows = [(f"this stack, {name}", r) for name, r in res["ours"].items()] + [("TRL GKDTrainer", res["trl"])]
    for label, r in rows:
        t = r["tokens_per_s"]
        phases = ", ".join(f"{p} {v['median']:.3f}" for p, v in r["seconds"].items())
        lines.append(
            f"{label:<22} {t['median']:8.1f} ({t['min']:.1f}-{t['max']:.1f}) {r['step_s']['median']:8.3f} "
            f"{r['cpu_s']['median']:8.3f}  {phases}"
        )
    lines.append(
        f"tokens/s vs TRL: {res['tokens_per_s_ratio']:.2f}x (full), {res['tokens_per_s_ratio_selected']:.2f}x "
        f"(dlearn_high rho=0.1); CPU seconds TRL/this stack {res['cpu_time_ratio_trl_vs_ours']:.2f}x; "
        f"target >= {res['target_ratio']}x: {met(res['meets_target'])}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=FULL["prompts"])
    p.add_argument("--samples", type=int, default=FULL["samples"], help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=FULL["new_tokens"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=FULL["repeats"], help="measured steps after one warm-up")
    p.add_argument("--recipe", default="demo", help="embedded assets recipe (demo, fast-test)")
    add_run_options(p, QUICK_KWARGS)
    a = p.parse_args(argv)
    kwargs = dict(prompts=a.prompts, samples=a.samples, new_tokens=a.new_tokens, temperature=a.temperature)
    kwargs.update(repeats=a.repeats, recipe=a.recipe, threads=a.threads)
    if a.quick:
        kwargs.update(QUICK_KWARGS)
    res = run(**kwargs)
    emit(table(res), res, a.out)


if __name__ == "__main__":
    main()
