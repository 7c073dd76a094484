"""Gain analysis math (docs/method.md §6.3–6.4) on hand-computed cases and synthetic data with a known effect."""

from __future__ import annotations

import numpy as np
import pytest

from ta_opd.diagnostics import gain as G


def test_gain_modes_hand_computed():
    kl0 = np.array([1.0, 0.5, 0.0])
    klt = np.array([0.5, 1.0, 0.0])
    assert G.gain(kl0, klt, "relative") == pytest.approx([0.5, -1.0, 0.0])
    assert G.gain(kl0, klt, "absolute") == pytest.approx([0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="gain mode"):
        G.gain(kl0, klt, "ratio")


def test_winsorize_bins_quadrants_rank():
    x = np.arange(101, dtype=float)
    w = G.winsorize(x, 0.01, 0.99)
    assert w.min() == 1.0 and w.max() == 99.0
    assert np.bincount(G.quantile_bins(np.arange(9.0)[::-1], 3)).tolist() == [3, 3, 3]
    assert G.quantile_bins(np.array([5.0, 1.0, 3.0]), 3).tolist() == [2, 0, 1]
    # medians: H 0.5, D 0.5; hi means >= median.
    h = np.array([1.0, 1.0, 0.0, 0.0])
    d = np.array([1.0, 0.0, 1.0, 0.0])
    assert G.quadrants(h, d).tolist() == [1, 2, 3, 4]
    assert G.percentile_rank(np.array([3.0, 1.0, 1.0, 2.0])).tolist() == pytest.approx([1.0, 1 / 6, 1 / 6, 2 / 3])
    assert G.budget_count(200, 0.03) == 6 and G.budget_count(10, 0.01) == 1


def _synthetic(seed=0, n_prompts=60, per_prompt=50, effect=0.5):
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(n_prompts), per_prompt)
    c = rng.uniform(size=clusters.size)
    g = effect * (c > 2 / 3) + rng.normal(0, 0.3, n_prompts)[clusters] + rng.normal(0, 0.3, clusters.size)
    return g, c, clusters


def test_bootstrap_gap_covers_known_effect_and_is_seeded():
    g, c, clusters = _synthetic()
    region = np.ones(g.size, bool)
    top, bottom = G.gap_groups(c, region, 3)
    assert top.sum() == bottom.sum() == g.size // 3
    res = G.bootstrap_mean_diff(g, top, bottom, clusters, n_resamples=1000, seed=3)
    assert res.ci_low < 0.5 < res.ci_high and res.ci_low > 0.3
    assert res.n_clusters == 60 and res.n_resamples == 1000
    again = G.bootstrap_mean_diff(g, top, bottom, clusters, n_resamples=1000, seed=3)
    assert again == res
    other = G.bootstrap_mean_diff(g, top, bottom, clusters, n_resamples=1000, seed=4)
    assert (other.ci_low, other.ci_high) != (res.ci_low, res.ci_high)
    assert other.estimate == res.estimate
    # The generic resampler (re-binning in each resample) agrees on the point and roughly on the CI.
    generic = G.cluster_bootstrap(G.gap_statistic(g, c, region, 3), clusters, n_resamples=300, seed=0)
    assert generic.estimate == pytest.approx(res.estimate)
    assert generic.ci_low == pytest.approx(res.ci_low, abs=0.03)
    assert generic.ci_high == pytest.approx(res.ci_high, abs=0.03)
    # No effect → the CI covers 0.
    g0, c0, cl0 = _synthetic(seed=1, effect=0.0)
    t0, b0 = G.gap_groups(c0, np.ones(g0.size, bool), 3)
    null = G.bootstrap_mean_diff(g0, t0, b0, cl0, n_resamples=500, seed=0)
    assert null.ci_low < 0.0 < null.ci_high


def test_mean_bootstrap_hand_case():
    # Two clusters; resampling can only give means 1, 2 or 3 (cluster means 1 and 3, equal sizes).
    values = np.array([1.0, 1.0, 3.0, 3.0])
    res = G.bootstrap_mean_diff(values, np.ones(4, bool), None, np.array([0, 0, 1, 1]), n_resamples=200, seed=0)
    assert res.estimate == 2.0 and res.ci_low >= 1.0 and res.ci_high <= 3.0


