"""Per-step selection metrics (METHOD.md §9), as a flat dict of floats with ``opd/`` keys."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ta_opd.selectors import Features
from ta_opd.stats import TokenStats


def _mean(x: Tensor, where: Tensor) -> float:
    """Mean of the finite values of ``x`` where ``where``; NaN over an empty set (no boolean indexing copies)."""
    xf = x.to(torch.float64)
    use = where & torch.isfinite(xf)
    count = int(use.sum())
    if count == 0:
        return math.nan
    return float(torch.where(use, xf, 0.0).sum()) / count


def selection_metrics(
    valid: Tensor,
    kept: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    nominal_ratio: float,
    features: Features | None = None,
    stats: TokenStats | None = None,
) -> dict[str, float]:
    """Realised keep ratio; mean H̃, D̃, C̃, D^L, D^I over valid and kept tokens; Q3 share; overlap;
    teacher mass on the shared set; reach_t1; mean sampled reverse KL over all and kept tokens.

    Means over an empty set are NaN (logged as such, never silently 0).
    """
    n_valid, n_kept = int(valid.sum()), int((kept & valid).sum())
    out: dict[str, float] = {
        "opd/n_valid_tokens": float(n_valid),
        "opd/n_kept_tokens": float(n_kept),
        "opd/nominal_ratio": float(min(nominal_ratio, 1.0)),
        "opd/realised_ratio": n_kept / n_valid if n_valid else 0.0,
    }
    rev_kl = student_logp.to(torch.float64) - teacher_logp.to(torch.float64)  # log p_S − log p_T at y_t
    out["opd/sampled_rev_kl_all"] = _mean(rev_kl, valid)
    out["opd/sampled_rev_kl_kept"] = _mean(rev_kl, kept & valid)
    if features is not None:
        named = {
            "h_norm": features.h,
            "d_norm": features.d,
            "c_norm": features.c,
            "d_learn": features.d_learn,
            "d_incompat": features.d_incompat,
        }
        for name, value in named.items():
            out[f"opd/{name}_valid"] = _mean(value, valid)
            out[f"opd/{name}_kept"] = _mean(value, kept & valid)
        out["opd/q3_share_valid"] = _mean(features.is_q3.to(torch.float64), valid)
        out["opd/q3_share_kept"] = _mean(features.is_q3.to(torch.float64), kept & valid)
    if stats is not None:
        out["opd/overlap_ratio"] = _mean(stats.overlap, valid)
        out["opd/teacher_mass_on_shared"] = _mean(stats.teacher_mass_on_shared, valid)
        out["opd/reach_t1"] = _mean(stats.reach_t1.to(torch.float64), valid)
        out["opd/kl_f_union_valid"] = _mean(stats.kl_f_union, valid)
        out["opd/cmass_valid"] = _mean(stats.compat_mass, valid)
        out["opd/entropy_norm_valid"] = _mean(stats.entropy_norm, valid)
    return out
