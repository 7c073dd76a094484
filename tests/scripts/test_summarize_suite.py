"""tools/summarize_suite.py (slime.suite_report.summary) on synthetic suites."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slime.suite_report.cli import main, summarize


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


def test_seeds_pool_into_one_row_with_paired_bootstrap_cis(tmp_path):
    """2 seeds x (full OPD, random 10 %) with per-prompt eval results: the CIs come from eval_results.jsonl."""
    suite = tmp_path / "s"
    lines = ["idx,alias,mask,ratio,seed,run_dir"]
    # final per-prompt correctness [seed][prompt]: full OPD = random + 1 on prompt 0 of every seed
    finals = {("pure_opd", 1): [1, 1, 0, 0], ("pure_opd", 2): [1, 0, 1, 0],
              ("random", 1): [0, 1, 0, 0], ("random", 2): [0, 0, 1, 0]}  # fmt: skip
    for (alias, seed), final in finals.items():
        name = f"runs/{alias}_s{seed}"
        ratio = 1.0 if alias == "pure_opd" else 0.1
        lines.append(f"1,{alias},{'full' if alias == 'pure_opd' else 'random'},{ratio},{seed},{name}")
        run = suite / name
        run.mkdir(parents=True)
        records = [
            {"rollout_id": -1, "eval/heldout/reward_mean": 0.0},
            {"rollout_id": 0, "train/teacher_kl_all": 1.0, "opd/nominal_ratio": ratio},
            {"rollout_id": 1, "train/teacher_kl_all": 0.5, "eval/heldout/reward_mean": sum(final) / 4},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        results = [
            {"rollout_id": -1, "dataset": "heldout", "n_samples_per_prompt": 1, "rewards": [0.0] * 4},
            {"rollout_id": 1, "dataset": "heldout", "n_samples_per_prompt": 1, "rewards": [float(x) for x in final]},
        ]
        (run / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        (run / "launcher.json").write_text(json.dumps({"exit_code": 0, "wall_seconds": 10.0 * seed}))
    (suite / "method_mapping.csv").write_text("\n".join(lines) + "\n")
    result = summarize([suite], plots=True, n_resamples=500)
    full, rnd = result["rows"]
    assert full["alias"] == "pure_opd" and full["seeds"] == 2 and full["seed_list"] == "1 2"
    assert full["accuracy_before"] == 0.0 and full["accuracy_after_mean"] == 0.5 and full["wall_s"] == 15.0
    assert 0.0 <= full["accuracy_after_ci_low"] < 0.5 < full["accuracy_after_ci_high"] <= 1.0
    assert full["gain_vs_random_mean"] == 0.25 and full["random_budget"] == 0.1
    assert 0.0 <= full["gain_vs_random_ci_low"] <= 0.25 <= full["gain_vs_random_ci_high"] <= 1.0
    assert rnd["gain_vs_random_mean"] is None and rnd["accuracy_after_mean"] == 0.25
    assert rnd["share_of_full_opd_gain"] == 0.5 and full["teacher_kl_after_mean"] == 0.75
    (verdict,) = result["verdicts"]
    assert verdict.startswith("Full OPD: +25.0 points vs random 10% [") and "+50.0 points over the student" in verdict
    with open(suite / "summary.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:15] == [
        "method", "alias", "mask", "budget_nominal", "budget_realised", "seeds", "accuracy_before",
        "accuracy_after_mean", "accuracy_after_ci_low", "accuracy_after_ci_high", "gain_vs_random_mean",
        "gain_vs_random_ci_low", "gain_vs_random_ci_high", "random_budget", "share_of_full_opd_gain",
    ]  # fmt: skip
    assert result["paths"]["curves"].stat().st_size > 10_000


def test_sft_baseline_row_leaves_teacher_kl_blank(tmp_path):
    """The SFT baseline trains on the teacher's samples: its "teacher KL" is not the student's, so the CSV leaves
    both KL columns empty (not 0.0) while its accuracy columns are filled."""
    suite = tmp_path / "s"
    lines = ["idx,alias,mask,ratio,seed,run_dir"]
    for alias in ("pure_opd", "sft_teacher"):
        name = f"runs/{alias}_s1"
        lines.append(f"1,{alias},full,1.0,1,{name}")
        run = suite / name
        run.mkdir(parents=True)
        records = [
            {"rollout_id": -1, "eval/heldout/reward_mean": 0.25},
            {"rollout_id": 0, "train/teacher_kl_all": 0.0 if alias == "sft_teacher" else 0.8},
            {"rollout_id": 1, "train/teacher_kl_all": 0.0 if alias == "sft_teacher" else 0.6,
             "eval/heldout/reward_mean": 0.5},
        ]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run / "launcher.json").write_text(json.dumps({"exit_code": 0, "wall_seconds": 1.0}))
    (suite / "method_mapping.csv").write_text("\n".join(lines) + "\n")
    summarize([suite], plots=False, n_resamples=50)
    with open(suite / "summary.csv", newline="") as f:
        rows = {r["alias"]: r for r in csv.DictReader(f)}
    assert rows["pure_opd"]["teacher_kl_before"] == "0.8" and rows["pure_opd"]["teacher_kl_after_mean"] == "0.7"
    assert rows["sft_teacher"]["teacher_kl_before"] == "" and rows["sft_teacher"]["teacher_kl_after_mean"] == ""
    assert rows["sft_teacher"]["accuracy_after_mean"] == "0.5"
