"""Fixed-context evaluation of a suite (ta_opd.diagnostics.cli.suite_eval) on a hand-built suite: tiny real models
as θ0 / θτ / teacher, token banks from real selection steps (one in the release layout), the Table-2 table and the
gain-vs-ratio curve."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ta_opd import SelectionConfig, select_tokens
from ta_opd.token_bank import TokenBankWriter

REFERENCE = Path(__file__).parents[1] / "ta_opd" / "reference.py"


def _reference():
    """tests/ta_opd/reference.py (its random TokenBatch builder), loaded by path."""
    if "_ta_opd_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_ta_opd_reference", REFERENCE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["_ta_opd_reference"]


def _bank(bank_dir: Path, mask: str, ratio: float, layout: str = "native") -> tuple[int, int, int]:
    """Two real selection steps written to a bank; returns (valid tokens, kept tokens, kept tokens in Q3)."""
    ref = _reference()
    fmt = "csv" if layout == "native" else "jsonl"
    writer = TokenBankWriter(bank_dir, fmt=fmt, layout=layout, owner=str(bank_dir.parent), budget_method=mask,
                             budget_ratio=ratio)  # fmt: skip
    valid = kept = q3 = 0
    for step in (0, 1):
        batch = ref.random_batch(10 + step, max_samples=4, max_len=10, k=4)
        res = select_tokens(batch, SelectionConfig(mask=mask, ratio=ratio))
        n = int(batch.sample_index.max()) + 1
        writer.write_step(step, batch, res, list(range(n)))
        v = batch.loss_mask.bool()
        k = res.mask.bool() & v
        valid, kept, q3 = valid + int(v.sum()), kept + int(k.sum()), q3 + int((k & res.features.is_q3).sum())
    return valid, kept, q3


@pytest.fixture
def suite(tmp_path, tiny_student_dir, tiny_teacher_dir):
    root = tmp_path / "suite"
    entries = [("teachability", "dlearn_high", 0.2, "native"), ("random", "random", 0.2, "release"),
               ("teachability", "dlearn_high", 0.5, "native")]  # fmt: skip
    rows, expected = [], {}
    for i, (method, mask, ratio, layout) in enumerate(entries):
        name = f"{i}_{method}_r{ratio}_s1"
        run = root / "runs" / name
        model = run / "checkpoints" / "iter_0000002" / "model"
        shutil.copytree(tiny_teacher_dir if i % 2 == 0 else tiny_student_dir, model)  # θτ: some other weights
        (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
        (run / "complete.json").write_text("{}")
        expected[name] = _bank(run / "token_bank", mask, ratio, layout)
        rows.append({"method": method, "mask": mask, "ratio": str(ratio), "idx": str(i), "notes": "",
                     "alias": method, "seed": "1", "seed_label": "", "run_dir": f"runs/{name}"})  # fmt: skip
    with open(root / "method_mapping.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(8)))
    return root, prompts, expected


@pytest.mark.slow
def test_suite_evaluation_table_and_curve(suite, tiny_student_dir, tiny_teacher_dir, tmp_path):
    from ta_opd.diagnostics.cli.suite_eval import main

    root, prompts, expected = suite
    common = ["--teacher", str(tiny_teacher_dir), "--student", str(tiny_student_dir), "--k", "4",
              "--bootstrap", "40", "--contexts-per-chunk", "4"]  # fmt: skip
    assert main(["run", "--suite-dir", str(root), "--prompts", str(prompts), "--num-contexts", "5",
                 "--response-tokens", "6", *common]) == 0  # fmt: skip
    fc = root / "fixed_context"
    assert (fc / "contexts.jsonl").is_file() and (fc / "theta0" / "token_stats.parquet").is_file()
    with open(fc / "budget_table.csv", newline="") as f:
        rows = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == set(expected)
    for name, (valid, kept, q3) in expected.items():
        row = rows[name]
        assert float(row["keep"]) == pytest.approx(kept / valid)  # the release bank is read like a native one
        assert float(row["q3_fraction"]) == pytest.approx(q3 / kept)
        g = float(row["G"])
        assert float(row["G_ci_low"]) <= g <= float(row["G_ci_high"])
        assert float(row["G_per_keep"]) == pytest.approx(g / (kept / valid))
        run = root / "runs" / name / "fixed_context"
        assert (run / "gain" / "gain_summary.csv").is_file() and (run / "token_bank_merged.parquet").is_file()
    # θτ = the student's own weights: no change on the shared contexts
    assert float(rows["1_random_r0.2_s1"]["G"]) == pytest.approx(0.0, abs=1e-6)
    md = (fc / "budget_table.md").read_text()
    assert "| teachability | 1 |" in md and "G @ 50 % [95 % CI]" in md
    assert (fc / "gain_vs_ratio.png").stat().st_size > 5_000  # two budgets: the curve comes with the table
    with open(fc / "gain_vs_ratio.csv", newline="") as f:
        assert sorted(float(r["ratio"]) for r in csv.DictReader(f)) == [0.2, 0.2, 0.5]

    # a second suite reuses the contexts and θ0's scores (COMMON_CONTEXT / BASELINE_METRICS): θ0 is not scored again
    second = tmp_path / "second"
    shutil.copytree(root, second, ignore=shutil.ignore_patterns("fixed_context"))  # the suite's and every run's
    assert main(["run", "--suite-dir", str(second), "--contexts", str(fc / "contexts.jsonl"), "--baseline-metrics",
                 str(fc / "theta0" / "token_stats.parquet"), *common]) == 0  # fmt: skip
    assert not (second / "fixed_context" / "theta0").exists()
    with open(second / "fixed_context" / "budget_table.csv", newline="") as f:
        again = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    for name in expected:
        assert float(again[name]["G"]) == pytest.approx(float(rows[name]["G"]), abs=1e-5)

    # one table over both suites (a sweep), with the curve
    assert main(["table", "--suite-dir", str(root), "--suite-dir", str(second), "--out-dir", str(tmp_path / "t"),
                 "--curve", "--k", "4", "--bootstrap", "40"]) == 0  # fmt: skip
    both = (tmp_path / "t" / "budget_table.csv").read_text().splitlines()
    assert len(both) == 1 + 2 * len(expected)


def test_baseline_from_other_contexts_is_refused(tmp_path):
    import pandas as pd

    from ta_opd.diagnostics.cli.eval_bank import attach_baseline

    frame = pd.DataFrame({"context_id": [0, 0], "position": [0, 1], "token_id": [5, 6], "tau.kl_f": [0.1, 0.2]})
    base = pd.DataFrame({"context_id": [0, 0], "position": [0, 1], "token_id": [5, 7], "theta0.kl_f": [0.3, 0.4]})
    with pytest.raises(SystemExit, match="other contexts"):
        attach_baseline(frame, base, "theta0", "b.parquet")
    base["token_id"] = [5, 6]
    out = attach_baseline(frame, base, "theta0", "b.parquet")
    assert list(out.columns) == ["context_id", "position", "token_id", "theta0.kl_f", "tau.kl_f"]  # θ0 first
    assert np.allclose(out["theta0.kl_f"], [0.3, 0.4])
    base["entropy_teacher"], frame["entropy_teacher"] = [1.0, 1.0], [1.0, 2.0]
    with pytest.raises(SystemExit, match="teacher column"):
        attach_baseline(frame, base, "theta0", "b.parquet")
