"""docs/method.md §1 loss pieces: agg_loss reductions by hand, micro-batch invariance, PPO-clip, advantages."""

from __future__ import annotations

import pytest
import torch

from ta_opd.losses import (
    REDUCTIONS,
    Reduction,
    agg_loss,
    opd_advantages,
    policy_loss,
    ppo_clip_policy_loss,
    sampled_reverse_kl,
    sft_loss,
)

# Two samples: sample 0 values [1, 2, 3] mask [1, 1, 0]; sample 1 values [4, 6] mask [1, 1]
V = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
M = torch.tensor([True, True, False, True, True])
S = torch.tensor([0, 0, 0, 1, 1])


def test_token_mean_by_hand():
    # (1 + 2 + 4 + 6) / 4 kept tokens = 3.25; with a global count of 10: 13/10
    assert agg_loss(V, M, "token-mean").item() == pytest.approx(3.25)
    assert agg_loss(V, M, "token-mean", global_token_count=10).item() == pytest.approx(1.3)


def test_seq_mean_token_mean_by_hand():
    # per-sample means over kept tokens: (1 + 2)/2 = 1.5, (4 + 6)/2 = 5 → (1.5 + 5)/2 samples = 3.25
    assert agg_loss(V, M, "seq-mean-token-mean", S).item() == pytest.approx(3.25)
    # global sample count 4 → 6.5/4
    assert agg_loss(V, M, "seq-mean-token-mean", S, global_sample_count=4).item() == pytest.approx(1.625)


def test_seq_mean_token_sum_by_hand():
    # per-sample sums: 3, 10 → 13/2 = 6.5
    assert agg_loss(V, M, "seq-mean-token-sum", S).item() == pytest.approx(6.5)


def test_padded_layout_equals_flat():
    padded = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 0.0]])
    pmask = torch.tensor([[True, True, False], [True, True, False]])
    for mode in REDUCTIONS:
        assert agg_loss(padded, pmask, mode).item() == pytest.approx(agg_loss(V, M, mode, S).item()), mode


def test_masked_nan_does_not_propagate():
    v = V.clone()
    v[2] = float("nan")
    for mode in REDUCTIONS:
        assert torch.isfinite(agg_loss(v, M, mode, S)), mode


@pytest.mark.parametrize("mode", REDUCTIONS)
def test_micro_batch_split_invariance(mode):
    # split by samples (micro-batches hold whole samples) and sum the micro-batch losses computed
    # with the step's global counts: equal to the whole step's loss
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 1, 4, 2, 6]
    sample = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths))
    values = torch.randn(sample.numel(), generator=gen)
    mask = torch.rand(sample.numel(), generator=gen) < 0.7
    n_tokens, n_samples = int(mask.sum()), 6
    whole = agg_loss(values, mask, mode, sample, global_token_count=n_tokens, global_sample_count=n_samples)
    for groups in ([[0, 1, 2], [3, 4, 5]], [[0], [1, 2, 3, 4], [5]], [[5, 0], [2, 4], [1, 3]]):
        total = torch.zeros(())
        for group in groups:
            rows = torch.isin(sample, torch.tensor(group))
            total = total + agg_loss(
                values[rows],
                mask[rows],
                mode,
                sample[rows],
                global_token_count=n_tokens,
                global_sample_count=n_samples,
            )
        assert total.item() == pytest.approx(whole.item(), abs=1e-6), groups


