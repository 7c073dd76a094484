"""Batch normalisation of raw scores to [0, 1] over all tokens of one rollout step (METHOD.md §3).

Norm(z) = clip((z − lo)/(hi − lo), 0, 1) with (lo, hi) from the registered method; non-finite
values map to 0; |hi − lo| < 1e-12 maps everything to 0. Each call sorts the finite values once:
the quantiles are read from that sort, and because Norm is monotone the same sort, mapped through
Norm, is the sorted normalised array (the Q3 medians come from it without another sort).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ta_opd.registry import Registry

DEGENERATE_RANGE = 1e-12

# name → fn(sorted finite values [M] float64, ascending, M >= 1; q_low; q_high) -> (lo, hi)
NORMALIZERS: Registry[Callable[[Tensor, float, float], tuple[Tensor, Tensor]]] = Registry("normalization")


def quantile_sorted(xs: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile (numpy's 'linear') of ascending ``xs``: x_(i) + (x_(i+1) − x_(i))·frac."""
    n = xs.numel()
    pos = q * (n - 1)
    lo_i = int(pos)
    hi_i = min(lo_i + 1, n - 1)
    return xs[lo_i] + (xs[hi_i] - xs[lo_i]) * (pos - lo_i)


@NORMALIZERS.decorator("batch_quantile")
def _batch_quantile(xs: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    return quantile_sorted(xs, q_low), quantile_sorted(xs, q_high)


@NORMALIZERS.decorator("batch_minmax")
def _batch_minmax(xs: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    return xs[0], xs[-1]


@NORMALIZERS.decorator("none")
def _none(xs: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    return torch.zeros((), dtype=xs.dtype, device=xs.device), torch.clamp_min(xs[-1], DEGENERATE_RANGE)


def median(x: Tensor) -> Tensor:
    """Linear-interpolation median of the finite values (0 when there are none)."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return quantile_sorted(torch.sort(finite.to(torch.float64)).values, 0.5)


def normalize_with_sorted(
    x: Tensor, method: str = "batch_quantile", q_low: float = 0.05, q_high: float = 0.95
) -> tuple[Tensor, Tensor]:
    """(Norm(x) [N] float64, the same values sorted ascending [N]) from one sort (METHOD.md §3)."""
    lo_hi = NORMALIZERS.get(method)
    x64 = x.to(torch.float64)
    finite_mask = torch.isfinite(x64)
    n_nonfinite = int((~finite_mask).sum())
    zeros = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    if n_nonfinite == x64.numel():
        return zeros, zeros.clone()
    xs = torch.sort(x64[finite_mask] if n_nonfinite else x64).values
    lo, hi = lo_hi(xs, q_low, q_high)
    span = hi - lo
    if abs(float(span)) < DEGENERATE_RANGE:
        return zeros, zeros.clone()
    out = ((x64 - lo) / span).clamp(0.0, 1.0)
    if n_nonfinite:
        out = torch.where(finite_mask, out, zeros)
    # Norm is monotone and non-finite values become 0 = the minimum, so this is sort(out) exactly
    out_sorted = ((xs - lo) / span).clamp(0.0, 1.0)
    if n_nonfinite:
        out_sorted = torch.cat([zeros[:n_nonfinite], out_sorted])
    return out, out_sorted


def normalize(x: Tensor, method: str = "batch_quantile", q_low: float = 0.05, q_high: float = 0.95) -> Tensor:
    """Norm(z) = clip((z − lo)/(hi − lo), 0, 1) over the finite values of ``x [N]`` (METHOD.md §3).

    Non-finite values map to 0; if |hi − lo| < 1e-12 every value maps to 0. Returns float64.
    """
    return normalize_with_sorted(x, method, q_low, q_high)[0]
