"""The chunked sparse LM head: dense values and gradients, and no [rows × V] tensor kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slime.backends.torch_utils.model import (
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


def _largest_saved(model, batch, **kw) -> int:
    """The largest tensor autograd saves for backward, weights and the backbone's hidden states excepted."""
    params = {p.data_ptr() for p in model.parameters()}
    sizes: list[int] = []

    def pack(t):
        if t.data_ptr() not in params:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = sampled_token_log_probs(model, batch, **kw)
    assert logp.requires_grad
    return max(sizes, default=0)


def test_sparse_head_saves_no_rows_by_vocab_tensor():
    """Memory bound: backward keeps [rows, H] and [rows] tensors, never [rows, V] (the dense path does)."""
    rows, width, vocab = 30, 4, 257
    model = HeadOnlyLM(length=rows + 2, width=width, vocab=vocab, bias=True)
    batch = _batch(rows + 2, vocab, seed=4)
    assert _largest_saved(model, batch, chunk_size=8) <= rows * width
    assert _largest_saved(model, batch, sparse=False) >= rows * vocab


def test_lm_head_chunk_rows():
    assert lm_head_chunk_rows(151_936) == 110  # 2^24 logits per chunk
    assert lm_head_chunk_rows(128) == 131_072
    assert lm_head_chunk_rows(151_936, 64) == 64
    with pytest.raises(ValueError, match="> 0"):
        lm_head_chunk_rows(100, 0)
