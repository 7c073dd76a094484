"""tools/summarize_suite.py (slime.utils.suite_summary) on synthetic suites."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slime.utils.suite_summary import main, summarize


def make_suite(root: Path, entries, steps: int = 4) -> Path:
    """entries: (idx, alias, mask, ratio, realised, final accuracy, posthoc or None)."""
    root.mkdir(parents=True)
    lines = ["idx,alias,mask,ratio,seed,run_dir"]
    for idx, alias, mask, ratio, realised, acc, posthoc in entries:
        run = root / "runs" / f"{idx}_{alias}"
        run.mkdir(parents=True)
        lines.append(f"{idx},{alias},{mask},{ratio},{idx},runs/{idx}_{alias}")
        records = [{"rollout_id": -1, "eval/heldout/reward_mean": 0.1}]
        for t in range(steps):
            records.append(
                {
                    "rollout_id": t,
                    "opd/nominal_ratio": ratio,
                    "opd/realised_ratio": realised,
                    "train/teacher_kl_all": 1.0 - 0.1 * t,
                    "perf/step_time": 2.0,
                    **({"eval/heldout/reward_mean": acc} if t == steps - 1 else {}),
                }
            )
        text = "".join(json.dumps(r) + "\n" for r in records)
        (run / "metrics.jsonl").write_text(text + '{"rollout_id": 9, "torn')  # a torn last line is skipped
        (run / "launcher.json").write_text(json.dumps({"exit_code": 0, "wall_seconds": 12.5}))
        if posthoc is not None:
            (run / "eval_accuracy.json").write_text(json.dumps({"accuracy": posthoc}))
    (root / "method_mapping.csv").write_text("\n".join(lines) + "\n")
    return root


def test_summary_rows_table_and_plots(tmp_path):
    suite = make_suite(
        tmp_path / "s",
        [
            (20, "teachability", "dlearn_high", 0.1, 0.12, 0.5, None),
            (10, "pure_opd", "full", 1.0, 1.0, 0.6, None),
        ],
    )
    result = summarize([suite], tail=2)
    runs = result["runs"]
    assert [r["alias"] for r in runs] == ["pure_opd", "teachability"]  # Full OPD first
    ta = runs[1]
    assert ta["method"] == "TA-OPD" and ta["budget_nominal"] == 0.1 and ta["budget_realised"] == pytest.approx(0.12)
    assert ta["eval_accuracy_initial"] == 0.1 and ta["eval_accuracy_final"] == 0.5
    assert ta["teacher_kl_first"] == 1.0 and ta["teacher_kl_final"] == pytest.approx((0.8 + 0.7) / 2)
    assert ta["steps"] == 4 and ta["wall_seconds"] == 12.5 and ta["status"] == "ok"
    row = result["rows"][1]  # one row per method x budget; no per-prompt results here: no CI
    assert row["accuracy_after_mean"] == 0.5 and row["accuracy_after_ci_low"] is None and row["seeds"] == 1
    assert "| TA-OPD | 10% | 12% | 1 | 10.0% | 50.0% | – |" in result["table"]
    assert result["verdicts"] == [
        "Full OPD: no random run to compare with; +50.0 points over the student before training",
        "TA-OPD 10%: no random run to compare with; 80% of full OPD's gain",
    ]
    with open(suite / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[1]["budget_realised"] == "0.12" and csv_rows[0]["method"] == "Full OPD"
    assert csv_rows[1]["share_of_full_opd_gain"] == "0.8"
    for name in ("curves", "accuracy_vs_budget"):
        assert result["paths"][name].stat().st_size > 10_000


def test_sweep_of_several_suites_with_posthoc_and_missing_run(tmp_path):
    a = make_suite(tmp_path / "b0.05", [(10, "tip", "tip", 0.05, 0.06, 0.3, 0.31)])
    b = make_suite(tmp_path / "b0.2", [(10, "tip", "tip", 0.2, 0.21, 0.4, 0.42)])
    (b / "method_mapping.csv").write_text(
        (b / "method_mapping.csv").read_text() + "20,random,random,0.2,20,runs/20_random\n"
    )  # listed but never ran
    result = summarize([a, b], out_dir=tmp_path, plots=False)
    by = {(r["alias"], r["budget_nominal"]): r for r in result["runs"]}
    assert by[("tip", 0.05)]["posthoc_accuracy"] == 0.31 and by[("tip", 0.2)]["posthoc_accuracy"] == 0.42
    assert by[("random", 0.2)]["status"] == "missing" and by[("random", 0.2)]["eval_accuracy_final"] is None
    assert {(r["alias"], r["budget_nominal"]): r["status"] for r in result["rows"]}[("random", 0.2)] == "0/1 ok"
    assert (tmp_path / "summary.md").is_file() and not (tmp_path / "plots").exists()


def test_cli_errors_cleanly(tmp_path, capsys):
    assert main(["--suite-dir", str(tmp_path)]) == 2
    assert "method_mapping.csv does not exist" in capsys.readouterr().err
