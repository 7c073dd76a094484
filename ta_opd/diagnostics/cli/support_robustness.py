"""Support-definition robustness of the Q3 high-C minus low-C gap (docs/method.md §6.5).

Usage:
    support_definition_robustness --stats OUT/token_stats.parquet --out-dir REPORT \
        [--ks 8,16,32] [--bins 3] [--bootstrap 1000] [--seed 0]
    support_definition_robustness --dataset 8b=A/token_stats.parquet --dataset 14b=B/token_stats.parquet \
        [--out-dir support_robustness] [--n-boot 1000]        # several tables in one report (release form)

For each K and each definition of C — teacher mass on the student's top-K (exact), overlap
|S∩T|/K, Jaccard, shared teacher top-K mass, shared student top-K mass, Bhattacharyya BC on the
union — C is percentile-rank normalised, the Q3 region (low H̃, high D̃, from ``ta_opd`` features
at that K) is split into C bins, and the top-minus-bottom gain gap is reported with a
prompt-cluster bootstrap CI. Writes ``support_robustness.csv``, ``support_robustness.png``,
``support_robustness.md``. With ``--dataset NAME=PATH`` (repeatable; instead of ``--stats``) every table is
analysed and its rows carry ``dataset`` = NAME (runs shown as ``NAME/run``); ``--out-dir`` then defaults to
``support_robustness``. ``--n-boot`` is the release's name of ``--bootstrap``.
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
    for action in p._actions:  # --stats / --out-dir become optional: --dataset replaces them
        if action.dest in ("stats", "out_dir"):
            action.required = False
        if action.dest == "bootstrap":
            action.option_strings.append("--n-boot")
            p._option_string_actions["--n-boot"] = action
    p.add_argument("--dataset", action="append", default=None, metavar="NAME=PATH",
                   help="A stats table to analyse, named (repeat; replaces --stats).")  # fmt: skip
    p.add_argument("--ks", default="8,16,32", help="K values (each must be in the stats table).")
    p.add_argument("--bins", type=int, default=3, help="C bins inside Q3 (3 = terciles).")
    return p


def parse_datasets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """``[(name, stats path)]``: the ``--dataset`` entries, or ``[(None, --stats)]``."""
    if args.dataset and args.stats:
        parser.error("give --stats or --dataset NAME=PATH, not both")
    if not args.dataset:
        if not args.stats:
            parser.error("one of --stats or --dataset NAME=PATH is required")
        if not args.out_dir:
            parser.error("--out-dir is required with --stats")
        return [(None, args.stats)]
    out: list[tuple[str | None, str]] = []
    for spec in args.dataset:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--dataset expects NAME=PATH, got {spec!r}")
        if name in {n for n, _ in out}:
            parser.error(f"--dataset name {name!r} is given twice")
        out.append((name, path))
    return out


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    datasets = parse_datasets(parser, args)
    out = out_dir(args.out_dir or "support_robustness")
    rows = []
    for name, stats in datasets:
        args.stats = stats
        for k in [int(x) for x in args.ks.split(",") if x.strip()]:
            bank = load_bank(args, k=k)
            for label, stem in DEFINITIONS.items():
                column = f"{bank.reference}.{stem}_k{k}"
                if column not in bank.frame.columns:
                    raise SystemExit(f"{stats} has no column {column!r}; evaluate with --support-ks including {k}")
                c = G.percentile_rank(np.asarray(bank.frame[column], float))
                top, bottom = G.gap_groups(c, bank.features["q3"], args.bins)
                for run in bank.runs:
                    res = G.bootstrap_mean_diff(bank.gains[run], top, bottom, bank.clusters, args.bootstrap, args.seed)
                    shown = run if name is None else f"{name}/{run}"
                    row = {} if name is None else {"dataset": name}
                    row.update(run=shown, k=k, definition=label, n_q3=int(bank.features["q3"].sum()))
                    rows.append({**row, **res.as_dict()})
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
    sources = ", ".join(f"`{path}`" for _, path in datasets)
    body = ["# Support-definition robustness (Q3 high-C minus low-C gap)", "",
            f"Stats {sources}; bins = {args.bins}; percentile-rank C; {args.bootstrap} resamples.", "",
            markdown_table(table[["run", "k", "definition", "n_q3", "estimate", "ci_low", "ci_high"]]), "",
            "![support robustness](support_robustness.png)", ""]  # fmt: skip
    atomic_write_text(out / "support_robustness.md", "\n".join(body))
    logger.info("wrote support robustness to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