@pytest.mark.parametrize("mode", REDUCTIONS)
def test_all_masked_gives_zero_with_live_graph(mode):
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = agg_loss(values, torch.zeros(3, dtype=torch.bool), mode, torch.tensor([0, 0, 1]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert values.grad is not None and torch.equal(values.grad, torch.zeros(3))


def test_agg_loss_errors():
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'"):
        agg_loss(V, M, "mean")
    with pytest.raises(ValueError, match="needs sample_index"):
        agg_loss(V, M, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="mask shape"):
        agg_loss(V, M[:3], "token-mean")


def test_ppo_clip_hand_cases():
    # ε = 0.2, ε_high = 0.28; loss = max(−A·r, −A·clip(r, 0.8, 1.28))
    logp = torch.log(torch.tensor([1.0, 1.5, 1.5, 0.5, 0.5, 1.1]))
    old = torch.zeros(6)
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    loss, clipped = ppo_clip_policy_loss(logp, old, adv)
    expected = [
        -2.0,  # r = 1: −A·r = −2 (no clipping)
        -1.28,  # A > 0, r = 1.5 > 1.28: max(−1.5, −1.28) = −1.28 (clipped, no incentive above 1 + ε_high)
        1.5,  # A < 0, r = 1.5: max(1.5, 1.28) = 1.5 (unclipped: the pessimistic branch)
        -0.5,  # A > 0, r = 0.5 < 0.8: max(−0.5, −0.8) = −0.5 (unclipped)
        0.8,  # A < 0, r = 0.5: max(0.5, 0.8) = 0.8 (clipped at 1 − ε)
        -1.1,  # inside the range
    ]
    assert loss.tolist() == pytest.approx(expected)
    assert clipped.tolist() == [False, True, False, False, True, False]
    sym, _ = ppo_clip_policy_loss(logp, old, adv, eps_clip_high=None)  # ε_high defaults to ε
    assert sym[1].item() == pytest.approx(-1.2)


def test_ppo_gradient_at_ratio_one_is_minus_advantage():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([0.5, -1.5])
    loss, _ = ppo_clip_policy_loss(logp, logp.detach(), adv)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, 1.5])


def test_opd_advantages_by_hand_and_detached():
    t = torch.tensor([-1.0, -0.5], requires_grad=True)
    s = torch.tensor([-2.0, -0.25], requires_grad=True)
    # A = λ (log p_T − log p_S) = [1, −0.25]; λ = 2 → [2, −0.5]; + base [1, 1]
    a = opd_advantages(t, s)
    assert a.tolist() == pytest.approx([1.0, -0.25]) and not a.requires_grad
    assert opd_advantages(t, s, kl_coef=2.0).tolist() == pytest.approx([2.0, -0.5])
    base = torch.ones(2, requires_grad=True)
    out = opd_advantages(t, s, base=base)
    assert out.tolist() == pytest.approx([2.0, 0.75]) and not out.requires_grad
    with pytest.raises(ValueError, match="shape"):
        opd_advantages(t, s[:1])


def test_reduction_is_agg_loss_with_the_step_counts():
    red = Reduction("seq-mean-token-mean", S, global_sample_count=4)
    assert red(V, M).item() == pytest.approx(1.625)  # (1.5 + 5) / 4, as agg_loss by hand above
    assert torch.allclose((red.coefficients(M) * V.double()).sum(), red(V, M).double())
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'"):
        Reduction("mean")


def test_policy_and_sft_losses_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    mask = torch.tensor([True, False, True])
    red = Reduction("token-mean", global_token_count=4)
    # on-policy (ratio 1): loss = -Σ A·1 over kept / 4; nothing clipped
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0, 5.0, -2.0]), mask, red)
    assert out.loss.item() == pytest.approx(-(1.0 - 2.0) / 4)
    assert int(out.clipped_tokens) == 0 and out.per_token.tolist() == [-1.0, 0.0, 2.0]
    # ratio e^1 > 1 + 0.28 with A > 0: the clipped branch on row 0; row 1 is masked
    out = policy_loss(logp, logp.detach() - 1.0, torch.tensor([1.0, 1.0, 0.0]), mask, red)
    assert int(out.clipped_tokens) == 1
    sft = sft_loss(logp, mask, red)
    assert sft.loss.item() == pytest.approx((1.0 + 0.5) / 4)
    assert sft.metrics["sft_nll"].item() == pytest.approx(0.75)
    (grad,) = torch.autograd.grad(sft.loss, logp)
    assert grad.tolist() == [-0.25, 0.0, -0.25]


def test_sampled_reverse_kl():
    s, t = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])
    assert sampled_reverse_kl(s, t) == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert sampled_reverse_kl(s, t, torch.tensor([True, False, False])) == pytest.approx(0.5)
    assert sampled_reverse_kl(s, t, torch.zeros(3, dtype=torch.bool)) == 0.0
