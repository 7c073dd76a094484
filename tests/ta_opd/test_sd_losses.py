"""Hand-computed cases, gradient checks and properties of ta_opd.sd_losses (docs/method.md §7–8).

Hand cases use V = 3, temperature 1 and probabilities chosen so that every number can be
checked on paper (values in the comments, ln in nats).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ta_opd.chunked import LMHeadInput
from ta_opd.loss_registry import LOSSES, LossConfig, LossInputs, LossSpec, loss_types_needing, register_loss
from ta_opd.sd_losses import (
    eopd_loss,
    gather_logprobs,
    jsd_loss,
    opsd_loss,
    position_weights,
    pwopsd_loss,
    reopold_loss,
    teacher_topk,
    topk_fkl_loss,
    topk_rkl_loss,
    valid_rank_in_sample,
)

D = torch.float64
UNIFORM = [1 / 3, 1 / 3, 1 / 3]


def logits_of(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is the given probability rows (log p)."""
    return torch.tensor(rows, dtype=D).log()


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------

# Teacher p_T = [0.5, 0.25, 0.25], student uniform: terms 0.5 ln 1.5 = 0.2027326 (clipped to 0.05),
# 0.25 ln 0.75 = -0.0719205 (twice)  =>  ℓ = 0.05 - 0.1438410 = -0.0938410.
OPSD_TOKEN = 0.05 + 2 * 0.25 * math.log(0.75)


def test_opsd_hand_case():
    student = logits_of(UNIFORM, UNIFORM, UNIFORM)
    teacher = logits_of([0.5, 0.25, 0.25], UNIFORM, [0.9, 0.05, 0.05])  # 3rd row masked out
    mask = torch.tensor([True, True, False])
    out = opsd_loss(student, teacher, mask, temperature=1.0)
    assert OPSD_TOKEN == pytest.approx(-0.0938410362, abs=1e-9)
    # (ℓ_1 + ℓ_2) / N_valid = (-0.0938410 + 0) / 2 = -0.0469205
    assert out.loss.item() == pytest.approx(-0.0469205181, abs=1e-9)
    assert out.per_token.tolist() == pytest.approx([OPSD_TOKEN, 0.0, 0.0], abs=1e-12)
    # Unclipped the first token is the plain KL 0.0588915 (> 0.05 clip only on the big term).
    big_clip = opsd_loss(student, teacher, mask, temperature=1.0, clip=10.0)
    assert big_clip.per_token[0].item() == pytest.approx(0.0588915178, abs=1e-9)


def test_opsd_temperature_divides_both_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g, dtype=D), torch.randn(4, 6, generator=g, dtype=D)
    mask = torch.ones(4, dtype=torch.bool)
    a = opsd_loss(s, t, mask).loss  # default temperature 1.1
    b = opsd_loss(s / 1.1, t / 1.1, mask, temperature=1.0).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_position_weights_hand_case():
    # Sample 0: valid tokens at rows 0, 1 (row 2 invalid) -> f = 0.25, 0.75; sample 1: one valid -> f = 0.5.
    mask = torch.tensor([True, True, False, False, True])
    sid = torch.tensor([0, 0, 0, 1, 1])
    rank, length = valid_rank_in_sample(mask, sid)
    assert rank.tolist() == [1, 2, 0, 0, 1]
    assert length.tolist() == [2, 2, 2, 1, 1]
    w = position_weights(mask, sid)
    # w = 0.25 + 0.75 σ((f − 0.3)/0.1): σ(−0.5) = 0.3775407 -> 0.5331555; σ(4.5) -> 0.9917598; σ(2) -> 0.9105978
    assert w.tolist() == pytest.approx([0.5331555016, 0.9917597930, 0.0, 0.0, 0.9105978085], abs=1e-9)


def test_valid_rank_uses_positions_when_rows_are_shuffled():
    # Rows of two samples interleaved and out of position order.
    sid = torch.tensor([1, 0, 1, 0, 0])
    pos = torch.tensor([1, 2, 0, 0, 1])
    mask = torch.tensor([True, True, True, False, True])
    rank, length = valid_rank_in_sample(mask, sid, pos)
    # sample 0 valid at positions 1, 2 -> ranks 1, 2; sample 1 at positions 0, 1 -> ranks 1, 2
    assert rank.tolist() == [2, 2, 1, 0, 1]
    assert length.tolist() == [2, 2, 2, 2, 2]


