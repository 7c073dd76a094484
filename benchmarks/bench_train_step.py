"""Where the time of one embedded TA-OPD training step goes.

Usage::

    python benchmarks/bench_train_step.py [--quick] [--prompts 16] [--samples 4] [--new-tokens 64] [--k 16]
        [--steps 2] [--out results.json]

Real components at tiny size, one phase after the other so that each phase's wall clock is its own:

1. ``generation``: the project's rollout ``generate(args, sample, params)`` for every sample at once
   (``asyncio.gather``), over HTTP to an embedded student server (``launch_server``: continuous
   batching, KV cache) with ``return_logprob`` and the student's top-K (K = ``--opd-topk-metrics-k``);
2. ``teacher_scoring``: the OPD ``reward_func`` of every sample at once: a prefill-only request with
   top-K to an embedded teacher server;
3. ``selection``: ``post_process_rewards`` (teacher log-probs into the samples, the ``TokenBatch``
   built from both top-K lists, ``ta_opd.select_tokens`` with ``dlearn_high`` at ρ = 0.1, masks
   written back); ``select_tokens`` alone is timed inside it;
4. ``train``: ``TorchTrainRayActor.train`` (called directly, no Ray): old log-probs (no grad), OPD
   advantages, forward + backward over micro-batches with the sparse LM head, AdamW;
5. ``weight_sync``: ``save_hf`` of the new weights + ``/update_weights_from_disk`` on the student server.

In ``train.py`` the rollout overlaps generation and teacher scoring per sample and runs in a Ray
actor; here the phases are serial and in one driver process (the servers are subprocesses), so
the shares add up to 100 % of the serial step. Threads: under ``train.py`` on a CPU node Ray gives
the RolloutManager (``num_cpus=0``) and the trainer (one CPU bundle) ``OMP_NUM_THREADS=1``, and the
servers the RolloutManager starts inherit it; ``--threads`` (default 1) reproduces that layout
for the driver (selection, training) and both servers. With 2 intra-op threads on a busy
machine, small ops such as selection's ``[N, K]`` tensors can be tens of times slower.

Prompts are random token ids; generation ignores EOS, so every response has exactly
``--new-tokens`` tokens. The first step is a warm-up and is not counted; the reported seconds
are means over ``--steps`` measured steps. Target: the selection share < 1 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
from common import emit, met, train_data  # noqa: E402

PHASES = ("generation", "teacher_scoring", "selection", "train", "weight_sync")
FULL = {"prompts": 16, "samples": 4, "new_tokens": 64, "k": 16, "prompt_len": 32, "steps": 2}
QUICK = {"prompts": 2, "samples": 2, "new_tokens": 8, "k": 4, "prompt_len": 8, "steps": 1}
TARGET_SELECTION_SHARE = 0.01
QUICK_KWARGS = {"quick": True}  # what `run_all.py --quick` passes to run()


def _args(student, teacher_url: str, student_url: str, out_dir: str, size: dict, ratio: float):
    from slime.utils.arguments import parse_args

    host, _, port = student_url.split("://", 1)[-1].rstrip("/").rpartition(":")
    n = size["prompts"] * size["samples"]
    return parse_args(
        [
            "--hf-checkpoint", str(student),
            "--rollout-batch-size", str(size["prompts"]), "--n-samples-per-prompt", str(size["samples"]),
            "--rollout-max-response-len", str(size["new_tokens"]), "--rollout-temperature", "1.0",
            "--sglang-router-ip", host, "--sglang-router-port", port,
            "--use-opd", "--opd-type", "sglang", "--rm-url", f"{teacher_url.rstrip('/')}/generate",
            "--opd-budget-mask", "dlearn_high", "--opd-budget-ratio", str(ratio),
            "--opd-topk-metrics-k", str(size["k"]),
            "--micro-batch-size", str(min(8, n)), "--train-dtype", "float32", "--lr", "1e-5",
            "--output-dir", out_dir,
        ]
    )  # fmt: skip


def run(
    quick: bool = False,
    prompts: int | None = None,
    samples: int | None = None,
    new_tokens: int | None = None,
    k: int | None = None,
    steps: int | None = None,
    ratio: float = 0.1,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Start the two servers, run 1 warm-up + ``steps`` measured steps; returns seconds and shares per phase."""
    import asyncio

    import torch
    from transformers.utils import logging as hf_logging

    import slime_patch.slime.rollout.on_policy_distillation as opd
    from slime.backends.embedded_sglang.launch import launch_server
    from slime.backends.torch_utils.actor import TorchTrainRayActor
    from slime.embedded.models import build_tiny_checkpoint
    from slime.rollout.sglang_rollout import build_sampling_params, generate
    from slime.utils.async_utils import run as run_async
    from slime.utils.http_utils import close_session, post
    from slime.utils.types import Sample

    hf_logging.disable_progress_bar()  # one bar per checkpoint write otherwise
    torch.set_num_threads(threads)
    server_env = {"OMP_NUM_THREADS": str(threads)}
    size = dict(QUICK if quick else FULL)
    given = {"prompts": prompts, "samples": samples, "new_tokens": new_tokens, "k": k, "steps": steps}
    size.update({key: v for key, v in given.items() if v is not None})
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(3, 98, (size["prompt_len"],), generator=gen).tolist() for _ in range(size["prompts"])]

    # Time ta_opd.select_tokens where post_process_rewards calls it (the patch module's global name).
    select_seconds: list[float] = []
    inner_select = opd.select_tokens

    def timed_select(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner_select(*a, **kw)
        finally:
            select_seconds.append(time.perf_counter() - t0)

    totals = {p: 0.0 for p in PHASES}
    extra = {"select_tokens": 0.0, "train_old_log_probs": 0.0}
    kept_ratio = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        # the engines accept weight pushes below the model's parent directory
        models = os.path.join(tmp, "models")
        student = build_tiny_checkpoint(os.path.join(models, "student"), size="student", seed=seed)
        teacher = build_tiny_checkpoint(os.path.join(models, "teacher"), size="teacher", seed=seed + 1)
        servers = []
        opd.select_tokens = timed_select
        try:
            for model, name in ((student, "student"), (teacher, "teacher")):
                log = os.path.join(tmp, f"{name}.log")
                servers.append(launch_server(model, log_file=log, env=server_env))
            student_url, teacher_url = servers[0].url, servers[1].url
            args = _args(student, teacher_url, student_url, os.path.join(models, "out"), size, ratio)
            trainer = TorchTrainRayActor(1, 0)
            trainer.init(args)
            params = dict(build_sampling_params(args), ignore_eos=True)
            for step in range(1 + size["steps"]):
                seconds: dict[str, float] = {}
                batch = [
                    Sample(group_index=i // size["samples"], index=i, tokens=list(prompt_ids[i // size["samples"]]))
                    for i in range(size["prompts"] * size["samples"])
                ]

                t0 = time.perf_counter()

                async def generate_all(batch=batch):
                    return await asyncio.gather(*(generate(args, s, dict(params)) for s in batch))

                batch = list(run_async(generate_all()))
                seconds["generation"] = time.perf_counter() - t0

                t0 = time.perf_counter()

                async def score_all(batch=batch):
                    return await asyncio.gather(*(opd.reward_func(args, s) for s in batch))

                for s, answer in zip(batch, run_async(score_all()), strict=True):
                    s.reward = answer
                seconds["teacher_scoring"] = time.perf_counter() - t0

                select_seconds.clear()
                t0 = time.perf_counter()
                opd.post_process_rewards(args, batch, rollout_id=step)
                seconds["selection"] = time.perf_counter() - t0
                selected = sum(select_seconds)

                data = train_data(batch)
                t0 = time.perf_counter()
                metrics = trainer.train(step, data)
                seconds["train"] = time.perf_counter() - t0

                t0 = time.perf_counter()
                path = trainer.update_weights()
                answer = run_async(post(f"{student_url.rstrip('/')}/update_weights_from_disk", {"model_path": path}))
                if not (isinstance(answer, dict) and answer.get("success")):
                    raise RuntimeError(f"weight push failed: {answer}")
                seconds["weight_sync"] = time.perf_counter() - t0

                if step == 0:
                    continue  # warm-up
                for p in PHASES:
                    totals[p] += seconds[p] / size["steps"]
                extra["select_tokens"] += selected / size["steps"]
                extra["train_old_log_probs"] += metrics["perf/log_probs_time"] / size["steps"]
                n_tokens = sum(data["response_lengths"])
                kept_ratio = sum(map(sum, data["loss_masks"])) / max(n_tokens, 1)
        finally:
            opd.select_tokens = inner_select
            run_async(close_session())
            for server in servers:
                server.stop()

    step_s = sum(totals.values())
    out: dict = {
        "benchmark": "train_step",
        **size,
        "rho": ratio,
        "quick": quick,
        "models": "tiny Qwen3: student (hidden 64, 2 layers), teacher (hidden 128, 4 layers), vocab 128",
        "response_tokens": size["prompts"] * size["samples"] * size["new_tokens"],
        "realised_keep_ratio": kept_ratio,
        "step_seconds": step_s,
        "seconds": {**totals, **extra},
        "threads": threads,
    }
    for p in PHASES:
        out[f"{p}_share"] = totals[p] / max(step_s, 1e-12)
    out["select_tokens_share"] = extra["select_tokens"] / max(step_s, 1e-12)
    out["target_selection_share"] = TARGET_SELECTION_SHARE
    out["meets_selection_target"] = bool(out["select_tokens_share"] < TARGET_SELECTION_SHARE)
    return out


def table(res: dict) -> str:
    lines = [
        f"embedded TA-OPD step: {res['prompts']} prompts x {res['samples']} samples x {res['new_tokens']} tokens, "
        f"K={res['k']}, rho={res['rho']} (realised {res['realised_keep_ratio']:.3f}), mean of {res['steps']} steps, "
        f"{res['threads']} thread(s) per process",
        f"{'phase':<28} {'seconds':>9} {'share':>8}",
    ]
    for p in PHASES:
        lines.append(f"{p:<28} {res['seconds'][p]:9.3f} {res[f'{p}_share']:8.2%}")
        if p == "selection":
            lines.append(f"{'  of which select_tokens':<28} {res['seconds']['select_tokens']:9.3f} "
                         f"{res['select_tokens_share']:8.2%}")  # fmt: skip
        if p == "train":
            old = res["seconds"]["train_old_log_probs"]
            lines.append(f"{'  of which old log-probs':<28} {old:9.3f} {old / max(res['step_seconds'], 1e-12):8.2%}")
    lines.append(f"{'step (serial sum)':<28} {res['step_seconds']:9.3f} {1:8.2%}")
    verdict = met(res["meets_selection_target"])
    lines.append(f"target: select_tokens share < {TARGET_SELECTION_SHARE:.0%} -> {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller sizes: {QUICK}")
    parser.add_argument("--prompts", type=int, default=None, help=f"default {FULL['prompts']}")
    parser.add_argument("--samples", type=int, default=None, help=f"samples per prompt (default {FULL['samples']})")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"default {FULL['new_tokens']}")
    parser.add_argument("--k", type=int, default=None, help=f"top-K (default {FULL['k']})")
    parser.add_argument("--steps", type=int, default=None, help=f"measured steps after 1 warm-up ({FULL['steps']})")
    parser.add_argument("--ratio", type=float, default=0.1, help="selection budget ρ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of each server")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sizes = (args.prompts, args.samples, args.new_tokens, args.k, args.steps)
    res = run(args.quick, *sizes, ratio=args.ratio, seed=args.seed, threads=args.threads)
    emit(table(res), res, args.out, indent=2)


if __name__ == "__main__":
    main()
