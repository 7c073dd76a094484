"""Per-step selection metrics (docs/method.md §9), as a flat dict of floats with ``opd/`` keys."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ta_opd.selectors import Features
from ta_opd.stats import TokenStats


def _mean(x: Tensor, where: Tensor) -> float:
    """Mean of the finite values of ``x`` where ``where``; NaN over an empty set (no boolean indexing copies)."""
    return _Means(where).of(x)


class _Means:
    """Means of several ``[N]`` tensors over one mask: the mask is converted once, and a tensor with
    no non-finite value (every normalised feature) is reduced in one pass."""

    def __init__(self, where: Tensor) -> None:
        self.where = where.detach().cpu().numpy().astype(bool, copy=False)
        self.weight = self.where.astype(np.float64)
        self.count = int(np.count_nonzero(self.where))

    def of(self, x: Tensor) -> float:
        if self.count == 0:
            return math.nan
        xf = x.detach().to(device="cpu", dtype=torch.float64).numpy()
        finite = np.isfinite(xf)
        if finite.all():
            # einsum, not np.dot: no BLAS call (its worker threads spin on a shared machine)
            return float(np.einsum("i,i->", xf, self.weight)) / self.count
        use = self.where & finite
        count = int(np.count_nonzero(use))
        return float(np.where(use, xf, 0.0).sum()) / count if count else math.nan


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
    on_valid, on_kept = _Means(valid), _Means(kept & valid)
    out["opd/sampled_rev_kl_all"] = on_valid.of(rev_kl)
    out["opd/sampled_rev_kl_kept"] = on_kept.of(rev_kl)
    if features is not None:
        named = {
            "h_norm": features.h,
            "d_norm": features.d,
            "c_norm": features.c,
            "d_learn": features.d_learn,
            "d_incompat": features.d_incompat,
        }
        for name, value in named.items():
            out[f"opd/{name}_valid"] = on_valid.of(value)
            out[f"opd/{name}_kept"] = on_kept.of(value)
        out["opd/q3_share_valid"] = on_valid.of(features.is_q3)
        out["opd/q3_share_kept"] = on_kept.of(features.is_q3)
    if stats is not None:
        out["opd/overlap_ratio"] = on_valid.of(stats.overlap)
        out["opd/teacher_mass_on_shared"] = on_valid.of(stats.teacher_mass_on_shared)
        out["opd/reach_t1"] = on_valid.of(stats.reach_t1)
        out["opd/kl_f_union_valid"] = on_valid.of(stats.kl_f_union)
        out["opd/cmass_valid"] = on_valid.of(stats.compat_mass)
        out["opd/entropy_norm_valid"] = on_valid.of(stats.entropy_norm)
    return out
