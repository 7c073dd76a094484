"""The chunked sparse LM head: dense values and gradients, what it keeps for backward, and the weight gradient
written in place into a persistent buffer (accumulation over micro-batches, zeroing between steps)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from slime.backends.torch_utils.model import (
    attach_head_grad_buffer,
    build_response_batch,
    lm_head_chunk_rows,
    sampled_token_log_probs,
)


class HiddenStandIn(torch.nn.Module):
    """A backbone that returns fixed hidden states [1, L, H] (a trainable leaf)."""

    def __init__(self, length: int, width: int, dtype: torch.dtype, gen: torch.Generator):
        super().__init__()
        self.hidden = torch.nn.Parameter(torch.randn(1, length, width, generator=gen, dtype=dtype))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.hidden[:, : input_ids.shape[1]])


class HeadOnlyLM(torch.nn.Module):
    """``logits = lm_head(last_hidden_state)``, the contract the sparse path relies on."""

    def __init__(self, length: int, width: int, vocab: int, bias: bool, dtype=torch.float64, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base_model = HiddenStandIn(length, width, dtype, gen)
        self.lm_head = torch.nn.Linear(width, vocab, bias=bias, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, width, generator=gen, dtype=dtype))
            if bias:
                self.lm_head.bias.copy_(torch.randn(vocab, generator=gen, dtype=dtype))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(self.base_model(input_ids).last_hidden_state))


def _batch(length: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return build_response_batch([torch.randint(0, vocab, (length,), generator=gen).tolist()], [2], [length - 2])


def _grads(model, batch, select, weights, **kw):
    model.zero_grad(set_to_none=True)
    logp = sampled_token_log_probs(model, batch, select=select, **kw)
    (logp * weights).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_sparse_head_equals_dense_values_and_gradients(chunk_size, temperature, bias):
    """float64: log-probs and the gradients of hidden, weight and bias agree with the dense path to 1e-10."""
    model = HeadOnlyLM(length=12, width=6, vocab=37, bias=bias)
    batch = _batch(12, 37)
    gen = torch.Generator().manual_seed(1)
    select = torch.rand(batch.num_tokens, generator=gen) < 0.5
    select[0] = True
    weights = torch.randn(int(select.sum()), generator=gen, dtype=torch.float64)
    sparse_logp, sparse = _grads(model, batch, select, weights, temperature=temperature, chunk_size=chunk_size)
    dense_logp, dense = _grads(model, batch, select, weights, temperature=temperature, sparse=False)
    torch.testing.assert_close(sparse_logp, dense_logp, atol=1e-12, rtol=0)
    assert sparse.keys() == dense.keys()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize(("width", "vocab", "chunk_size"), [(16, 20, 1), (8, 40, 2), (3, 64, 5)])
def test_backward_tiles_of_rows_and_vocabulary_equal_dense(width, vocab, chunk_size):
    """Backward tiles the rows (when their [rows, H] gradient exceeds the chunk budget) and the vocabulary;
    ∂W is written by the first row block and added to by the next ones: still the dense gradients."""
    model = HeadOnlyLM(length=32, width=width, vocab=vocab, bias=True, seed=5)
    batch = _batch(32, vocab, seed=5)
    select = torch.ones(batch.num_tokens, dtype=torch.bool)
    weights = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sparse_logp, sparse = _grads(model, batch, select, weights, temperature=0.9, chunk_size=chunk_size)
    dense_logp, dense = _grads(model, batch, select, weights, temperature=0.9, sparse=False)
    torch.testing.assert_close(sparse_logp, dense_logp, atol=1e-12, rtol=0)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-10, rtol=0, msg=name)


def test_no_grad_log_probs_chunked_equal_dense():
    model = HeadOnlyLM(length=20, width=5, vocab=41, bias=False)
    batch = _batch(20, 41, seed=2)
    with torch.no_grad():
        dense = sampled_token_log_probs(model, batch, sparse=False)
        for chunk in (1, 4, 7, 100):
            got = sampled_token_log_probs(model, batch, chunk_size=chunk)
            torch.testing.assert_close(got, dense, atol=1e-12, rtol=0)


def test_bfloat16_head_matches_float64_reference():
    """Half-precision weights: logits in float32, weight gradient accumulated in float32 across chunks."""
    ref = HeadOnlyLM(length=16, width=8, vocab=50, bias=False)
    half = HeadOnlyLM(length=16, width=8, vocab=50, bias=False).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in ref.state_dict().items()})
    batch = _batch(16, 50, seed=3)
    select = torch.ones(batch.num_tokens, dtype=torch.bool)
    weights = torch.linspace(-1, 1, batch.num_tokens, dtype=torch.float64)
    logp_h, grads_h = _grads(half, batch, select, weights.float(), chunk_size=3)
    logp_r, grads_r = _grads(ref, batch, select, weights, sparse=False)
    assert logp_h.dtype == torch.float32
    torch.testing.assert_close(logp_h.double(), logp_r, atol=0.1, rtol=0)
    for name in grads_r:
        assert grads_h[name].dtype == torch.bfloat16
        scale = float(grads_r[name].abs().max())
        torch.testing.assert_close(grads_h[name].double(), grads_r[name], atol=0.05 * scale, rtol=0, msg=name)


def _saved_shapes(model, batch, **kw) -> list[tuple[int, ...]]:
    """The shapes of the tensors autograd saves for backward, weights and the backbone's hidden states excepted."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = sampled_token_log_probs(model, batch, **kw)
    assert logp.requires_grad
    return shapes


