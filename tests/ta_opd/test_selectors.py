"""docs/method.md §3–4 features and every selector's score on a 4-token case computed by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ta_opd import SELECTORS, SelectionConfig, compute_features, selector_scores
from ta_opd.selectors import random_score, soft_or

# Raw statistics of 4 tokens. With normalization 'none' (lo = 0, hi = max) and a max of 1 the
# normalised features equal the raw values: H̃ = H, D̃ = D, C̃ = C.
H = [1.0, 0.5, 0.0, 0.25]
D = [0.0, 1.0, 0.5, 0.25]
C = [1.0, 0.5, 0.0, 0.5]
# D·C = [0, 0.5, 0, 0.125] → Norm (hi = 0.5) → DC̃ = [0, 1, 0, 0.25]
DC = [0.0, 1.0, 0.0, 0.25]
D_LEARN = [0.0, 0.5, 0.0, 0.125]  # D̃·C̃
D_INCOMPAT = [0.0, 0.5, 0.5, 0.125]  # D̃·(1 − C̃)
# medians (linear interpolation of 4 sorted values: mean of the middle two):
#   H̃ sorted [0, .25, .5, 1] → 0.375; D̃ sorted [0, .25, .5, 1] → 0.375
# Q3 = H̃ < 0.375 and D̃ ≥ 0.375: token 2 (H̃ 0, D̃ 0.5) only
IS_Q3 = [False, False, True, False]

EXPECTED_SCORES = {
    "full": [1.0, 1.0, 1.0, 1.0],
    "dlearn_high": D_LEARN,
    # code variant: 1 − (1 − H̃)(1 − DC̃) = [1, 1 − 0.5·0 = 1, 0, 1 − 0.75·0.75 = 0.4375]
    "ca_softor": [1.0, 1.0, 0.0, 0.4375],
    "entropy": H,
    # soft-OR(H̃, D̃) = [1, 1 − 0.5·0 = 1, 1 − 1·0.5 = 0.5, 1 − 0.75·0.75 = 0.4375]
    "tip": [1.0, 1.0, 0.5, 0.4375],
    "divergence": D,
    "compatibility": C,
    "dincompat_high": D_INCOMPAT,
    # (1 − H̃)·DC̃ = [0·0, 0.5·1, 1·0, 0.75·0.25]
    "split_budget_ca": [0.0, 0.5, 0.0, 0.1875],
    "q3": [0.0, 0.5, 0.0, 0.1875],
    "q3_highc": C,
    "q3_lowc": C,
    "q3_dlearn_high": D_LEARN,
    "q3_dlearn_low": D_LEARN,
    "q3_dincompat_high": D_INCOMPAT,
}


def _features(**cfg):
    stats = SimpleNamespace(
        entropy_norm=torch.tensor(H, dtype=torch.float64),
        kl_f_union=torch.tensor(D, dtype=torch.float64),
        compat=torch.tensor(C, dtype=torch.float64),
    )
    config = SelectionConfig(normalization="none", **cfg)
    return compute_features(stats, config), config


def test_features_by_hand():
    f, _ = _features()
    assert f.h.tolist() == H and f.d.tolist() == D and f.c.tolist() == C
    assert f.dc.tolist() == pytest.approx(DC)
    assert f.d_learn.tolist() == pytest.approx(D_LEARN)
    assert f.d_incompat.tolist() == pytest.approx(D_INCOMPAT)
    assert f.h_median == pytest.approx(0.375) and f.d_median == pytest.approx(0.375)
    assert f.is_q3.tolist() == IS_Q3


def test_q3_boundary_is_strict_for_h_and_inclusive_for_d():
    # H̃ = D̃ = [0, 1, 0.5] → medians 0.5; token 2 has H̃ = median (not < ) → not Q3; token 0 has
    # D̃ = 0 < 0.5 → not Q3; a token with H̃ 0 and D̃ exactly the median 0.5 is Q3.
    stats = SimpleNamespace(
        entropy_norm=torch.tensor([0.0, 1.0, 0.5, 0.0], dtype=torch.float64),
        kl_f_union=torch.tensor([0.0, 1.0, 0.5, 0.5], dtype=torch.float64),
        compat=torch.ones(4, dtype=torch.float64),
    )
    f = compute_features(stats, SelectionConfig(normalization="none"))
    assert f.h_median == 0.25 and f.d_median == 0.5
    assert f.is_q3.tolist() == [False, False, False, True]


def test_every_selector_score_by_hand():
    f, cfg = _features()
    scores = selector_scores(f, cfg)
    assert set(scores) == set(SELECTORS.names())
    for name, expected in EXPECTED_SCORES.items():
        assert scores[name].tolist() == pytest.approx(expected), name
    assert set(EXPECTED_SCORES) | {"random"} == set(SELECTORS.names())


def test_ca_softor_paper_variant_by_hand():
    # paper: soft-OR(H̃, D̃·C̃) = [1, 1 − 0.5·0.5 = 0.75, 0, 1 − 0.75·0.875 = 0.34375]
    f, cfg = _features(ca_softor_variant="paper")
    assert selector_scores(f, cfg)["ca_softor"].tolist() == pytest.approx([1.0, 0.75, 0.0, 0.34375])


def test_soft_or_is_exactly_one_when_an_input_is_one():
    a = torch.tensor([1.0, 0.3, 0.0, 0.2], dtype=torch.float64)
    b = torch.tensor([0.123456789, 1.0, 0.0, 0.5], dtype=torch.float64)
    out = soft_or(a, b)
    assert out[0].item() == 1.0 and out[1].item() == 1.0 and out[2].item() == 0.0
    assert out[3].item() == pytest.approx(0.2 + 0.5 - 0.1)


def test_random_selector_reproducible_from_seed_and_rollout_index():
    cfg = SelectionConfig(mask="random", ratio=0.5, seed=42)
    a = random_score(100, cfg, rollout_index=3)
    assert torch.equal(a, random_score(100, cfg, rollout_index=3))
    assert not torch.equal(a, random_score(100, cfg, rollout_index=4))
    # seed + rollout index: (42, 3) and (43, 2) are the same stream
    assert torch.equal(a, random_score(100, SelectionConfig(mask="random", ratio=0.5, seed=43), rollout_index=2))
    assert bool(((a >= 0) & (a < 1)).all())


def test_selector_specs():
    assert len(SELECTORS) == 16
    ascending = {n for n, s in SELECTORS.items() if s.ascending}
    q3 = {n for n, s in SELECTORS.items() if s.uses_q3}
    assert ascending == {"q3_lowc", "q3_dlearn_low"}
    assert q3 == {"q3", "q3_highc", "q3_lowc", "q3_dlearn_high", "q3_dlearn_low", "q3_dincompat_high"}
    with pytest.raises(ValueError, match="already registered"):
        SELECTORS.register("q3", SELECTORS["q3"])
    with pytest.raises(ValueError, match="dlearn_high"):
        SELECTORS.get("teachability")


def test_docs_selectors_page_is_up_to_date():
    from ta_opd import docs

    assert docs.DEFAULT_PATH.read_text(encoding="utf-8") == docs.render(), "run `python -m ta_opd.docs`"
    for name in SELECTORS.names():
        assert f"`{name}`" in docs.render()
