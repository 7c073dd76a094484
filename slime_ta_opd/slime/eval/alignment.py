"""High-probability-token alignment over training: the share of the student's top-k tokens that the teacher also
ranks in its top-k, per method × budget (mean over seeds, band from the lowest to the highest seed).

Usage::

    plot_topk_alignment outputs/suites/my_suite                 # writes <suite>/plots/topk_alignment.{png,csv}
    plot_topk_alignment SUITE --out alignment.png --smooth 5

The metric is ``opd/overlap_ratio`` of each run's ``metrics.jsonl`` (``ta_opd.metrics.selection_metrics``:
|top-k(student) ∩ top-k(teacher)| / k, averaged over the step's valid response tokens; k is
``--opd-topk-metrics-k``), logged at every rollout step of a run that scores a teacher (``--use-opd``). The right
panel is ``opd/teacher_mass_on_shared``: the teacher's probability mass on the shared tokens. The CSV holds the
per-seed values at full precision.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from slime.suite_report.summary import Run, load_suite, series
from ta_opd.atomic_io import atomic_write_text

ALIGNMENT_KEY = "opd/overlap_ratio"
MASS_KEY = "opd/teacher_mass_on_shared"


def alignment_series(runs: Sequence[Run], key: str = ALIGNMENT_KEY) -> dict[str, dict[str, tuple[list, list]]]:
    """``{method label: {run dir: (steps, values)}}`` of ``key`` (runs without it are left out)."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for run in runs:
        recs = [r for r in run.records if isinstance(r.get("rollout_id"), int) and r["rollout_id"] >= 0]
        steps, values = series(recs, key)
        if steps:
            out.setdefault(run.label, {})[run.row["run_dir"]] = (steps, values)
    return out


def band(curves: Sequence[tuple[list, list]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the curves at the steps every curve has."""
    common = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    maps = [dict(zip(s, v, strict=True)) for s, v in curves]
    return (
        common,
        [sum(m[t] for m in maps) / len(maps) for t in common],
        [min(m[t] for m in maps) for t in common],
        [max(m[t] for m in maps) for t in common],
    )


def _smooth(values: list[float], k: int) -> list[float]:
    windows = [values[max(0, i - max(1, k) + 1) : i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def plot(suite: Path, out: Path, smooth: int = 1) -> tuple[Path, Path]:
    """Write the PNG and the CSV; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_suite(suite)
    overlap = alignment_series(runs, ALIGNMENT_KEY)
    if not overlap:
        raise ValueError(
            f"no run of {suite} logged {ALIGNMENT_KEY!r} (it is logged when the rollout scores a teacher: --use-opd)"
        )
    mass = alignment_series(runs, MASS_KEY)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    for ax, data, title, ylabel in (
        (axes[0], overlap, "Top-k alignment: share of the student's top-k also in the teacher's", "overlap (%)"),
        (axes[1], mass, "Teacher mass on the shared top-k tokens", "teacher probability mass (%)"),
    ):
        for i, (label, by_run) in enumerate(sorted(data.items())):
            steps, mean, lo, hi = band(list(by_run.values()))
            if not steps:
                continue
            color = cmap(i % 10)
            n = f", {len(by_run)} seeds" if len(by_run) > 1 else ""
            ax.plot(steps, [100 * v for v in _smooth(mean, smooth)], color=color, lw=1.8, label=label + n)
            if len(by_run) > 1:
                ax.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    buf = io.StringIO()
    buf.write("method,run_dir,rollout_id,metric,value\n")
    for key, data in ((ALIGNMENT_KEY, overlap), (MASS_KEY, mass)):
        for label, by_run in sorted(data.items()):
            for run_dir, (steps, values) in sorted(by_run.items()):
                for s, v in zip(steps, values, strict=True):
                    buf.write(f'"{label}",{run_dir},{s},{key},{v!r}\n')
    csv_path = atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    return out, csv_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="plot_topk_alignment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("suite", type=Path, help="a method-suite directory (method_mapping.csv + runs/*/metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default SUITE/plots/topk_alignment.png)")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving average over this many steps")
    args = p.parse_args(argv)
    try:
        if args.smooth < 1:
            raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
        png, csv_path = plot(args.suite, args.out or args.suite / "plots" / "topk_alignment.png", args.smooth)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(png)
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
