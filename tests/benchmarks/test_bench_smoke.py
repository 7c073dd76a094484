"""Smoke tests of the benchmark suite: each bench's run() at tiny sizes returns its keys, and run_all's table."""

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
    assert res["ratios"] == {
        "sparse_head_time_vs_dense": res["train_time_ratio"],
        "sparse_head_memory_vs_dense": res["train_peak_ratio"],
    }
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
    if "skipped" in payload["result"]:  # an optional extra is missing (bench_vs_trl without trl)
        pytest.skip(payload["result"]["skipped"])
    assert run_all.ratios(payload["result"]), f"{name} reported no ratio/speed-up"


def test_post_process_quick_same_masks_as_reference():
    bench = load("bench_post_process")
    res = bench.run(samples=3, tokens=40, k=4, repeats=1)
    assert res["tokens"] == 40 and res["identical_masks"]
    assert 0 < res["kept"] < 40
    assert res["ratios"]["post_process_vs_per_token_reference"] == res["post_process_vs_per_token_reference"] > 0
    assert "per-token reference" in bench.table(res)


def test_run_all_headline_table_and_merge(tmp_path):
    run_all = load("run_all")
    results = {
        "bench_a": {"ok": True, "result": {"ratios": {"sparse_head_time_vs_dense": 0.1, "extra_ratio": 2}}},
        "bench_b": {"ok": False, "error": "boom"},
        "bench_c": {"ok": True, "result": {"skipped": "trl is not installed"}},
    }
    table = run_all.headline_ratios(results)
    assert table == {
        "sparse_head_time_vs_dense": {"value": 0.1, "benchmark": "bench_a"},
        "extra_ratio": {"value": 2.0, "benchmark": "bench_a"},
    }
    text = run_all.ratio_table(table)
    for name in run_all.STABLE_RATIOS:
        assert name in text
    assert "(not run)" in text and "extra_ratio" in text
    out = tmp_path / "results.json"
    out.write_text('{"quick": true, "benchmarks": {"bench_a": {"ok": true}}}')
    assert run_all._previous(out, True) == {"bench_a": {"ok": True}}
    assert run_all._previous(out, False) == {}  # a run of other sizes is not merged


def test_vs_trl_skips_cleanly_without_trl(monkeypatch):
    bench = load("bench_vs_trl")
    monkeypatch.setattr(bench, "trl_missing", lambda: "trl is not installed")
    res = bench.run()
    assert res == {"benchmark": "vs_trl", "skipped": "trl is not installed"}
    assert "skipped" in bench.table(res)


@pytest.mark.slow
def test_vs_trl_quick_same_token_count():
    pytest.importorskip("trl")
    bench = load("bench_vs_trl")
    res = bench.run(**bench.QUICK_KWARGS)
    assert res["trl"]["response_tokens"] == res["tokens_per_step"] == 2 * 2 * 8
    assert res["ours"]["full"]["response_tokens"] == res["tokens_per_step"]
    assert 0 < res["ours"]["dlearn_high"]["kept_tokens"] < res["tokens_per_step"]
    assert res["ratios"]["opd_step_tokens_per_s_vs_trl"] == res["tokens_per_s_ratio"] > 0
    assert set(res["trl"]["seconds"]) == set(bench.TRL_PHASES)
