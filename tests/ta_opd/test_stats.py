"""docs/method.md §2 statistics on cases small enough to check on paper (hand computation in comments)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import batch_from_rows

from ta_opd import SelectionConfig, compute_token_stats
from ta_opd.stats import prefix_ema

L = math.log
F = 1e-12  # the floor of ŝ, t̂

# The running example: K = 2, S = {1: 0.5, 2: 0.25}, T = {1: 0.25, 3: 0.5}.
# U = {1, 2, 3}; Σ_U s = 0.75, Σ_U t = 0.75, so on U:
#   ŝ = {1: 2/3, 2: 1/3, 3: 1e-12}      t̂ = {1: 1/3, 2: 1e-12, 3: 2/3}
EXAMPLE = {"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.25), (3, 0.5)]}


def _stats(rows, k=2, **cfg):
    return compute_token_stats(batch_from_rows(rows, k), SelectionConfig(**cfg))


def test_union_divergences_and_bc_by_hand():
    st = _stats([EXAMPLE])
    # D = Σ t̂ (log t̂ − log ŝ) = 1/3·log(1/3 ÷ 2/3) + 1e-12·log(1e-12 ÷ 1/3) + 2/3·log(2/3 ÷ 1e-12)
    d = 1 / 3 * L(0.5) + F * L(F * 3) + 2 / 3 * L(2 / 3 / F)
    # KLr = Σ ŝ (log ŝ − log t̂) = 2/3·log 2 + 1/3·log(1/3 ÷ 1e-12) + 1e-12·log(1e-12 ÷ 2/3)
    klr = 2 / 3 * L(2) + 1 / 3 * L(1 / 3 / F) + F * L(F * 1.5)
    # BC = Σ sqrt(ŝ t̂) = sqrt(2/9) + sqrt(1e-12/3) + sqrt(2e-12/3)
    bc = math.sqrt(2 / 9) + math.sqrt(F / 3) + math.sqrt(2 * F / 3)
    assert st.kl_f_union.item() == pytest.approx(d, rel=1e-12)  # ≈ 17.919
    assert st.kl_r_union.item() == pytest.approx(klr, rel=1e-12)  # ≈ 9.306
    assert st.bc.item() == pytest.approx(bc, rel=1e-12)  # ≈ 0.4714


def test_cmass_overlap_reach_masses_and_top1_by_hand():
    st = _stats([EXAMPLE])
    assert st.cmass.item() == pytest.approx(0.25)  # teacher mass on S from T's list: t(1) = 0.25 (2 ∉ T)
    assert st.compat.item() == pytest.approx(0.25)  # default proxy 'mass'
    assert st.overlap.item() == pytest.approx(0.5)  # |{1}| / K = 1/2
    assert not st.reach_t1.item()  # teacher top-1 is 3 (0.5), not in S
    assert st.student_top1_id.item() == 1 and st.student_top1_prob.item() == pytest.approx(0.5)
    assert st.teacher_top1_id.item() == 3 and st.teacher_top1_prob.item() == pytest.approx(0.5)
    assert st.student_topk_mass.item() == pytest.approx(0.75)  # 0.5 + 0.25
    assert st.teacher_topk_mass.item() == pytest.approx(0.75)
    assert st.teacher_mass_on_shared.item() == pytest.approx(0.25)


def test_reach_t1_true_when_teacher_top1_in_student_list():
    st = _stats([{"s": [(1, 0.5), (2, 0.25)], "t": [(2, 0.6), (3, 0.1)]}])
    assert st.reach_t1.item()  # teacher top-1 is 2 ∈ S
    assert st.cmass.item() == pytest.approx(0.6)  # t(2) only


def test_entropy_normalised_by_hand():
    st = _stats([EXAMPLE])
    # student probs renormalised over themselves: 2/3, 1/3; H = −(2/3 ln 2/3 + 1/3 ln 1/3) / ln 2 ≈ 0.9183
    h = -(2 / 3 * L(2 / 3) + 1 / 3 * L(1 / 3)) / L(2)
    assert st.entropy_norm.item() == pytest.approx(h, rel=1e-12)
    # four equal entries: ln 4 / ln 4 = 1; one entry: 0 / ln 2 = 0; no entries: 0
    st = _stats(
        [
            {"s": [(1, 0.1), (2, 0.1), (3, 0.1), (4, 0.1)], "t": [(1, 0.5)]},
            {"s": [(1, 0.3)], "t": [(1, 0.5)]},
            {"s": [], "t": [(1, 0.5)]},
        ],
        k=4,
    )
    assert st.entropy_norm.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)


def test_entropy_does_not_depend_on_teacher_list():
    # H is the student's own entropy: an empty teacher list must not change it (renormalise over S only)
    with_t = _stats([EXAMPLE]).entropy_norm.item()
    without_t = _stats([{"s": EXAMPLE["s"], "t": []}]).entropy_norm.item()
    assert without_t == pytest.approx(with_t, rel=1e-12)


def test_ranks_of_sampled_token():
    # y = 2: student list 0.5 > 0.25 → rank 1; absent from T → −1.  y = 1: rank 0 in S, rank 1 in T (0.5 > 0.25)
    st = _stats([{**EXAMPLE, "y": 2}, {**EXAMPLE, "y": 1}, {**EXAMPLE, "y": 9}])
    assert st.student_rank_sampled.tolist() == [1, 0, -1]
    assert st.teacher_rank_sampled.tolist() == [-1, 1, -1]


def test_identical_lists_zero_divergence_unit_bc():
    st = _stats([{"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.5), (2, 0.25)]}])
    assert st.kl_f_union.item() == pytest.approx(0.0, abs=1e-12)
    assert st.kl_r_union.item() == pytest.approx(0.0, abs=1e-12)
    assert st.bc.item() == pytest.approx(1.0)  # Σ sqrt(ŝ t̂) = Σ ŝ = 1
    assert st.cmass.item() == pytest.approx(0.75)
    assert st.overlap.item() == 1.0


def test_empty_side_gives_zero_divergences():
    # either side without mass on U → D = KLr = BC = 0; C = 0 without a teacher list
    st = _stats([{"s": EXAMPLE["s"], "t": []}, {"s": [], "t": EXAMPLE["t"]}])
    assert st.kl_f_union.tolist() == [0.0, 0.0]
    assert st.kl_r_union.tolist() == [0.0, 0.0]
    assert st.bc.tolist() == [0.0, 0.0]
    assert st.cmass.tolist() == [0.0, 0.0]


def test_nonfinite_entries_are_dropped_from_lists():
    batch = batch_from_rows([{"s": [(1, 0.5), (2, 0.25), (7, 0.1)], "t": [(1, 0.25), (3, 0.5), (8, 0.1)]}], 3)
    batch.student_topk_logp[0, 2] = float("nan")  # entry 7 dropped
    batch.teacher_topk_logp[0, 2] = float("inf")  # entry 8 dropped
    got = compute_token_stats(batch, SelectionConfig())
    want = _stats([EXAMPLE], k=3)
    for name in ("kl_f_union", "kl_r_union", "bc", "cmass", "entropy_norm"):
        assert getattr(got, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-12), name


def test_cmass_is_clipped_to_one():
    # sloppy servers can return masses a hair above 1: C = clip(Σ, 0, 1)
    st = _stats([{"s": [(1, 0.5), (2, 0.5)], "t": [(1, 0.6), (2, 0.6)]}])
    assert st.cmass.item() == 1.0


def test_exact_cmass_and_overflow_rules_by_hand():
    # S = {1: 0.5, 2: 0.25}, teacher top-K = {3: 0.5} → lower bound C = 0.
    # Exact teacher probs of the student ids: 1 → 0.2, 2 → 0.1 → exact C = 0.3.
    row = {"s": [(1, 0.5), (2, 0.25)], "t": [(3, 0.5)], "exact": [0.2, 0.1]}
    lower = _stats([row])
    assert lower.cmass.item() == 0.0 and lower.cmass_exact is None  # exact mode off
    exact = _stats([row], exact_cmass=True)
    assert exact.cmass.item() == 0.0  # the lower bound is still reported
    assert exact.cmass_exact.item() == pytest.approx(0.3)
    assert exact.compat.item() == pytest.approx(0.3)
    # the sample's id union {1, 2} has 2 ids > max_union 1:
    fallback = _stats([row], exact_cmass=True, exact_cmass_max_union=1, exact_cmass_overflow="fallback")
    assert fallback.compat.item() == 0.0  # whole sample keeps the lower bound
    # truncate: exact only for the id with the best student log-prob (1: 0.5) → 0.2 + lower bound of 2 (0)
    trunc = _stats([row], exact_cmass=True, exact_cmass_max_union=1, exact_cmass_overflow="truncate")
    assert trunc.compat.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="sample 0"):
        _stats([row], exact_cmass=True, exact_cmass_max_union=1, exact_cmass_overflow="error")


def test_exact_cmass_unavailable_rows_keep_lower_bound():
    rows = [
        {"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.4)], "exact": [0.4, 0.3]},
        {"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.4)], "exact": [0.4, 0.3], "sample": 1},
    ]
    batch = batch_from_rows(rows, 2)
    batch.exact_available = torch.tensor([True, False])
    st = compute_token_stats(batch, SelectionConfig(exact_cmass=True))
    assert st.compat.tolist() == pytest.approx([0.7, 0.4])  # exact 0.4 + 0.3; lower bound t(1) = 0.4


def test_position_normalised():
    # t / max(L − 1, 1): L = 5 → 0, 1/4, 2/4, 3/4, 1; L = 1 → 0
    rows = [{**EXAMPLE} for _ in range(5)] + [{**EXAMPLE, "sample": 1}]
    st = _stats(rows)
    assert st.position_norm.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.0])


@pytest.mark.parametrize("proxy", ["mass", "set", "bc", "prefix_ema"])
def test_compat_proxies(proxy):
    # two tokens of one sample: C = [0.25, 0.75], overlap = [1/2, 1], BC from the union
    rows = [EXAMPLE, {"s": [(1, 0.5), (2, 0.25)], "t": [(1, 0.5), (2, 0.25)]}]
    st = _stats(rows, compat_proxy=proxy, prefix_ema_alpha=0.9)
    expected = {
        "mass": [0.25, 0.75],
        "set": [0.5, 1.0],
        "bc": st.bc.tolist(),
        # e_0 = C_0 = 0.25; e_1 = 0.9·0.25 + 0.1·0.75 = 0.3
        "prefix_ema": [0.25, 0.3],
    }[proxy]
    assert st.compat.tolist() == pytest.approx(expected, rel=1e-12)


def test_prefix_ema_by_hand_and_resets_per_sample():
    # sample 0: C = [0.2, 0.6, 1.0], α = 0.9 → 0.2, 0.9·0.2 + 0.1·0.6 = 0.24, 0.9·0.24 + 0.1·1.0 = 0.316
    # sample 1 (rows interleaved in memory, positions out of order): C = [0.5 @ pos 0, 0.0 @ pos 1] → 0.5, 0.45
    values = torch.tensor([0.2, 0.0, 0.6, 0.5, 1.0], dtype=torch.float64)
    sample = torch.tensor([0, 1, 0, 1, 0])
    position = torch.tensor([0, 1, 1, 0, 2])
    out = prefix_ema(values, sample, position, 0.9)
    assert out.tolist() == pytest.approx([0.2, 0.45, 0.24, 0.5, 0.316], rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3, 0.9, 0.999, 1.0])
def test_prefix_ema_long_sequences_match_the_recurrence(alpha):
    # 700 positions crosses the scan's blocks; small α must not overflow α^-i
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(700 + 300, generator=gen, dtype=torch.float64)
    sample = torch.cat([torch.zeros(700, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    position = torch.cat([torch.arange(700), torch.arange(300)])
    out = prefix_ema(values, sample, position, alpha)
    expected = []
    for lo, hi in ((0, 700), (700, 1000)):
        e = 0.0
        for j in range(lo, hi):
            e = values[j].item() if j == lo else alpha * e + (1 - alpha) * values[j].item()
            expected.append(e)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx(expected, abs=1e-9)
