"""Teacher scoring of one OPD step: today's path against the one-request-per-sample path without prefix reuse.

Usage::

    python benchmarks/bench_teacher_scoring.py [--prompts 32] [--samples 4] [--prompt-len 26] [--response-len 17]

The step: ``prompts`` prompts x ``samples`` sampled responses each, every sample scored by the teacher as the
OPD reward does it (``slime.rollout.on_policy_distillation.reward_func``: prompt + response, ``max_new_tokens=0``,
input log-probs from the last prompt token, top-16), all samples of the step in flight at once as the rollout
sends them. Two embedded teacher servers serve the same tiny teacher checkpoint; the two paths alternate
repetitions (so they share the machine's load), and the median per path is reported in CPU seconds of the
client and the server (the load-independent measure) and in wall seconds:

* ``on`` (the default): ``--sglang-batch-requests`` sends the samples in flight as batched ``/generate``
  requests (one per prompt length), and the server's engine prefills each distinct prompt once and keeps it in
  the prompt cache; every sample then forwards only its response tokens on top of the prompt's KV, in one
  batched prefill;
* ``off`` (the path before both): one HTTP request per sample, and the server started with
  ``--disable-scoring-prefix-reuse`` (every sample prefilled whole).

``teacher_scoring_time_prefix_reuse_vs_off`` is on / off in CPU seconds (< 1 is faster). The split is reported
too: ``engine_prefix_reuse_vs_off`` (the engine alone, in this process, one batch, prefix reuse on vs off; its
floor is the token count, (P + n·R) / (n·(P + R)) = 0.55 at the defaults) and ``batched_requests_vs_per_sample``
(both servers with prefix reuse, batched vs per-sample requests). Each repetition uses new prompts (nothing
cached from an earlier step); prompt lengths vary by ±2 tokens around ``prompt_len``, as a real step's do. Both
paths return the same log-probs up to float rounding (checked). The defaults are the demo task's shape
(``make demo``: 26 prompt tokens, ~17 response tokens).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
from common import emit, parser, scoring_requests  # noqa: E402

QUICK_KWARGS = {"prompts": 8, "repeats": 3}


def _step_batches(gen, prompts, samples, prompt_len, response_len):
    """A new step's (prompt, response) pairs: ``samples`` responses per prompt, prompt lengths ±2 tokens."""
    lens = [max(2, prompt_len + (i % 5) - 2) for i in range(prompts)]
    heads = [torch.randint(3, 98, (n,), generator=gen).tolist() for n in lens]
    tails = [torch.randint(3, 98, (response_len,), generator=gen).tolist() for _ in range(prompts * samples)]
    return [(heads[i // samples], tail) for i, tail in enumerate(tails)]


def _cpu(pids: list[int]) -> float:
    """CPU seconds of this process and of ``pids`` (the servers)."""
    import psutil

    total = time.process_time()
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _server_paths(ckpt: str, tmp: str, batches: list, top_k: int) -> dict:
    """CPU and wall seconds per step of the OPD reward's teacher scoring over HTTP, per path (see the doc)."""
    import asyncio

    import slime.rollout.on_policy_distillation as opd
    from slime.backends.embedded_sglang.launch import launch_server
    from slime.utils.arguments import parse_args
    from slime.utils.types import Sample

    env = {"OMP_NUM_THREADS": "1"}
    servers = {
        "reuse": launch_server(ckpt, log_file=os.path.join(tmp, "reuse.log"), env=env),
        "whole": launch_server(
            ckpt, log_file=os.path.join(tmp, "whole.log"), env=env, extra_args=["--disable-scoring-prefix-reuse"]
        ),
    }
    # path: (server, batched requests)
    paths = {"on": ("reuse", True), "batched_off": ("reuse", False), "off": ("whole", False)}
    try:
        args = {
            name: parse_args(
                [
                    "--hf-checkpoint",
                    ckpt,
                    "--use-opd",
                    "--opd-type",
                    "sglang",
                    "--rm-url",
                    f"{servers[srv].url}/generate",
                    "--opd-topk-metrics-k",
                    str(top_k),
                    "--rollout-batch-size",
                    "1",
                    "--rollout-max-response-len",
                    "1",
                    "--sglang-batch-requests" if batched else "--no-sglang-batch-requests",
                ]
            )  # fmt: skip
            for name, (srv, batched) in paths.items()
        }
        pids = {name: [servers[srv].pid] for name, (srv, _) in paths.items()}

        def score(name: str, batch: list) -> list:
            samples = [
                Sample(index=i, group_index=i, tokens=p + r, response_length=len(r)) for i, (p, r) in enumerate(batch)
            ]

            async def all_samples():
                return await asyncio.gather(*(opd.reward_func(args[name], s) for s in samples))

            return asyncio.run(all_samples())

        for name in paths:  # warm-up (first-call allocations, connections)
            score(name, batches[0][:4])
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        wall: dict[str, list[float]] = {name: [] for name in paths}
        max_diff = 0.0
        for batch in batches[1:]:
            answers = {}
            for name in paths:  # new prompts every step: nothing is cached from an earlier one
                t0, c0 = time.perf_counter(), _cpu(pids[name])
                answers[name] = score(name, batch)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu(pids[name]) - c0)
            for a, b in zip(answers["on"], answers["off"], strict=True):
                va = [x[0] for x in a["meta_info"]["input_token_logprobs"][1:]]
                vb = [x[0] for x in b["meta_info"]["input_token_logprobs"][1:]]
                max_diff = max([max_diff, *(abs(x - y) for x, y in zip(va, vb, strict=True))])
        return {
            "cpu": {k: statistics.median(v) for k, v in cpu.items()},
            "wall": {k: statistics.median(v) for k, v in wall.items()},
            "max_abs_logprob_diff": max_diff,
        }
    finally:
        for srv in servers.values():
            srv.stop()


def _engine_only(ckpt: str, batches: list, top_k: int) -> dict:
    """CPU seconds of one batched engine call per step in this process, prefix reuse on vs off."""
    from slime.backends.embedded_sglang.engine import Engine

    n = len(batches[0])
    engines = {
        "on": Engine(ckpt, max_running_requests=n, scoring_prefix_reuse=True),
        "off": Engine(ckpt, max_running_requests=n, scoring_prefix_reuse=False),
    }
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for engine in engines.values():
            engine.generate(scoring_requests(batches[0][:4], top_k))
        for batch in batches[1:]:
            for name, engine in engines.items():
                engine.flush_cache().result()
                reqs = scoring_requests(batch, top_k)
                c0 = time.process_time()
                engine.generate(reqs)
                cpu[name].append(time.process_time() - c0)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return {k: statistics.median(v) for k, v in cpu.items()}


def run(
    prompts: int = 32,
    samples: int = 4,
    prompt_len: int = 26,
    response_len: int = 17,
    size: str = "teacher",
    repeats: int = 5,
    top_k: int = 16,
    seed: int = 0,
) -> dict:
    """Median CPU (and wall) seconds to score one step's ``prompts * samples`` samples, per path (module doc)."""
    from slime.embedded.models import build_tiny_checkpoint

    if prompts < 1 or samples < 1 or prompt_len < 2 or response_len < 1 or repeats < 1:
        raise ValueError(
            f"need prompts, samples, response_len, repeats >= 1 and prompt_len >= 2; got {prompts}, {samples}, "
            f"{response_len}, {repeats}, {prompt_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    batches = [_step_batches(gen, prompts, samples, prompt_len, response_len) for _ in range(repeats + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(build_tiny_checkpoint(os.path.join(tmp, "teacher"), size=size, seed=seed))
        http = _server_paths(ckpt, tmp, batches, top_k)
        engine = _engine_only(ckpt, batches, top_k)
    cpu, wall = http["cpu"], http["wall"]
    return {
        "benchmark": "teacher_scoring_prefix_reuse",
        "model_size": size,
        "prompts": prompts,
        "samples_per_prompt": samples,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "repeats": repeats,
        "cpu_seconds_on_median": cpu["on"],
        "cpu_seconds_off_median": cpu["off"],
        "cpu_seconds_batched_off_median": cpu["batched_off"],
        "wall_seconds_on_median": wall["on"],
        "wall_seconds_off_median": wall["off"],
        "wall_time_ratio_on_vs_off": wall["on"] / wall["off"],
        "engine_cpu_seconds_on_median": engine["on"],
        "engine_cpu_seconds_off_median": engine["off"],
        "engine_prefix_reuse_vs_off": engine["on"] / engine["off"],
        "batched_requests_vs_per_sample": cpu["on"] / cpu["batched_off"],
        "max_abs_logprob_diff": http["max_abs_logprob_diff"],
        "torch_threads": torch.get_num_threads(),
        "ratios": {"teacher_scoring_time_prefix_reuse_vs_off": cpu["on"] / cpu["off"]},
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (n)")
    p.add_argument("--prompt-len", type=int, default=26)
    p.add_argument("--response-len", type=int, default=17)
    p.add_argument("--size", default="teacher", help="a slime.embedded.models size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    a = p.parse_args()
    res = run(a.prompts, a.samples, a.prompt_len, a.response_len, a.size, a.repeats)
    ratio = res["ratios"]["teacher_scoring_time_prefix_reuse_vs_off"]
    line = (
        f"teacher scoring, {a.prompts} prompts x {a.samples} samples: batched + prefix reuse "
        f"{res['cpu_seconds_on_median']:.3f} CPU s, per-sample without reuse {res['cpu_seconds_off_median']:.3f} CPU s"
        f"   ratio {ratio:.2f} (wall {res['wall_time_ratio_on_vs_off']:.2f}; engine alone "
        f"{res['engine_prefix_reuse_vs_off']:.2f}, batching alone {res['batched_requests_vs_per_sample']:.2f})"
    )
    emit(line + "\n" + json.dumps(res, indent=1), res, a.out)


if __name__ == "__main__":
    main()
