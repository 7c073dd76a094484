"""Full-vocabulary statistics (docs/method.md §6.2) against hand-computed cases on a vocabulary of 4."""

from __future__ import annotations

import math

import pytest
import torch

from ta_opd.diagnostics.fullvocab import chunked_fullvocab_token_stats, fullvocab_token_stats

P_S = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.6, 0.2, 0.15, 0.05]], dtype=torch.float64)
P_T = torch.tensor([[0.25, 0.5, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
SAMPLED = torch.tensor([1, 3])


def _stats(**kw):
    return fullvocab_token_stats(P_S.log(), P_T.log(), SAMPLED, **kw)


def test_entropy_kl_bc_hand_computed():
    out = _stats(ks=())
    ln2 = math.log(2)
    # row 0: H = 0.5 ln2 + 0.25·2 ln2 + 2·0.125·3 ln2 = 1.75 ln2 for both sides.
    assert out["entropy_student"][0].item() == pytest.approx(1.75 * ln2)
    assert out["entropy_teacher"][0].item() == pytest.approx(1.75 * ln2)
    # KL(p_T‖p_S) = 0.25 ln(0.25/0.5) + 0.5 ln(0.5/0.25) = 0.25 ln2; KLr the same by symmetry here.
    assert out["kl_f"][0].item() == pytest.approx(0.25 * ln2)
    assert out["kl_r"][0].item() == pytest.approx(0.25 * ln2)
    assert out["bc_full"][0].item() == pytest.approx(2 * math.sqrt(0.125) + 0.25)
    # row 1 written out term by term.
    klf = 0.1 * math.log(0.1 / 0.6) + 0.3 * math.log(0.3 / 0.15) + 0.4 * math.log(0.4 / 0.05)
    klr = 0.6 * math.log(0.6 / 0.1) + 0.15 * math.log(0.15 / 0.3) + 0.05 * math.log(0.05 / 0.4)
    assert out["kl_f"][1].item() == pytest.approx(klf)
    assert out["kl_r"][1].item() == pytest.approx(klr)
    h_t = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))
    assert out["entropy_teacher"][1].item() == pytest.approx(h_t)
    assert out["student_logp_sampled"].tolist() == pytest.approx([math.log(0.25), math.log(0.05)])
    assert out["teacher_logp_sampled"].tolist() == pytest.approx([math.log(0.5), math.log(0.4)])


def test_support_definitions_hand_computed():
    out = _stats(ks=(1, 2, 3))
    # row 0, K=2: S = {0, 1} = T → C = 0.25 + 0.5, full overlap.
    assert out["cmass_exact_k2"][0].item() == pytest.approx(0.75)
    assert out["overlap_k2"][0].item() == 1.0 and out["jaccard_k2"][0].item() == 1.0
    assert out["shared_student_mass_k2"][0].item() == pytest.approx(0.75)
    # row 0, K=1: S = {0}, T = {1}: teacher mass on S = 0.25, nothing shared.
    assert out["cmass_exact_k1"][0].item() == pytest.approx(0.25)
    assert out["overlap_k1"][0].item() == 0.0 and out["shared_teacher_mass_k1"][0].item() == 0.0
    # row 1, K=2: S = {0, 1}, T = {3, 2}: C = 0.1 + 0.2, disjoint.
    assert out["cmass_exact_k2"][1].item() == pytest.approx(0.3)
    assert out["jaccard_k2"][1].item() == 0.0
    # row 1, K=3: S = {0, 1, 2}, T = {3, 2, 1}: shared {1, 2}.
    assert out["cmass_exact_k3"][1].item() == pytest.approx(0.6)
    assert out["overlap_k3"][1].item() == pytest.approx(2 / 3)
    assert out["jaccard_k3"][1].item() == pytest.approx(0.5)
    assert out["shared_teacher_mass_k3"][1].item() == pytest.approx(0.5)
    assert out["shared_student_mass_k3"][1].item() == pytest.approx(0.35)


def test_kl_is_zero_for_equal_distributions_and_shapes_checked():
    out = fullvocab_token_stats(P_S.log(), P_S.log(), SAMPLED, ks=())
    assert torch.allclose(out["kl_f"], torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out["bc_full"], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        fullvocab_token_stats(P_S.log(), P_T.log()[:, :3], SAMPLED)


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    s_logits = torch.randn(37, 50, generator=gen)
    t_logits = torch.randn(37, 50, generator=gen)
    sampled = torch.randint(0, 50, (37,), generator=gen)
    full = fullvocab_token_stats(s_logits, t_logits, sampled, ks=(4, 8), keep_topk=8)
    calls = []

    def s_fn(a, b):
        calls.append(b - a)
        return s_logits[a:b]

    chunked = chunked_fullvocab_token_stats(
        s_fn, lambda a, b: t_logits[a:b], sampled, chunk_tokens=10, ks=(4, 8), keep_topk=8
    )
    assert max(calls) <= 10 and sum(calls) == 37
    assert full.keys() == chunked.keys()
    for key in full:
        assert torch.allclose(full[key].double(), chunked[key].double()), key


def test_union_stats_come_from_ta_opd_stats():
    pytest.importorskip("ta_opd.stats")
    from ta_opd.diagnostics.selection import make_token_batch, token_stats

    gen = torch.Generator().manual_seed(1)
    s_logits = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    t_logits = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    sampled = torch.randint(0, 30, (12,), generator=gen)
    out = fullvocab_token_stats(s_logits, t_logits, sampled, ks=(), union_ks=(4,), keep_topk=4)
    batch = make_token_batch(
        out["student_topk_ids"], out["student_topk_logp"], out["teacher_topk_ids"], out["teacher_topk_logp"],
        sampled, out["student_logp_sampled"], out["teacher_logp_sampled"],
    )  # fmt: skip
    ref = token_stats(batch, topk_k=4)
    for name in ("kl_f_union", "kl_r_union", "bc", "cmass", "entropy_norm"):
        assert torch.allclose(out[f"{name}_k4"].double(), getattr(ref, name).double(), atol=1e-6), name
    # D = KLf on the union of the top-K lists is at most... not bounded by full KL, but is >= 0 and finite.
    assert torch.isfinite(out["kl_f_union_k4"]).all() and (out["kl_f_union_k4"] >= -1e-9).all()
    # Lower-bound C from the teacher's own top-K never exceeds exact C.
    exact = fullvocab_token_stats(s_logits, t_logits, sampled, ks=(4,))["cmass_exact_k4"]
    assert (out["cmass_k4"] <= exact + 1e-6).all()
