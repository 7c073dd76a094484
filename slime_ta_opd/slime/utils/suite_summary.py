"""Summarise a method suite or budget sweep: one table (CSV + Markdown) and PNG plots.

Reads ``<suite>/method_mapping.csv`` (written by scripts/train/run_method_suite.sh), then for each
run ``<suite>/<run_dir>/metrics.jsonl`` (one JSON object per rollout step, written by train.py),
``launcher.json`` (wall time, exit code) and, when present, ``eval_accuracy.json`` (a post-hoc
evaluation of the final checkpoint by tools/eval_task_accuracy.py). Several suites (a budget sweep)
can be combined into one table. Only the newest run of each ``metrics.jsonl`` is read, one record per
rollout step (``current_run_records``), so a file that somehow holds two runs is never blended.

Writes ``summary.csv``, ``summary.md`` and ``plots/{curves,accuracy_vs_budget}.png`` under
``--out-dir`` (default: the first suite directory) and prints the Markdown table.

Usage (``tools/summarize_suite.py`` and the ``summarize_suite`` command wrap ``main``)::

    python tools/summarize_suite.py --suite-dir outputs/method_suite/suite_20260101_120000
    python tools/summarize_suite.py --suite-dir SWEEP/budget_0.05 --suite-dir SWEEP/budget_0.1 --out-dir SWEEP
    python tools/summarize_suite.py --suite-dir DIR --no-plots
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Display names of the script aliases (the release's table); unknown aliases show as themselves.
PAPER_NAMES = {
    "pure_opd": "Full OPD",
    "teachability": "TA-OPD",
    "teachability_entropy": "TA-OPD + Entropy",
    "entropy": "Entropy-only",
    "tip": "TIP-style",
    "divergence": "High divergence",
    "random": "Random",
}

# Metric keys written by the stack (docs/training.md); the first present key wins.
REALISED_KEYS = ("opd/realised_ratio", "rollout/kept_token_ratio")
NOMINAL_KEYS = ("opd/nominal_ratio",)
TEACHER_KL_KEYS = ("train/teacher_kl_all", "rollout/teacher_kl_sampled", "opd/sampled_rev_kl_all")
ACCURACY_SUFFIX = "/reward_mean"  # eval/<dataset>/reward_mean = accuracy with the task's verifier reward

COLUMNS = [
    "idx",
    "method",
    "alias",
    "mask",
    "budget_nominal",
    "budget_realised",
    "steps",
    "eval_accuracy_initial",
    "eval_accuracy_final",
    "posthoc_accuracy",
    "teacher_kl_first",
    "teacher_kl_final",
    "wall_seconds",
    "status",
    "suite",
    "run_dir",
]


@dataclass
class Run:
    suite: Path
    row: dict[str, str]
    records: list[dict[str, Any]] = field(default_factory=list)
    launcher: dict[str, Any] = field(default_factory=dict)
    posthoc: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.suite / self.row["run_dir"]

    @property
    def label(self) -> str:
        alias = self.row["alias"]
        name = PAPER_NAMES.get(alias, alias)
        return name if alias == "pure_opd" else f"{name} ({_pct(float(self.row['ratio']))})"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def current_run_records(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The records of the newest run in one metrics file, one per rollout id; and how many earlier runs were dropped.

    A run resumed from a checkpoint continues its own file: its first new step is past the checkpoint (>= 1), and
    a step logged again after the resume replaces the earlier line. A step that goes back to the start (at or
    below the segment's first step, or to step 0 / the pre-training eval -1) begins a new run, e.g. ``train.py``
    run twice with one ``--output-dir``: the earlier lines belong to another run and are not summarised with it.
    """
    runs: list[dict[int, dict[str, Any]]] = [{}]
    first: float | None = None
    previous: float | None = None
    for record in records:
        rid = record.get("rollout_id")
        if not _finite(rid):
            continue
        if first is None:
            first = rid
        elif previous is not None and rid <= previous and (rid <= first or rid <= 0):
            runs.append({})
            first = rid
        previous = rid
        runs[-1][int(rid)] = record
    newest = runs[-1]
    return [newest[k] for k in sorted(newest)], len(runs) - 1


