"""The plots of a suite summary (slime.suite_report.summary): curves with seed bands, accuracy vs budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slime.suite_report.summary import (
    OFF_POLICY_ALIASES,
    PAPER_NAMES,
    TEACHER_KL_KEYS,
    Run,
    _finite,
    _first_key,
    _pct,
    accuracy_key,
    series,
)


def _label(run: Run) -> str:
    alias = run.row["alias"]
    name = PAPER_NAMES.get(alias, alias)
    return name if alias in ("pure_opd", "sft_teacher") else f"{name} ({_pct(float(run.row['ratio']))})"


def _band(curves: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the seeds' curves at the steps every seed has."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in curves))) if curves else []
    by_seed = [dict(zip(steps, values, strict=True)) for steps, values in curves]
    mean = [sum(c[t] for c in by_seed) / len(by_seed) for t in common]
    return common, mean, [min(c[t] for c in by_seed) for t in common], [max(c[t] for c in by_seed) for t in common]


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average of k (rollout batches are small and noisy)."""
    k = max(1, min(k, len(values)))
    return [
        sum(values[max(0, j - k + 1) : j + 1]) / len(values[max(0, j - k + 1) : j + 1]) for j in range(len(values))
    ]


def plot_curves(runs: Sequence[Run], path: Path, smooth: int = 3) -> Path:
    """Teacher KL (sampled tokens) and held-out accuracy over rollout steps: one line per method × budget (the mean
    over its seeds) with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.row["alias"], run.row["ratio"]), []).append(run)
    fig, (ax_kl, ax_acc) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    for i, ((alias, _), members) in enumerate(groups.items()):
        color = cmap(i % 10)
        style = "--" if alias == "random" else "-"
        width = 2.6 if alias in ("pure_opd", "teachability") else 1.6
        label = _label(members[0]) + (f", {len(members)} seeds" if len(members) > 1 else "")
        kl_curves, acc_curves = [], []
        for run in members:
            recs = [r for r in run.records if _finite(r.get("rollout_id")) and r["rollout_id"] >= 0]
            steps, kl = series(recs, _first_key(recs, TEACHER_KL_KEYS))
            if kl and alias not in OFF_POLICY_ALIASES:  # on the teacher's samples: not the student's KL
                kl_curves.append((steps, _smooth(kl, smooth)))
            steps, acc = series(run.records, accuracy_key(run.records))
            if acc:
                acc_curves.append((steps, [100 * a for a in acc]))
        for ax, curves, marker in ((ax_kl, kl_curves, None), (ax_acc, acc_curves, "o")):
            steps, mean, lo, hi = _band(curves)
            if not steps:
                continue
            ax.plot(steps, mean, style, marker=marker, ms=4, color=color, lw=width, label=label)
            if len(curves) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
    ax_kl.set_title(f"Teacher KL on sampled tokens (moving avg. of {smooth})", fontsize=10)
    ax_kl.set_xlabel("rollout step")
    ax_kl.set_ylabel("mean log p_student(y) − log p_teacher(y)")
    ax_acc.set_title("Held-out accuracy (greedy, verifier)", fontsize=10)
    fig.suptitle("Mean over seeds; band: the seeds' range", fontsize=9)
    ax_acc.set_xlabel("rollout step (−1 = before training)")
    ax_acc.set_ylabel("accuracy (%)")
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
    """Final accuracy (mean over seeds, 95 % CI bars) against the nominal budget, one line per method; Full OPD and
    the SFT baseline as horizontal references, the student before training dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["accuracy_after_mean"] is not None and r["alias"] not in ("pure_opd", "sft_teacher"):
            by_method.setdefault(r["method"], []).append(r)
    for i, (method, pts) in enumerate(sorted(by_method.items())):
        pts.sort(key=lambda r: r["budget_nominal"])
        x = [100 * r["budget_nominal"] for r in pts]
        y = [100 * r["accuracy_after_mean"] for r in pts]
        err = [
            [100 * (r["accuracy_after_mean"] - r["accuracy_after_ci_low"]) for r in pts],
            [100 * (r["accuracy_after_ci_high"] - r["accuracy_after_mean"]) for r in pts],
        ] if all(r["accuracy_after_ci_low"] is not None for r in pts) else None  # fmt: skip
        ax.errorbar(x, y, yerr=err, fmt="-o", capsize=3, color=cmap((i + 2) % 10), label=method)
    for alias, color, style in (("pure_opd", cmap(0), "--"), ("sft_teacher", cmap(1), "-.")):
        ref = [r for r in rows if r["alias"] == alias and r["accuracy_after_mean"] is not None]
        if ref:
            name = "Full OPD (100% of tokens)" if alias == "pure_opd" else ref[0]["method"]
            ax.axhline(100 * ref[0]["accuracy_after_mean"], color=color, ls=style, lw=2, label=name)
    before = [r["accuracy_before"] for r in rows if r["accuracy_before"] is not None]
    if before:
        ax.axhline(100 * before[0], color="grey", ls=":", lw=1.5, label="student before training")
    budgets = sorted({100 * r["budget_nominal"] for r in rows if r["alias"] not in ("pure_opd", "sft_teacher")})
    if len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] >= 8:
        ax.set_xscale("log")
    if budgets:
        ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
    ax.set_xlabel("token budget (nominal share of response tokens trained on)")
    ax.set_ylabel("final held-out accuracy (%), mean over seeds [95% CI]")
    ax.set_title("Final accuracy vs token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
