"""The global token budget over all samples of one rollout step (docs/method.md §5).

n = max(1, ceil(ρ · N_valid)) tokens with the best scores are kept, pooled over every sample of
the step (not a per-sequence quota). Ties: higher score first, then earlier position in its
sample, then earlier sample; ascending variants take the lowest scores first, and among equal
scores the later position first, then the earlier sample. Q3 masks compete only among Q3
candidates (at most n kept). Then every sample with a valid token but fewer than
``min_keep_per_sample`` kept tokens gets its best remaining tokens by the ca_softor score.
Everything is a partial sort plus a few stable sorts of tied rows: no per-token Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ta_opd.order_stats import kth_values

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
    """n = max(1, ceil(ρ · N_valid)), with a 1e-9 tolerance on the product (docs/method.md §5)."""
    return max(1, math.ceil(ratio * n_valid - CEIL_TOLERANCE))


def _order_rows(rows: Tensor, score: Tensor, sample_index: Tensor, position: Tensor, ascending: bool) -> Tensor:
    """``rows`` sorted by (score desc, position asc, sample asc) or (score asc, position desc, sample asc)."""
    if rows.numel() == 0:
        return rows
    samples, pos = sample_index[rows], position[rows]
    pos_key = -pos if ascending else pos  # ascending variants: later position first
    pos_key = pos_key - pos_key.min()
    # the two tie keys folded into one int64 (position-major), so one stable sort handles both
    tie_key = pos_key * (int(samples.max().item()) + 1) + samples
    perm = torch.argsort(tie_key, stable=True)
    # NaN scores rank last in either direction (normalised features are never NaN; custom scores might be)
    s = torch.nan_to_num(score[rows].to(torch.float64), nan=math.inf if ascending else -math.inf)
    score_key = s if ascending else -s
    perm = perm[torch.argsort(score_key[perm], stable=True)]
    return rows[perm]


def ranked_order(score: Tensor, sample_index: Tensor, position: Tensor, eligible: Tensor, ascending: bool) -> Tensor:
    """Row indices, eligible rows first, each part in the budget's order (docs/method.md §5 tie rule)."""
    eligible_rows = eligible.nonzero(as_tuple=True)[0]
    other_rows = (~eligible).nonzero(as_tuple=True)[0]
    return torch.cat(
        [
            _order_rows(eligible_rows, score, sample_index, position, ascending),
            _order_rows(other_rows, score, sample_index, position, ascending),
        ]
    )


def _take_top(
    n: int, score: Tensor, sample_index: Tensor, position: Tensor, eligible: Tensor, ascending: bool = False
) -> Tensor:
    """Mask of the first ``n`` eligible rows in ``_order_rows``' order, without sorting them all.

    The n-th best score v is found in linear time (``ta_opd.order_stats``); every row strictly
    better than v is kept, and only the rows tied at v are ordered by the tie rule. The same set
    as ``_order_rows(...)[:n]``: that order is (score key, tie key, row) and the kept set is a prefix.
    """
    mask = torch.zeros_like(eligible)
    rows = eligible.nonzero(as_tuple=True)[0]
    n = min(n, rows.numel())
    if n <= 0:
        return mask
    if n == rows.numel():
        mask[rows] = True
        return mask
    nan = math.inf if ascending else -math.inf  # NaN ranks last in either direction, as in _order_rows
    s = np.nan_to_num(score[rows].detach().to(device="cpu", dtype=torch.float64).numpy(), nan=nan)
    if not ascending:
        s = -s  # the key sorts ascending either way
    v = kth_values(s, [n - 1])[0]
    better = s < v
    n_better = int(np.count_nonzero(better))
    tied = np.flatnonzero(s == v)
    rows_np = rows.cpu().numpy()
    chosen = [rows_np[better]]
    if n > n_better:
        t_rows = rows_np[tied]
        pos = position[torch.from_numpy(t_rows).to(position.device)].cpu().numpy()
        smp = sample_index[torch.from_numpy(t_rows).to(sample_index.device)].cpu().numpy()
        # ties: position asc (desc for ascending variants), then sample asc, then row order (lexsort is stable)
        order = np.lexsort((smp, -pos if ascending else pos))
        chosen.append(t_rows[order[: n - n_better]])
    mask[torch.from_numpy(np.concatenate(chosen)).to(mask.device)] = True
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
    # only rows of samples that are short compete (each sample is topped up from its own rows)
    remaining = (valid & ~mask & (deficit[sample_index] > 0)).nonzero(as_tuple=True)[0]
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
    """Keep the n best-scored valid tokens of the step, then apply min-keep (docs/method.md §5).

    All tensors are flat ``[N]`` rows of the step: ``score``/``fallback_score`` float, ``valid`` and
    ``candidates`` bool, ``sample_index``/``position`` int64.
    """
    _check_inputs(score, valid, sample_index, position, fallback_score, candidates)
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
    """split_budget_ca (docs/method.md §4): round(γ·n) by the first score, n − that by the second.

    Both parts are picked from all valid tokens independently; when they overlap, the union is
    topped up to n by the fallback (ca_softor) score. round() is Python's (half to even), as in the
    released code's ``int(round(gamma * n))``: γ = 0.5, n = 5 gives 2 tokens by H̃ and 3 by the second score.
    """
    _check_inputs(first_score, valid, sample_index, position, fallback_score, None, second_score)
    n_valid = int(valid.sum())
    if ratio >= 1.0:
        return BudgetResult(valid.clone(), n_valid, n_valid, n_valid, 0, 1.0 if n_valid else 0.0)
    if not ratio > 0:
        raise ValueError(f"budget ratio must be > 0, got {ratio}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
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


def _check_inputs(
    score: Tensor,
    valid: Tensor,
    sample_index: Tensor,
    position: Tensor,
    fallback_score: Tensor,
    candidates: Tensor | None,
    *more_scores: Tensor,
) -> None:
    n = valid.shape[0] if valid.dim() == 1 else -1
    if valid.dtype != torch.bool or valid.dim() != 1:
        raise ValueError(f"valid must be a bool [N] tensor, got {valid.dtype} {tuple(valid.shape)}")
    named = {"score": score, "sample_index": sample_index, "position": position, "fallback_score": fallback_score}
    named.update({f"score_{i}": t for i, t in enumerate(more_scores)})
    if candidates is not None:
        named["candidates"] = candidates
    for name, t in named.items():
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] like valid, got {tuple(t.shape)}")
    if candidates is not None and candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be bool, got {candidates.dtype}")
    if n and (int(sample_index.min()) < 0 or int(position.min()) < 0):
        raise ValueError("sample_index and position must be >= 0")


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