def test_pwopsd_hand_case_per_sample_and_global():
    tp = [0.5, 0.25, 0.25]
    student = logits_of(UNIFORM, UNIFORM, UNIFORM, UNIFORM, UNIFORM, UNIFORM)
    teacher = logits_of(tp, tp, tp, UNIFORM, tp, tp)  # every valid token has ℓ = -0.0938410
    mask = torch.tensor([True, True, False, False, True, False])
    sid = torch.tensor([0, 0, 0, 1, 1, 2])  # sample 2 has no valid token: not counted in the mean
    out = pwopsd_loss(student, teacher, mask, sid, temperature=1.0)
    # sample 0: (0.5331555 + 0.9917598)(-0.0938410)/2 = -0.0715498; sample 1: 0.9105978 (-0.0938410) = -0.0854514
    # mean over the two samples = -0.0785006
    assert out.loss.item() == pytest.approx(-0.0785006288, abs=1e-9)
    glob = pwopsd_loss(student, teacher, mask, sid, temperature=1.0, reduction="token-mean")
    # Σ w ℓ / N_valid = (0.5331555 + 0.9917598 + 0.9105978)(-0.0938410)/3 = -0.0761837
    assert glob.loss.item() == pytest.approx(-0.0761836911, abs=1e-9)


def test_eopd_hand_case():
    # Token 1: teacher [0.5, 0.3, 0.2] (H = 1.0297 nats > 0.8), y = 0: A = ln 1.5 = 0.4054651, PPO = -A at ratio 1;
    #   top-2 {0, 1} renormalised [0.625, 0.375]: FKL = 0.625 ln 1.875 + 0.375 ln 1.125 = 0.4370491 -> ℓ = 0.0315839.
    # Token 2: teacher [0.9, 0.05, 0.05] (H = 0.3944 < 0.8, gate off), y = 1: A = ln 0.15 = -1.8971200, ℓ = -A.
    student = logits_of(UNIFORM, UNIFORM)
    teacher = logits_of([0.5, 0.3, 0.2], [0.9, 0.05, 0.05])
    y = torch.tensor([0, 1])
    mask = torch.ones(2, dtype=torch.bool)
    out = eopd_loss(student, teacher, y, mask, temperature=1.0, topk=2)
    assert out.per_token.tolist() == pytest.approx([0.0315839424, 1.8971199849], abs=1e-9)
    assert out.loss.item() == pytest.approx(0.9643519636, abs=1e-9)
    assert out.metrics["gate_mean"].item() == pytest.approx(0.5)


def test_eopd_ppo_clip_uses_old_logp():
    # ratio = p_S(y)/p_old(y) = (1/3)/(1/6) = 2 > 1.2 with A > 0: the clipped objective is constant -> zero gradient.
    s = logits_of(UNIFORM).requires_grad_(True)
    t = logits_of([0.2, 0.2, 0.6])  # H = 0.950 > 0.8, so the FKL term is on (it has a gradient of its own)
    old = torch.tensor([math.log(1 / 6)], dtype=D)
    out = eopd_loss(s, t, torch.tensor([2]), torch.tensor([True]), old_logp=old, temperature=1.0, topk=3)
    # A = ln 0.6 − ln(1/6) = ln 3.6 = 1.2809338 ; PPO = -A·1.2 = -1.5371206 ; FKL(full K=3) = KL(t‖u) = 0.1483726
    fkl = sum(p * math.log(3 * p) for p in (0.2, 0.2, 0.6))
    assert out.loss.item() == pytest.approx(-1.2 * math.log(3.6) + fkl, abs=1e-9)
    (g,) = torch.autograd.grad(out.loss, s)
    # Only the FKL term contributes: d/ds Σ p_T(log p_T − log p_S) = p_S − p_T = [0.1333, 0.1333, -0.2667]
    assert g[0].tolist() == pytest.approx([1 / 3 - 0.2, 1 / 3 - 0.2, 1 / 3 - 0.6], abs=1e-9)


