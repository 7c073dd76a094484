"""Support-definition robustness of the Q3 high-C minus low-C gap (METHOD.md §6.5).

Usage:
    support_definition_robustness --stats OUT/token_stats.parquet --out-dir REPORT \
        [--ks 8,16,32] [--bins 3] [--bootstrap 1000] [--seed 0]

For each K and each definition of C — teacher mass on the student's top-K (exact), overlap
|S∩T|/K, Jaccard, shared teacher top-K mass, shared student top-K mass, Bhattacharyya BC on the
union — C is percentile-rank normalised, the Q3 region (low H̃, high D̃, from ``ta_opd`` features
at that K) is split into C bins, and the top-minus-bottom gain gap is reported with a
prompt-cluster bootstrap CI. Writes ``support_robustness.csv``, ``support_robustness.png``,
``support_robustness.md``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ta_opd.diagnostics import gain as G
from ta_opd.diagnostics.cli.common import analysis_parser, load_bank, markdown_table, out_dir, pyplot, save_figure
from ta_opd.diagnostics.io import atomic_write_text, write_table

logger = logging.getLogger(__name__)
# definition label → stats column stem (suffix _k{K}); all from eval_fixed_context_bank.
DEFINITIONS = {
    "teacher_mass_on_student_topk": "cmass_exact",
    "overlap": "overlap",
    "jaccard": "jaccard",
    "shared_teacher_mass": "shared_teacher_mass",
    "shared_student_mass": "shared_student_mass",
    "bc_union": "bc",
}


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser("support_definition_robustness", __doc__)
    p.add_argument("--ks", default="8,16,32", help="K values (each must be in the stats table).")
    p.add_argument("--bins", type=int, default=3, help="C bins inside Q3 (3 = terciles).")
    return p


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = out_dir(args.out_dir)
    rows = []
    for k in [int(x) for x in args.ks.split(",") if x.strip()]:
        bank = load_bank(args, k=k)
        for label, stem in DEFINITIONS.items():
            column = f"{bank.reference}.{stem}_k{k}"
            if column not in bank.frame.columns:
                raise SystemExit(f"{args.stats} has no column {column!r}; evaluate with --support-ks including {k}")
            c = G.percentile_rank(np.asarray(bank.frame[column], float))
            top, bottom = G.gap_groups(c, bank.features["q3"], args.bins)
            for run in bank.runs:
                res = G.bootstrap_mean_diff(bank.gains[run], top, bottom, bank.clusters, args.bootstrap, args.seed)
                rows.append({"run": run, "k": k, "definition": label, "n_q3": int(bank.features["q3"].sum()),
                             **res.as_dict()})  # fmt: skip
    table = pd.DataFrame(rows)
    write_table(out / "support_robustness.csv", table)
    plt = pyplot()
    runs = list(dict.fromkeys(table["run"]))
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.8 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = table[table["run"] == run]
        ks = sorted(set(t["k"]))
        x = np.arange(len(DEFINITIONS))
        width = 0.8 / len(ks)
        for j, k in enumerate(ks):
            tk = t[t["k"] == k].set_index("definition").loc[list(DEFINITIONS)]
            err = np.vstack([tk["estimate"] - tk["ci_low"], tk["ci_high"] - tk["estimate"]])
            ax.bar(x + (j - (len(ks) - 1) / 2) * width, tk["estimate"], width, yerr=err, capsize=3, label=f"K={k}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(x, list(DEFINITIONS), rotation=20, ha="right")
        ax.set_ylabel("Q3 gain gap (high − low C)")
        ax.set_title(f"Support-definition robustness, θτ = {run} (95% CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, out / "support_robustness.png")
    plt.close(fig)
    body = ["# Support-definition robustness (Q3 high-C minus low-C gap)", "",
            f"Stats `{args.stats}`; bins = {args.bins}; percentile-rank C; {args.bootstrap} resamples.", "",
            markdown_table(table[["run", "k", "definition", "n_q3", "estimate", "ci_low", "ci_high"]]), "",
            "![support robustness](support_robustness.png)", ""]  # fmt: skip
    atomic_write_text(out / "support_robustness.md", "\n".join(body))
    logger.info("wrote support robustness to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