def _saved_sizes(model, batch, **kw) -> list[int]:
    return [math.prod(shape) for shape in _saved_shapes(model, batch, **kw)]


def test_sparse_head_saves_no_rows_by_vocab_tensor_above_h_rows():
    """Memory bound: with more rows than H, backward keeps [rows, H] and [rows] tensors, never [rows, V] (the
    dense path does)."""
    rows, width, vocab = 30, 4, 257
    model = HeadOnlyLM(length=rows + 2, width=width, vocab=vocab, bias=True)
    batch = _batch(rows + 2, vocab, seed=4)
    assert max(_saved_sizes(model, batch, chunk_size=8)) <= rows * width
    assert max(_saved_sizes(model, batch, sparse=False)) >= rows * vocab


def test_sparse_head_keeps_the_logits_up_to_h_rows_with_a_gradient_buffer():
    """With the weight-gradient buffer and rows ≤ H, forward keeps the rows' logits (rows·V numbers, in tiles) so
    backward skips the recompute; without the buffer, or with H + 1 rows, it recomputes them."""
    width, vocab = 8, 257
    model = HeadOnlyLM(length=12, width=width, vocab=vocab, bias=True)
    batch = _batch(12, vocab, seed=4)
    select = torch.zeros(batch.num_tokens, dtype=torch.bool)
    select[:width] = True  # exactly H rows

    def tiles():
        shapes = _saved_shapes(model, batch, select=select, chunk_size=2)
        return [s for s in shapes if len(s) == 2 and s[1] != width]

    assert tiles() == []  # no buffer: recomputed
    attach_head_grad_buffer(model)
    assert tiles() == [(width, 64)] * 4 + [(width, 1)]  # 2 rows' worth of logits per tile: [8, 64] × 4 + [8, 1]
    select[width] = True  # H + 1 rows: recomputed
    assert tiles() == []


# ---------------------------------------------------------------- the weight gradient in a persistent buffer