def test_reopold_hand_case_warmup_and_entropy_phase():
    # floor = ln(0.1/0.9) = -2.1972246 ; student uniform so log p_S(y) = -ln 3 = -1.0986123.
    # R_1 = ln 1.5 = 0.4054651 (kept), R_2 = ln 0.15 = -1.8971200 (kept), R_3 = ln 0.03 = -3.5065579 (< floor).
    student = logits_of(UNIFORM, UNIFORM, UNIFORM)
    teacher = logits_of([0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.98, 0.01, 0.01])
    y = torch.tensor([0, 1, 1])
    mask = torch.ones(3, dtype=torch.bool)
    warm = reopold_loss(student, teacher, y, mask, step=0, temperature=1.0)
    # -(0.4054651·(-1.0986123) + (-1.8971200)(-1.0986123)) / 2 = -0.8193752
    assert warm.loss.item() == pytest.approx(-0.8193751890, abs=1e-9)
    assert warm.metrics["keep_ratio"].item() == pytest.approx(2 / 3)

    # After warm-up: 5 tokens, the uniform student (highest entropy) is the only one >= the 80th percentile.
    student5 = torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [0.0, 0, 0], [1.0, 0, 0], [0.5, 0, 0]], dtype=D)
    teacher5 = logits_of(UNIFORM, UNIFORM, [0.98, 0.01, 0.01], UNIFORM, UNIFORM)
    y5 = torch.tensor([0, 0, 1, 0, 0])
    late = reopold_loss(student5, teacher5, y5, torch.ones(5, dtype=torch.bool), step=50, temperature=1.0)
    # R = ln 0.03 < floor -> R̂ = floor: loss = -(-2.1972246)(-1.0986123)/1 = -2.4138979
    assert late.loss.item() == pytest.approx(-2.4138979216, abs=1e-9)
    assert late.metrics["keep_ratio"].item() == pytest.approx(0.2)


def test_topk_rkl_hand_case_with_padding():
    # Token 1: student [0.5, 0.3, 0.2], top-2 ids {0, 1}, w = [0.625, 0.375]; teacher log p on them ln[0.6, 0.1]:
    #   A_0 = 0.625 ln 1.2 = 0.1139512, A_1 = 0.375 ln(1/3) = -0.4119796; ratio 1 -> ℓ = -A_0 - A_1 = 0.2980286.
    # Token 2: list [2, pad], teacher ln 0.5: w = [1, 0], A = ln(0.5/0.2) = 0.9162907 -> ℓ = -0.9162907.
    student = logits_of([0.5, 0.3, 0.2], [0.5, 0.3, 0.2])
    ids = torch.tensor([[0, 1], [2, -1]])
    old = torch.tensor([[0.5, 0.3], [0.2, 0.0]], dtype=D).log()  # ln 0 = -inf padding
    teacher = torch.tensor([[0.6, 0.1], [0.5, 0.0]], dtype=D).log()
    out = topk_rkl_loss(student, ids, teacher, torch.ones(2, dtype=torch.bool), student_topk_old_logp=old)
    assert out.per_token.tolist() == pytest.approx([0.2980286353, -0.9162907319], abs=1e-9)
    assert out.loss.item() == pytest.approx(-0.3091310483, abs=1e-9)


def test_topk_fkl_hand_case_tail_and_renormalised():
    # Teacher top-2 {0, 1} with p = [0.5, 0.3], student uniform:
    #   plain: 0.5 ln 1.5 + 0.3 ln 0.9 = 0.1711244
    #   + tail bucket: 0.2 ln(0.2/(1/3)) = -0.1021651 -> 0.0689593 = KL([.5,.3,.2] ‖ uniform) exactly
    #   renormalised [0.625, 0.375]: 0.4370491
    student = logits_of(UNIFORM)
    ids = torch.tensor([[0, 1]])
    lt = torch.tensor([[0.5, 0.3]], dtype=D).log()
    mask = torch.tensor([True])
    assert topk_fkl_loss(student, ids, lt, mask).loss.item() == pytest.approx(0.1711243994, abs=1e-9)
    tail = topk_fkl_loss(student, ids, lt, mask, tail_bucket=True).loss.item()
    assert tail == pytest.approx(0.0689592746, abs=1e-9)
    renorm = topk_fkl_loss(student, ids, lt, mask, renormalize_teacher=True).loss.item()
    assert renorm == pytest.approx(0.4370490505, abs=1e-9)


