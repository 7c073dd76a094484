"""docs/method.md §3 batch normalisation: hand cases, non-finite and degenerate inputs, [0, 1] range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ta_opd.normalize import NORMALIZERS, median, normalize

X = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0], dtype=torch.float64)


def test_registry_names():
    assert NORMALIZERS.names() == ["batch_quantile", "batch_minmax", "none"]
    with pytest.raises(ValueError, match="batch_quantile"):
        normalize(X, "zscore")


def test_batch_quantile_linear_interpolation_by_hand():
    # n = 5 sorted values, q = 0.05 → position 0.05·4 = 0.2 → 0 + 0.2·(10 − 0) = 2
    #                      q = 0.95 → position 3.8 → 30 + 0.8·(40 − 30) = 38
    # Norm(z) = clip((z − 2)/36, 0, 1): 0 → 0 (clipped), 10 → 8/36, 20 → 0.5, 30 → 28/36, 40 → 1 (clipped)
    out = normalize(X, "batch_quantile", 0.05, 0.95)
    assert out.tolist() == pytest.approx([0.0, 8 / 36, 0.5, 28 / 36, 1.0])
    # custom quantiles: q = 0.25 → 10, q = 0.75 → 30 → (20 − 10)/20 = 0.5
    assert normalize(X, "batch_quantile", 0.25, 0.75).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_quantile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(101, generator=gen, dtype=torch.float64)
    lo, hi = np.quantile(x.numpy(), [0.05, 0.95])
    want = np.clip((x.numpy() - lo) / (hi - lo), 0, 1)
    assert normalize(x).numpy() == pytest.approx(want, abs=1e-12)


def test_batch_minmax_by_hand():
    # (z − 0)/(40 − 0): 20 → 0.5
    assert normalize(X, "batch_minmax").tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_none_by_hand():
    # lo = 0, hi = max(max, 1e-12) = 40 → z/40; negative values clip to 0
    x = torch.tensor([-5.0, 10.0, 40.0], dtype=torch.float64)
    assert normalize(x, "none").tolist() == pytest.approx([0.0, 0.25, 1.0])
    # all ≤ 0: hi = 1e-12, span ≥ 1e-12 → every value ≤ 0 clips to 0
    assert normalize(torch.tensor([-1.0, -2.0]), "none").tolist() == [0.0, 0.0]


@pytest.mark.parametrize("method", ["batch_quantile", "batch_minmax", "none"])
def test_nonfinite_values_map_to_zero(method):
    # the finite values [1, 2, 3] set the range; NaN / ±inf → 0
    x = torch.tensor([math.nan, math.inf, 1.0, 2.0, 3.0, -math.inf], dtype=torch.float64)
    out = normalize(x, method)
    assert out[0] == 0 and out[1] == 0 and out[5] == 0
    assert torch.isfinite(out).all()
    if method == "batch_minmax":
        assert out[2:5].tolist() == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize("method", ["batch_quantile", "batch_minmax", "none"])
def test_degenerate_range_maps_to_zero(method):
    # |hi − lo| < 1e-12 → every value 0 (for 'none' a constant 0 gives hi = 1e-12: nothing above 0)
    for x in ([5.0, 5.0, 5.0], [0.0, 0.0], [7.0], [math.nan, math.nan]):
        out = normalize(torch.tensor(x, dtype=torch.float64), method)
        if method == "none" and x[0] > 0:
            assert out.tolist() == [1.0] * len(x)  # lo = 0, hi = 5: z/5 = 1, not degenerate
        else:
            assert out.tolist() == [0.0] * len(x)
    # a spread of 1e-13 around 1 is degenerate for the batch normalisers
    if method != "none":
        tiny = torch.tensor([1.0, 1.0 + 1e-13], dtype=torch.float64)
        assert normalize(tiny, method).tolist() == [0.0, 0.0]


def test_median_linear_interpolation():
    assert float(median(torch.tensor([3.0, 1.0, 2.0, 10.0]))) == 2.5  # (2 + 3)/2
    assert float(median(torch.tensor([3.0, math.nan, 1.0, 2.0]))) == 2.0  # NaN ignored
    assert float(median(torch.tensor([math.nan]))) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=40),
    st.sampled_from(["batch_quantile", "batch_minmax", "none"]),
)
def test_normalised_values_in_unit_interval(values, method):
    x = torch.tensor(values, dtype=torch.float64)
    out = normalize(x, method)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert bool(((out >= 0) & (out <= 1)).all())
    assert bool((out[~torch.isfinite(x)] == 0).all())
