"""The ``summarize_suite`` command: a suite's tables (``slime.suite_report.summary``) and plots (``.plots``).

Usage and outputs: the docstring of ``slime.suite_report.summary``; docs/method_suite.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slime.suite_report.summary import (
    BOOTSTRAP_RESAMPLES,
    SUMMARY_COLUMNS,
    aggregate,
    load_suite,
    markdown_table,
    summarize_run,
    verdicts,
    write_csv,
)
from slime.suite_report.summary import (
    __doc__ as SUMMARY_DOC,
)
from ta_opd.atomic_io import atomic_write_text


def summarize(
    suite_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    tail: int = 3,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """Build the summary of one or more suites; returns the method rows, the run rows, the table, the verdict
    lines and the written paths."""
    if not suite_dirs:
        raise ValueError("need at least one suite directory")
    runs = [run for d in suite_dirs for run in load_suite(Path(d))]
    if not runs:
        raise ValueError(f"no runs in {list(map(str, suite_dirs))} (empty method_mapping.csv)")
    run_rows = [summarize_run(r, tail) for r in runs]
    rows = aggregate(runs, run_rows, n_resamples)
    order = sorted(range(len(runs)), key=lambda i: (run_rows[i]["alias"] != "pure_opd", run_rows[i]["budget_nominal"],
                                                   run_rows[i]["idx"], run_rows[i]["seed"] or 0))  # fmt: skip
    runs, run_rows = [runs[i] for i in order], [run_rows[i] for i in order]
    out = Path(out_dir) if out_dir is not None else Path(suite_dirs[0])
    table = markdown_table(rows, tail)
    lines = verdicts(rows)
    write_csv(rows, out / "summary.csv", SUMMARY_COLUMNS)
    write_csv(run_rows, out / "runs.csv")
    atomic_write_text(out / "summary.md", table + "\n" + "".join(f"- {line}\n" for line in lines))
    paths = {"csv": out / "summary.csv", "markdown": out / "summary.md", "runs": out / "runs.csv"}
    if plots:
        from slime.suite_report.plots import plot_accuracy_vs_budget, plot_curves

        paths["curves"] = plot_curves(runs, out / "plots" / "curves.png")
        paths["accuracy_vs_budget"] = plot_accuracy_vs_budget(rows, out / "plots" / "accuracy_vs_budget.png")
    return {"rows": rows, "runs": run_rows, "table": table, "verdicts": lines, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=SUMMARY_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite-dir", action="append", required=True, help="a suite directory (repeatable)")
    parser.add_argument("--out-dir", default=None, help="default: the first --suite-dir")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--tail", type=int, default=3, help="final teacher KL = mean of the last N steps")
    ns = parser.parse_args(argv)
    if ns.tail < 1:
        parser.error(f"--tail must be >= 1, got {ns.tail}")
    try:
        result = summarize(ns.suite_dir, ns.out_dir, plots=not ns.no_plots, tail=ns.tail)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(result["table"], end="")  # the table and the verdict lines come last
    for line in result["verdicts"]:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
