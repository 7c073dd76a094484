"""``pack_topk``'s fast paths for clean server lists (the compiled one-pass kernel and the vectorised torch
path) give exactly the per-entry path's tensors and errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import ta_opd.topk as topk
from ta_opd._native import pack_kernel
from ta_opd.topk import PAD_ID, _clean_row, pack_topk

HAVE_KERNEL = pack_kernel() is not None


@pytest.fixture(params=["native", "torch"], autouse=True)
def fast_path(request, monkeypatch):
    """Every test runs once with the compiled kernel and once with the vectorised torch path."""
    if request.param == "native" and not HAVE_KERNEL:
        pytest.skip("no compiled top-K packing kernel on this machine (needs a C compiler and Python.h)")
    if request.param == "torch":
        monkeypatch.setattr(topk, "pack_kernel", lambda: None)
    return request.param


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


def _junk_value(rng: random.Random):
    return rng.choice(
        [
            True,  # a bool is an int: 1.0 as a log-prob, 1 as an id
            0,  # an int log-prob
            3.5e38,  # finite in float64, inf in float32: dropped
            -3.4028234e38,  # still finite in float32
            10**400,  # overflows float: the per-entry error
            float(1 << 41),  # an id far above any vocabulary: the per-entry error
            np.float64(-0.25),  # a numpy scalar: not a plain float, the per-entry path reads it
            np.int64(9),
            None,
            "x",
        ]
    )


@pytest.mark.parametrize("seed", range(30))
def test_kernel_edge_values_match_per_entry_path(seed):
    """Junk values, tuples, short entries and odd containers: same tensors, or the same error, on every path."""
    rng = random.Random(seed)
    k = rng.randint(1, 5)
    entries = []
    for _ in range(rng.randint(1, 12)):
        row = random_row(rng, k, messy=True)
        if row and rng.random() < 0.5:
            j = rng.randrange(len(row))
            entry = list(row[j])
            entry[rng.randrange(2)] = _junk_value(rng)
            if rng.random() < 0.2:
                entry = entry[:1]  # too short
            row[j] = tuple(entry) if rng.random() < 0.5 else entry
        if row and rng.random() < 0.2:
            row = tuple(row)
        entries.append(row)
    try:
        want = per_entry_reference(entries, k)
    except ValueError as e:
        with pytest.raises(ValueError, match="top-K entry") as got:
            pack_topk(entries, k)
        assert str(got.value) == str(e)
        return
    ids, logp = pack_topk(entries, k)
    assert torch.equal(ids, want[0]) and torch.equal(logp, want[1])


def test_any_sequence_of_rows_and_float32_rounding():
    """A tuple of rows is read like a list; log-probs are rounded to float32 as torch.tensor rounds them."""
    rows = ([[-0.1, 3, None], [-1 / 3, 7, None]], None, [], [(-2.0, 1)])
    ids, logp = pack_topk(rows, 3)
    assert ids.tolist() == [[3, 7, PAD_ID], [PAD_ID] * 3, [PAD_ID] * 3, [1, PAD_ID, PAD_ID]]
    assert logp[0, 1].item() == torch.tensor(-1 / 3, dtype=torch.float32).item()
    assert logp[2].tolist() == [-math.inf] * 3


def test_long_rows_are_truncated_on_the_per_entry_path():
    row = [[-0.1 * j, j, None] for j in range(8)]
    ids, _ = pack_topk([row, row[:2]], 3)
    assert ids.tolist() == [[0, 1, 2], [0, 1, PAD_ID]]


def test_from_sample_lists_student_logprobs_plain_floats_or_not():
    """Plain float lists skip the per-value conversion; ints, numpy scalars and None give the same tensors."""
    from ta_opd.topk import TokenBatch

    top = [[[[-0.1, 1, None], [-2.0, 2, None]]] * 3]

    def build(student_logp):
        return TokenBatch.from_sample_lists(top, top, [[1, 2, 1]], [student_logp], [[-0.5] * 3], [[1, 1, 1]], 2)

    plain = build([-0.25, -1.0, -3.0])
    mixed = build([np.float64(-0.25), -1, -3.0])
    assert torch.equal(plain.student_logp, mixed.student_logp)
    assert plain.student_logp.dtype == torch.float32 and plain.student_logp_known.all()
    missing = build([-0.25, None, -3.0])
    assert missing.student_logp_known.tolist() == [True, False, True]
    assert math.isnan(missing.student_logp[1].item()) and missing.student_logp[2].item() == -3.0
