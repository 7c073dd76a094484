"""Fixed-context gain analysis: OLS, Q3 high-C vs low-C gap, matching, plots, report (docs/method.md §6.3–6.4).

Usage:
    analyze_fixed_context_gain --stats OUT/token_stats.parquet --out-dir REPORT \
        [--gain relative|absolute] [--k 16] [--bootstrap 1000] [--seed 0] [--runs teachability,divergence]

For each θτ (every student of the table but the reference θ0): the per-token gain
G = (KLf_0 − KLf_τ)/(KLf_0 + 1e-12) (``--gain absolute``: KLf_0 − KLf_τ), winsorised at 1 %/99 %;
the standardised OLS models m1 (H + D + H·D + position + teacher entropy), m2 (+ C) and m3 (D
replaced by D^L and D^I) with prompt-cluster-robust standard errors (statsmodels); the Q3 (low H,
high D) high-C minus low-C gap for terciles and quartiles with prompt-cluster bootstrap CIs; and
within-prompt nearest-neighbour matching on (H, D, position) of above- vs below-median C.
H, D, C are the training features H̃, D̃, C̃ of θ0 (``ta_opd``). Writes ``gain_summary.csv``,
``ols.csv``, ``q3_gap.csv``, ``matching.csv``, ``gain_vs_h_d.png``, ``q3_gap.png``,
``gain_report.md``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from ta_opd.diagnostics import gain as G
from ta_opd.diagnostics.cli.common import (
    Bank,
    analysis_parser,
    load_bank,
    markdown_table,
    out_dir,
    pyplot,
    save_figure,
)
from ta_opd.diagnostics.io import atomic_write_text, write_table

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return analysis_parser("analyze_fixed_context_gain", __doc__)


def regressors(bank: Bank) -> dict[str, np.ndarray]:
    f = bank.features
    frame = bank.frame
    pos = np.asarray(frame["position"], float) / np.maximum(np.asarray(frame["response_length"], float) - 1, 1)
    return {
        "H": f["H"],
        "D": f["D"],
        "HxD": G.standardize(f["H"]) * G.standardize(f["D"]),
        "position": pos,
        "teacher_entropy": np.asarray(frame["entropy_teacher"], float),
        "C": f["C"],
        "D_learn": f["D_learn"],
        "D_incompat": f["D_incompat"],
    }


def analyse(bank: Bank, n_boot: int, seed: int) -> dict[str, Any]:
    import pandas as pd

    regs = regressors(bank)
    f = bank.features
    summary, ols_rows, gap_rows, match_rows = [], [], [], []
    for run in bank.runs:
        g, raw = bank.gains[run], bank.raw_gains[run]
        mean_ci = G.bootstrap_mean_diff(g, np.ones(g.size, bool), None, bank.clusters, n_boot, seed)
        summary.append(
            {
                "run": run,
                "n_tokens": g.size,
                "mean_gain": float(np.mean(raw)),
                "median_gain": float(np.median(raw)),
                "winsorised_mean_gain": mean_ci.estimate,
                "ci_low": mean_ci.ci_low,
                "ci_high": mean_ci.ci_high,
                "mean_kl_f_0": float(bank.frame[f"{bank.reference}.kl_f"].mean()),
                "mean_kl_f_tau": float(bank.frame[f"{run}.kl_f"].mean()),
            }
        )
        for model, names in G.ols_model_specs().items():
            fit = G.standardized_ols(g, {n: regs[n] for n in names}, clusters=bank.clusters)
            for term in fit["coef"]:
                ols_rows.append(
                    {
                        "run": run,
                        "model": model,
                        "term": term,
                        "coef": fit["coef"][term],
                        "se": fit["se"][term],
                        "pvalue": fit["pvalue"][term],
                        "ci_low": fit["ci_low"][term],
                        "ci_high": fit["ci_high"][term],
                        "r2": fit["r2"],
                        "n": fit["n"],
                        "cov_type": fit["cov_type"],
                    }  # fmt: skip
                )
        for n_bins, label in ((3, "terciles"), (4, "quartiles")):
            top, bottom = G.gap_groups(f["C"], f["q3"], n_bins)
            res = G.bootstrap_mean_diff(g, top, bottom, bank.clusters, n_boot, seed)
            gap_rows.append({"run": run, "bins": label, "n_q3": int(f["q3"].sum()), **res.as_dict()})
        m = G.nearest_neighbour_matching(g, f["C"], np.column_stack([f["H"], f["D"], regs["position"]]),
                                         bank.clusters)  # fmt: skip
        ci = (G.bootstrap_mean_diff(m.pair_diff, np.ones(m.n_pairs, bool), None, m.pair_cluster, n_boot, seed)
              if m.n_pairs else None)  # fmt: skip
        match_rows.append(
            {
                "run": run,
                "effect": m.effect,
                "ci_low": ci.ci_low if ci else np.nan,
                "ci_high": ci.ci_high if ci else np.nan,
                "n_pairs": m.n_pairs,
                "n_prompts": m.n_prompts,
                "mean_distance": m.mean_distance,
            }  # fmt: skip
        )
    return {
        "summary": pd.DataFrame(summary),
        "ols": pd.DataFrame(ols_rows),
        "q3_gap": pd.DataFrame(gap_rows),
        "matching": pd.DataFrame(match_rows),
    }


def plot_gain_vs_h_d(bank: Bank, path: Any, n_bins: int = 10) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "H", "student entropy H̃ (θ0, top-K)"), (axes[1], "D", "disagreement D̃")):
        bins = G.quantile_bins(bank.features[key], n_bins)
        centers = [bank.features[key][bins == b].mean() for b in range(n_bins)]
        for run in bank.runs:
            g = np.arcsinh(bank.raw_gains[run])
            ax.plot(centers, [g[bins == b].mean() for b in range(n_bins)], marker="o", label=run)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(f"{label}, decile means")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean asinh(gain)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Fixed-context gain vs H and D")
    save_figure(fig, path)
    plt.close(fig)


def plot_q3_gap(table: Any, path: Any) -> None:
    plt = pyplot()
    t = table[table["bins"] == "terciles"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(t) + 2), 4))
    x = np.arange(len(t))
    err = np.vstack([t["estimate"] - t["ci_low"], t["ci_high"] - t["estimate"]])
    ax.bar(x, t["estimate"], yerr=err, capsize=5, color="#4c72b0")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(x, t["run"], rotation=20, ha="right")
    ax.set_ylabel("gain(high C) − gain(low C)")
    ax.set_title("Q3 (low H, high D): high-C minus low-C tercile gap, 95% CI")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def report(tables: dict[str, Any], args: argparse.Namespace, bank: Bank) -> str:
    ols = tables["ols"]
    m3 = ols[(ols["model"] == "m3_learnable_split") & ols["term"].isin(["D_learn", "D_incompat"])]
    lines = [
        "# Fixed-context gain analysis",
        "",
        f"Stats: `{args.stats}`; reference θ0 = `{bank.reference}`; gain = {args.gain} (winsorised "
        f"{args.winsor}); K = {args.k}; C = {'lower bound' if args.no_exact_c else 'exact'}; "
        f"{args.bootstrap} prompt-cluster bootstrap resamples, seed {args.seed}; "
        f"{len(bank.frame)} tokens, {len(set(bank.clusters))} prompts.",
        "",
        "## Mean gain per run",
        "",
        markdown_table(tables["summary"]),
        "",
        "## Q3 high-C minus low-C gap (docs/method.md §6.4)",
        "",
        "Positive: inside Q3, tokens whose teacher mass on the student's top-K is high gain more.",
        "",
        markdown_table(tables["q3_gap"][["run", "bins", "n_q3", "estimate", "ci_low", "ci_high", "n_clusters"]]),
        "",
        "![Q3 gap](q3_gap.png)",
        "",
        "## Learnable vs incompatible disagreement (model m3, standardised coefficients)",
        "",
        markdown_table(m3[["run", "term", "coef", "se", "ci_low", "ci_high", "pvalue"]]),
        "",
        "All models are in `ols.csv` (m1: H + D + H·D + position + teacher entropy; m2: + C; m3: D → D^L, D^I).",
        "",
        "## Within-prompt nearest-neighbour matching (above- vs below-median C)",
        "",
        markdown_table(tables["matching"]),
        "",
        "![gain vs H and D](gain_vs_h_d.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = out_dir(args.out_dir)
    bank = load_bank(args)
    tables = analyse(bank, args.bootstrap, args.seed)
    for name, frame in tables.items():
        write_table(out / f"{'gain_summary' if name == 'summary' else name}.csv", frame)
    plot_gain_vs_h_d(bank, out / "gain_vs_h_d.png")
    plot_q3_gap(tables["q3_gap"], out / "q3_gap.png")
    atomic_write_text(out / "gain_report.md", report(tables, args, bank))
    logger.info("wrote the gain analysis to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
