"""The paired seed × prompt bootstrap of a method suite (ta_opd.diagnostics.gain): hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ta_opd.diagnostics.gain import paired_bootstrap_draws, paired_seed_prompt_bootstrap


def test_zero_variance_gives_a_degenerate_ci():
    method = np.ones((3, 5))
    random = np.zeros((3, 5))
    r = paired_seed_prompt_bootstrap(method, random, n_resamples=200, seed=1)
    assert (r.estimate, r.ci_low, r.ci_high, r.se) == (1.0, 1.0, 1.0, 0.0)
    assert (r.n_tokens, r.n_clusters, r.n_resamples) == (15, 3, 200)


def test_pairing_uses_one_draw_for_method_and_baseline():
    # method = baseline + 0.25 on every (seed, prompt): any paired resample differs by exactly 0.25,
    # however much the baseline itself varies
    rng = np.random.default_rng(0)
    baseline = rng.integers(0, 2, size=(4, 7)).astype(float)
    r = paired_seed_prompt_bootstrap(baseline + 0.25, baseline, n_resamples=300, seed=3)
    assert r.estimate == pytest.approx(0.25) and r.ci_low == pytest.approx(0.25) and r.ci_high == pytest.approx(0.25)


def test_two_seeds_two_prompts_with_a_known_set_of_resamples():
    values = np.array([[1.0, 0.0], [1.0, 1.0]])  # [seed, prompt]
    seed_draws = np.array([[0, 0], [1, 1], [0, 1], [1, 0]])  # [R=4, S=2]
    prompt_draws = np.array(
        [
            [[0, 0], [1, 1]],  # seed 0 twice: (1, 1) and (0, 0)      -> 0.5
            [[0, 1], [0, 0]],  # seed 1 twice: (1, 1) and (1, 1)      -> 1.0
            [[1, 1], [0, 1]],  # seed 0 (0, 0), seed 1 (1, 1)         -> 0.5
            [[0, 0], [1, 1]],  # seed 1 (1, 1), seed 0 (0, 0)         -> 0.5
        ]
    )  # [R, S, P]
    r = paired_seed_prompt_bootstrap(values, draws=(seed_draws, prompt_draws))
    assert r.estimate == 0.75
    # percentile CI of [0.5, 0.5, 0.5, 1.0] (linear interpolation): 2.5 % at rank 0.075 -> 0.5,
    # 97.5 % at rank 2.925 -> 0.5 + 0.925 * 0.5
    assert r.ci_low == 0.5 and r.ci_high == pytest.approx(0.9625)
    assert r.se == pytest.approx(np.std([0.5, 1.0, 0.5, 0.5], ddof=1))

    # paired difference against a baseline of the same shape: the same draws apply to both
    baseline = np.array([[0.0, 0.0], [1.0, 0.0]])  # diff = [[1, 0], [0, 1]]
    r = paired_seed_prompt_bootstrap(values, baseline, draws=(seed_draws, prompt_draws))
    # resample means of the diff: r0 seed 0 (1, 1),(0, 0) -> 0.5; r1 seed 1 (0, 1),(0, 0) -> 0.25;
    # r2 seed 0 (0, 0), seed 1 (0, 1) -> 0.25; r3 seed 1 (0, 0), seed 0 (0, 0) -> 0.0
    assert r.estimate == 0.5
    expected = np.quantile([0.5, 0.25, 0.25, 0.0], [0.025, 0.975])
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(expected))
    assert r.ci_low == pytest.approx(0.01875) and r.ci_high == pytest.approx(0.48125)


def test_draws_are_seeded_and_shaped():
    a = paired_bootstrap_draws(3, 5, n_resamples=10, seed=7)
    b = paired_bootstrap_draws(3, 5, n_resamples=10, seed=7)
    assert a[0].shape == (10, 3) and a[1].shape == (10, 3, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].max() < 3 and a[1].max() < 5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="baseline shape"):
        paired_seed_prompt_bootstrap(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        paired_seed_prompt_bootstrap(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        paired_seed_prompt_bootstrap(np.zeros(3))