def load_suite(suite: Path) -> list[Run]:
    mapping = suite / "method_mapping.csv"
    if not mapping.is_file():
        raise FileNotFoundError(f"{mapping} does not exist (is {suite} a suite directory?)")
    with open(mapping, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"idx", "alias", "mask", "ratio", "run_dir"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{mapping}: expected columns {sorted(need)}, got {sorted(rows[0])}")
    runs = []
    for row in rows:
        run = Run(suite=suite, row=row)
        if (run.dir / "metrics.jsonl").is_file():
            run.records, earlier = current_run_records(read_jsonl(run.dir / "metrics.jsonl"))
            if earlier:
                print(
                    f"warning: {run.dir / 'metrics.jsonl'} holds {earlier} earlier run(s) before the newest; "
                    "only the newest is summarised",
                    file=sys.stderr,
                )
        for name, attr in (("launcher.json", "launcher"), ("eval_accuracy.json", "posthoc")):
            if (run.dir / name).is_file():
                setattr(run, attr, json.loads((run.dir / name).read_text()))
        runs.append(run)
    return runs


def _first_key(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> str | None:
    for key in keys:
        if any(_finite(r.get(key)) for r in records):
            return key
    return None


def accuracy_key(records: Sequence[dict[str, Any]]) -> str | None:
    """The eval accuracy key (``eval/<dataset>/reward_mean``); ``eval/heldout`` preferred."""
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith(ACCURACY_SUFFIX)})
    if not keys:
        return None
    return "eval/heldout" + ACCURACY_SUFFIX if "eval/heldout" + ACCURACY_SUFFIX in keys else keys[0]


def series(records: Sequence[dict[str, Any]], key: str | None) -> tuple[list[int], list[float]]:
    """(rollout ids, values) of ``key`` over the records that have it (rollout -1 = before training)."""
    if key is None:
        return [], []
    pts = [(int(r["rollout_id"]), float(r[key])) for r in records if _finite(r.get(key)) and "rollout_id" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize_run(run: Run, tail: int = 3) -> dict[str, Any]:
    recs = [r for r in run.records if _finite(r.get("rollout_id")) and r["rollout_id"] >= 0]
    _, realised = series(recs, _first_key(recs, REALISED_KEYS))
    _, nominal = series(recs, _first_key(recs, NOMINAL_KEYS))
    _, kl = series(recs, _first_key(recs, TEACHER_KL_KEYS))
    acc_steps, acc = series(run.records, accuracy_key(run.records))
    exit_code = run.launcher.get("exit_code")
    if not run.records:
        status = "missing" if exit_code is None else f"failed ({exit_code})"
    elif exit_code not in (None, 0):
        status = f"failed ({exit_code})"
    else:
        status = "ok"
    wall = run.launcher.get("wall_seconds")
    if wall is None and recs:
        wall = sum(float(r.get("perf/step_time", 0.0)) for r in recs)
    return {
        "idx": int(run.row["idx"]),
        "method": PAPER_NAMES.get(run.row["alias"], run.row["alias"]),
        "alias": run.row["alias"],
        "mask": run.row["mask"],
        "budget_nominal": nominal[-1] if nominal else float(run.row["ratio"]),
        "budget_realised": _mean(realised),
        "steps": len(recs),
        "eval_accuracy_initial": acc[0] if acc and acc_steps[0] < 0 else None,
        "eval_accuracy_final": acc[-1] if acc else None,
        "posthoc_accuracy": run.posthoc.get("accuracy"),
        "teacher_kl_first": kl[0] if kl else None,
        "teacher_kl_final": _mean(kl[-tail:]),
        "wall_seconds": wall,
        "status": status,
        "suite": str(run.suite),
        "run_dir": str(run.dir),
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key.startswith("budget"):
        return _pct(value)
    if "accuracy" in key:
        return f"{100 * value:.1f}%"
    if key.startswith("teacher_kl"):
        return f"{value:.4f}"
    if key == "wall_seconds":
        return f"{value:.0f} s"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], tail: int = 3) -> str:
    has_posthoc = any(r["posthoc_accuracy"] is not None for r in rows)
    cols = [
        ("method", "method"),
        ("alias", "alias"),
        ("budget_nominal", "budget (nominal)"),
        ("budget_realised", "budget (realised)"),
        ("eval_accuracy_initial", "accuracy before"),
        ("eval_accuracy_final", "accuracy final"),
        *([("posthoc_accuracy", "final ckpt accuracy")] if has_posthoc else []),
        ("teacher_kl_first", "teacher KL first"),
        ("teacher_kl_final", f"teacher KL final (last {tail})"),
        ("wall_seconds", "wall time"),
        ("status", "status"),
    ]
    out = io.StringIO()
    out.write("| " + " | ".join(h for _, h in cols) + " |\n")
    out.write("|" + "|".join("---" for _ in cols) + "|\n")
    for r in rows:
        out.write("| " + " | ".join(_fmt(k, r[k]) for k, _ in cols) + " |\n")
    return out.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    _atomic_write(path, buf.getvalue())


