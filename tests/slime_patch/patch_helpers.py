"""Helpers: hand-built Samples and SGLang-shaped teacher answers for the patch contract tests."""

from __future__ import annotations

import argparse

import torch

from slime.utils.types import Sample

VOCAB = 40


def _topk(logits: torch.Tensor, k: int) -> list[list]:
    """SGLang-shaped top-K list ``[[logprob, id, None], ...]`` of one position, best first."""
    logp = torch.log_softmax(logits, dim=-1)
    vals, ids = logp.topk(k)
    return [[float(v), int(i), None] for v, i in zip(vals.tolist(), ids.tolist(), strict=True)]


def teacher_answer(tokens: list[int], start: int, teacher_logits: torch.Tensor, k: int, ids: list[int] | None = None):
    """The answer a teacher prefill would give for ``tokens`` with ``logprob_start_len = start``.

    ``teacher_logits[i]`` is the teacher's distribution of token i (row 0 unused). Entry 0 of the
    input lists is None when ``start == 0`` (the first token has no log-prob), as SGLang does.
    """
    token_logprobs, top, id_logprobs = [], [], []
    for pos in range(start, len(tokens)):
        if pos == 0:
            token_logprobs.append([None, tokens[0], None])
            top.append(None)
            id_logprobs.append(None)
            continue
        logp = torch.log_softmax(teacher_logits[pos], dim=-1)
        token_logprobs.append([float(logp[tokens[pos]]), tokens[pos], None])
        top.append(_topk(teacher_logits[pos], k) if k else None)
        id_logprobs.append([[float(logp[i]), int(i), None] for i in ids] if ids else None)
    meta = {
        "id": "rid",
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(tokens),
        "completion_tokens": 0,
        "input_token_logprobs": token_logprobs,
        "output_token_logprobs": [],
        "input_top_logprobs": top if k else [],
        "output_top_logprobs": [],
    }
    if ids:
        meta["input_token_ids_logprobs"] = id_logprobs
    return {"text": "", "output_ids": [], "meta_info": meta}


def make_sample(
    index: int,
    prompt_len: int,
    response_len: int,
    k: int,
    *,
    seed: int,
    loss_mask: list[int] | None = None,
    with_student_topk: bool = True,
    with_teacher: bool = True,
    start: int | None = None,
) -> Sample:
    """A finished sample whose sampled tokens sit inside the student's top-K (as sampling would give)."""
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(prompt_len + response_len, VOCAB, generator=g) * 2.0
    teacher_logits = student_logits + torch.randn(prompt_len + response_len, VOCAB, generator=g) * 1.5
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=g).tolist()
    response, rollout_logp, student_top = [], [], []
    for pos in range(prompt_len, prompt_len + response_len):
        entries = _topk(student_logits[pos], k) if k else []
        choice = int(torch.randint(0, max(k, 1), (1,), generator=g))
        token = entries[choice][1] if k else int(torch.randint(0, VOCAB, (1,), generator=g))
        response.append(token)
        rollout_logp.append(float(torch.log_softmax(student_logits[pos], -1)[token]))
        student_top.append(entries)
    tokens = prompt + response
    sample = Sample(
        index=index,
        group_index=index // 2,
        prompt=f"prompt {index}",
        tokens=tokens,
        response=f"response {index}",
        response_length=response_len,
        label=str(index),
        loss_mask=list(loss_mask) if loss_mask is not None else [1] * response_len,
        rollout_log_probs=rollout_logp,
        status=Sample.Status.COMPLETED,
        metadata={"source": "unit"},
    )
    if with_student_topk and k:
        sample.metadata["student_top_logprobs"] = student_top
    if with_teacher:
        sample.reward = teacher_answer(tokens, prompt_len - 1 if start is None else start, teacher_logits, k)
    sample.metadata["_teacher_logits"] = teacher_logits  # for stub servers; dropped before comparisons
    return sample


def opd_args(**overrides) -> argparse.Namespace:
    """The args upstream OPD + the TA-OPD flags (defaults of docs/method.md) would give."""
    from slime_patch.slime.utils.ta_opd_arguments import add_ta_opd_arguments

    args = add_ta_opd_arguments(argparse.ArgumentParser()).parse_args([])
    base = dict(
        use_opd=True,
        opd_type="sglang",
        opd_kl_coef=1.0,
        rm_url=None,
        rollout_temperature=1.0,
        reward_key=None,
        http_max_retries=2,
        http_timeout=30.0,
    )
    for key, value in {**base, **overrides}.items():
        setattr(args, key, value)
    return args


def make_batch(k: int = 8, lengths=(7, 5, 9, 6), seed: int = 0, **kwargs) -> list[Sample]:
    samples = [
        make_sample(i, prompt_len=3 + i, response_len=n, k=k, seed=seed + i, **kwargs) for i, n in enumerate(lengths)
    ]
    for s in samples:
        s.metadata.pop("_teacher_logits")
    return samples


PRIVILEGED_PROMPT = [11, 12, 13, 14]  # token ids of a stand-in privileged teacher prompt


def privileged_prompt_hook(args, sample, payload: dict) -> dict:
    """A ``--custom-teacher-prefill-function-path`` hook: the teacher scores the response after another prompt."""
    response = list(sample.tokens[len(sample.tokens) - sample.response_length :])
    payload["input_ids"] = PRIVILEGED_PROMPT + response
    payload["logprob_start_len"] = len(PRIVILEGED_PROMPT) - 1
    return payload


def broken_prefill_hook(args, sample, payload: dict) -> None:
    """A hook that forgets to return the payload."""
    payload["input_ids"] = []
