"""Batch normalisation of raw scores to [0, 1] over all tokens of one rollout step (docs/method.md §3).

Norm(z) = clip((z − lo)/(hi − lo), 0, 1) with (lo, hi) from the registered method; non-finite
values map to 0; |hi − lo| < 1e-12 maps everything to 0. Because Norm is monotone, order
statistics of Norm(z) are Norm of order statistics of z: the Q3 medians need no second pass.
The built-in methods only read a few order statistics (two quantiles, the min/max), so they
are found in linear time (``ta_opd.order_stats``) instead of a full sort; any other registered
normaliser receives the fully sorted array. The names are the option's choices,
``ta_opd.config.NORMALIZATIONS``; the registry implements exactly those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ta_opd.config import NORMALIZATIONS
from ta_opd.order_stats import kth_values
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


if NORMALIZERS.names() != list(NORMALIZATIONS):
    raise ImportError(f"ta_opd.normalize registers {NORMALIZERS.names()}, ta_opd.config declares {NORMALIZATIONS}")


def median(x: Tensor) -> Tensor:
    """Linear-interpolation median of the finite values (0 when there are none)."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return quantile_sorted(torch.sort(finite.to(torch.float64)).values, 0.5)


def _quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """(lower index, upper index, fraction) of ``quantile_sorted`` over ``n`` sorted values."""
    pos = q * (n - 1)
    lo_i = int(pos)
    return lo_i, min(lo_i + 1, n - 1), pos - lo_i


def _builtin_ranks(method: str, n: int, q_low: float, q_high: float) -> list[int] | None:
    """Sorted positions a built-in normaliser reads (None: a custom one, which needs the full sort)."""
    fn = NORMALIZERS.get(method)
    if fn is _batch_quantile:
        return [*_quantile_ranks(n, q_low)[:2], *_quantile_ranks(n, q_high)[:2]]
    if fn is _batch_minmax:
        return [0, n - 1]
    if fn is _none:
        return [n - 1]
    return None


class _OrderStats:
    """The order statistics of the finite values of one feature, found by one partial sort.

    ``value(k)`` is the k-th smallest finite value (exactly ``sort(finite)[k]``) for every k in
    ``ranks``; with ``ranks=None`` the values are fully sorted (custom normalisers).
    """

    def __init__(self, finite: np.ndarray, ranks: Sequence[int] | None) -> None:
        self.n = finite.shape[0]
        if ranks is None:
            self.values = np.sort(finite)
        else:
            kth = sorted({int(k) for k in ranks if 0 <= k < self.n})
            # only the positions in ``kth`` hold their order statistic (the readers read no other)
            self.values = np.zeros_like(finite)
            self.values[kth] = kth_values(finite, kth)

    def tensor(self) -> Tensor:
        return torch.from_numpy(self.values)


def normalize_with_ranks(
    x: Tensor,
    method: str = "batch_quantile",
    q_low: float = 0.05,
    q_high: float = 0.95,
    ranks: Sequence[float] = (),
) -> tuple[Tensor, list[Tensor]]:
    """(Norm(x) [N] float64, the linear-interpolation quantiles of Norm(x) at ``ranks``) (docs/method.md §3).

    The quantiles are exactly ``quantile_sorted(sort(Norm(x)), q)``: non-finite values become 0,
    the minimum, so they sit first in the sorted normalised array, and Norm maps the sorted finite
    values monotonically onto the rest.
    """
    lo_hi = NORMALIZERS.get(method)
    x64 = x.detach().to(device="cpu", dtype=torch.float64)
    xn = x64.numpy()
    n_all = xn.shape[0]
    finite_mask = np.isfinite(xn)
    n_nonfinite = n_all - int(np.count_nonzero(finite_mask))

    def all_zero() -> tuple[Tensor, list[Tensor]]:  # built only when needed: [N] zeros cost a pass
        zero = torch.zeros((), dtype=torch.float64)
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device), [zero for _ in ranks]

    if n_all == 0 or n_nonfinite == n_all:
        return all_zero()
    finite = xn[finite_mask] if n_nonfinite else xn
    m = finite.shape[0]
    # positions of the requested quantiles in sort(Norm(x)) → positions among the sorted finite values
    wanted = [_quantile_ranks(n_all, q) for q in ranks]
    need = [i - n_nonfinite for lo_i, hi_i, _ in wanted for i in (lo_i, hi_i)]
    builtin = _builtin_ranks(method, m, q_low, q_high)
    order = _OrderStats(finite, None if builtin is None else builtin + need)
    xs = order.tensor()
    lo, hi = lo_hi(xs, q_low, q_high)
    span = hi - lo
    if abs(float(span)) < DEGENERATE_RANGE:
        return all_zero()
    lo_f, span_f = float(lo), float(span)
    out = np.subtract(xn, lo_f)
    out /= span_f
    np.clip(out, 0.0, 1.0, out=out)
    if n_nonfinite:
        out[~finite_mask] = 0.0

    def norm_at(i: int) -> float:  # sort(Norm(x))[i], the same arithmetic as ``out``
        return 0.0 if i < n_nonfinite else min(max((float(order.values[i - n_nonfinite]) - lo_f) / span_f, 0.0), 1.0)

    quantiles = []
    for lo_i, hi_i, frac in wanted:
        a, b = norm_at(lo_i), norm_at(hi_i)
        quantiles.append(torch.tensor(a + (b - a) * frac, dtype=torch.float64))
    return torch.from_numpy(out).to(x.device), quantiles


def normalize(x: Tensor, method: str = "batch_quantile", q_low: float = 0.05, q_high: float = 0.95) -> Tensor:
    """Norm(z) = clip((z − lo)/(hi − lo), 0, 1) over the finite values of ``x [N]`` (docs/method.md §3).

    Non-finite values map to 0; if |hi − lo| < 1e-12 every value maps to 0. Returns float64.
    """
    return normalize_with_ranks(x, method, q_low, q_high)[0]
