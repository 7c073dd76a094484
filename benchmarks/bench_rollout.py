"""Rollout throughput of the embedded engine: against the floor of batched HF ``generate`` and a naive loop.

Usage::

    python benchmarks/bench_rollout.py [--prompts 64] [--new-tokens 64] [--size student] [--out results.json]

Both sides run in the same process on the same tiny random Qwen3 checkpoint and generate the same
number of tokens (``ignore_eos``):

* ``batched``: ``slime.backends.embedded_sglang.engine.Engine`` (continuous batching, KV cache,
  batched prefill, all prompts submitted at once);
* ``hf_generate``: ``model.generate`` of transformers on the same batch at once (greedy, KV cache, the same
  number of new tokens): the floor a user gets from the library itself, with no server and no scheduling;
* ``naive``: one request at a time, one full forward over the whole sequence per new token
  (no KV cache) -- what a server without batching or caching does.

Prints generated tokens/s of each and the ratios; ``run()`` returns the same numbers as a dict, with
``ratios["rollout_tokens_per_s_vs_hf_generate"]`` (engine / HF generate; >= 1: at least as fast as the floor).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
from common import emit, parser  # noqa: E402


def _naive_generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        logits = model(ids).logits[0, -1]
        nxt = torch.argmax(logits).view(1, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt) :].tolist()


def run(
    prompts: int = 64,
    new_tokens: int = 64,
    size: str = "student",
    prompt_len: int = 32,
    seed: int = 0,
    naive_prompts: int = 8,
) -> dict:
    """Measure both paths; returns tokens/s, seconds and the speed-up ratio.

    The naive loop serves one request at a time, so its tokens/s does not depend on how many
    prompts it runs; it runs the first ``naive_prompts`` of the same prompts to keep the run short.
    """
    from transformers import AutoModelForCausalLM

    from slime.backends.embedded_sglang.engine import Engine, GenRequest
    from slime.embedded.models import build_tiny_checkpoint

    gen = torch.Generator().manual_seed(seed)
    batch = [torch.randint(3, 98, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(os.path.join(tmp, "model"), size=size, seed=seed)
        engine = Engine(str(ckpt), device="cpu", max_running_requests=prompts)
        try:
            warm = [GenRequest(rid="w", input_ids=batch[0], max_new_tokens=2, temperature=0.0, ignore_eos=True)]
            engine.generate(warm)
            reqs = [
                GenRequest(rid=str(i), input_ids=p, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
                for i, p in enumerate(batch)
            ]
            t0 = time.perf_counter()
            results = engine.generate(reqs)
            batched_s = time.perf_counter() - t0
        finally:
            engine.shutdown()
        batched_tokens = sum(len(r.output_ids) for r in results)
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), local_files_only=True).eval()
        with torch.inference_mode():
            ids = torch.tensor(batch)  # every prompt has prompt_len tokens: no padding on either side
            hf_kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
            hf_kwargs["pad_token_id"] = model.config.pad_token_id
            model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **{**hf_kwargs, "max_new_tokens": 2})
            t0 = time.perf_counter()
            hf_out = model.generate(ids, attention_mask=torch.ones_like(ids), **hf_kwargs)[:, prompt_len:]
            hf_s = time.perf_counter() - t0
            _naive_generate(model, batch[0], 2)
            t0 = time.perf_counter()
            naive_out = [_naive_generate(model, p, new_tokens) for p in batch[:naive_prompts]]
            naive_s = time.perf_counter() - t0
    naive_tokens = sum(len(o) for o in naive_out)
    hf_tokens = int(hf_out.numel())
    hf_agree = sum(r.output_ids == o for r, o in zip(results, hf_out.tolist(), strict=True)) / len(results)
    # Greedy on both sides: the outputs must agree (up to float ties), a correctness check of the fast path.
    agree = sum(r.output_ids == o for r, o in zip(results, naive_out, strict=False)) / len(naive_out)
    out = {
        "benchmark": "rollout_throughput",
        "model_size": size,
        "prompts": prompts,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "naive_prompts": min(naive_prompts, prompts),
        "batched_tokens_per_s": batched_tokens / batched_s,
        "naive_tokens_per_s": naive_tokens / naive_s,
        "hf_generate_tokens_per_s": hf_tokens / hf_s,
        "hf_generate_seconds": hf_s,
        "hf_generate_greedy_agreement": hf_agree,
        "batched_seconds": batched_s,
        "naive_seconds": naive_s,
        "speedup": (batched_tokens / batched_s) / (naive_tokens / naive_s),
        "greedy_agreement": agree,
        "torch_threads": torch.get_num_threads(),
        "ratios": {"rollout_tokens_per_s_vs_hf_generate": (batched_tokens / batched_s) / (hf_tokens / hf_s)},
    }
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--size", default="student")
    p.add_argument("--naive-prompts", type=int, default=8, help="prompts run by the one-at-a-time loop")
    p.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    a = p.parse_args()
    res = run(a.prompts, a.new_tokens, a.size, naive_prompts=a.naive_prompts)
    line = (
        f"engine: {res['batched_tokens_per_s']:.0f} tok/s  HF generate: {res['hf_generate_tokens_per_s']:.0f} tok/s"
        f"  naive loop: {res['naive_tokens_per_s']:.0f} tok/s   engine/HF generate: "
        f"{res['ratios']['rollout_tokens_per_s_vs_hf_generate']:.2f}x   engine/naive: {res['speedup']:.1f}x   "
        f"greedy agreement: {res['greedy_agreement']:.2f} (naive), {res['hf_generate_greedy_agreement']:.2f} (HF)"
    )
    emit(line + "\n" + json.dumps(res, indent=1), res, a.out)


if __name__ == "__main__":
    main()
