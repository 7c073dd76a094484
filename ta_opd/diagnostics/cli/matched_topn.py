"""Matched top-N gain per selector score at several budgets, with bootstrap CIs (docs/method.md §6.4).

Usage:
    matched_fixed_context_topn --stats OUT/token_stats.parquet --out-dir REPORT \
        [--selectors dlearn_high,divergence,tip,entropy,random,ca_softor] [--budgets 0.01,0.03,0.10] \
        [--k 16] [--bootstrap 1000] [--seed 0]

Every selector's score is computed by ``ta_opd`` on θ0's statistics over the whole bank (one
"rollout step": the same normalisation and score code as training); at each budget ρ the
n = max(1, ceil(ρ·N)) highest-scored tokens (no min-keep top-up, so every selector keeps the same
number: *matched*) are taken and their mean winsorised gain under each θτ reported with a
prompt-cluster bootstrap CI. Selector names may be docs/method.md aliases (teachability, tip, ...).
Writes ``matched_topn.csv``, ``matched_topn.png``, ``matched_topn.md``.
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
DEFAULT_SELECTORS = "dlearn_high,divergence,tip,entropy,random,ca_softor,dincompat_high,compatibility"


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser("matched_fixed_context_topn", __doc__)
    p.add_argument("--selectors", default=DEFAULT_SELECTORS, help="Selector (mask) names or aliases, comma list.")
    p.add_argument("--budgets", default="0.01,0.03,0.10", help="Budget ratios ρ, comma list.")
    return p


def resolve_selectors(spec: str) -> list[str]:
    from ta_opd.aliases import resolve_alias

    names = []
    for raw in spec.split(","):
        if raw.strip():
            name = resolve_alias(raw.strip())
            if name != "full" and name not in names:
                names.append(name)
    return names


def topn_table(bank: Bank, selectors: list[str], budgets: list[float], n_boot: int, seed: int) -> Any:
    import pandas as pd

    from ta_opd.diagnostics.selection import topn_mask

    rows = []
    for name in selectors:
        for ratio in budgets:
            kept = topn_mask(name, bank.scores, bank.batch, bank.raw_features, ratio).cpu().numpy().astype(bool)
            for run in bank.runs:
                res = G.bootstrap_mean_diff(bank.gains[run], kept, None, bank.clusters, n_boot, seed)
                rows.append(
                    {
                        "run": run,
                        "selector": name,
                        "budget": ratio,
                        "n_kept": int(kept.sum()),
                        "mean_gain": res.estimate,
                        "ci_low": res.ci_low,
                        "ci_high": res.ci_high,
                        "all_token_mean_gain": float(bank.gains[run].mean()),
                    }  # fmt: skip
                )
    return pd.DataFrame(rows)


def plot_topn(table: Any, path: Any) -> None:
    plt = pyplot()
    runs = list(dict.fromkeys(table["run"]))
    budgets = sorted(set(table["budget"]))
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = table[table["run"] == run]
        selectors = list(dict.fromkeys(t["selector"]))
        width = 0.8 / len(budgets)
        x = np.arange(len(selectors))
        for j, b in enumerate(budgets):
            tb = t[t["budget"] == b].set_index("selector").loc[selectors]
            err = np.vstack([tb["mean_gain"] - tb["ci_low"], tb["ci_high"] - tb["mean_gain"]])
            ax.bar(x + (j - (len(budgets) - 1) / 2) * width, tb["mean_gain"], width, yerr=err, capsize=3,
                   label=f"top {b:.0%}")  # fmt: skip
        ax.axhline(float(t["all_token_mean_gain"].iloc[0]), color="black", ls="--", lw=1, label="all tokens")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(x, selectors, rotation=20, ha="right")
        ax.set_ylabel("mean gain of top-N")
        ax.set_title(f"Matched top-N fixed-context gain, θτ = {run} (95% prompt-bootstrap CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise SystemExit(f"--budgets must be ratios in (0, 1], got {args.budgets!r}")
    selectors = resolve_selectors(args.selectors)
    out = out_dir(args.out_dir)
    bank = load_bank(args)
    table = topn_table(bank, selectors, budgets, args.bootstrap, args.seed)
    write_table(out / "matched_topn.csv", table)
    plot_topn(table, out / "matched_topn.png")
    body = [
        "# Matched top-N fixed-context gain",
        "",
        f"θ0 = `{bank.reference}`; {len(bank.frame)} tokens; gain = {args.gain}, winsorised {args.winsor}; "
        f"K = {args.k}; "
        f"{args.bootstrap} prompt-cluster bootstrap resamples (seed {args.seed}).",
        "",
        markdown_table(table),
        "",
        "![matched top-N](matched_topn.png)",
        "",
    ]
    atomic_write_text(out / "matched_topn.md", "\n".join(body))
    logger.info("wrote matched top-N tables to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
