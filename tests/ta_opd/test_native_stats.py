"""The compiled statistics kernel (ta_opd/_native) gives bit-identical results to the numpy path.

The numpy path is the specification; the kernel is an optional speed-up. Both are run on the same
batches (random, with padding, non-finite entries, empty and identical lists, ties; both log-prob dtypes;
exact mode) and every TokenStats field must be equal to the last bit (NaN where NaN).
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

import ta_opd._native as native
import ta_opd.stats as stats_mod
from ta_opd import SelectionConfig, select_tokens
from ta_opd.topk import TokenBatch

LIB = native.stats_kernel()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no compiled kernel (no C compiler, or TA_OPD_NATIVE=0)")


def _both(batch: TokenBatch, cfg: SelectionConfig, monkeypatch) -> tuple[dict, dict]:
    with monkeypatch.context() as m:
        m.setattr(stats_mod, "stats_kernel", lambda: None)
        numpy_path = stats_mod.compute_token_stats(batch, cfg).as_dict()
    kernel_path = stats_mod.compute_token_stats(batch, cfg).as_dict()
    return numpy_path, kernel_path


def _assert_identical(want: dict, got: dict, where: str) -> None:
    assert want.keys() == got.keys(), where
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{where}: {name} {g.dtype}{tuple(g.shape)}"
        if w.is_floating_point():
            same = (g == w) | (g.isnan() & w.isnan())
            # bit-identical also means the same sign of zero
            same &= torch.signbit(g) == torch.signbit(w)
        else:
            same = g == w
        bad = (~same).nonzero().flatten()[:3].tolist()
        assert not bad, f"{where}: {name} differs at rows {bad}: kernel {g[bad].tolist()} vs numpy {w[bad].tolist()}"


@needs_kernel
@pytest.mark.parametrize("seed", range(30))
def test_kernel_matches_numpy_bit_for_bit(seed, monkeypatch):
    batch = ref.random_batch(seed, exact=seed % 3 == 0, max_samples=6, max_len=40, k=None if seed % 2 else 16)
    cfg = SelectionConfig(mask="ca_softor", ratio=0.2, exact_cmass=seed % 3 == 0)
    want, got = _both(batch, cfg, monkeypatch)
    _assert_identical(want, got, f"seed {seed}")


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_numpy_with_ties_and_float64(seed, monkeypatch):
    batch = ref.random_batch(100 + seed, ties=True, max_len=60)
    batch.student_topk_logp = batch.student_topk_logp.double()
    batch.teacher_topk_logp = batch.teacher_topk_logp.double()
    want, got = _both(batch, SelectionConfig(mask="ca_softor", ratio=0.3), monkeypatch)
    _assert_identical(want, got, f"ties seed {seed}")


@needs_kernel
def test_kernel_hand_case():
    """One row by hand: S = {1: .5, 2: .25}, T = {2: .5, 3: .25}; every entry valid."""
    lp = lambda *p: [math.log(x) for x in p]  # noqa: E731
    batch = TokenBatch(
        student_topk_ids=torch.tensor([[1, 2]]),
        student_topk_logp=torch.tensor([lp(0.5, 0.25)], dtype=torch.float64),
        teacher_topk_ids=torch.tensor([[2, 3]]),
        teacher_topk_logp=torch.tensor([lp(0.5, 0.25)], dtype=torch.float64),
        sampled_ids=torch.tensor([2]),
        student_logp=torch.tensor([math.log(0.25)]),
        teacher_logp=torch.tensor([math.log(0.5)]),
        loss_mask=torch.tensor([True]),
        sample_index=torch.tensor([0]),
        position=torch.tensor([0]),
        response_length=torch.tensor([1]),
        num_samples=1,
    )
    s = stats_mod.compute_token_stats(batch, SelectionConfig())
    s_hat, t_hat = {1: 2 / 3, 2: 1 / 3, 3: 1e-12}, {1: 1e-12, 2: 2 / 3, 3: 1 / 3}
    kl_f = sum(t_hat[v] * (math.log(t_hat[v]) - math.log(s_hat[v])) for v in (1, 2, 3))
    assert float(s.kl_f_union[0]) == pytest.approx(kl_f, rel=1e-12)
    assert float(s.cmass[0]) == pytest.approx(0.5)  # the teacher's mass on the student's id 2
    assert float(s.overlap[0]) == 0.5
    assert bool(s.reach_t1[0])  # the teacher's top-1 (id 2) is in S
    assert int(s.student_rank_sampled[0]) == 1 and int(s.teacher_rank_sampled[0]) == 0
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)
    assert float(s.entropy_norm[0]) == pytest.approx(h)


@needs_kernel
def test_selection_masks_identical_on_a_large_batch(monkeypatch):
    """Chunk boundaries: more rows than one kernel chunk, and a row count that is not a multiple of it."""
    gen = torch.Generator().manual_seed(3)
    n, k, vocab = stats_mod.NATIVE_ROW_CHUNK * 3 + 17, 8, 20
    s_lp, s_ids = torch.log_softmax(torch.randn(n, vocab, generator=gen), 1).topk(k, dim=1)
    t_lp, t_ids = torch.log_softmax(torch.randn(n, vocab, generator=gen), 1).topk(k, dim=1)
    batch = TokenBatch(
        student_topk_ids=s_ids, student_topk_logp=s_lp, teacher_topk_ids=t_ids, teacher_topk_logp=t_lp,
        sampled_ids=s_ids[:, 0], student_logp=s_lp[:, 0], teacher_logp=t_lp[:, 0],
        loss_mask=torch.ones(n, dtype=torch.bool), sample_index=torch.arange(n) // 100,
        position=torch.arange(n) % 100, response_length=torch.full((n,), 100), num_samples=(n + 99) // 100,
    )  # fmt: skip
    cfg = SelectionConfig(mask="q3_dlearn_high", ratio=0.1)
    want, got = _both(batch, cfg, monkeypatch)
    _assert_identical(want, got, "large batch")
    with monkeypatch.context() as m:
        m.setattr(stats_mod, "stats_kernel", lambda: None)
        mask_numpy = select_tokens(batch, cfg).mask
    assert torch.equal(select_tokens(batch, cfg).mask, mask_numpy)


def test_mode_env_var(monkeypatch):
    monkeypatch.setenv("TA_OPD_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="TA_OPD_NATIVE='sometimes'"):
        native.native_mode()
    monkeypatch.setenv("TA_OPD_NATIVE", "off")
    native._load.cache_clear()
    try:
        assert native.stats_kernel() is None
    finally:
        native._load.cache_clear()


def test_missing_compiler_falls_back_or_raises(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TA_OPD_NATIVE_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        monkeypatch.setenv("TA_OPD_NATIVE", "auto")
        with caplog.at_level("WARNING"):
            assert native.stats_kernel() is None
        assert "using numpy" in caplog.text
        native._load.cache_clear()
        monkeypatch.setenv("TA_OPD_NATIVE", "require")
        with pytest.raises(RuntimeError, match="no C compiler"):
            native.stats_kernel()
    finally:
        native._load.cache_clear()


@needs_kernel
def test_compile_error_leaves_no_partial_library(monkeypatch, tmp_path):
    bad_cc = tmp_path / "cc"
    bad_cc.write_text("#!/bin/sh\necho 'cc: fatal error: boom' >&2\nexit 1\n")
    bad_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(bad_cc))
    monkeypatch.setenv("TA_OPD_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TA_OPD_NATIVE", "require")
    native._load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            native.stats_kernel()
    finally:
        native._load.cache_clear()
    assert list((tmp_path / "cache").iterdir()) == []
