"""Sparse LM head: same log-probs and gradients as the dense path (also with the LM-head weight gradient written
into a persistent buffer, through gradient clipping, AdamW and the trainer's steps); batching coordinates."""

from __future__ import annotations

import copy

import pytest
import torch

from slime.backends.torch_utils.model import (
    attach_head_grad_buffer,
    build_response_batch,
    load_hf_model,
    sampled_token_log_probs,
    sparse_head_matches_dense,
)


@pytest.fixture(scope="module")
def model64(tiny_student_dir):
    return load_hf_model(tiny_student_dir, dtype="float64")


def _random_batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    tokens, prompts, resps = [], [], []
    for _ in range(n):
        p = int(torch.randint(1, 5, (1,), generator=g))
        r = int(torch.randint(0, 7, (1,), generator=g))
        tokens.append(torch.randint(0, 99, (p + r,), generator=g).tolist())
        prompts.append(p)
        resps.append(r)
    return build_response_batch(tokens, prompts, resps), tokens, prompts, resps


def test_build_response_batch_coordinates_by_hand():
    b = build_response_batch([[1, 2, 3, 4, 5], [6, 7, 8]], [2, 1], [3, 2])
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert b.row.tolist() == [0, 0, 0, 1, 1]
    # hidden state at P + j - 1 predicts response token j
    assert b.pred_pos.tolist() == [1, 2, 3, 0, 1]
    assert b.target.tolist() == [3, 4, 5, 7, 8]
    assert b.position.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize(
    "tokens,prompts,resps,match",
    [
        ([[1, 2, 3]], [2], [2], "sample 0"),  # 2 + 2 != 3 tokens
        ([[1, 2]], [0], [2], "sample 0"),  # empty prompt
        ([[1, 2], [3, 4]], [1], [1, 1], "one entry per sample"),
    ],
)
def test_build_response_batch_rejects_inconsistent_lengths(tokens, prompts, resps, match):
    with pytest.raises(ValueError, match=match):
        build_response_batch(tokens, prompts, resps)


def test_sparse_log_probs_equal_dense(model64):
    batch, *_ = _random_batch(1)
    sparse = sampled_token_log_probs(model64, batch, sparse=True)
    chunked = sampled_token_log_probs(model64, batch, sparse=True, chunk_size=3)
    dense = sampled_token_log_probs(model64, batch, sparse=False)
    assert sparse.shape == (batch.num_tokens,)
    torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked, dense, atol=1e-12, rtol=0)
    assert sparse_head_matches_dense(model64, model64.config.vocab_size)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sparse_gradients_equal_dense_at_selected_rows(model64, temperature):
    """The loss at kept rows only: sparse (gather then LM head) and dense give identical gradients."""
    batch, *_ = _random_batch(2, n=5)
    g = torch.Generator().manual_seed(3)
    select = torch.rand(batch.num_tokens, generator=g) < 0.3
    weights = torch.randn(int(select.sum()), generator=g, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        model64.zero_grad(set_to_none=True)
        logp = sampled_token_log_probs(model64, batch, select=select, temperature=temperature, sparse=sparse)
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model64.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-5, msg=name)


def test_select_by_index_matches_bool(model64):
    batch, *_ = _random_batch(4)
    mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
    mask[::2] = True
    with torch.no_grad():
        a = sampled_token_log_probs(model64, batch, select=mask)
        b = sampled_token_log_probs(model64, batch, select=mask.nonzero().squeeze(-1))
        full = sampled_token_log_probs(model64, batch)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, full[mask], atol=1e-12, rtol=0)


def test_head_grad_buffer_through_clipping_and_adamw_equals_dense(tiny_student_dir):
    """The tiny Qwen3 ties the LM head to the embedding. Two micro-batches per step, the weight gradient written
    into the persistent buffer: the same gradients, clipped norm and AdamW update as the dense path, and a second
    step after ``optimizer.zero_grad()`` the same again."""
    from slime.backends.train_step import adamw
    from slime.utils.arguments import get_parser

    args = get_parser().parse_args(["--lr", "1e-2", "--weight-decay", "0.1"])
    models = [load_hf_model(tiny_student_dir, dtype="float64") for _ in range(2)]  # [buffer + sparse, dense]
    head = models[0].get_output_embeddings().weight
    assert head is models[0].get_input_embeddings().weight  # tied
    buffer = attach_head_grad_buffer(models[0])
    optimizers = [adamw(m, args) for m in models]
    for step in range(2):
        norms = []
        for model, opt, sparse in zip(models, optimizers, (True, False), strict=True):
            opt.zero_grad(set_to_none=True)
            for mb in range(2):
                batch, *_ = _random_batch(10 * step + mb, n=3)
                gen = torch.Generator().manual_seed(mb)
                select = torch.rand(batch.num_tokens, generator=gen) < 0.4
                weights = torch.randn(int(select.sum()), generator=gen, dtype=torch.float64)
                (sampled_token_log_probs(model, batch, select=select, sparse=sparse) * weights).sum().backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        assert head.grad is buffer
        assert norms[0] == pytest.approx(norms[1], rel=1e-10) and norms[0] > 0.05  # the clip applies
        grads = [{n: p.grad for n, p in m.named_parameters()} for m in models]
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=1e-9, msg=name)
        for opt in optimizers:
            opt.step()
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def test_trainer_keeps_the_head_gradient_in_its_buffer(tiny_student_dir, tmp_path):
    """The torch OPD trainer with the sparse head attaches the buffer once, and its steps (clipped, two per rollout,
    two micro-batches of one sample each) give the dense trainer's gradients, norms and weights."""
    from tests.backends.torch_trainer_inputs import fake_rollout, make_trainer, trainer_args

    opd = ("--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate")
    extra = (*opd, "--clip-grad", "0.01", "--num-steps-per-rollout", "2")  # global batches of 2 samples
    sparse = make_trainer(trainer_args(tiny_student_dir, tmp_path, *extra))
    dense = make_trainer(trainer_args(tiny_student_dir, tmp_path, *extra, "--no-sparse-lm-head"))
    buffer = sparse.head_grad_buffer
    head = sparse.model.get_output_embeddings().weight
    assert buffer is head.main_grad and dense.head_grad_buffer is None
    data = fake_rollout(3, zero_sample=None)
    for rollout_id in range(2):
        ms, md = sparse.train(rollout_id, copy.deepcopy(data)), dense.train(rollout_id, copy.deepcopy(data))
        assert head.grad is buffer and sparse.head_grad_buffer is buffer
        assert ms["train/grad_norm"] == pytest.approx(md["train/grad_norm"], rel=1e-9) and ms["train/grad_norm"] > 0.01
        assert ms["train/loss"] == pytest.approx(md["train/loss"], abs=1e-12)
        ps, pd = sparse.state_for_test(), dense.state_for_test()
        for name in pd:
            torch.testing.assert_close(ps[name], pd[name], atol=1e-10, rtol=0, msg=name)


def test_load_hf_model_rejects_bad_inputs(tmp_path, tiny_student_dir):
    with pytest.raises(ValueError, match="unknown train dtype"):
        load_hf_model(tiny_student_dir, dtype="int8")
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_model(tmp_path / "missing")
