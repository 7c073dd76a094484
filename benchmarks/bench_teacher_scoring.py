"""Teacher scoring of one OPD step with the shared-prompt prefix reuse on vs off (the embedded engine).

Usage::

    python benchmarks/bench_teacher_scoring.py [--prompts 32] [--samples 4] [--prompt-len 26] [--response-len 17]

The step: ``prompts`` prompts x ``samples`` sampled responses each, every sample scored by the teacher as
the OPD reward does it (prompt + response, ``max_new_tokens=0``, input log-probs from the last prompt token,
top-16). Both sides run in this process on the same tiny teacher checkpoint and the same requests,
alternating repetitions (so they share the machine's load); the median per side is reported, in CPU
seconds of this process (the engines' worker threads; idle engines use next to none) and in wall seconds:

* ``on``: ``Engine(scoring_prefix_reuse=True)`` (the default): each distinct prompt is prefilled once and kept
  in the prompt cache; every sample then forwards only its response tokens on top of the prompt's KV;
* ``off``: ``scoring_prefix_reuse=False``: every sample is prefilled whole (prompt + response).

Each repetition starts from an empty prompt cache (a new step's prompts are new). Both sides return the
same log-probs up to float rounding (checked). The defaults are the demo task's shape (``make demo``: 26
prompt tokens, ~17 response tokens); ``run()`` returns a dict with
``ratios["teacher_scoring_time_prefix_reuse_vs_off"]`` (on / off in CPU seconds; < 1 is faster).
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
    """Median CPU (and wall) seconds to score one step's ``prompts * samples`` samples, prefix reuse on and off."""
    from slime.backends.embedded_sglang.engine import Engine
    from slime.embedded.models import build_tiny_checkpoint

    if prompts < 1 or samples < 1 or prompt_len < 2 or response_len < 1 or repeats < 1:
        raise ValueError(
            f"need prompts, samples, response_len, repeats >= 1 and prompt_len >= 2; got {prompts}, {samples}, "
            f"{response_len}, {repeats}, {prompt_len}"
        )
    gen = torch.Generator().manual_seed(seed)

    def step_batch() -> list[tuple[list[int], list[int]]]:
        heads = [torch.randint(3, 98, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
        tails = [torch.randint(3, 98, (response_len,), generator=gen).tolist() for _ in range(prompts * samples)]
        return [(heads[i // samples], tail) for i, tail in enumerate(tails)]

    times: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    max_diff = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(os.path.join(tmp, "teacher"), size=size, seed=seed)
        engines = {
            "on": Engine(str(ckpt), max_running_requests=prompts * samples, scoring_prefix_reuse=True),
            "off": Engine(str(ckpt), max_running_requests=prompts * samples, scoring_prefix_reuse=False),
        }
        try:
            for engine in engines.values():  # warm-up (first-call allocations)
                engine.generate(scoring_requests(step_batch()[:samples], top_k))
            for _ in range(repeats):
                batch = step_batch()  # new prompts every step: nothing cached from an earlier step
                answers = {}
                for name, engine in engines.items():
                    engine.flush_cache().result()
                    reqs = scoring_requests(batch, top_k)
                    t0, c0 = time.perf_counter(), time.process_time()
                    answers[name] = engine.generate(reqs)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                for a, b in zip(answers["on"], answers["off"], strict=True):
                    on_vals, off_vals = a.input_token_logprobs_val[1:], b.input_token_logprobs_val[1:]
                    max_diff = max([max_diff, *(abs(x - y) for x, y in zip(on_vals, off_vals, strict=True))])
        finally:
            for engine in engines.values():
                engine.shutdown()
    on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    return {
        "benchmark": "teacher_scoring_prefix_reuse",
        "model_size": size,
        "prompts": prompts,
        "samples_per_prompt": samples,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "repeats": repeats,
        "cpu_seconds_on_median": on,
        "cpu_seconds_off_median": off,
        "wall_seconds_on_median": statistics.median(times["on"]),
        "wall_seconds_off_median": statistics.median(times["off"]),
        "wall_time_ratio_on_vs_off": statistics.median(times["on"]) / statistics.median(times["off"]),
        "max_abs_logprob_diff": max_diff,
        "torch_threads": torch.get_num_threads(),
        "ratios": {"teacher_scoring_time_prefix_reuse_vs_off": on / off},
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
        f"teacher scoring, {a.prompts} prompts x {a.samples} samples: prefix reuse {res['cpu_seconds_on_median']:.3f} "
        f"CPU s, off {res['cpu_seconds_off_median']:.3f} CPU s   ratio {ratio:.2f} "
        f"(wall {res['wall_time_ratio_on_vs_off']:.2f})"
    )
    emit(line + "\n" + json.dumps(res, indent=1), res, a.out)


if __name__ == "__main__":
    main()
