"""Summarise a method suite or budget sweep: one table (CSV + Markdown), verdict lines and PNG plots.

Reads ``<suite>/method_mapping.csv`` (written by scripts/train/run_method_suite.sh), then for each
run ``<suite>/<run_dir>/metrics.jsonl`` (one JSON object per rollout step, written by train.py),
``eval_results.jsonl`` (per-prompt eval rewards, written by the RolloutManager), ``launcher.json``
(wall time, exit code) and, when present, ``eval_accuracy.json`` (a post-hoc evaluation of the final
checkpoint by tools/eval_task_accuracy.py). Several suites (a budget sweep) can be combined into one
table. Only the newest run of each ``metrics.jsonl`` / ``eval_results.jsonl`` is read, one record per
rollout step (``current_run_records``), so a file that somehow holds two runs is never blended.

``summary.csv`` has one row per method × budget (its seeds pooled; columns ``SUMMARY_COLUMNS``,
docs/method_suite.md): accuracies as fractions, 95 % CIs from the paired seed × prompt bootstrap
(``ta_opd.diagnostics.gain.paired_seed_prompt_bootstrap``) of the final eval's per-prompt correctness,
``gain_vs_random`` against the random selector's run of the same seed on the same prompts.
``runs.csv`` has one row per run. Also written: ``summary.md`` (the table and one verdict line per
method) and ``plots/{curves,accuracy_vs_budget}.png``, under ``--out-dir`` (default: the first suite
directory); the table and the verdicts are printed.

Usage (``tools/summarize_suite.py`` and the ``summarize_suite`` command wrap ``slime.suite_report.cli.main``,
which writes this module's tables and ``slime.suite_report.plots``' figures)::

    python tools/summarize_suite.py --suite-dir outputs/method_suite/suite_20260101_120000
    python tools/summarize_suite.py --suite-dir SWEEP/budget_0.05 --suite-dir SWEEP/budget_0.1 --out-dir SWEEP
    python tools/summarize_suite.py --suite-dir DIR --no-plots
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ta_opd.atomic_io import atomic_write_text

# Display names of the script aliases (the release's table); unknown aliases show as themselves.
PAPER_NAMES = {
    "pure_opd": "Full OPD",
    "teachability": "TA-OPD",
    "teachability_entropy": "TA-OPD + Entropy",
    "entropy": "Entropy-only",
    "tip": "TIP-style",
    "divergence": "High divergence",
    "random": "Random",
    "sft_teacher": "SFT on teacher samples",
}

# Metric keys written by the stack (docs/training.md); the first present key wins.
REALISED_KEYS = ("opd/realised_ratio", "rollout/kept_token_ratio")
NOMINAL_KEYS = ("opd/nominal_ratio",)
TEACHER_KL_KEYS = ("train/teacher_kl_all", "rollout/teacher_kl_sampled", "opd/sampled_rev_kl_all")
# Runs that train on the teacher's samples: their "teacher KL" is measured on tokens the student did not
# sample, so it is not the student's divergence from the teacher; the KL columns stay blank for them.
OFF_POLICY_ALIASES = ("sft_teacher",)
ACCURACY_SUFFIX = "/reward_mean"  # eval/<dataset>/reward_mean = accuracy with the task's verifier reward

# summary.csv: one row per method x budget, seeds pooled (docs/method_suite.md defines every column)
SUMMARY_COLUMNS = [
    "method",
    "alias",
    "mask",
    "budget_nominal",
    "budget_realised",
    "seeds",
    "accuracy_before",
    "accuracy_after_mean",
    "accuracy_after_ci_low",
    "accuracy_after_ci_high",
    "gain_vs_random_mean",
    "gain_vs_random_ci_low",
    "gain_vs_random_ci_high",
    "random_budget",
    "share_of_full_opd_gain",
    "teacher_kl_before",
    "teacher_kl_after_mean",
    "wall_s",
    "seed_list",
    "status",
]
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

# runs.csv: one row per run
COLUMNS = [
    "idx",
    "seed",
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
    eval_results: dict[int, list[float]] = field(default_factory=dict)  # rollout id -> per-prompt score

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
        if (run.dir / EVAL_RESULTS).is_file():
            run.eval_results = read_eval_results(run.dir / EVAL_RESULTS, accuracy_dataset(run.records))
        runs.append(run)
    return runs


EVAL_RESULTS = "eval_results.jsonl"  # slime.ray.rollout.EVAL_RESULTS_FILE (not imported: that module loads torch)


def read_eval_results(path: Path, dataset: str | None) -> dict[int, list[float]]:
    """Per-prompt scores of one dataset by rollout id (the newest run of the file): each prompt's mean reward over
    its samples. A step whose rewards are not all numbers is left out (no per-prompt CI for it)."""
    records = [r for r in read_jsonl(path) if dataset is None or r.get("dataset") == dataset]
    out: dict[int, list[float]] = {}
    for r in current_run_records(records)[0]:
        rewards, n = r.get("rewards"), int(r.get("n_samples_per_prompt") or 1)
        if not isinstance(rewards, list) or not rewards or len(rewards) % n or not all(map(_finite, rewards)):
            continue
        out[int(r["rollout_id"])] = [sum(rewards[i : i + n]) / n for i in range(0, len(rewards), n)]
    return out


def accuracy_dataset(records: Sequence[dict[str, Any]]) -> str | None:
    """The dataset of :func:`accuracy_key` (``eval/<dataset>/reward_mean``)."""
    key = accuracy_key(records)
    return None if key is None else key[len("eval/") : -len(ACCURACY_SUFFIX)]


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
    _, kl = series(recs, _first_key(recs, TEACHER_KL_KEYS)) if run.row["alias"] not in OFF_POLICY_ALIASES else ([], [])
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
        "seed": int(run.row["seed"]) if str(run.row.get("seed", "")).isdigit() else None,
        "method": PAPER_NAMES.get(run.row["alias"], run.row["alias"]),
        "alias": run.row["alias"],
        "mask": run.row["mask"],
        "budget_nominal": nominal[-1] if nominal else float(run.row["ratio"]),
        "budget_realised": _mean(realised),
        "steps": len(recs),
        "eval_accuracy_initial": acc[0] if acc and acc_steps[0] < 0 else None,
        "eval_accuracy_final": acc[-1] if acc else None,
        "final_eval_step": acc_steps[-1] if acc else None,
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
    if key.startswith("budget") or key == "random_budget":
        return _pct(value)
    if key == "share_of_full_opd_gain":
        return f"{100 * value:.0f}%"
    if key.startswith("gain"):
        return f"{100 * value:+.1f} pts"
    if "accuracy" in key:
        return f"{100 * value:.1f}%"
    if key.startswith("teacher_kl"):
        return f"{value:.4f}"
    if key in ("wall_seconds", "wall_s"):
        return f"{value:.0f} s"
    return str(value)


def _ci(row: dict[str, Any], key: str) -> str:
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return "" if lo is None or hi is None else f" [{_fmt(key, lo)}, {_fmt(key, hi)}]"


def _mean_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    return _mean([r[key] for r in runs if _finite(r.get(key))])


def aggregate(
    runs: Sequence[Run], run_rows: Sequence[dict[str, Any]], n_resamples: int = BOOTSTRAP_RESAMPLES
) -> list[dict[str, Any]]:
    """One row per method × budget (``SUMMARY_COLUMNS``) from the runs of every seed.

    ``accuracy_after``: the final eval's accuracy, mean over seeds and prompts, with the paired seed × prompt
    bootstrap CI of the per-prompt scores (``eval_results.jsonl``); without per-prompt results, the mean of the
    runs' final accuracies and no CI. ``gain_vs_random``: the same bootstrap of (method − random) on the seeds both
    have, random at the same budget (else the suite's only random budget). Rows: Full OPD first, then by budget.
    """
    from ta_opd.diagnostics.gain import paired_seed_prompt_bootstrap

    groups: dict[tuple[str, float], list[tuple[Run, dict[str, Any]]]] = {}
    for run, row in zip(runs, run_rows, strict=True):
        groups.setdefault((row["alias"], float(run.row["ratio"])), []).append((run, row))

    def final_scores(members) -> dict[int, list[float]]:
        """seed -> the per-prompt scores of the run's final eval (runs with them only)."""
        out = {}
        for run, row in members:
            step = row["final_eval_step"]
            if row["seed"] is not None and step is not None and step in run.eval_results:
                out[row["seed"]] = run.eval_results[step]
        return out

    def bootstrap(a: dict[int, list[float]], b: dict[int, list[float]] | None):
        seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
        if not seeds or len({len(a[s]) for s in seeds} | ({len(b[s]) for s in seeds} if b else set())) != 1:
            return None  # nothing paired, or runs evaluated on different prompt sets
        import numpy as np

        values = np.array([a[s] for s in seeds])
        base = np.array([b[s] for s in seeds]) if b is not None else None
        return paired_seed_prompt_bootstrap(values, base, n_resamples=n_resamples, confidence=CONFIDENCE)

    randoms = {ratio: members for (alias, ratio), members in groups.items() if alias == "random"}
    rows = []
    for (alias, ratio), members in groups.items():
        run_rows_g = [row for _, row in members]
        ok = [row for row in run_rows_g if row["status"] == "ok"]
        scores = final_scores(members)
        acc = bootstrap(scores, None)
        row: dict[str, Any] = {
            "method": PAPER_NAMES.get(alias, alias),
            "alias": alias,
            "mask": members[0][0].row["mask"],
            "budget_nominal": _mean_of(run_rows_g, "budget_nominal") or ratio,
            "budget_realised": _mean_of(run_rows_g, "budget_realised"),
            "seeds": len(ok),
            "accuracy_before": _mean_of(run_rows_g, "eval_accuracy_initial"),
            "accuracy_after_mean": acc.estimate if acc else _mean_of(run_rows_g, "eval_accuracy_final"),
            "accuracy_after_ci_low": acc.ci_low if acc else None,
            "accuracy_after_ci_high": acc.ci_high if acc else None,
            "gain_vs_random_mean": None,
            "gain_vs_random_ci_low": None,
            "gain_vs_random_ci_high": None,
            "random_budget": None,
            "share_of_full_opd_gain": None,
            "teacher_kl_before": _mean_of(run_rows_g, "teacher_kl_first"),
            "teacher_kl_after_mean": _mean_of(run_rows_g, "teacher_kl_final"),
            "wall_s": _mean_of(run_rows_g, "wall_seconds"),
            "seed_list": " ".join(str(r["seed"]) for r in run_rows_g if r["seed"] is not None),
            "status": "ok" if len(ok) == len(run_rows_g) else f"{len(ok)}/{len(run_rows_g)} ok",
        }
        reference = randoms.get(ratio) or (next(iter(randoms.values())) if len(randoms) == 1 else None)
        if alias != "random" and reference is not None:
            row["random_budget"] = float(reference[0][0].row["ratio"])
            gain = bootstrap(scores, final_scores(reference))
            if gain is not None:
                row["gain_vs_random_mean"] = gain.estimate
                row["gain_vs_random_ci_low"], row["gain_vs_random_ci_high"] = gain.ci_low, gain.ci_high
        rows.append(row)
    full = next((r for r in rows if r["alias"] == "pure_opd"), None)
    full_gain = _gain_over_start(full) if full else None
    for r in rows:
        gain = _gain_over_start(r)
        if full_gain is not None and full_gain > 0 and gain is not None:
            r["share_of_full_opd_gain"] = gain / full_gain
    return sorted(rows, key=lambda r: (r["alias"] != "pure_opd", r["budget_nominal"], r["alias"]))


def _gain_over_start(row: dict[str, Any] | None) -> float | None:
    if row is None or row["accuracy_after_mean"] is None or row["accuracy_before"] is None:
        return None
    return row["accuracy_after_mean"] - row["accuracy_before"]


def _label(row: dict[str, Any]) -> str:
    if row["alias"] in ("pure_opd", "sft_teacher"):
        return row["method"]
    return f"{row['method']} {_pct(row['budget_nominal'])}"


def verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per method, e.g. "TA-OPD 10%: +4.0 points vs random 10% [+1.0, +7.0]; 55% of full OPD's gain"."""
    full = next((r for r in rows if r["alias"] == "pure_opd"), None)
    full_gain = _gain_over_start(full)
    lines = []
    for r in rows:
        if r["alias"] == "random":
            continue
        parts = []
        if r["gain_vs_random_mean"] is not None:
            lo, hi = r["gain_vs_random_ci_low"], r["gain_vs_random_ci_high"]
            parts.append(
                f"{100 * r['gain_vs_random_mean']:+.1f} points vs random {_pct(r['random_budget'])} "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
            )
        elif r["random_budget"] is not None:
            parts.append(f"no paired per-prompt results to compare with random {_pct(r['random_budget'])}")
        else:
            parts.append("no random run to compare with")
        gain = _gain_over_start(r)
        if r["alias"] == "pure_opd":
            if gain is not None:
                parts.append(f"{100 * gain:+.1f} points over the student before training")
        elif full_gain is None:
            parts.append("no full OPD run to compare with")
        elif full_gain <= 0:
            parts.append(f"full OPD gained {100 * full_gain:+.1f} points: no share of its gain to report")
        elif gain is not None:
            parts.append(f"{100 * gain / full_gain:.0f}% of full OPD's gain")
        lines.append(f"{_label(r)}: " + "; ".join(parts))
    return lines


def _markdown(
    cols: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]], cell: Callable[[dict[str, Any], str], str]
) -> str:
    """A Markdown table: ``cols`` are (key, header) pairs, ``cell(row, key)`` formats one cell."""
    out = io.StringIO()
    out.write("| " + " | ".join(h for _, h in cols) + " |\n")
    out.write("|" + "|".join("---" for _ in cols) + "|\n")
    for r in rows:
        out.write("| " + " | ".join(cell(r, key) for key, _ in cols) + " |\n")
    return out.getvalue()


def markdown_table(rows: Sequence[dict[str, Any]], tail: int = 3) -> str:
    """The summary table (one row per method × budget), accuracies with their 95 % CIs."""
    cols = [
        ("method", "method"),
        ("budget_nominal", "budget (nominal)"),
        ("budget_realised", "budget (realised)"),
        ("seeds", "seeds"),
        ("accuracy_before", "accuracy before"),
        ("accuracy_after", "accuracy after [95% CI]"),
        ("gain_vs_random", "gain vs random [95% CI]"),
        ("teacher_kl_before", "teacher KL before"),
        ("teacher_kl_after_mean", f"teacher KL after (last {tail})"),
        ("wall_s", "wall time / run"),
        ("status", "status"),
    ]

    def cell(r: dict[str, Any], key: str) -> str:
        if key in ("accuracy_after", "gain_vs_random"):
            mean = r[f"{key}_mean"]
            return _fmt(key, mean) + ("" if mean is None else _ci(r, key))
        return _fmt(key, r[key])

    return _markdown(cols, rows, cell)


def runs_markdown_table(rows: Sequence[dict[str, Any]], tail: int = 3) -> str:
    """One row per run (runs.csv as Markdown)."""
    has_posthoc = any(r["posthoc_accuracy"] is not None for r in rows)
    cols = [
        ("method", "method"),
        ("alias", "alias"),
        ("seed", "seed"),
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
    return _markdown(cols, rows, lambda r, key: _fmt(key, r[key]))


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] = COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in columns})
    atomic_write_text(path, buf.getvalue())