def test_in_place_weight_gradient_two_micro_batches_by_hand():
    """H = 2, V = 3, one row per micro-batch: ∂ log p(y) / ∂W = (onehot(y) − softmax(W h)) hᵀ. The two
    micro-batches' gradients add up in the buffer, which is ``weight.grad``; ∂h = Wᵀ (onehot(y) − softmax)."""
    model = HeadOnlyLM(length=3, width=2, vocab=3, bias=False)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    h = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.copy_(w)
        model.base_model.hidden[0, :2] = h
    buffer = attach_head_grad_buffer(model)
    assert buffer is model.lm_head.weight.main_grad and model.lm_head.weight.grad is None
    batch = build_response_batch([[0, 2, 0]], [1], [2])  # hidden row 0 predicts y = 2, row 1 predicts y = 0
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for row, y in ((0, 2), (1, 0)):
        sampled_token_log_probs(model, batch, select=torch.tensor([row])).sum().backward()
        diff = torch.nn.functional.one_hot(torch.tensor(y), 3).double() - torch.softmax(w @ h[row], 0)
        expected += torch.outer(diff, h[row])
        assert model.lm_head.weight.grad is buffer  # written in place: no [V, H] gradient from autograd
        torch.testing.assert_close(buffer, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(model.base_model.hidden.grad[0, row], w.t() @ diff, atol=1e-12, rtol=0)


def _micro_batch(length: int, seed: int, share: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    select = torch.rand(length - 2, generator=gen) < share
    select[seed % (length - 2)] = True
    return select, torch.randn(int(select.sum()), generator=gen, dtype=torch.float64)


def _backward(model, batch, select, weights, **kw):
    (sampled_token_log_probs(model, batch, select=select, **kw) * weights).sum().backward()


@pytest.mark.parametrize(
    ("width", "vocab", "share", "chunk_size"),
    [(6, 37, 0.5, None), (6, 37, 0.5, 1), (16, 20, 1.0, 1), (3, 40, 1.0, 2)],
    ids=["kept-logits", "kept-logits-tiles", "kept-logits-row-blocks", "recompute-row-blocks"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_in_place_accumulation_equals_sum_of_dense_gradients(width, vocab, share, chunk_size, bias):
    """Two micro-batches into the buffer = the sum of their dense gradients; a step after zeroing (either way)
    = a fresh step, in the same buffer."""
    length = 12
    model = HeadOnlyLM(length=length, width=width, vocab=vocab, bias=bias, seed=7)
    ref = HeadOnlyLM(length=length, width=width, vocab=vocab, bias=bias, seed=7)  # no buffer, dense path
    buffer = attach_head_grad_buffer(model)
    batch = _batch(length, vocab, seed=7)
    mbs = [_micro_batch(length, seed) for seed in (1, 2, 3)]
    kw = {"temperature": 0.8, "chunk_size": chunk_size}
    for select, weights in mbs[:2]:
        _backward(model, batch, select, weights, **kw)
        _backward(ref, batch, select, weights, temperature=0.8, sparse=False)
    assert model.lm_head.weight.grad is buffer
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, atol=1e-10, rtol=0, msg=name)
    for set_to_none in (True, False):  # the actor's zeroing (buffer overwritten), and zeroing in place
        model.zero_grad(set_to_none=set_to_none)
        ref.zero_grad(set_to_none=True)
        _backward(model, batch, *mbs[2], **kw)
        _backward(ref, batch, *mbs[2], temperature=0.8, sparse=False)
        assert model.lm_head.weight.grad is buffer
        for name, p in ref.named_parameters():
            got = dict(model.named_parameters())[name].grad
            torch.testing.assert_close(got, p.grad, atol=1e-10, rtol=0, msg=name)


def test_stale_buffer_is_overwritten_not_added():
    """After ``zero_grad(set_to_none=True)`` the buffer's old values (here NaN, as after a skipped non-finite
    step) never reach the next gradient; no rows at all gives a zero gradient."""
    model = HeadOnlyLM(length=10, width=4, vocab=23, bias=False)
    ref = HeadOnlyLM(length=10, width=4, vocab=23, bias=False)
    attach_head_grad_buffer(model).fill_(float("nan"))
    batch = _batch(10, 23, seed=8)
    select, weights = _micro_batch(10, 4)
    _backward(model, batch, select, weights, chunk_size=1)
    _backward(ref, batch, select, weights, sparse=False)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-10, rtol=0)
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.main_grad.fill_(float("nan"))
    none = torch.zeros(batch.num_tokens, dtype=torch.bool)
    sampled_token_log_probs(model, batch, select=none).sum().backward()
    assert torch.equal(model.lm_head.weight.grad, torch.zeros(23, 4, dtype=torch.float64))


def test_no_weight_sized_allocation_in_backward_with_the_buffer():
    """The profiler's largest allocation in backward: a [V, H] gradient without the buffer, none with it."""
    profiler = pytest.importorskip("torch.profiler")
    width, vocab = 16, 512
    largest = []
    for attach in (False, True):
        model = HeadOnlyLM(length=10, width=width, vocab=vocab, bias=False)
        if attach:
            attach_head_grad_buffer(model)
        logp = sampled_token_log_probs(model, _batch(10, vocab), select=torch.arange(4))
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            logp.sum().backward()
        largest.append(max(e.cpu_memory_usage for e in prof.events()))
    weight_bytes = vocab * width * 8
    assert largest[0] >= weight_bytes > largest[1]


def test_gradient_hooks_and_autograd_grad_still_get_the_weight_gradient():
    """In place only where ``.backward()`` accumulates into ``.grad`` unobserved: ``torch.autograd.grad`` and
    ``backward(inputs=...)`` leave ``.grad`` alone, and a gradient hook on the weight sees the gradient."""
    model = HeadOnlyLM(length=10, width=4, vocab=23, bias=False)
    ref = HeadOnlyLM(length=10, width=4, vocab=23, bias=False)
    attach_head_grad_buffer(model)
    batch = _batch(10, 23, seed=9)
    select, weights = _micro_batch(10, 5)
    _backward(ref, batch, select, weights, sparse=False)
    weight = model.lm_head.weight
    logp = sampled_token_log_probs(model, batch, select=select)
    (got,) = torch.autograd.grad((logp * weights).sum(), [weight])
    torch.testing.assert_close(got, ref.lm_head.weight.grad, atol=1e-10, rtol=0)
    (sampled_token_log_probs(model, batch, select=select) * weights).sum().backward(inputs=[model.base_model.hidden])
    assert weight.grad is None
    seen = []
    handle = weight.register_hook(lambda g: seen.append(g.clone()))
    _backward(model, batch, select, weights)
    handle.remove()
    assert len(seen) == 1 and weight.grad is not weight.main_grad
    torch.testing.assert_close(seen[0], ref.lm_head.weight.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(weight.grad, ref.lm_head.weight.grad, atol=1e-10, rtol=0)


def test_attach_head_grad_buffer_only_where_the_sparse_head_can_use_it():
    model = HeadOnlyLM(length=4, width=3, vocab=5, bias=False)
    buffer = attach_head_grad_buffer(model)
    assert buffer.shape == (5, 3) and attach_head_grad_buffer(model) is buffer  # idempotent
    half = HeadOnlyLM(length=4, width=3, vocab=5, bias=False).to(torch.bfloat16)
    frozen = HeadOnlyLM(length=4, width=3, vocab=5, bias=False)
    frozen.lm_head.weight.requires_grad_(False)
    assert attach_head_grad_buffer(half) is None and attach_head_grad_buffer(frozen) is None
    assert not hasattr(half.lm_head.weight, "main_grad")


def test_lm_head_chunk_rows():
    assert lm_head_chunk_rows(151_936) == 110  # 2^24 logits per chunk
    assert lm_head_chunk_rows(128) == 131_072
    assert lm_head_chunk_rows(151_936, 64) == 64
    with pytest.raises(ValueError, match="> 0"):
        lm_head_chunk_rows(100, 0)
