"""Stand-in plug-ins loaded by dotted path in the rollout / RolloutManager tests.

They mimic the shape of the OPD reward function and post-process (teacher prefill, teacher
log-probs, a token mask, step metrics on samples[0]) so the stack's wiring is tested without
depending on the real OPD module; the real one has its own tests.
"""

from __future__ import annotations

import torch

from slime.utils.http_utils import post

CALLS: list[str] = []


async def length_rm(args, sample, **kwargs):
    return float(sample.response_length)


async def teacher_rm(args, sample, **kwargs):
    payload = {
        "input_ids": sample.tokens,
        "sampling_params": {"temperature": args.opd_teacher_temperature, "max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": args.opd_topk_metrics_k,
    }
    return await post(args.rm_url, payload)


def keep_even_positions(args, samples, **kwargs):
    kept = 0
    for s in samples:
        logprobs = [item[0] for item in s.reward["meta_info"]["input_token_logprobs"][1:]]
        s.teacher_log_probs = torch.tensor(logprobs[-s.response_length :], dtype=torch.float32)
        s.loss_mask = [1 if i % 2 == 0 else 0 for i in range(s.response_length)]
        kept += sum(s.loss_mask)
    total = sum(s.response_length for s in samples)
    samples[0].metadata["opd_step_metrics"] = {"opd/realised_keep_ratio": kept / max(total, 1)}
    return [0.0] * len(samples), [0.0] * len(samples)


async def echo_generate(args, sample, sampling_params, evaluation=False):
    """A custom generate function: a fixed two-token answer, no server involved."""
    CALLS.append(f"echo:{evaluation}")
    sample.tokens = [5, 6, 7]
    sample.append_response_tokens(
        args, tokens=[8, 9], log_probs=[-0.5, -0.25], meta_info={"finish_reason": {"type": "stop"}}, text="ab"
    )
    return sample
