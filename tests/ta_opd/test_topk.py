"""Packing SGLang-shaped top-K lists into padded tensors and building a step's TokenBatch (docs/method.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from ta_opd import TokenBatch, pack_topk
from ta_opd.topk import PAD_ID, lookup_logprobs


def test_pack_topk_drops_sorts_dedups_truncates():
    rows = [
        [[-2.0, 5, "a"], [-0.5, 7, None], [math.nan, 9, None], [None, 3, None], [-1.0, 5, None], [-math.inf, 4, None]],
        None,
        [],
        [[-0.1, 1, None], [-0.2, 2, None], [-0.3, 3, None], [-0.4, 4, None]],
    ]
    ids, logp = pack_topk(rows, 3)
    assert ids.dtype == torch.long and ids.shape == (4, 3)
    # row 0: NaN / None / −inf dropped; id 5 kept once (the first entry seen); sorted by log-prob desc
    assert ids[0].tolist() == [7, 5, PAD_ID]
    assert logp[0, :2].tolist() == pytest.approx([-0.5, -2.0]) and logp[0, 2] == -math.inf
    assert ids[1].tolist() == [PAD_ID] * 3 and ids[2].tolist() == [PAD_ID] * 3
    assert torch.isinf(logp[1]).all()
    assert ids[3].tolist() == [1, 2, 3]  # truncated to K = 3
    with pytest.raises(ValueError, match="k must be >= 0"):
        pack_topk(rows, -1)


def test_lookup_logprobs():
    query = torch.tensor([[3, 1, PAD_ID], [2, 8, 9]])
    out = lookup_logprobs([[[-0.1, 1, None], [-0.3, 3, None]], None], query)
    assert out[0].tolist() == pytest.approx([-0.3, -0.1, -math.inf])
    assert torch.isinf(out[1]).all()
    with pytest.raises(ValueError, match="expected 2"):
        lookup_logprobs([None], query)


def _lists(n, ids=(1, 2)):
    return [[[-0.5, ids[0], None], [-1.5, ids[1], None]] for _ in range(n)]


def test_from_sample_lists_layout():
    batch = TokenBatch.from_sample_lists(
        student_top_per_sample=[_lists(3), _lists(2)],
        teacher_top_per_sample=[_lists(3, (2, 5)), _lists(2)],
        sampled_ids_per_sample=[[1, 2, 3], [4, 5]],
        student_logp_per_sample=[[-0.1, -0.2, -0.3], None],
        teacher_logp_per_sample=[[-1.0, -2.0, -3.0], [-4.0, -5.0]],
        loss_mask_per_sample=[[1, 0, 1], [1, 1]],
        k=2,
    ).validate()
    assert batch.n_tokens == 5 and batch.k == 2 and batch.n_samples() == 2
    assert batch.sample_index.tolist() == [0, 0, 0, 1, 1]
    assert batch.position.tolist() == [0, 1, 2, 0, 1]
    assert batch.response_length.tolist() == [3, 3, 3, 2, 2]
    assert batch.loss_mask.tolist() == [True, False, True, True, True]
    assert batch.teacher_topk_ids[0].tolist() == [2, 5]
    assert batch.student_logp_known.tolist() == [True, True, True, False, False]
    assert math.isnan(batch.student_logp[3])


def test_from_sample_lists_errors_name_the_sample():
    good = dict(
        student_top_per_sample=[_lists(2)],
        teacher_top_per_sample=[_lists(2)],
        sampled_ids_per_sample=[[1, 2]],
        student_logp_per_sample=None,
        teacher_logp_per_sample=[[-1.0, -1.0]],
        loss_mask_per_sample=[[1, 1]],
        k=2,
    )
    with pytest.raises(ValueError, match="sample 0: teacher log-probs has 1 entries, response has 2 tokens"):
        TokenBatch.from_sample_lists(**{**good, "teacher_logp_per_sample": [[-1.0]]})
    with pytest.raises(ValueError, match="loss_mask_per_sample has 2 samples, expected 1"):
        TokenBatch.from_sample_lists(**{**good, "loss_mask_per_sample": [[1, 1], [1]]})
    with pytest.raises(ValueError, match="sample 0: teacher top-K lists cover 0 of 2"):
        TokenBatch.from_sample_lists(**{**good, "teacher_top_per_sample": [None]}, require_topk=True)
    batch = TokenBatch.from_sample_lists(**{**good, "teacher_top_per_sample": [None]})
    assert batch.topk_missing.tolist() == [True, True]


def test_exact_logprobs_per_sample_and_overflowed_sample():
    exact = [[[[-0.7, 1, None], [-1.6, 2, None]]] * 2, None]  # sample 1 overflowed: None
    batch = TokenBatch.from_sample_lists(
        [_lists(2), _lists(1)],
        [_lists(2), _lists(1)],
        [[1, 2], [1]],
        None,
        [[-1.0, -1.0], [-1.0]],
        [[1, 1], [1]],
        k=2,
        teacher_ids_logprobs_per_sample=exact,
    )
    assert batch.exact_available.tolist() == [True, True, False]
    assert batch.teacher_logp_on_student_topk[0].tolist() == pytest.approx([-0.7, -1.6])


def test_to_device_roundtrip():
    batch = TokenBatch.from_sample_lists([_lists(2)], [_lists(2)], [[1, 2]], None, [[-1.0, -1.0]], [[1, 1]], k=2)
    moved = batch.to("cpu")
    assert torch.equal(moved.student_topk_ids, batch.student_topk_ids) and moved.num_samples == 1