def test_jsd_hand_case_and_endpoint_limits():
    # p_T = [0.5, 0.3, 0.2], p_S uniform: KL(T‖S) = 0.0689593, KL(S‖T) = 0.0702403,
    # JSD_0.5 = 0.0172510 (M = [0.41667, 0.31667, 0.26667]); normalised by β(1−β) = 0.25 -> 0.0690039.
    s, t = logits_of(UNIFORM), logits_of([0.5, 0.3, 0.2])
    mask = torch.tensor([True])
    assert jsd_loss(s, t, mask, beta=0.0).loss.item() == pytest.approx(0.0689592746, abs=1e-9)
    assert jsd_loss(s, t, mask, beta=1.0).loss.item() == pytest.approx(0.0702403438, abs=1e-9)
    assert jsd_loss(s, t, mask, beta=0.5, normalize=False).loss.item() == pytest.approx(0.0172509812, abs=1e-9)
    assert jsd_loss(s, t, mask, beta=0.5).loss.item() == pytest.approx(0.0690039246, abs=1e-9)
    # The endpoints are the limits of the normalised interior.
    assert jsd_loss(s, t, mask, beta=1e-6).loss.item() == pytest.approx(0.0689592746, abs=1e-6)
    assert jsd_loss(s, t, mask, beta=1 - 1e-6).loss.item() == pytest.approx(0.0702403438, abs=1e-6)


def test_all_masked_gives_zero_with_graph():
    s = torch.randn(3, 5, dtype=D, requires_grad=True)
    t = torch.randn(3, 5, dtype=D)
    out = opsd_loss(s, t, torch.zeros(3, dtype=torch.bool), chunk_size=2)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0


# --------------------------------------------------------------------------------------------
# Gradient checks (float64, tiny inputs) through the LM head, naive and chunked
# --------------------------------------------------------------------------------------------

N, H, V = 5, 3, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=D, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=D, requires_grad=True)
    teacher = 2 * torch.randn(N, V, generator=g, dtype=D)
    y = torch.randint(0, V, (N,), generator=g)
    mask = torch.tensor([True, True, False, True, True])
    sid = torch.tensor([0, 0, 0, 1, 1])
    return hidden, weight, teacher, y, mask, sid, g


def _grad_cases():
    hidden, weight, teacher, y, mask, sid, g = _inputs()
    old = (torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(-1, y[:, None]).squeeze(-1)) + 0.1 * (
        torch.randn(N, generator=g, dtype=D)
    )
    s_ids = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(N)])
    s_ids[1, 2] = -1
    s_old = torch.log_softmax(torch.randn(N, V, generator=g, dtype=D), -1).gather(-1, s_ids.clamp_min(0))
    t_on_s = torch.log_softmax(teacher, -1).gather(-1, s_ids.clamp_min(0))
    t_ids, t_logp = teacher_topk(teacher, 3)
    return (
        {
            "opsd": lambda src, cs: opsd_loss(src, teacher, mask, clip=0.02, chunk_size=cs),
            "pwopsd": lambda src, cs: pwopsd_loss(src, teacher, mask, sid, chunk_size=cs),
            "eopd": lambda src, cs: eopd_loss(
                src, teacher, y, mask, old_logp=old, topk=3, entropy_gate=0.5, chunk_size=cs
            ),
            "topk_rkl": lambda src, cs: topk_rkl_loss(
                src, s_ids, t_on_s, mask, student_topk_old_logp=s_old, chunk_size=cs
            ),
            "topk_fkl": lambda src, cs: topk_fkl_loss(src, t_ids, t_logp, mask, tail_bucket=True, chunk_size=cs),
            "jsd": lambda src, cs: jsd_loss(src, teacher, mask, beta=0.3, chunk_size=cs),
        },
        hidden,
        weight,
    )


LOSS_CASES = ["opsd", "pwopsd", "eopd", "topk_rkl", "topk_fkl", "jsd"]


@pytest.mark.parametrize("name", LOSS_CASES)
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_gradcheck(name, chunk_size):
    cases, hidden, weight = _grad_cases()
    fn = cases[name]
    assert torch.autograd.gradcheck(
        lambda h, w: fn(LMHeadInput(h, w), chunk_size).loss, (hidden, weight), eps=1e-6, atol=1e-7
    )


