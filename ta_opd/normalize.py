"""Batch normalisation of raw scores to [0, 1] over all tokens of one rollout step (METHOD.md §3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ta_opd.registry import Registry

DEGENERATE_RANGE = 1e-12

# name → fn(finite values [M], q_low, q_high) -> (lo, hi)
NORMALIZERS: Registry[Callable[[Tensor, float, float], tuple[Tensor, Tensor]]] = Registry("normalization")


def _quantile(x: Tensor, q: float) -> Tensor:
    # Linear interpolation between order statistics (numpy's default, torch.quantile's 'linear').
    # torch.quantile refuses very large inputs, so sort once and interpolate by hand.
    xs, _ = torch.sort(x.to(torch.float64))
    pos = q * (xs.numel() - 1)
    lo_i = int(pos)
    hi_i = min(lo_i + 1, xs.numel() - 1)
    frac = pos - lo_i
    return xs[lo_i] + (xs[hi_i] - xs[lo_i]) * frac


@NORMALIZERS.decorator("batch_quantile")
def _batch_quantile(finite: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    return _quantile(finite, q_low), _quantile(finite, q_high)


@NORMALIZERS.decorator("batch_minmax")
def _batch_minmax(finite: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    return finite.min().to(torch.float64), finite.max().to(torch.float64)


@NORMALIZERS.decorator("none")
def _none(finite: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    hi = torch.clamp_min(finite.max().to(torch.float64), DEGENERATE_RANGE)
    return torch.zeros((), dtype=torch.float64), hi


def median(x: Tensor) -> Tensor:
    """Linear-interpolation median of the finite values (0 when there are none)."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return _quantile(finite, 0.5)


def normalize(x: Tensor, method: str = "batch_quantile", q_low: float = 0.05, q_high: float = 0.95) -> Tensor:
    """Norm(z) = clip((z − lo)/(hi − lo), 0, 1) over the finite values of ``x [N]`` (METHOD.md §3).

    Non-finite values map to 0; if |hi − lo| < 1e-12 every value maps to 0. Returns float64.
    """
    lo_hi = NORMALIZERS.get(method)
    finite_mask = torch.isfinite(x)
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    if not bool(finite_mask.any()):
        return out
    lo, hi = lo_hi(x[finite_mask], q_low, q_high)
    span = hi - lo
    if abs(float(span)) < DEGENERATE_RANGE:
        return out
    scaled = ((x.to(torch.float64) - lo) / span).clamp(0.0, 1.0)
    return torch.where(finite_mask, scaled, torch.zeros_like(scaled))
