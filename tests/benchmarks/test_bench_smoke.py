"""Smoke tests of the benchmark suite (issue 9 item 4): each bench's run() at tiny sizes returns its keys."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sparse_head_quick_returns_ratios():
    bench = load("bench_sparse_head")
    assert bench.QUICK_KWARGS == {"quick": True}
    res = bench.run(quick=True, tokens=64, hidden=32, vocab=4096, logprob_tokens=64)
    for key in (
        "train_peak_ratio",
        "train_activation_peak_ratio",
        "train_time_ratio",
        "train_cpu_time_ratio",
        "logprobs_peak_ratio",
        "logprobs_time_ratio",
        "meets_time_target",
        "meets_peak_target",
        "memory_method",
    ):
        assert key in res, key
    train = res["phases"]["train"]
    assert train["sparse"]["kept_tokens"] == round(0.1 * 64) and train["dense"]["weight_grad_mb"] > 0
    # same data, same loss: the sparse path is exact
    assert train["value_abs_diff"] < 1e-4 and train["norm_rel_diff"] < 1e-4
    assert "sparse vs dense" in bench.table(res)


@pytest.mark.slow
def test_train_step_quick_returns_shares():
    bench = load("bench_train_step")
    res = bench.run(**bench.QUICK_KWARGS)
    shares = [res[f"{p}_share"] for p in bench.PHASES]
    assert sum(shares) == pytest.approx(1.0)
    assert all(s > 0 for s in shares)
    assert 0 < res["select_tokens_share"] <= res["selection_share"]
    assert res["response_tokens"] == 2 * 2 * 8
    assert 0 < res["realised_keep_ratio"] < 1
    assert "select_tokens" in bench.table(res)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH_DIR.glob("bench_*.py")))
def test_every_bench_runs_quick_through_run_all(name, tmp_path):
    """``run_all.py --quick`` runs each module in its own process and finds at least one ratio in it."""
    run_all = load("run_all")
    payload = run_all.run_one(name, True, tmp_path)
    assert payload["ok"], payload.get("error")
    assert run_all.ratios(payload["result"]), f"{name} reported no ratio/speed-up"
