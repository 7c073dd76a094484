"""The vectorised ta_opd pipeline against the per-token reference (tests/ta_opd/reference.py).

Masks must be identical; statistics, features, scores and metrics allclose. Batches are random:
random K, overlapping lists, padded/non-finite entries, empty lists, loss_mask 0, samples of
different lengths, exact C with some samples unavailable.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import reference as ref
import torch

from ta_opd import SELECTORS, SelectionConfig, select_tokens
from ta_opd.config import COMPAT_PROXIES
from ta_opd.normalize import NORMALIZERS

ATOL = 1e-5


def _run_both(batch, cfg: SelectionConfig, rollout_index: int = 0):
    got = select_tokens(batch, cfg, rollout_index)
    want = ref.select(ref.tokens_from_batch(batch), ref.RefConfig.from_selection_config(cfg), batch.k, rollout_index)
    return got, want


def _assert_parity(got, want, cfg: SelectionConfig, where: str) -> None:
    assert got.mask.tolist() == want.mask, f"{where}: masks differ"
    assert got.budget.n_budget == want.n_budget, where
    stats = got.stats.as_dict()
    for name in want.stats[0] if want.stats else []:
        if name == "cmass_exact" and not cfg.exact_cmass:
            continue
        expected = torch.tensor([st[name] for st in want.stats], dtype=torch.float64)
        actual = stats[name].to(torch.float64)
        assert torch.allclose(actual, expected, atol=ATOL, rtol=1e-6), f"{where}: statistic {name}"
    feats = got.features.as_dict() if got.features is not None else {}
    for mine, theirs in (
        ("h_norm", "h"),
        ("d_norm", "d"),
        ("c_norm", "c"),
        ("dc_norm", "dc"),
        ("d_learn", "d_learn"),
        ("d_incompat", "d_incompat"),
    ):
        expected = torch.tensor(want.features[theirs], dtype=torch.float64)
        assert torch.allclose(feats[mine].to(torch.float64), expected, atol=ATOL), f"{where}: feature {mine}"
    if feats:
        assert feats["is_q3"].tolist() == [bool(x) for x in want.features["is_q3"]], f"{where}: Q3 flags"
    for name, values in want.scores.items():
        expected = torch.tensor(values, dtype=torch.float64)
        assert torch.allclose(got.scores[name].to(torch.float64), expected, atol=ATOL), f"{where}: score {name}"
    assert set(got.metrics) == set(want.metrics), f"{where}: metric keys {set(got.metrics) ^ set(want.metrics)}"
    for key, value in want.metrics.items():
        other = got.metrics[key]
        assert (math.isnan(value) and math.isnan(other)) or math.isclose(other, value, abs_tol=ATOL), (
            f"{where}: metric {key}: {other} vs {value}"
        )


def _random_config(rng: random.Random, mask: str) -> SelectionConfig:
    return SelectionConfig(
        mask=mask,
        ratio=rng.choice([0.01, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0]),
        seed=rng.randint(0, 100),
        min_keep_per_sample=rng.choice([0, 1, 1, 2]),
        gamma=rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]),
        compat_proxy=rng.choice(COMPAT_PROXIES),
        prefix_ema_alpha=rng.choice([0.0, 0.5, 0.9, 1.0]),
        normalization=rng.choice(NORMALIZERS.names()),
        ca_softor_variant=rng.choice(["code", "paper"]),
        exact_cmass=rng.random() < 0.4,
        exact_cmass_max_union=rng.choice([3, 6, 4096]),
        exact_cmass_overflow=rng.choice(["fallback", "truncate"]),
        topk_k=16,
    )


@pytest.mark.parametrize("mask", SELECTORS.names())
def test_every_selector_matches_the_reference(mask):
    """Each selector on 12 random batches with random configs (normaliser, proxy, variant, exact C);
    every third batch is tie-heavy (rows drawn from 3 templates) so the tie rule decides."""
    for seed in range(12):
        rng = random.Random(1000 * seed + len(mask))
        cfg = _random_config(rng, mask)
        batch = ref.random_batch(seed * 31 + len(mask), exact=cfg.exact_cmass, ties=seed % 3 == 0)
        got, want = _run_both(batch, cfg, rollout_index=seed)
        _assert_parity(got, want, cfg, f"mask={mask} seed={seed} cfg={cfg}")


@pytest.mark.parametrize(
    ("normalization", "proxy", "variant", "exact"),
    list(itertools.product(NORMALIZERS.names(), COMPAT_PROXIES, ["code", "paper"], [False, True])),
)
def test_every_normaliser_proxy_variant_and_exact_mode(normalization, proxy, variant, exact):
    """Every normaliser × proxy × ca_softor variant × exact C on/off, on selectors that use each feature."""
    for i, mask in enumerate(("ca_softor", "q3", "split_budget_ca", "q3_lowc")):
        cfg = SelectionConfig(
            mask=mask,
            ratio=0.2,
            compat_proxy=proxy,
            normalization=normalization,
            ca_softor_variant=variant,
            exact_cmass=exact,
            exact_cmass_max_union=5 if i % 2 else 4096,
            exact_cmass_overflow="truncate" if i == 3 else "fallback",
        )
        batch = ref.random_batch(100 + i, exact=exact, max_samples=4, max_len=40)
        got, want = _run_both(batch, cfg)
        _assert_parity(got, want, cfg, f"{normalization}/{proxy}/{variant}/exact={exact}/{mask}")


def test_larger_batch_fixed_k16():
    """One bigger step (K = 16, several hundred tokens) for every selector at 3 %."""
    batch = ref.random_batch(7, max_samples=6, max_len=80, k=16)
    for mask in SELECTORS.names():
        cfg = SelectionConfig(mask=mask, ratio=0.03)
        got, want = _run_both(batch, cfg, rollout_index=3)
        _assert_parity(got, want, cfg, f"large/{mask}")


def test_nonfinite_drop_policy_matches():
    batch = ref.random_batch(5, max_samples=3, max_len=20)
    batch.teacher_logp[1] = float("nan")
    batch.student_logp[2] = float("inf")
    batch.loss_mask[1] = batch.loss_mask[2] = True
    cfg = SelectionConfig(mask="dlearn_high", ratio=0.3, nonfinite_policy="drop")
    got, want = _run_both(batch, cfg)
    _assert_parity(got, want, cfg, "drop")
    assert got.metrics["opd/nonfinite_logp_tokens"] == 2.0
    assert not got.mask[1] and not got.mask[2]


def test_exact_overflow_error_in_both():
    batch = ref.random_batch(3, exact=True, max_samples=2, max_len=30, k=4)
    batch.exact_available[:] = True
    cfg = SelectionConfig(
        mask="ca_softor", ratio=0.5, exact_cmass=True, exact_cmass_max_union=1, exact_cmass_overflow="error"
    )
    with pytest.raises(ValueError, match="sample"):
        select_tokens(batch, cfg)
    with pytest.raises(ValueError, match="sample"):
        ref.select(ref.tokens_from_batch(batch), ref.RefConfig.from_selection_config(cfg), batch.k)
