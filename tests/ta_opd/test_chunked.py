"""Chunked full-vocabulary losses equal the naive form, values and gradients."""

from __future__ import annotations

import pytest
import torch

from ta_opd.chunked import (
    LMHeadInput,
    auto_chunk_size,
    chunked_loss,
    chunked_token_stats,
    chunked_token_values,
    materialize_logits,
)
from ta_opd.losses import agg_loss, reduction_coefficients
from ta_opd.sd_losses import (
    eopd_loss,
    gather_logprobs,
    jsd_loss,
    opsd_loss,
    pwopsd_loss,
    reopold_loss,
    teacher_topk,
    topk_fkl_loss,
    topk_rkl_loss,
)

D = torch.float64
N, H, V = 23, 8, 50


def _batch(seed: int = 0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / 2
    bias = torch.randn(V, generator=g, dtype=dtype) / 4
    t_hidden = torch.randn(N, H, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    sid = torch.sort(torch.randint(0, 4, (N,), generator=g)).values
    old = torch.randn(N, generator=g, dtype=dtype) * 0.1 - 3.0
    s_ids, s_old = teacher_topk(hidden @ weight.t() + torch.randn(N, V, generator=g, dtype=dtype) * 0.1, 5)
    s_ids[0, 4] = -1
    teacher = LMHeadInput(t_hidden, weight)  # self-distillation: same LM head, other hidden states
    t_ids, t_logp = teacher_topk(teacher, 5)
    t_on_s = gather_logprobs(teacher, s_ids)
    return dict(
        hidden=hidden, weight=weight, bias=bias, teacher=teacher, y=y, mask=mask, sid=sid, old=old,
        s_ids=s_ids, s_old=s_old, t_ids=t_ids, t_logp=t_logp, t_on_s=t_on_s,
    )  # fmt: skip


CASES = {
    "opsd": lambda b, src, cs: opsd_loss(src, b["teacher"], b["mask"], chunk_size=cs),
    "opsd_seq": lambda b, src, cs: opsd_loss(
        src, b["teacher"], b["mask"], reduction="seq-mean-token-sum", sample_index=b["sid"], chunk_size=cs
    ),
    "pwopsd": lambda b, src, cs: pwopsd_loss(src, b["teacher"], b["mask"], b["sid"], chunk_size=cs),
    "pwopsd_global": lambda b, src, cs: pwopsd_loss(
        src, b["teacher"], b["mask"], b["sid"], reduction="token-mean", chunk_size=cs
    ),
    "eopd": lambda b, src, cs: eopd_loss(src, b["teacher"], b["y"], b["mask"], old_logp=b["old"], chunk_size=cs),
    "reopold_warm": lambda b, src, cs: reopold_loss(src, b["teacher"], b["y"], b["mask"], step=0, chunk_size=cs),
    "reopold_late": lambda b, src, cs: reopold_loss(src, b["teacher"], b["y"], b["mask"], step=99, chunk_size=cs),
    "topk_rkl": lambda b, src, cs: topk_rkl_loss(
        src, b["s_ids"], b["t_on_s"], b["mask"], student_topk_old_logp=b["s_old"], chunk_size=cs
    ),
    "topk_fkl": lambda b, src, cs: topk_fkl_loss(
        src, b["t_ids"], b["t_logp"], b["mask"], tail_bucket=True, chunk_size=cs
    ),
    "jsd": lambda b, src, cs: jsd_loss(src, b["teacher"], b["mask"], beta=0.3, chunk_size=cs),
    "jsd_fkl": lambda b, src, cs: jsd_loss(src, b["teacher"], b["mask"], beta=0.0, chunk_size=cs),
}


def _run_case(name, b, chunk_size, with_bias=True):
    h = b["hidden"].clone().requires_grad_(True)
    w = b["weight"].clone().requires_grad_(True)
    bias = b["bias"].clone().requires_grad_(True) if with_bias else None
    out = CASES[name](b, LMHeadInput(h, w, bias), chunk_size)
    params = (h, w) if bias is None else (h, w, bias)
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_matches_naive_through_lm_head(name, chunk_size):
    b = _batch()
    naive, g_naive = _run_case(name, b, 0)
    chunked, g_chunked = _run_case(name, b, chunk_size)
    assert chunked.loss.item() == pytest.approx(naive.loss.item(), abs=1e-10)
    torch.testing.assert_close(chunked.per_token, naive.per_token, atol=1e-10, rtol=0)
    for a, c in zip(g_naive, g_chunked, strict=True):
        torch.testing.assert_close(c, a, atol=1e-10, rtol=0)
    for key in naive.metrics:
        assert chunked.metrics[key].item() == pytest.approx(naive.metrics[key].item(), abs=1e-10), key


@pytest.mark.parametrize("name", ["opsd", "eopd", "topk_fkl", "jsd"])
def test_chunked_over_logits_matches_naive(name):
    b = _batch(1)
    logits = materialize_logits(LMHeadInput(b["hidden"], b["weight"], b["bias"]))
    l_naive = logits.clone().requires_grad_(True)
    l_chunk = logits.clone().requires_grad_(True)
    naive = CASES[name](b, l_naive, None)  # logits default to the naive path
    chunked = CASES[name](b, l_chunk, 5)
    (g_naive,) = torch.autograd.grad(naive.loss, l_naive)
    (g_chunk,) = torch.autograd.grad(chunked.loss, l_chunk)
    assert chunked.loss.item() == pytest.approx(naive.loss.item(), abs=1e-10)
    torch.testing.assert_close(g_chunk, g_naive, atol=1e-10, rtol=0)


def test_float32_chunked_close_to_naive():
    b = _batch(2, dtype=torch.float32)
    naive, g_naive = _run_case("opsd", b, 0)
    chunked, g_chunked = _run_case("opsd", b, 3)
    assert chunked.loss.item() == pytest.approx(naive.loss.item(), rel=1e-5, abs=1e-6)
    for a, c in zip(g_naive, g_chunked, strict=True):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)


def _kl_token(s, t, ex):
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def test_recompute_engine_matches_naive_values_and_grads():
    b = _batch(3)
    h = b["hidden"].clone().requires_grad_(True)
    w = b["weight"].clone().requires_grad_(True)
    teacher = materialize_logits(b["teacher"])
    vals = chunked_token_values(_kl_token, LMHeadInput(h, w), teacher, {}, chunk_size=4)
    loss = agg_loss(vals, b["mask"], "seq-mean-token-mean", sample_index=b["sid"])
    g = torch.autograd.grad(loss, (h, w))
    h2 = b["hidden"].clone().requires_grad_(True)
    w2 = b["weight"].clone().requires_grad_(True)
    ref_vals = _kl_token(h2 @ w2.t(), teacher, {})
    ref = agg_loss(ref_vals, b["mask"], "seq-mean-token-mean", sample_index=b["sid"])
    g_ref = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(vals.detach(), ref_vals.detach(), atol=1e-12, rtol=0)
    for a, c in zip(g_ref, g, strict=True):
        torch.testing.assert_close(c, a, atol=1e-12, rtol=0)


def test_token_fn_never_sees_more_than_a_chunk_and_skips_masked_rows():
    b = _batch(4)
    seen: list[int] = []

    def spy(s, t, ex):
        seen.append(s.shape[0])
        return _kl_token(s, t, ex)

    coef = reduction_coefficients(b["mask"], "token-mean")
    chunked_loss(spy, LMHeadInput(b["hidden"], b["weight"]), b["teacher"], {}, coef, chunk_size=3)
    assert max(seen) <= 3
    assert sum(seen) == int(b["mask"].sum())  # rows with coef 0 are never computed


def test_reduction_coefficients_reproduce_agg_loss():
    b = _batch(5)
    v = torch.randn(N, dtype=D)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        coef = reduction_coefficients(b["mask"], mode, sample_index=b["sid"], global_sample_count=7)
        ref = agg_loss(v, b["mask"], mode, sample_index=b["sid"], global_sample_count=7)
        assert (coef * v).sum().item() == pytest.approx(ref.item(), abs=1e-12)


def test_microbatch_split_with_global_counts_equals_whole():
    b = _batch(6)
    teacher = materialize_logits(b["teacher"])
    n_tok = int(b["mask"].sum())
    whole_h = b["hidden"].clone().requires_grad_(True)
    whole = opsd_loss(LMHeadInput(whole_h, b["weight"]), teacher, b["mask"], chunk_size=4).loss
    (g_whole,) = torch.autograd.grad(whole, whole_h)
    split_h = b["hidden"].clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 10), slice(10, N)):
        src = LMHeadInput(split_h[rows], b["weight"])
        total = total + opsd_loss(src, teacher[rows], b["mask"][rows], global_token_count=n_tok, chunk_size=4).loss
    (g_split,) = torch.autograd.grad(total, split_h)
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(g_split, g_whole, atol=1e-12, rtol=0)


def test_chunked_token_stats_and_teacher_helpers():
    b = _batch(7)
    logits = materialize_logits(b["teacher"])
    stats = chunked_token_stats(lambda s, t, ex: {"lse": torch.logsumexp(s, -1)}, b["teacher"], None, {}, chunk_size=5)
    torch.testing.assert_close(stats["lse"], torch.logsumexp(logits, -1))
    ids, lp = teacher_topk(b["teacher"], 4, chunk_size=3)
    ref_lp, ref_ids = torch.log_softmax(logits, -1).topk(4, -1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp, ref_lp)
    assert auto_chunk_size(151_936) == 55


def test_validation_errors():
    b = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(_kl_token, b["teacher"], None, {}, torch.ones(N, dtype=D), chunk_size=0)
    with pytest.raises(ValueError, match="teacher has"):
        opsd_loss(LMHeadInput(b["hidden"], b["weight"]), torch.zeros(3, V, dtype=D), b["mask"])
    with pytest.raises(ValueError, match="hidden size"):
        LMHeadInput(b["hidden"], torch.zeros(V, H + 1))
