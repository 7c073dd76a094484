"""Fixed-context gain analysis math (docs/method.md §6.3–6.5): numpy in, numbers out.

Gain, winsorising, quantile bins and the H×D quadrants, the high-C minus low-C gap,
prompt-cluster bootstrap confidence intervals, the paired seed × prompt bootstrap of a method suite's
accuracies, within-prompt nearest-neighbour matching, matched top-N means and the standardised OLS models.
statsmodels is imported only inside :func:`standardized_ols` (the ``ta_opd`` layer imports torch/numpy at
module level only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

GAIN_MODES = ("relative", "absolute")
GAIN_EPS = 1e-12
# Quadrants of docs/method.md §4: Q1 hiH/hiD, Q2 hiH/loD, Q3 loH/hiD, Q4 loH/loD.
QUADRANT_NAMES = {1: "Q1 hiH/hiD", 2: "Q2 hiH/loD", 3: "Q3 loH/hiD", 4: "Q4 loH/loD"}


def gain(kl_f_before: np.ndarray, kl_f_after: np.ndarray, mode: str = "relative") -> np.ndarray:
    """Per-token gain (docs/method.md §6.3): relative ``(KL0 − KLτ)/(KL0 + 1e-12)`` or absolute ``KL0 − KLτ``."""
    kl0 = np.asarray(kl_f_before, dtype=np.float64)
    klt = np.asarray(kl_f_after, dtype=np.float64)
    if mode == "relative":
        return (kl0 - klt) / (kl0 + GAIN_EPS)
    if mode == "absolute":
        return kl0 - klt
    raise ValueError(f"gain mode {mode!r} is not one of {GAIN_MODES}")


def winsorize(x: np.ndarray, lower: float = 0.01, upper: float = 0.99) -> np.ndarray:
    """Clip to the linear-interpolation ``lower``/``upper`` quantiles of the finite values."""
    if not 0.0 <= lower < upper <= 1.0:
        raise ValueError(f"winsorising quantiles must satisfy 0 <= lower < upper <= 1, got {lower}, {upper}")
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return x.copy()
    lo, hi = np.quantile(finite, [lower, upper])
    return np.clip(x, lo, hi)


def standardize(x: np.ndarray) -> np.ndarray:
    """z-score (population SD); a constant column maps to 0."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return np.zeros_like(x) if sd < 1e-12 else (x - x.mean()) / sd


def quantile_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 of each value by its rank (equal-count bins, ties by stable order)."""
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.empty(x.size, dtype=np.int64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size)
    return np.minimum(ranks * n_bins // x.size, n_bins - 1)


def percentile_rank(x: np.ndarray) -> np.ndarray:
    """Average-rank percentile in [0, 1] (ties share their mean rank); robust to scale (§6.5)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n <= 1:
        return np.zeros(n)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Average rank over runs of equal values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x) != 0) + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends - 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks / (n - 1)


def quadrants(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Quadrant 1..4 per token from the medians of H and D: hi means ``>= median`` (docs/method.md §4)."""
    h = np.asarray(h, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    hi_h = h >= np.median(h)
    hi_d = d >= np.median(d)
    return np.where(hi_h, np.where(hi_d, 1, 2), np.where(hi_d, 3, 4)).astype(np.int64)


def high_low_gap(g: np.ndarray, c: np.ndarray, n_bins: int = 3) -> float:
    """mean(G | top C bin) − mean(G | bottom C bin), bins by rank within the given tokens (NaN if empty)."""
    g = np.asarray(g, dtype=np.float64)
    if g.size < n_bins:
        return float("nan")
    bins = quantile_bins(c, n_bins)
    return float(g[bins == n_bins - 1].mean() - g[bins == 0].mean())


@dataclass(frozen=True)
class BootstrapResult:
    """A point estimate with a percentile bootstrap CI over prompt clusters."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    n_tokens: int
    n_clusters: int
    n_resamples: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], float],
    clusters: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Percentile CI of ``statistic(indices)`` resampling whole clusters (prompts) with replacement.

    ``statistic`` receives an int index array into the token arrays (with repeats when a cluster
    is drawn twice) and returns a float. Resamples whose statistic is NaN are dropped. Same seed
    → same result.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    clusters = np.asarray(clusters)
    all_idx = np.arange(clusters.size)
    estimate = float(statistic(all_idx))
    labels, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=labels.size)
    offsets = np.r_[0, np.cumsum(counts)]
    members = [order[offsets[j] : offsets[j + 1]] for j in range(labels.size)]
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for r in range(n_resamples):
        draw = rng.integers(0, labels.size, size=labels.size)
        values[r] = statistic(np.concatenate([members[j] for j in draw]))
    lo, hi, se, n_valid = _percentile_ci(values, confidence)
    return BootstrapResult(estimate, lo, hi, se, int(clusters.size), int(labels.size), n_valid)


