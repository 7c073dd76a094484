"""select_tokens end to end (docs/method.md §2–5, §9): full mask, budgets, metrics, non-finite policy."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from reference import batch_from_rows

from ta_opd import SELECTORS, SelectionConfig, TokenBatch, select_tokens

# Two samples; sample 1's token 1 is not supervisable (loss_mask 0).
ROWS = [
    {"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.25), (3, 0.5)], "slp": -1.0, "tlp": -2.0},
    {"s": [(1, 0.9), (2, 0.05)], "t": [(1, 0.9), (2, 0.05)], "slp": -0.5, "tlp": -0.5},
    {"s": [(4, 0.4), (5, 0.4)], "t": [(4, 0.1), (6, 0.8)], "sample": 1, "slp": -3.0, "tlp": -1.0},
    {"s": [(4, 0.6), (5, 0.2)], "t": [(4, 0.5), (5, 0.3)], "sample": 1, "mask": False, "slp": -1.0, "tlp": -1.0},
]


def test_full_mask_keeps_every_valid_token_and_reports_metrics():
    res = select_tokens(batch_from_rows(ROWS, 2), SelectionConfig())
    assert res.mask.tolist() == [True, True, True, False]
    m = res.metrics
    assert m["opd/n_valid_tokens"] == 3 and m["opd/n_kept_tokens"] == 3
    assert m["opd/realised_ratio"] == 1.0 and m["opd/nominal_ratio"] == 1.0
    # sampled reverse KL log p_S − log p_T over valid tokens: (1 + 0 − 2)/3
    assert m["opd/sampled_rev_kl_all"] == pytest.approx(-1 / 3)
    # overlap |S ∩ T|/K over valid tokens: (1/2 + 2/2 + 1/2)/3
    assert m["opd/overlap_ratio"] == pytest.approx(2 / 3)
    # teacher mass on the shared set: (0.25 + 0.95 + 0.1)/3
    assert m["opd/teacher_mass_on_shared"] == pytest.approx(1.3 / 3)
    # reach_t1: teacher top-1 in S? token 0 (3 ∉ S) no, token 1 yes, token 2 (6 ∉ S) no → 1/3
    assert m["opd/reach_t1"] == pytest.approx(1 / 3)
    for key in ("h_norm", "d_norm", "c_norm", "d_learn", "d_incompat", "q3_share"):
        assert f"opd/{key}_valid" in m and f"opd/{key}_kept" in m


def test_budget_keeps_best_token_then_min_keep():
    # divergence at ρ = 0.3: N_valid = 3 → n = 1. D: token 1 has identical lists → D = 0, so the best D̃ is
    # token 0 or 2; min-keep then gives the other sample its best token by ca_softor.
    batch = batch_from_rows(ROWS, 2)
    res = select_tokens(batch, SelectionConfig(mask="divergence", ratio=0.3))
    d = res.stats.kl_f_union
    assert d[1].item() == pytest.approx(0.0, abs=1e-12)
    assert res.budget.n_budget == 1
    assert res.mask[3].item() is False  # never an invalid token
    assert res.mask[:2].any() and res.mask[2:].any()  # min-keep: both samples keep a token
    assert res.metrics["opd/realised_ratio"] == pytest.approx(2 / 3)
    assert res.metrics["opd/nominal_ratio"] == pytest.approx(0.3)
    assert res.metrics["opd/min_keep_added"] == 1.0
    no_keep = select_tokens(batch, SelectionConfig(mask="divergence", ratio=0.3, min_keep_per_sample=0))
    assert no_keep.mask.sum().item() == 1


@pytest.mark.parametrize("mask", SELECTORS.names())
def test_every_selector_runs_and_respects_the_loss_mask(mask):
    batch = ref.random_batch(11, max_samples=5, max_len=30, k=8)
    res = select_tokens(batch, SelectionConfig(mask=mask, ratio=0.2), rollout_index=2)
    assert res.mask.dtype == torch.bool and res.mask.shape == batch.loss_mask.shape
    assert not bool((res.mask & ~batch.loss_mask).any())
    n_valid = int(batch.loss_mask.sum())
    assert res.metrics["opd/n_valid_tokens"] == n_valid
    assert res.metrics["opd/realised_ratio"] == pytest.approx(res.mask.sum().item() / n_valid)
    for value in res.metrics.values():
        assert isinstance(value, float)


def test_ratio_at_least_one_or_full_means_no_masking():
    batch = ref.random_batch(4)
    for cfg in (SelectionConfig(mask="ca_softor", ratio=1.0), SelectionConfig(mask="full", ratio=0.1)):
        res = select_tokens(batch, cfg)
        assert torch.equal(res.mask, batch.loss_mask)
        assert res.metrics["opd/nominal_ratio"] == 1.0


def test_random_selector_seeded_by_rollout_index():
    batch = ref.random_batch(8, max_samples=5, max_len=30)
    cfg = SelectionConfig(mask="random", ratio=0.3, min_keep_per_sample=0)
    a = select_tokens(batch, cfg, rollout_index=5).mask
    assert torch.equal(a, select_tokens(batch, cfg, rollout_index=5).mask)
    assert not torch.equal(a, select_tokens(batch, cfg, rollout_index=6).mask)


def test_nonfinite_error_names_sample_and_position():
    batch = batch_from_rows(ROWS, 2)
    batch.teacher_logp[2] = math.nan
    with pytest.raises(ValueError, match=r"sample 1 position 0"):
        select_tokens(batch, SelectionConfig(mask="ca_softor", ratio=0.5))
    with pytest.raises(ValueError, match=r"sample 1 position 0"):
        select_tokens(batch, SelectionConfig())  # the policy applies with the full mask too


def test_nonfinite_drop_masks_and_counts():
    batch = batch_from_rows(ROWS, 2)
    batch.teacher_logp[2] = math.nan
    batch.student_logp[0] = -math.inf
    batch.teacher_logp[3] = math.nan  # loss_mask 0: not a supervised token, not counted
    res = select_tokens(batch, SelectionConfig(nonfinite_policy="drop"))
    assert res.mask.tolist() == [False, True, False, False]
    assert res.metrics["opd/nonfinite_logp_tokens"] == 2.0
    assert res.metrics["opd/n_valid_tokens"] == 1.0
    # a NaN never reaches the metrics
    assert all(not math.isnan(v) for k, v in res.metrics.items() if "kept" not in k or "rev_kl" in k)


def test_unrecorded_student_logprobs_are_not_faults():
    lists = [[[-0.5, 1, None], [-1.0, 2, None]]] * 2
    batch = TokenBatch.from_sample_lists([lists], [lists], [[1, 2]], [None], [[-0.5, -1.0]], [[1, 1]], k=2)
    res = select_tokens(batch, SelectionConfig(mask="entropy", ratio=0.5))
    assert res.metrics["opd/nonfinite_logp_tokens"] == 0.0
    assert math.isnan(res.metrics["opd/sampled_rev_kl_all"])  # unknown log p_S: no reverse KL, NaN logged


def test_missing_topk_lists_name_the_sample_only_when_selecting():
    lists = [[[-0.5, 1, None]]] * 3
    args = ([lists, lists[:1]], [lists, lists], [[1, 1, 1], [1, 1, 1]], None, [[-1.0] * 3] * 2, [[1] * 3] * 2)
    batch = TokenBatch.from_sample_lists(*args, k=1)
    select_tokens(batch, SelectionConfig())  # full: fine without lists
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        select_tokens(batch, SelectionConfig(mask="ca_softor", ratio=0.5))
    with pytest.raises(ValueError, match="sample 1: student top-K lists cover 1 of 3"):
        TokenBatch.from_sample_lists(*args, k=1, require_topk=True)


def test_no_topk_lists_with_a_selector_is_an_error():
    batch = batch_from_rows([{"s": [], "t": []}], 0)
    select_tokens(batch, SelectionConfig())
    with pytest.raises(ValueError, match="top-K"):
        select_tokens(batch, SelectionConfig(mask="entropy", ratio=0.5))


def test_metrics_match_reference_on_kept_tokens():
    batch = ref.random_batch(21, max_samples=5, max_len=30)
    cfg = SelectionConfig(mask="q3", ratio=0.25)
    got = select_tokens(batch, cfg).metrics
    want = ref.select(ref.tokens_from_batch(batch), ref.RefConfig.from_selection_config(cfg), batch.k).metrics
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key
