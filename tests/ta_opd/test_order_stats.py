"""kth_values: exactly np.sort(x)[k], through every path (small, tied guess, bracket, fallback)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ta_opd.order_stats as order_stats
from ta_opd.order_stats import kth_values


def test_hand_case_small():
    x = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
    assert kth_values(x, [0, 1, 2, 4]).tolist() == [1.0, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("kind", ["uniform", "ties_at_top", "few_values", "skewed", "with_inf"])
def test_large_arrays_every_rank_kind(kind):
    rng = np.random.default_rng(0)
    n = 100_000
    x = rng.random(n)
    if kind == "ties_at_top":
        x[rng.random(n) < 0.1] = -1.0  # like -score with 10 % of scores clipped to 1
    elif kind == "few_values":
        x = rng.integers(0, 5, n).astype(np.float64)
    elif kind == "skewed":
        x = np.exp(rng.normal(0, 8, n))
    elif kind == "with_inf":
        x[:50], x[50:100] = -np.inf, np.inf
    ks = [0, 1, 7, 3000, 3001, n // 2, n // 2 + 1, n - 2, n - 1]
    assert np.array_equal(kth_values(x, ks), np.sort(x)[ks])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5, 1e-300, -np.inf]) | st.floats(-5, 5), min_size=1, max_size=300
    ),
    st.data(),
)
def test_property_matches_sort(values, data):
    x = np.array(values, dtype=np.float64)
    ks = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=5))
    old = order_stats.SMALL, order_stats.SAMPLE
    order_stats.SMALL, order_stats.SAMPLE = 8, 4  # the sampled paths, on small arrays
    try:
        assert np.array_equal(kth_values(x, ks), np.sort(x)[ks])
    finally:
        order_stats.SMALL, order_stats.SAMPLE = old


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 5 out of range for 5 values"):
        kth_values(np.zeros(5), [5])