def _percentile_ci(resampled: np.ndarray, confidence: float) -> tuple[float, float, float, int]:
    """(CI low, CI high, bootstrap SE, resamples kept) of bootstrap statistics; NaN/inf ones are dropped."""
    kept = resampled[np.isfinite(resampled)]
    if kept.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(kept, [alpha, 1.0 - alpha])
    se = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    return float(lo), float(hi), se, int(kept.size)


def bootstrap_mean_diff(
    values: np.ndarray,
    group_a: np.ndarray,
    group_b: np.ndarray | None,
    clusters: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """mean(values | group_a) − mean(values | group_b) (or just the first mean when ``group_b`` is None)
    with a prompt-cluster percentile bootstrap CI; group membership is fixed, clusters are resampled.

    Vectorised: each resample is a vector of cluster draw counts, and a group mean is
    (counts · per-cluster sums)/(counts · per-cluster sizes). Same seed → same result.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    values = np.asarray(values, dtype=np.float64)
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    n_c = labels.size

    def sums(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.asarray(mask, dtype=bool)
        return (
            np.bincount(inverse[mask], weights=values[mask], minlength=n_c),
            np.bincount(inverse[mask], minlength=n_c).astype(np.float64),
        )

    s_a, c_a = sums(group_a)
    s_b, c_b = sums(group_b) if group_b is not None else (np.zeros(n_c), np.zeros(n_c))

    def stat(weights: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (weights @ s_a) / (weights @ c_a)
            if group_b is not None:
                out = out - (weights @ s_b) / (weights @ c_b)
        return out

    estimate = float(stat(np.ones((1, n_c)))[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_c, size=(n_resamples, n_c))
    weights = np.zeros((n_resamples, n_c))
    np.add.at(weights, (np.arange(n_resamples)[:, None], draws), 1.0)
    lo, hi, se, n_valid = _percentile_ci(stat(weights), confidence)
    n_tok = int(np.asarray(group_a, bool).sum() + (0 if group_b is None else np.asarray(group_b, bool).sum()))
    return BootstrapResult(estimate, lo, hi, se, n_tok, int(n_c), n_valid)


def paired_bootstrap_draws(
    n_seeds: int, n_prompts: int, n_resamples: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Resample indices of a two-level bootstrap: ``seed_draws [R, S]`` (seeds with replacement) and
    ``prompt_draws [R, S, P]`` (within each drawn seed, its eval prompts with replacement). Same seed → same draws."""
    if n_seeds < 1 or n_prompts < 1 or n_resamples < 1:
        raise ValueError(f"need >= 1 seed, prompt and resample; got {n_seeds}, {n_prompts}, {n_resamples}")
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    prompt_draws = rng.integers(0, n_prompts, size=(n_resamples, n_seeds, n_prompts))
    return seed_draws, prompt_draws


def paired_seed_prompt_bootstrap(
    values: np.ndarray,
    baseline: np.ndarray | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    draws: tuple[np.ndarray, np.ndarray] | None = None,
) -> BootstrapResult:
    """Mean of ``values − baseline`` (or of ``values``) over seeds and eval prompts, with a percentile CI from a
    paired two-level bootstrap: resample the seeds, then within each drawn seed its prompts; the same draw is
    applied to ``values`` and ``baseline`` (paired: the method and its reference run of the same seed, scored on
    the same prompts).

    ``values``/``baseline``: ``[S, P]`` per-seed, per-prompt scores (e.g. 0/1 correctness of the final eval).
    ``draws``: explicit ``(seed_draws [R, S], prompt_draws [R, S, P])`` instead of
    :func:`paired_bootstrap_draws` (tests use a known set). Each resample's statistic is the mean over its
    ``S × P`` drawn cells. ``n_tokens`` of the result counts the cells, ``n_clusters`` the seeds.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"values must be a non-empty [seeds, prompts] array, got shape {values.shape}")
    diff = values
    if baseline is not None:
        baseline = np.asarray(baseline, dtype=np.float64)
        if baseline.shape != values.shape:
            raise ValueError(
                f"baseline shape {baseline.shape} != values shape {values.shape} (paired by seed, prompt)"
            )
        diff = values - baseline
    if not np.isfinite(diff).all():
        raise ValueError("values/baseline hold NaN or inf; every seed needs a score for every prompt")
    n_seeds, n_prompts = diff.shape
    seed_draws, prompt_draws = (
        draws if draws is not None else paired_bootstrap_draws(n_seeds, n_prompts, n_resamples, seed)
    )
    seed_draws, prompt_draws = np.asarray(seed_draws), np.asarray(prompt_draws)
    if seed_draws.ndim != 2 or prompt_draws.shape != (*seed_draws.shape, prompt_draws.shape[-1]):
        raise ValueError(f"draws must be [R, S] and [R, S, P]; got {seed_draws.shape} and {prompt_draws.shape}")
    stats = diff[seed_draws[:, :, None], prompt_draws].mean(axis=(1, 2))  # [R]
    lo, hi, se, n_valid = _percentile_ci(stats, confidence)
    return BootstrapResult(float(diff.mean()), lo, hi, se, int(diff.size), int(n_seeds), n_valid)


def gap_groups(c: np.ndarray, region: np.ndarray, n_bins: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(top-C-bin mask, bottom-C-bin mask) of the tokens in ``region``, bins by rank within the region."""
    region = np.asarray(region, dtype=bool)
    top = np.zeros(region.size, dtype=bool)
    bottom = np.zeros(region.size, dtype=bool)
    idx = np.flatnonzero(region)
    if idx.size >= n_bins:
        bins = quantile_bins(np.asarray(c, dtype=np.float64)[idx], n_bins)
        top[idx[bins == n_bins - 1]] = True
        bottom[idx[bins == 0]] = True
    return top, bottom


def gap_statistic(g: np.ndarray, c: np.ndarray, region: np.ndarray, n_bins: int) -> Callable[[np.ndarray], float]:
    """The statistic for :func:`cluster_bootstrap`: high-C minus low-C gap inside ``region`` (bool)."""
    g = np.asarray(g, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    region = np.asarray(region, dtype=bool)

    def stat(idx: np.ndarray) -> float:
        idx = idx[region[idx]]
        return high_low_gap(g[idx], c[idx], n_bins)

    return stat


@dataclass(frozen=True)
class MatchingResult:
    """Within-prompt nearest-neighbour matching of high-C to low-C tokens."""

    effect: float  # mean over pairs of G(high C) − G(matched low C)
    n_pairs: int
    n_prompts: int
    mean_distance: float
    pair_diff: np.ndarray  # [n_pairs]
    pair_cluster: np.ndarray  # [n_pairs]


def nearest_neighbour_matching(
    g: np.ndarray, c: np.ndarray, covariates: np.ndarray, clusters: np.ndarray
) -> MatchingResult:
    """Match each above-median-C token to its nearest below-or-at-median-C token of the same prompt.

    Distance: Euclidean on the standardised ``covariates`` ``[N, p]`` (H, D, position), matching
    with replacement; prompts lacking either group contribute no pairs. Returns the mean of
    G_high − G_low over pairs (docs/method.md §6.4).
    """
    g = np.asarray(g, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    x = np.column_stack([standardize(col) for col in np.asarray(covariates, dtype=np.float64).T])
    clusters = np.asarray(clusters)
    high = c > np.median(c)
    diffs, dists, pair_clusters = [], [], []
    labels, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    offsets = np.r_[0, np.cumsum(np.bincount(inverse, minlength=labels.size))]
    n_prompts = 0
    for j in range(labels.size):  # loop over prompts; the matching inside is vectorised
        idx = order[offsets[j] : offsets[j + 1]]
        treated, control = idx[high[idx]], idx[~high[idx]]
        if treated.size == 0 or control.size == 0:
            continue
        n_prompts += 1
        dist = np.linalg.norm(x[treated][:, None, :] - x[control][None, :, :], axis=-1)  # [t, c]
        nearest = dist.argmin(axis=1)
        diffs.append(g[treated] - g[control[nearest]])
        dists.append(dist[np.arange(treated.size), nearest])
        pair_clusters.append(np.full(treated.size, labels[j]))
    if not diffs:
        return MatchingResult(float("nan"), 0, 0, float("nan"), np.zeros(0), np.zeros(0))
    diff = np.concatenate(diffs)
    return MatchingResult(
        float(diff.mean()), int(diff.size), n_prompts, float(np.concatenate(dists).mean()), diff,
        np.concatenate(pair_clusters),
    )  # fmt: skip


def budget_count(n_valid: int, ratio: float) -> int:
    """Tokens kept at a budget ratio: max(1, ceil(ρ·N)) (docs/method.md §5)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"budget ratio must be in (0, 1], got {ratio}")
    return max(1, int(np.ceil(ratio * n_valid - 1e-9)))


def standardized_ols(
    y: np.ndarray,
    regressors: Mapping[str, np.ndarray],
    clusters: np.ndarray | None = None,
    standardize_y: bool = False,
) -> dict[str, Any]:
    """OLS of ``y`` on z-scored regressors with an intercept, via statsmodels (docs/method.md §6.4).

    Standard errors are cluster-robust by ``clusters`` (prompts) when given, else HC1. Returns
    ``{"coef": {name: b}, "se": {...}, "pvalue": {...}, "ci_low": {...}, "ci_high": {...},
    "r2": float, "n": int, "cov_type": str}``.
    """
    import statsmodels.api as sm

    y = np.asarray(y, dtype=np.float64)
    names = list(regressors)
    if not names:
        raise ValueError("standardized_ols needs at least one regressor")
    x = np.column_stack([standardize(regressors[name]) for name in names])
    keep = np.isfinite(y) & np.isfinite(x).all(axis=1)
    y, x = y[keep], x[keep]
    if standardize_y:
        y = standardize(y)
    design = sm.add_constant(x, has_constant="add")
    model = sm.OLS(y, design)
    if clusters is not None and np.unique(np.asarray(clusters)[keep]).size > 1:
        groups = np.unique(np.asarray(clusters)[keep], return_inverse=True)[1]
        fit = model.fit(cov_type="cluster", cov_kwds={"groups": groups})
        cov_type = "cluster(prompt)"
    else:
        fit = model.fit(cov_type="HC1")
        cov_type = "HC1"
    cols = ["const", *names]
    ci = np.asarray(fit.conf_int())
    return {
        "coef": dict(zip(cols, map(float, fit.params), strict=True)),
        "se": dict(zip(cols, map(float, fit.bse), strict=True)),
        "pvalue": dict(zip(cols, map(float, fit.pvalues), strict=True)),
        "ci_low": dict(zip(cols, map(float, ci[:, 0]), strict=True)),
        "ci_high": dict(zip(cols, map(float, ci[:, 1]), strict=True)),
        "r2": float(fit.rsquared),
        "n": int(y.size),
        "cov_type": cov_type,
    }


def ols_model_specs(has_teacher_entropy: bool = True) -> dict[str, Sequence[str]]:
    """The regressor sets of docs/method.md §6.4 (names of columns built by the analysis tool).

    ``m1``: H + D + H·D + position (+ teacher entropy); ``m2``: m1 + C; ``m3``: D replaced by
    the learnable part D^L = D̃·C̃ and the incompatible part D^I = D̃·(1 − C̃).
    """
    tail = ["position", "teacher_entropy"] if has_teacher_entropy else ["position"]
    return {
        "m1_base": ["H", "D", "HxD", *tail],
        "m2_plus_C": ["H", "D", "HxD", *tail, "C"],
        "m3_learnable_split": ["H", "D_learn", "D_incompat", *tail],
    }