def plot_curves(runs: Sequence[Run], path: Path, smooth: int = 3) -> Path:
    """Teacher KL (sampled tokens) and held-out accuracy over rollout steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_acc) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        color = cmap(i % 10)
        style = "-" if run.row["alias"] == "pure_opd" else ("--" if run.row["alias"] == "random" else "-")
        width = 2.6 if run.row["alias"] in ("pure_opd", "teachability") else 1.6
        recs = [r for r in run.records if _finite(r.get("rollout_id")) and r["rollout_id"] >= 0]
        steps, kl = series(recs, _first_key(recs, TEACHER_KL_KEYS))
        if kl:
            k = max(1, min(smooth, len(kl)))  # trailing moving average: rollout batches are small and noisy
            kl_s = [sum(kl[max(0, j - k + 1) : j + 1]) / len(kl[max(0, j - k + 1) : j + 1]) for j in range(len(kl))]
            ax_kl.plot(steps, kl_s, style, color=color, lw=width, label=run.label)
        steps, acc = series(run.records, accuracy_key(run.records))
        if acc:
            ax_acc.plot(steps, [100 * a for a in acc], style, marker="o", ms=4, color=color, lw=width, label=run.label)
    ax_kl.set_title(f"Teacher KL on sampled tokens (moving average of {smooth})")
    ax_kl.set_xlabel("rollout step")
    ax_kl.set_ylabel("mean log p_student(y) − log p_teacher(y)")
    ax_acc.set_title("Held-out accuracy (greedy, verifier)")
    ax_acc.set_xlabel("rollout step (−1 = before training)")
    ax_acc.set_ylabel("accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    top = max([v for line in ax_acc.get_lines() for v in line.get_ydata()] + [5.0])
    ax_acc.set_ylim(0, min(100.0, 1.15 * top))
    for ax in (ax_kl, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_kl.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_budget(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Final accuracy against the nominal budget, one line per method; Full OPD as a horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def acc(r):
        return r["posthoc_accuracy"] if r["posthoc_accuracy"] is not None else r["eval_accuracy_final"]

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if acc(r) is not None and r["alias"] != "pure_opd":
            by_method.setdefault(r["method"], []).append((r["budget_nominal"], 100 * acc(r)))
    for i, (method, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "-o", color=cmap((i + 1) % 10), label=method)
    full = [100 * acc(r) for r in rows if r["alias"] == "pure_opd" and acc(r) is not None]
    if full:
        ax.axhline(sum(full) / len(full), color=cmap(0), ls="--", lw=2, label="Full OPD (100% of tokens)")
    initial = [r["eval_accuracy_initial"] for r in rows if r["eval_accuracy_initial"] is not None]
    if initial:
        ax.axhline(100 * initial[0], color="grey", ls=":", lw=1.5, label="student before OPD")
    budgets = sorted({r["budget_nominal"] * 100 for r in rows if r["alias"] != "pure_opd"})
    if len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] >= 8:
        ax.set_xscale("log")
    if budgets:
        ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
    ax.set_xlabel("token budget (nominal share of response tokens trained on)")
    ax.set_ylabel("final held-out accuracy (%)")
    ax.set_title("Final accuracy vs token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(
    suite_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    tail: int = 3,
) -> dict[str, Any]:
    """Build the summary of one or more suites; returns the rows and the written paths."""
    if not suite_dirs:
        raise ValueError("need at least one suite directory")
    runs = [run for d in suite_dirs for run in load_suite(Path(d))]
    if not runs:
        raise ValueError(f"no runs in {list(map(str, suite_dirs))} (empty method_mapping.csv)")
    rows = sorted(
        (summarize_run(r, tail) for r in runs), key=lambda r: (r["alias"] != "pure_opd", r["budget_nominal"], r["idx"])
    )
    out = Path(out_dir) if out_dir is not None else Path(suite_dirs[0])
    table = markdown_table(rows, tail)
    write_csv(rows, out / "summary.csv")
    _atomic_write(out / "summary.md", table)
    paths = {"csv": out / "summary.csv", "markdown": out / "summary.md"}
    if plots:
        paths["curves"] = plot_curves(runs, out / "plots" / "curves.png")
        paths["accuracy_vs_budget"] = plot_accuracy_vs_budget(rows, out / "plots" / "accuracy_vs_budget.png")
    return {"rows": rows, "table": table, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print(result["table"], end="")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