def test_reopold_gradient_is_reward_weighted_log_likelihood():
    # R̂ and M are constants (stop-gradient), so gradcheck on the loss would see them move; instead
    # compare with the explicit formula -Σ R̂ M ∇log p_S(y) / Σ M built from the loss's own constants.
    hidden, weight, teacher, y, mask, _, _ = _inputs(3)
    for step in (0, 60):
        for cs in (0, 2):
            out = reopold_loss(LMHeadInput(hidden, weight), teacher, y, mask, step=step, chunk_size=cs)
            g_loss = torch.autograd.grad(out.loss, (hidden, weight))
            with torch.no_grad():
                lps = torch.log_softmax((hidden @ weight.t()) / 1.1, -1).gather(-1, y[:, None]).squeeze(-1)
                lpt = torch.log_softmax(teacher / 1.1, -1).gather(-1, y[:, None]).squeeze(-1)
                r = lpt - lps
                floor = math.log(0.1 / 0.9)
                if step < 50:
                    keep = r >= floor
                else:
                    ent = -(
                        torch.softmax(hidden @ weight.t() / 1.1, -1) * torch.log_softmax(hidden @ weight.t() / 1.1, -1)
                    ).sum(-1)
                    keep = ent >= torch.quantile(ent[mask], 0.8)
                m = (mask & keep).to(D)
            lp = torch.log_softmax((hidden @ weight.t()) / 1.1, -1).gather(-1, y[:, None]).squeeze(-1)
            ref = -(r.clamp_min(floor) * m * lp).sum() / m.sum().clamp_min(1)
            g_ref = torch.autograd.grad(ref, (hidden, weight))
            assert out.loss.item() == pytest.approx(ref.item(), abs=1e-12)
            for a, b in zip(g_loss, g_ref, strict=True):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------
# Properties, registry, helpers
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_jsd_nonnegative_and_zero_at_equal(seed, beta):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 6, generator=g, dtype=D), torch.randn(3, 6, generator=g, dtype=D)
    mask = torch.ones(3, dtype=torch.bool)
    assert jsd_loss(s, t, mask, beta=beta).loss.item() >= -1e-12
    # Near an endpoint the normalised quotient amplifies rounding by up to 1/sqrt(eps) ~ 7e7.
    assert abs(jsd_loss(s, s, mask, beta=beta).loss.item()) < 1e-7


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_topk_fkl_with_tail_is_nonnegative(seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 9, generator=g, dtype=D), 3 * torch.randn(4, 9, generator=g, dtype=D)
    ids, lt = teacher_topk(t, 4)
    out = topk_fkl_loss(s, ids, lt, torch.ones(4, dtype=torch.bool), tail_bucket=True)
    assert (out.per_token >= -1e-12).all()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=30))
def test_position_rank_counts_valid_tokens(rows):
    sid = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    rank, length = valid_rank_in_sample(mask, sid)
    for b in set(sid.tolist()):
        sel = sid == b
        assert rank[sel & mask].tolist() == list(range(1, int((sel & mask).sum()) + 1))
        assert (length[sel] == int((sel & mask).sum())).all()
    w = position_weights(mask, sid)
    assert ((w[mask] >= 0.25) & (w[mask] <= 1.0)).all() and (w[~mask] == 0).all()


SD_NAMES = ["eopd", "jsd", "opsd", "pwopsd", "reopold", "topk_fkl", "topk_rkl"]


def test_registry_names_and_dispatch():
    assert sorted(LOSSES) == sorted(["policy_loss", "sft_loss", "custom_loss", *SD_NAMES])
    assert sorted(loss_types_needing("teacher")) == SD_NAMES
    assert LOSSES.get("policy_loss").needs == {"logp", "old_logp", "advantages"}
    assert LOSSES.get("sft_loss").needs == {"logp"} and LOSSES.get("pwopsd").rows == "response"
    with pytest.raises(ValueError, match="expected one of"):
        LOSSES.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("opsd", needs={"student"})(lambda x, c: None)
    with pytest.raises(ValueError, match="unknown inputs"):
        LossSpec("x", lambda x, c: None, frozenset({"logits"}))
    s, t = logits_of(UNIFORM, UNIFORM), logits_of([0.5, 0.25, 0.25], UNIFORM)
    inputs = LossInputs(student=s, teacher=t, loss_mask=torch.tensor([True, True]))
    out = LOSSES.get("opsd").fn(inputs, LossConfig(temperature=1.0))
    assert out.loss.item() == pytest.approx(-0.0469205181, abs=1e-9)
    with pytest.raises(ValueError, match="needs inputs"):
        LOSSES.get("pwopsd").fn(inputs, LossConfig())


