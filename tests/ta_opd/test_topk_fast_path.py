"""``pack_topk``'s vectorised path for clean server lists gives exactly the per-entry path's tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ta_opd.topk import PAD_ID, _clean_row, pack_topk


def per_entry_reference(entries, k):
    ids = torch.full((len(entries), k), PAD_ID, dtype=torch.long)
    logp = torch.full((len(entries), k), float("-inf"), dtype=torch.float32)
    for i, row in enumerate(entries):
        pairs = _clean_row(row, k)
        if pairs:
            ids[i, : len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            logp[i, : len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    return ids, logp


def random_row(rng: random.Random, k: int, messy: bool):
    if messy and rng.random() < 0.1:
        return rng.choice([None, []])
    m = rng.randint(1, k + 2 if messy else k)
    ids = rng.sample(range(50), m)
    lps = sorted((-rng.random() * 4 for _ in range(m)), reverse=True)
    row = [[lp, tid, None] for lp, tid in zip(lps, ids, strict=True)]
    if messy:
        r = rng.random()
        if r < 0.1 and m > 1:
            row[1][1] = row[0][1]  # repeated id
        elif r < 0.2:
            row[-1][0] = rng.choice([-math.inf, math.nan])
        elif r < 0.3:
            row[0][1] = -1
        elif r < 0.4 and m > 1:
            row.reverse()  # unsorted
        elif r < 0.5 and m > 1:
            row[1][0] = row[0][0]  # a tie: the server's order is kept
    return row


@pytest.mark.parametrize("messy", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_fast_path_equals_per_entry_path(messy, seed):
    rng = random.Random(seed)
    k = rng.randint(1, 6)
    entries = [random_row(rng, k, messy) for _ in range(rng.randint(0, 40))]
    ids, logp = pack_topk(entries, k)
    ref_ids, ref_logp = per_entry_reference(entries, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(logp, ref_logp)


def test_junk_entry_falls_back_to_per_entry_path_and_its_errors():
    clean = [[-0.1, 3, None], [-0.5, 7, None]]
    with pytest.raises(ValueError, match="top-K entry"):
        pack_topk([clean, [[-0.2, "x", None]]], 2)
    ids, logp = pack_topk([clean, [None, [None, 4], [-0.3, 5.0, None]]], 2)  # 5.0 is an integer id
    assert ids.tolist() == [[3, 7], [5, PAD_ID]]
    assert logp[1, 0].item() == pytest.approx(-0.3)


@pytest.mark.parametrize("junk", [[[[0.0, [1]]]], [[[[0.1], 2]]], [[[0.0, [1]], [0.1, [2]]]]])
def test_nested_ids_or_logprobs_get_the_entry_error(junk):
    """Ids or log-probs that are lists make 2-D tensors on the fast path: the per-row path must report them
    (found by the parser fuzzer: an IndexError escaped before)."""
    with pytest.raises(ValueError, match="top-K entry"):
        pack_topk(junk, 2)
