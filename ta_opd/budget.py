"""The global token budget over all samples of one rollout step (METHOD.md §5).

n = max(1, ceil(ρ · N_valid)) tokens with the best scores are kept, pooled over every sample of
the step (not a per-sequence quota). Ties: higher score first, then earlier position in its
sample, then earlier sample; ascending variants take the lowest scores first, and among equal
scores the later position first, then the earlier sample. Q3 masks compete only among Q3
candidates (at most n kept). Then every sample with a valid token but fewer than
``min_keep_per_sample`` kept tokens gets its best remaining tokens by the ca_softor score.
Everything is a handful of stable sorts: no per-token Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# ρ·N is computed in floating point: 0.1·30 = 3.0000000000000004 must give 3, not 4.
CEIL_TOLERANCE = 1e-9


@dataclass
class BudgetResult:
    mask: Tensor  # [N] bool: kept tokens
    n_budget: int  # n = max(1, ceil(ρ·N_valid)) (N_valid when no masking)
    n_kept: int  # tokens kept, min-keep included
    n_valid: int
    n_min_keep_added: int  # tokens added by the min-keep rule
    realised_ratio: float  # n_kept / N_valid (can exceed ρ through min-keep)


def budget_size(ratio: float, n_valid: int) -> int:
    """n = max(1, ceil(ρ · N_valid)), with a 1e-9 tolerance on the product (METHOD.md §5)."""
    return max(1, math.ceil(ratio * n_valid - CEIL_TOLERANCE))


def ranked_order(score: Tensor, sample_index: Tensor, position: Tensor, eligible: Tensor, ascending: bool) -> Tensor:
    """Row indices, eligible rows first, in the budget's order (METHOD.md §5 tie rule)."""
    perm = torch.argsort(sample_index, stable=True)  # lowest-priority key first: sample asc
    pos_key = -position if ascending else position  # ascending variants: later position first
    perm = perm[torch.argsort(pos_key[perm], stable=True)]
    # NaN scores rank last in either direction (normalised features are never NaN; custom scores might be)
    s = torch.nan_to_num(score.to(torch.float64), nan=math.inf if ascending else -math.inf)
    score_key = s if ascending else -s
    perm = perm[torch.argsort(score_key[perm], stable=True)]
    perm = perm[torch.argsort((~eligible[perm]).to(torch.int8), stable=True)]
    return perm


def _take_top(
    n: int, score: Tensor, sample_index: Tensor, position: Tensor, eligible: Tensor, ascending: bool = False
) -> Tensor:
    mask = torch.zeros_like(eligible)
    n = min(n, int(eligible.sum()))
    if n > 0:
        mask[ranked_order(score, sample_index, position, eligible, ascending)[:n]] = True
    return mask


def min_keep_top_up(
    mask: Tensor, valid: Tensor, sample_index: Tensor, position: Tensor, min_keep: int, fallback_score: Tensor
) -> Tensor:
    """Give every sample with a valid token at least ``min_keep`` kept tokens, best fallback score first."""
    if min_keep <= 0 or not bool(valid.any()):
        return mask
    n_samples = int(sample_index.max().item()) + 1
    ones = torch.ones_like(sample_index, dtype=torch.long)
    zeros = torch.zeros(n_samples, dtype=torch.long, device=mask.device)
    valid_count = zeros.index_add(0, sample_index, ones * valid)
    kept_count = zeros.index_add(0, sample_index, ones * (mask & valid))
    deficit = torch.clamp_min(torch.clamp_max(valid_count, min_keep) - kept_count, 0)
    if not bool((deficit > 0).any()):
        return mask
    remaining = (valid & ~mask).nonzero(as_tuple=True)[0]
    rs, rp = sample_index[remaining], position[remaining]
    rf = torch.nan_to_num(fallback_score[remaining].to(torch.float64), nan=-math.inf)
    order = torch.argsort(rp, stable=True)  # position asc
    order = order[torch.argsort(-rf[order], stable=True)]  # fallback score desc
    order = order[torch.argsort(rs[order], stable=True)]  # grouped by sample
    sorted_s = rs[order]
    rank = torch.arange(sorted_s.numel(), device=mask.device) - torch.searchsorted(sorted_s, sorted_s)
    take = rank < deficit[sorted_s]
    out = mask.clone()
    out[remaining[order[take]]] = True
    return out


def apply_global_budget(
    score: Tensor,
    valid: Tensor,
    sample_index: Tensor,
    position: Tensor,
    ratio: float,
    min_keep_per_sample: int,
    fallback_score: Tensor,
    ascending: bool = False,
    candidates: Tensor | None = None,
) -> BudgetResult:
    """Keep the n best-scored valid tokens of the step, then apply min-keep (METHOD.md §5)."""
    n_valid = int(valid.sum())
    if ratio >= 1.0:
        return BudgetResult(valid.clone(), n_valid, n_valid, n_valid, 0, 1.0 if n_valid else 0.0)
    if not ratio > 0:
        raise ValueError(f"budget ratio must be > 0, got {ratio}")
    if n_valid == 0:
        return BudgetResult(torch.zeros_like(valid), 0, 0, 0, 0, 0.0)
    n = budget_size(ratio, n_valid)
    eligible = valid if candidates is None else (valid & candidates)
    kept = _take_top(n, score, sample_index, position, eligible, ascending)
    return _finish(kept, valid, sample_index, position, n, min_keep_per_sample, fallback_score)


def apply_split_budget(
    first_score: Tensor,
    second_score: Tensor,
    valid: Tensor,
    sample_index: Tensor,
    position: Tensor,
    ratio: float,
    gamma: float,
    min_keep_per_sample: int,
    fallback_score: Tensor,
) -> BudgetResult:
    """split_budget_ca (METHOD.md §4): round(γ·n) by the first score, n − that by the second.

    Both parts are picked from all valid tokens independently; when they overlap, the union is
    topped up to n by the fallback (ca_softor) score. round() is Python's (half to even), as in the
    released code's ``int(round(gamma * n))``: γ = 0.5, n = 5 gives 2 tokens by H̃ and 3 by the second score.
    """
    n_valid = int(valid.sum())
    if ratio >= 1.0:
        return BudgetResult(valid.clone(), n_valid, n_valid, n_valid, 0, 1.0 if n_valid else 0.0)
    if n_valid == 0:
        return BudgetResult(torch.zeros_like(valid), 0, 0, 0, 0, 0.0)
    n = budget_size(ratio, n_valid)
    n_first = min(n, round(gamma * n))
    kept = _take_top(n_first, first_score, sample_index, position, valid)
    kept |= _take_top(n - n_first, second_score, sample_index, position, valid)
    short = n - int(kept.sum())
    if short > 0:
        kept |= _take_top(short, fallback_score, sample_index, position, valid & ~kept)
    return _finish(kept, valid, sample_index, position, n, min_keep_per_sample, fallback_score)


def _finish(
    kept: Tensor,
    valid: Tensor,
    sample_index: Tensor,
    position: Tensor,
    n: int,
    min_keep: int,
    fallback_score: Tensor,
) -> BudgetResult:
    before = int(kept.sum())
    kept = min_keep_top_up(kept, valid, sample_index, position, min_keep, fallback_score)
    n_kept, n_valid = int(kept.sum()), int(valid.sum())
    return BudgetResult(kept, n, n_kept, n_valid, n_kept - before, n_kept / n_valid if n_valid else 0.0)