def test_registry_runs_every_full_vocabulary_loss_on_one_batch():
    hidden, weight, teacher, y, mask, sid, g = _inputs(5)
    s_ids, s_old = teacher_topk(hidden.detach() @ weight.detach().t(), 3)
    t_ids, t_logp = teacher_topk(teacher, 3)
    inputs = LossInputs(
        student=LMHeadInput(hidden, weight),
        teacher=teacher,
        loss_mask=mask,
        target_ids=y,
        sample_index=sid,
        student_topk_ids=s_ids,
        student_topk_old_logp=s_old,
        teacher_logp_on_student_topk=gather_logprobs(teacher, s_ids),
        teacher_topk_ids=t_ids,
        teacher_topk_logp=t_logp,
    )
    for name in SD_NAMES:
        out = LOSSES.get(name).fn(inputs, LossConfig(chunk_size=2))
        assert torch.isfinite(out.loss), name
        hg, wg = torch.autograd.grad(out.loss, (hidden, weight))
        assert torch.isfinite(hg).all() and torch.isfinite(wg).all(), name
        assert (hg[~mask] == 0).all(), name  # unselected rows get no gradient


def test_topk_entries_derive_their_lists_from_the_full_distributions():
    """Without top-K lists the entries take them from the student (topk_rkl, old = current) and the teacher
    (topk_fkl): the same loss as with the lists given."""
    hidden, weight, teacher, y, mask, sid, g = _inputs(5)
    student = LMHeadInput(hidden, weight)
    cfg = LossConfig(chunk_size=2, topk=3)
    s_ids, s_old = teacher_topk(hidden.detach() @ weight.detach().t(), 3)
    t_ids, t_logp = teacher_topk(teacher, 3)
    given = LossInputs(
        loss_mask=mask, student=student, teacher=teacher, student_topk_ids=s_ids, student_topk_old_logp=s_old,
        teacher_logp_on_student_topk=gather_logprobs(teacher, s_ids), teacher_topk_ids=t_ids, teacher_topk_logp=t_logp,
    )  # fmt: skip
    derived = LossInputs(loss_mask=mask, student=student, teacher=teacher)
    for name in ("topk_rkl", "topk_fkl"):
        a, b = LOSSES.get(name).fn(given, cfg), LOSSES.get(name).fn(derived, cfg)
        assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-12), name


def test_reopold_entry_weights_a_call_by_its_share_of_the_step():
    hidden, weight, teacher, y, mask, sid, g = _inputs(5)
    x = LossInputs(loss_mask=mask, student=LMHeadInput(hidden, weight), teacher=teacher, target_ids=y)
    alone = LOSSES.get("reopold").fn(x, LossConfig()).loss.item()
    x.global_token_count = 4 * int(mask.sum())
    assert LOSSES.get("reopold").fn(x, LossConfig()).loss.item() == pytest.approx(alone / 4, rel=1e-12)


def test_input_validation():
    s = torch.randn(2, 3, dtype=D)
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        opsd_loss(s, s, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="beta"):
        jsd_loss(s, s, torch.ones(2, dtype=torch.bool), beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        opsd_loss(s, s, torch.ones(2, dtype=torch.bool), temperature=0.0)


def test_masked_teacher_vocabulary_is_finite():
    # A teacher that puts -inf on padded vocabulary rows (p_T = 0 there) must not give NaN.
    s = torch.randn(2, 5, dtype=D, requires_grad=True)
    t = torch.randn(2, 5, dtype=D)
    t[:, 3:] = -math.inf
    mask = torch.ones(2, dtype=torch.bool)
    for out in (opsd_loss(s, t, mask), jsd_loss(s, t, mask, beta=0.0), jsd_loss(s, t, mask, beta=0.5)):
        assert torch.isfinite(out.loss)
        (g,) = torch.autograd.grad(out.loss, s)
        assert torch.isfinite(g).all()
