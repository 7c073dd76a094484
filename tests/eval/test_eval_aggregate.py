"""Multi-seed aggregation: hand-computed means, sample stds, deltas, tables; Avg@k / Pass@k / Maj@k over seeds."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slime.eval import aggregate as agg
from ta_opd import math_eval as me


def _lmeval(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "configs": {}}))


def _layout(root: Path) -> None:
    """base (no budget) and pure_opd/ta_opd at budget 0.10, two seeds each; AIME24 (exact match) and IFEval."""
    values = {  # (method, budget): {seed: (aime24, ifeval)} as lm-eval fractions
        ("base", None): {0: (0.10, 0.20), 1: (0.20, 0.30)},
        ("pure_opd", "0.10"): {0: (0.30, 0.40), 1: (0.50, 0.40)},
        ("ta_opd", "0.10"): {0: (0.40, 0.50), 1: (0.40, 0.70)},
    }
    for (method, budget), seeds in values.items():
        for seed, (aime, ifeval) in seeds.items():
            parts = [method] + ([budget] if budget else []) + [f"seed{seed}", "model_name"]
            _lmeval(
                root.joinpath(*parts, "results_2026-01-01T00-00-00.json"),
                {
                    "aime24": {"alias": "aime24", "exact_match,none": aime, "exact_match_stderr,none": "N/A"},
                    "ifeval": {"prompt_level_strict_acc,none": ifeval, "inst_level_strict_acc,none": 0.99},
                },
            )


def test_mean_std_hand_case():
    mean, std = agg.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = (16/9 + 1/9 + 25/9) / 2 = 7/3
    assert std == pytest.approx(math.sqrt(7 / 3))
    assert math.isnan(agg.mean_std([5.0])[1])  # one seed: no spread, never a silent 0
    with pytest.raises(ValueError, match="at least one"):
        agg.mean_std([])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=8), st.floats(-50, 50))
def test_mean_std_shift_property(values, shift):
    m1, s1 = agg.mean_std(values)
    m2, s2 = agg.mean_std([v + shift for v in values])
    assert m2 == pytest.approx(m1 + shift, abs=1e-9)
    assert s2 == pytest.approx(s1, abs=1e-7)


def test_table3_hand_case(tmp_path):
    _layout(tmp_path)
    scores = agg.collect(tmp_path)
    assert {(s.key1, s.key2) for s in scores} == {("base", "-"), ("pure_opd", "0.10"), ("ta_opd", "0.10")}
    cells = {(c.key1, c.benchmark): c for c in agg.summarize(scores)}
    ta = cells[("ta_opd", "AIME24")]
    assert ta.metric == "exact_match,none" and ta.seeds == (0, 1)
    assert ta.mean == pytest.approx(40.0) and ta.std == pytest.approx(0.0)
    assert ta.delta_vs_base == pytest.approx(40.0 - 15.0)
    assert ta.delta_vs_full_opd == pytest.approx(40.0 - 40.0)
    ifeval = cells[("ta_opd", "IFEval")]  # prompt-level strict accuracy, not the instruction-level one
    assert ifeval.mean == pytest.approx(60.0)
    assert ifeval.std == pytest.approx(math.sqrt(((50 - 60) ** 2 + (70 - 60) ** 2) / 1))
    assert ifeval.delta_vs_base == pytest.approx(60.0 - 25.0)
    assert ifeval.delta_vs_full_opd == pytest.approx(60.0 - 40.0)
    assert cells[("base", "AIME24")].delta_vs_base == 0.0

    columns, rows = agg.table_rows(agg.summarize(scores), order1=["base", "pure_opd"])
    assert columns == ["AIME24", "IFEval"]
    assert [r.key1 for r in rows] == ["base", "pure_opd", "ta_opd"]
    ta_row = rows[2]
    assert ta_row.avg_mean == pytest.approx((40.0 + 60.0) / 2)
    # per-seed averages 45 and 55 -> sample std sqrt(50)
    assert ta_row.avg_std == pytest.approx(math.sqrt(50.0))
    assert ta_row.avg_delta_vs_base == pytest.approx(((40 - 15) + (60 - 25)) / 2)


def test_cli_writes_full_precision_csv_and_rounded_markdown(tmp_path, capsys):
    _layout(tmp_path / "eval")
    out = tmp_path / "summary"
    assert agg.main([str(tmp_path / "eval"), "--out-dir", str(out), "--digits", "1"]) == 0
    with open(out / "table3.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["pure_opd"]["AIME24_mean"]) == pytest.approx(40.0)
    assert float(rows["pure_opd"]["AIME24_std"]) == pytest.approx(math.sqrt(200.0))  # 14.142135623730951
    assert rows["pure_opd"]["AIME24_std"] == repr(math.sqrt(200.0))  # full precision, not rounded
    assert rows["base"]["AIME24_std"] == repr(math.sqrt(50.0))
    md = (out / "table3.md").read_text()
    assert "| pure_opd | 0.10 | 2 | 40.0 ± 14.1 (+25.0) | 40.0 ± 0.0 (+15.0) | 40.0 ± 7.1 | +20.0 | +0.0 |" in md
    assert md in capsys.readouterr().out
    with open(out / "scores.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * 2 * 2  # method-budgets x seeds x benchmarks


def _eval_math_run(run_dir: Path, k: int, per_problem: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_problem))
    datasets = sorted({r["dataset"] for r in per_problem})
    rows = "".join(f"{d},{k}\n" for d in datasets)
    (run_dir / "results.csv").write_text("dataset,k\n" + rows)


def _problem(dataset: str, correct: list[bool], answers: list[str]) -> dict:
    s = me.score_problem(correct, answers, len(correct), me.string_equivalent)
    return {"dataset": dataset, "avg": s.avg, "pass": s.pass_k, "maj": s.maj}


def test_avg_pass_maj_at_k_over_seeds_hand_case(tmp_path):
    """k = 4 samples per problem, two problems, two seeds; PW-OPSD layout (model / method / seed)."""
    # seed 0: p1 correct 1/4 (answers 5,7,7,9; gold 5: majority 7 wrong), p2 correct 3/4 (majority right)
    seed0 = [
        _problem("aime24", [True, False, False, False], ["5", "7", "7", "9"]),
        _problem("aime24", [True, True, True, False], ["2", "2", "2", "3"]),
    ]
    # seed 1: p1 0/4, p2 4/4
    seed1 = [
        _problem("aime24", [False] * 4, ["1", "1", "2", "3"]),
        _problem("aime24", [True] * 4, ["2", "2", "2", "2"]),
    ]
    root = tmp_path / "eval"
    _eval_math_run(root / "qwen3-1.7b" / "pwopsd" / "seed0", 4, seed0)
    _eval_math_run(root / "qwen3-1.7b" / "pwopsd" / "seed1", 4, seed1)
    scores = {(s.seed, s.metric): s.value for s in agg.collect(root)}
    # Avg@4: seed 0 (1/4 + 3/4)/2 = 50 %; seed 1 (0 + 1)/2 = 50 %
    assert scores[(0, "avg@4")] == pytest.approx(50.0) and scores[(1, "avg@4")] == pytest.approx(50.0)
    # Pass@4 with n = k = 4: any correct -> 1. seed 0: (1 + 1)/2; seed 1: (0 + 1)/2
    assert scores[(0, "pass@4")] == pytest.approx(100.0) and scores[(1, "pass@4")] == pytest.approx(50.0)
    # Maj@4: seed 0 p1 majority "7" wrong, p2 "2" right -> 50 %; seed 1 p1 "1" wrong, p2 right -> 50 %
    assert scores[(0, "maj@4")] == pytest.approx(50.0) and scores[(1, "maj@4")] == pytest.approx(50.0)
    cells = {c.metric: c for c in agg.summarize(agg.collect(root), layout="pwopsd")}
    assert cells["pass@4"].mean == pytest.approx(75.0)
    assert cells["pass@4"].std == pytest.approx(math.sqrt(((100 - 75) ** 2 + (50 - 75) ** 2) / 1))
    assert math.isnan(cells["pass@4"].delta_vs_base)  # no base row of that model


def test_pwopsd_layout_table(tmp_path):
    """Rows model x method, Avg@k per benchmark and their mean; deltas against the model's own base row."""
    root = tmp_path / "eval"
    for model, offset in (("qwen3-1.7b", 0.0), ("olmo-7b", 0.25)):
        for method, extra in (("base", 0.0), ("pwopsd", 0.25)):
            for seed in (0, 1):
                p = offset + extra + 0.25 * seed / 2  # fraction correct per problem (same for all problems)
                flags = [True] * int(p * 8) + [False] * (8 - int(p * 8))
                recs = [_problem(ds, flags, ["x"] * 8) for ds in ("aime24", "hmmt25") for _ in range(2)]
                _eval_math_run(root / model / method / f"seed{seed}", 8, recs)
    out = tmp_path / "summary"
    assert agg.main([str(root), "--layout", "pwopsd", "--metric", "avg@8", "--out-dir", str(out)]) == 0
    with open(out / "pwopsd.csv", newline="") as fh:
        rows = {(r["model"], r["method"]): r for r in csv.DictReader(fh)}
    row = rows[("olmo-7b", "pwopsd")]  # p = 0.5 (seed 0) and 0.625 (seed 1) on both benchmarks
    assert float(row["AIME24_mean"]) == pytest.approx(56.25)
    assert float(row["HMMT25_mean"]) == pytest.approx(56.25)
    assert float(row["avg_mean"]) == pytest.approx(56.25)
    assert float(row["AIME24_delta_vs_base"]) == pytest.approx(25.0)
    assert "avg_delta_vs_full_opd" not in row
    assert "| olmo-7b | pwopsd | 2 |" in (out / "pwopsd.md").read_text()