def test_nearest_neighbour_matching_recovers_effect_despite_confounding():
    rng = np.random.default_rng(0)
    n_prompts, per = 30, 200
    clusters = np.repeat(np.arange(n_prompts), per)
    h = rng.uniform(size=clusters.size)
    d = rng.uniform(size=clusters.size)
    pos = np.tile(np.linspace(0, 1, per), n_prompts)
    c = 0.3 * h + 0.7 * rng.uniform(size=clusters.size)  # C confounded with H (with overlap)
    high = c > np.median(c)
    g = 2.0 * h + 0.3 * high + rng.normal(0, 0.02, clusters.size)  # D and position carry no signal
    naive = g[high].mean() - g[~high].mean()
    res = G.nearest_neighbour_matching(g, c, np.column_stack([h, d, pos]), clusters)
    assert naive > 0.5  # confounded: twice the true effect
    assert res.effect == pytest.approx(0.3, abs=0.06)
    assert res.n_pairs == high.sum() and res.n_prompts == n_prompts
    assert res.pair_diff.shape == res.pair_cluster.shape


def test_standardized_ols_recovers_known_coefficients_with_se():
    pytest.importorskip("statsmodels")
    rng = np.random.default_rng(0)
    n = 4000
    clusters = np.repeat(np.arange(200), n // 200)
    x1 = rng.normal(2.0, 3.0, n)
    x2 = rng.normal(0.0, 1.0, n)
    y = 0.5 * (x1 - 2.0) / 3.0 - 0.2 * x2 + rng.normal(0, 0.1, n)  # standardised slopes 0.5 and -0.2
    fit = G.standardized_ols(y, {"x1": x1, "x2": x2}, clusters=clusters)
    assert fit["coef"]["x1"] == pytest.approx(0.5, abs=0.02)
    assert fit["coef"]["x2"] == pytest.approx(-0.2, abs=0.02)
    assert 0 < fit["se"]["x1"] < 0.01 and fit["pvalue"]["x1"] < 1e-6
    assert fit["ci_low"]["x1"] < fit["coef"]["x1"] < fit["ci_high"]["x1"]
    assert fit["cov_type"] == "cluster(prompt)" and fit["n"] == n and fit["r2"] > 0.9
    assert set(G.ols_model_specs()["m3_learnable_split"]) >= {"D_learn", "D_incompat"}


def test_matched_topn_on_synthetic_scores():
    pytest.importorskip("ta_opd.api")
    import torch

    from ta_opd.diagnostics.selection import bank_scores, make_token_batch, selection_config, topn_mask

    gen = torch.Generator().manual_seed(0)
    n, k = 400, 4
    s_logp = torch.log_softmax(torch.randn(n, 20, generator=gen, dtype=torch.float64), -1)
    t_logp = torch.log_softmax(torch.randn(n, 20, generator=gen, dtype=torch.float64), -1)
    s_top, s_ids = s_logp.topk(k)
    t_top, t_ids = t_logp.topk(k)
    sampled = torch.randint(0, 20, (n,), generator=gen)
    batch = make_token_batch(
        s_ids, s_top, t_ids, t_top, sampled, s_logp.gather(1, sampled[:, None])[:, 0],
        t_logp.gather(1, sampled[:, None])[:, 0], sample_index=torch.arange(n) // 20, position=torch.arange(n) % 20,
        response_length=torch.full((n,), 20), teacher_logp_on_student_ids=t_logp.gather(1, s_ids),
    )  # fmt: skip
    _, features, scores = bank_scores(batch, selection_config(k, exact=True))
    for name in ("dlearn_high", "divergence", "entropy", "tip", "random"):
        for ratio, expect in ((0.01, 4), (0.03, 12), (0.10, 40)):
            kept = topn_mask(name, scores, batch, features, ratio)
            assert int(kept.sum()) == expect  # matched: no min-keep top-up
            # the kept tokens are the highest-scored ones
            assert scores[name][kept].min() >= scores[name][~kept].max()
    # Gain equal to the score → the top-N mean gain is the mean of the top-n scores.
    g = scores["divergence"].numpy()
    kept = topn_mask("divergence", scores, batch, features, 0.10).numpy()
    res = G.bootstrap_mean_diff(g, kept, None, (np.arange(n) // 20), 200, 0)
    assert res.estimate == pytest.approx(np.sort(g)[-40:].mean())
