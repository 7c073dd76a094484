"""Exact order statistics of a large array without partitioning all of it (normalisation quantiles, budget).

``kth_values(x, ks)[i] == np.sort(x)[ks[i]]`` exactly (the value is one of x's elements). A strided sample
of x brackets each k-th value; only the elements inside the bracket are partitioned, and the count of those
below it fixes the rank. Ties are no problem (a tied value inside the bracket is kept whole, and a value
tied over rank k is recognised by two counts without any partition); when the bracket misses (a very
skewed array), that k falls back to a full ``np.partition``. Used by the budget, whose scores are often
tied at 1 (np.partition slows down on many equal values); the normalisation's several quantiles are
cheaper with one ``np.partition``. With the compiled kernel (ta_opd/_native) the same method runs in C for
any number of ranks (brackets of neighbouring ranks merged; a three-way quickselect inside each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ta_opd._native import stats_kernel

SMALL = 32768  # below this, one np.partition is as fast as anything
SAMPLE = 2048  # sample size: a bracket holds a few % of the array


def kth_values(x: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """``np.sort(x)[ks]`` for a 1-D float array without NaN, reading only a bracket around each rank."""
    n = x.shape[0]
    ks = [int(k) for k in ks]
    for k in ks:
        if not 0 <= k < n:
            raise ValueError(f"rank {k} out of range for {n} values")
    out = np.empty(len(ks), dtype=x.dtype)
    if not ks:
        return out
    lib = stats_kernel()
    if lib is not None and x.dtype == np.float64:
        distinct = np.array(sorted(set(ks)), dtype=np.int64)
        xc = np.ascontiguousarray(x)
        found = np.empty(distinct.shape[0])
        if lib.ta_kth(n, xc.ctypes.data, distinct.shape[0], distinct.ctypes.data, found.ctypes.data) != 0:
            raise MemoryError(f"kth_values: no memory for the order statistics of {n} values")
        return found[np.searchsorted(distinct, ks)]
    if n < SMALL or len(set(ks)) > 2:  # numpy: several ranks are cheapest in one partition
        return np.partition(x, sorted(set(ks)))[ks]
    step = n // SAMPLE
    sample = np.sort(x[::step])
    m = sample.shape[0]
    for i, k in enumerate(ks):
        q = k / (n - 1)
        pos = q * (m - 1)
        margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0  # 4 spreads of the sample rank of the k-th value
        guess = sample[min(round(pos), m - 1)]
        if int(np.count_nonzero(x < guess)) <= k < int(np.count_nonzero(x <= guess)):
            out[i] = guess  # a value tied over rank k (scores clipped to 1 are common): no partition at all
            continue
        lo_i, hi_i = math.floor(pos - margin), math.ceil(pos + margin)
        lo = sample[lo_i] if lo_i > 0 else -np.inf
        hi = sample[hi_i] if hi_i < m - 1 else np.inf
        below = int(np.count_nonzero(x < lo))
        inside = x[(x >= lo) & (x <= hi)]
        if below <= k < below + inside.shape[0]:
            out[i] = np.partition(inside, k - below)[k - below]
        else:  # the sample misjudged this rank: partition everything
            out[i] = np.partition(x, k)[k]
    return out