def test_bad_inputs_are_named(tmp_path, capsys):
    assert agg.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    _lmeval(tmp_path / "r" / "pure_opd" / "results_1.json", {"aime24": {"exact_match,none": 0.5}})
    assert agg.main([str(tmp_path / "r")]) == 2
    assert "expected EVAL_ROOT/<method>/[<budget>/]seed<N>" in capsys.readouterr().err
    _layout(tmp_path / "ok")
    assert agg.main([str(tmp_path / "ok"), "--benchmarks", "GPQA-D"]) == 2
    assert "benchmarks ['GPQA-D'] have no scores" in capsys.readouterr().err
    assert agg.main([str(tmp_path / "ok"), "--metric-for", "IFEval"]) == 2
    assert "expected BENCHMARK=METRIC_KEY" in capsys.readouterr().err


def test_metric_keys_and_newest_file_wins(tmp_path):
    assert agg.pick_metric({"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}, ["exact_match"])
    gsm = {"exact_match,flexible-extract": 0.2, "exact_match,strict-match": 0.1}
    picked = agg.lmeval_scores({"gsm8k_cot": gsm}, {})
    assert picked == [("GSM8K", "exact_match,strict-match", pytest.approx(10.0))]
    over = agg.lmeval_scores({"gsm8k_cot": gsm}, {"GSM8K": "exact_match,flexible-extract"})
    assert over[0][2] == pytest.approx(20.0)
    seed_dir = tmp_path / "base" / "seed0"
    _lmeval(seed_dir / "a" / "results_1.json", {"aime24": {"exact_match,none": 0.1}})
    _lmeval(seed_dir / "b" / "results_2.json", {"aime24": {"exact_match,none": 0.3}, "aime25": {"exact_match": 0.2}})
    os.utime(seed_dir / "a" / "results_1.json", (1, 1))  # older
    values = {s.benchmark: s.value for s in agg.collect(tmp_path)}
    assert values == {"AIME24": pytest.approx(30.0), "AIME25": pytest.approx(20.0)}
