"""Gain inside each H×D quadrant (Q1..Q4) by C tercile (docs/method.md §4, §6.4).

Usage:
    within_region_analysis --stats OUT/token_stats.parquet --out-dir REPORT [--k 16] [--bins 3] [--bootstrap 1000]

Quadrants from the medians of θ0's H̃ and D̃ (``ta_opd`` features): Q1 hiH/hiD, Q2 hiH/loD,
Q3 loH/hiD, Q4 loH/loD. Inside each, tokens are split into C̃ bins (terciles) and the mean
winsorised gain of each bin is reported with a prompt-cluster bootstrap CI, plus the
top-minus-bottom gap. Writes ``within_region.csv``, ``within_region.png``, ``within_region.md``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ta_opd.diagnostics import gain as G
from ta_opd.diagnostics.cli.common import analysis_parser, load_bank, markdown_table, out_dir, pyplot, save_figure
from ta_opd.diagnostics.io import atomic_write_text, write_table

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser("within_region_analysis", __doc__)
    p.add_argument("--bins", type=int, default=3, help="C bins per quadrant (3 = terciles).")
    return p


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = out_dir(args.out_dir)
    bank = load_bank(args)
    f = bank.features
    quad = G.quadrants(f["H"], f["D"])
    rows = []
    for q, qname in G.QUADRANT_NAMES.items():
        region = quad == q
        idx = np.flatnonzero(region)
        bins = np.full(quad.size, -1)
        if idx.size >= args.bins:
            bins[idx] = G.quantile_bins(f["C"][idx], args.bins)
        for run in bank.runs:
            g = bank.gains[run]
            for b in range(args.bins):
                res = G.bootstrap_mean_diff(g, bins == b, None, bank.clusters, args.bootstrap, args.seed)
                rows.append({"run": run, "quadrant": qname, "c_bin": f"C{b + 1}/{args.bins}",
                             "n": int((bins == b).sum()), "mean_gain": res.estimate, "ci_low": res.ci_low,
                             "ci_high": res.ci_high})  # fmt: skip
            top, bottom = G.gap_groups(f["C"], region, args.bins)
            res = G.bootstrap_mean_diff(g, top, bottom, bank.clusters, args.bootstrap, args.seed)
            rows.append({"run": run, "quadrant": qname, "c_bin": "gap top-bottom", "n": int(region.sum()),
                         "mean_gain": res.estimate, "ci_low": res.ci_low, "ci_high": res.ci_high})  # fmt: skip
    table = pd.DataFrame(rows)
    write_table(out / "within_region.csv", table)
    plt = pyplot()
    runs = list(dict.fromkeys(table["run"]))
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = table[(table["run"] == run) & (table["c_bin"] != "gap top-bottom")]
        x = np.arange(len(G.QUADRANT_NAMES))
        width = 0.8 / args.bins
        for b in range(args.bins):
            tb = t[t["c_bin"] == f"C{b + 1}/{args.bins}"].set_index("quadrant").loc[list(G.QUADRANT_NAMES.values())]
            err = np.nan_to_num(np.vstack([tb["mean_gain"] - tb["ci_low"], tb["ci_high"] - tb["mean_gain"]]))
            ax.bar(x + (b - (args.bins - 1) / 2) * width, tb["mean_gain"], width, yerr=err, capsize=3,
                   label=f"C bin {b + 1} (low→high)")  # fmt: skip
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(x, list(G.QUADRANT_NAMES.values()))
        ax.set_ylabel("mean gain")
        ax.set_title(f"Gain by H×D quadrant and C bin, θτ = {run} (95% CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, out / "within_region.png")
    plt.close(fig)
    body = ["# Within-region analysis: gain by H×D quadrant and C bin", "",
            f"Stats `{args.stats}`; θ0 = `{bank.reference}`; {args.bootstrap} resamples.", "",
            markdown_table(table), "", "![within region](within_region.png)", ""]  # fmt: skip
    atomic_write_text(out / "within_region.md", "\n".join(body))
    logger.info("wrote the within-region analysis to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
