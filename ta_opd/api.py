"""The one-call entry point: a step's tokens + config → new loss masks + metrics (docs/method.md §2–5, §9)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ta_opd.budget import BudgetResult, apply_global_budget, apply_split_budget
from ta_opd.config import SelectionConfig
from ta_opd.metrics import selection_metrics
from ta_opd.selectors import SELECTORS, Features, compute_features, selector_scores
from ta_opd.stats import TokenStats, compute_token_stats
from ta_opd.topk import TokenBatch


@dataclass
class SelectionResult:
    mask: Tensor  # [N] bool: the new loss mask (kept tokens)
    metrics: dict[str, float]
    stats: TokenStats | None
    features: Features | None
    scores: Mapping[str, Tensor]  # every selector's score [N], computed on access (empty without top-K lists)
    budget: BudgetResult


def _check_finite(batch: TokenBatch, valid: Tensor, cfg: SelectionConfig) -> tuple[Tensor, int]:
    """Apply the non-finite log-prob policy (see ta_opd.config) to the valid tokens."""
    # rows whose rollout log-prob was never recorded (student_logp_known False) are not faults
    known_student = batch.student_logp_known if batch.student_logp_known is not None else torch.ones_like(valid)
    bad = valid & (~torch.isfinite(batch.teacher_logp) | (known_student & ~torch.isfinite(batch.student_logp)))
    n_bad = int(bad.sum())
    if n_bad and cfg.nonfinite_policy == "error":
        rows = bad.nonzero(as_tuple=True)[0][:5].tolist()
        where = ", ".join(
            f"sample {int(batch.sample_index[r])} position {int(batch.position[r])} "
            f"(teacher {float(batch.teacher_logp[r])}, student {float(batch.student_logp[r])})"
            for r in rows
        )
        raise ValueError(
            f"{n_bad} valid token(s) have a non-finite sampled-token log-prob: {where}. "
            "A server returned NaN/inf; fix the server or set nonfinite_policy='drop' to mask them out."
        )
    return valid & ~bad, n_bad


def select_tokens(batch: TokenBatch, cfg: SelectionConfig, rollout_index: int = 0) -> SelectionResult:
    """Statistics → normalisation → scores → global budget → masks and metrics for one rollout step."""
    cfg.validate()
    batch.validate(cfg)
    valid, n_bad = _check_finite(batch, batch.loss_mask.clone(), cfg)
    stats = features = None
    scores: Mapping[str, Tensor] = {}
    if batch.has_topk:
        stats = compute_token_stats(batch, cfg)
        features = compute_features(stats, cfg)
        scores = selector_scores(features, cfg, rollout_index)
    if not cfg.selecting:
        budget = apply_global_budget(
            scores.get("full", valid.float()), valid, batch.sample_index, batch.position, 1.0, 0, valid.float()
        )
    else:
        assert features is not None  # batch.validate(cfg) guarantees top-K lists when selecting
        spec = SELECTORS.get(cfg.mask)
        fallback = scores["ca_softor"]  # min-keep's order (docs/method.md §5)
        if cfg.mask == "split_budget_ca":
            budget = apply_split_budget(
                features.h,
                scores[cfg.mask],
                valid,
                batch.sample_index,
                batch.position,
                cfg.ratio,
                cfg.gamma,
                cfg.min_keep_per_sample,
                fallback,
            )
        else:
            budget = apply_global_budget(
                scores[cfg.mask],
                valid,
                batch.sample_index,
                batch.position,
                cfg.ratio,
                cfg.min_keep_per_sample,
                fallback,
                ascending=spec.ascending,
                candidates=features.is_q3 if spec.uses_q3 else None,
            )
    metrics = selection_metrics(
        valid,
        budget.mask,
        batch.student_logp,
        batch.teacher_logp,
        cfg.ratio if cfg.selecting else 1.0,
        features,
        stats,
    )
    metrics["opd/nonfinite_logp_tokens"] = float(n_bad)
    metrics["opd/budget_n"] = float(budget.n_budget)
    metrics["opd/min_keep_added"] = float(budget.n_min_keep_added)
    return SelectionResult(budget.mask, metrics, stats, features, scores, budget)
