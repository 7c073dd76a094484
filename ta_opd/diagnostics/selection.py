"""Selector scores and top-N masks on a fixed-context bank, through the training code (docs/method.md §3–5, §6.4).

The bank's tokens are treated as one rollout step: the §2 statistics come from
``ta_opd.stats.compute_token_stats``, the normalised features and every selector's score from
``ta_opd.selectors``, and top-N masks from ``ta_opd.budget.apply_global_budget`` (with
``min_keep = 0``, so every selector keeps exactly the same number of tokens: *matched* top-N).
This module is the only place the diagnostic touches those interfaces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def make_token_batch(
    student_ids: torch.Tensor,  # [N, K] (-1 pad)
    student_topk_logp: torch.Tensor,  # [N, K] (-inf pad)
    teacher_ids: torch.Tensor,  # [N, K]
    teacher_topk_logp: torch.Tensor,  # [N, K]
    sampled_ids: torch.Tensor,  # [N]
    student_logp_sampled: torch.Tensor,  # [N]
    teacher_logp_sampled: torch.Tensor,  # [N]
    position: torch.Tensor | None = None,  # [N]
    response_length: torch.Tensor | None = None,  # [N]
    sample_index: torch.Tensor | None = None,  # [N]
    loss_mask: torch.Tensor | None = None,  # [N] bool
    teacher_logp_on_student_ids: torch.Tensor | None = None,  # [N, K] exact-C input
) -> Any:
    """A ``ta_opd.topk.TokenBatch`` from padded top-K tensors (missing per-token fields default sensibly)."""
    from ta_opd.topk import TokenBatch

    n = sampled_ids.shape[0]
    device = sampled_ids.device
    if position is None:
        position = torch.zeros(n, dtype=torch.long, device=device)
    if response_length is None:
        response_length = torch.ones(n, dtype=torch.long, device=device)
    if sample_index is None:
        sample_index = torch.zeros(n, dtype=torch.long, device=device)
    if loss_mask is None:
        loss_mask = torch.ones(n, dtype=torch.bool, device=device)
    kwargs: dict[str, Any] = dict(
        student_topk_ids=student_ids.long(),
        student_topk_logp=student_topk_logp,
        teacher_topk_ids=teacher_ids.long(),
        teacher_topk_logp=teacher_topk_logp,
        sampled_ids=sampled_ids.long(),
        student_logp=student_logp_sampled,
        teacher_logp=teacher_logp_sampled,
        loss_mask=loss_mask.bool(),
        sample_index=sample_index.long(),
        position=position.long(),
        response_length=response_length.long(),
    )
    if teacher_logp_on_student_ids is not None:
        kwargs[_exact_field()] = teacher_logp_on_student_ids
        if "exact_available" in {f.name for f in dataclasses.fields(TokenBatch)}:
            kwargs["exact_available"] = torch.ones(n, dtype=torch.bool, device=device)
    return TokenBatch(**kwargs)


def _exact_field() -> str:
    """Name of the TokenBatch field holding the teacher's log-probs on the student's top-K ids."""
    from ta_opd.topk import TokenBatch

    names = {f.name for f in dataclasses.fields(TokenBatch)}
    for candidate in ("teacher_logp_on_student_topk", "teacher_logp_on_student_ids"):
        if candidate in names:
            return candidate
    raise ValueError(f"ta_opd.topk.TokenBatch has no exact-C field (fields: {sorted(names)})")


def selection_config(topk_k: int, exact: bool = False, **overrides: Any) -> Any:
    """A ``SelectionConfig`` with docs/method.md defaults, the bank's K and optional overrides."""
    from ta_opd.config import SelectionConfig

    fields = {f.name for f in dataclasses.fields(SelectionConfig)}
    values: dict[str, Any] = {"topk_k": int(topk_k)}
    if exact and "exact_cmass" in fields:
        values["exact_cmass"] = True
    values.update(overrides)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"SelectionConfig has no field(s) {unknown}")
    return SelectionConfig(**values)


def token_stats(batch: Any, topk_k: int, **overrides: Any) -> Any:
    """``ta_opd.stats.compute_token_stats`` of a batch with the default config at K."""
    from ta_opd.stats import compute_token_stats

    return compute_token_stats(batch, selection_config(topk_k, **overrides))


def bank_scores(batch: Any, cfg: Any, rollout_index: int = 0) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(stats, features, {selector name: score [N]}) of the whole bank as one rollout step."""
    from ta_opd.api import select_tokens

    result = select_tokens(batch, cfg, rollout_index)
    return result.stats, result.features, dict(result.scores)


def topn_mask(name: str, scores: dict[str, torch.Tensor], batch: Any, features: Any, ratio: float) -> torch.Tensor:
    """Tokens kept by selector ``name`` at budget ``ratio`` with no min-keep top-up (matched top-N).

    Uses the selector's own ordering (ascending variants) and Q3 candidate set from
    ``ta_opd.selectors.SELECTORS``, so the same tokens win as in a training step. Q3 masks may keep
    fewer than n tokens (only Q3 candidates are eligible), as in training.
    """
    from ta_opd.budget import apply_global_budget
    from ta_opd.selectors import SELECTORS

    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; expected one of {sorted(SELECTORS)}")
    if name not in scores:
        raise ValueError(f"selector {name!r} has no score (scored: {sorted(scores)})")
    if name == "split_budget_ca":
        raise ValueError("split_budget_ca is a two-score budget, not a single ranking; it has no matched top-N")
    spec = SELECTORS[name]
    result = apply_global_budget(
        scores[name],
        batch.loss_mask.bool(),
        batch.sample_index,
        batch.position,
        ratio,
        0,  # no min-keep top-up: every selector keeps exactly n tokens
        scores.get("ca_softor", scores[name]),
        ascending=spec.ascending,
        candidates=features.is_q3 if spec.uses_q3 else None,
    )
    return result.mask
