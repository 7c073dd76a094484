"""Fixed-context evaluation of a method suite or a budget sweep: the budget intervention of docs/method.md §6.

Usage:
    suite_fixed_context_eval run --suite-dir SUITE --teacher TEACHER_HF --student STUDENT_HF --prompts P.jsonl \\
        [--contexts CONTEXTS.jsonl] [--baseline-metrics THETA0/token_stats.parquet] [--num-contexts 48] \\
        [--response-tokens 32] [--k 16] [--device cpu] [--bootstrap 1000] [--seed 0]
    suite_fixed_context_eval table --suite-dir SUITE [--suite-dir SUITE2 ...] --out-dir OUT [--curve]

``run`` (what scripts/train/run_method_suite.sh calls after its runs unless SKIP_EVAL=1):

1. the shared frozen contexts: ``--contexts`` (COMMON_CONTEXT: reused, e.g. by every suite of a sweep), else
   ``SUITE/fixed_context/contexts.jsonl``, sampled once from θ0 (export_fixed_context_bank);
2. θ0 scored once against the teacher on them: ``--baseline-metrics`` (BASELINE_METRICS: reused), else
   ``SUITE/fixed_context/theta0/token_stats.parquet``;
3. for every finished entry of ``SUITE/method_mapping.csv``: its token bank merged
   (``RUN/fixed_context/token_bank_merged.parquet``), its final student scored on the same contexts with θ0's
   columns reused (``RUN/fixed_context/eval/token_stats.parquet``), and the gain analysis
   (``RUN/fixed_context/gain/``); an entry whose outputs exist is not evaluated again;
4. ``table`` for the suite (with the curve when its runs span more than one budget).

``table`` writes, per run (selector × budget × seed), ``budget_table.csv``: ``keep`` (the kept share of the valid
tokens over the run's token bank), ``G`` (mean fixed-context gain of the trained student over all tokens,
winsorised, with a prompt-cluster bootstrap 95 % CI), ``G_per_keep`` = G / keep, ``q3_fraction`` (share of the
kept tokens in Q3 = low H̃, high D̃), and the Q3 high-C minus low-C gain gap with its CI (the release's
``bootstrap_mean_diff``); then ``budget_table.md``, the paper's Table 2 form: one row per selector (and seed),
for every budget Keep, G [CI], G/K and Q3 fraction. ``--curve`` (a sweep) adds ``gain_vs_ratio.csv`` and
``gain_vs_ratio.png``: G against the budget ratio per selector, with the CI band.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "complete.json"
TAU = "tau"  # the trained student's column prefix in a run's eval table (θ0 keeps the baseline's name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suite_fixed_context_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Contexts, θ0, every finished entry, then the table.")
    run.add_argument("--suite-dir", required=True)
    run.add_argument("--teacher", required=True, help="Teacher HF checkpoint.")
    run.add_argument("--student", required=True, help="θ0: the student HF checkpoint every entry started from.")
    run.add_argument("--prompts", default=None, help="Prompt JSONL to sample the contexts from.")
    run.add_argument("--contexts", default=None, help="Shared context bank (COMMON_CONTEXT); built when absent.")
    run.add_argument("--baseline-metrics", default=None, help="θ0's token_stats on --contexts (BASELINE_METRICS).")
    run.add_argument("--num-contexts", type=int, default=48)
    run.add_argument("--response-tokens", type=int, default=32)
    run.add_argument("--k", type=int, default=16)
    run.add_argument("--device", default="cpu")
    run.add_argument("--student-device", default=None)
    run.add_argument("--teacher-device", default=None)
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--contexts-per-chunk", type=int, default=16)
    run.add_argument("--chunk-tokens", type=int, default=1024)
    run.add_argument("--bootstrap", type=int, default=1000)
    run.add_argument("--seed", type=int, default=0, help="Context sampling and bootstrap seed.")
    run.add_argument("--allow-tokenizer-mismatch", action="store_true")
    table = sub.add_parser("table", help="The per-selector × budget table (and the curve) of finished evaluations.")
    table.add_argument("--suite-dir", action="append", required=True, help="A suite directory (repeat for a sweep).")
    table.add_argument("--out-dir", required=True)
    table.add_argument("--curve", action="store_true", help="Also the gain-vs-ratio curve (CSV + PNG).")
    table.add_argument("--k", type=int, default=16)
    table.add_argument("--bootstrap", type=int, default=1000)
    table.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------- entries
def read_mapping(suite: Path) -> list[dict[str, str]]:
    """The rows of ``SUITE/method_mapping.csv`` (needs ``mask``, ``ratio``, ``run_dir``)."""
    path = suite / "method_mapping.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (is {suite} a method-suite directory?)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"mask", "ratio", "run_dir"}
    if rows and not need <= set(rows[0]):
        raise SystemExit(f"{path}: lacks column(s) {sorted(need - set(rows[0]))}")
    return rows


def final_weights(run_dir: Path) -> Path | None:
    """The HF weights of a run's newest checkpoint (``checkpoints/iter_NNNNNNN/model``), None without one."""
    pointer = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    if not pointer.is_file():
        return None
    model = run_dir / "checkpoints" / f"iter_{int(pointer.read_text().strip()):07d}" / "model"
    return model if model.is_dir() else None


def bank_keep(bank_dir: Path) -> tuple[float, float, int]:
    """(keep ratio over valid tokens, Q3 share of the kept tokens, valid tokens) of a run's token bank."""
    from ta_opd.diagnostics.cli.merge_banks import merge

    frame = merge([str(bank_dir)], ["run"], True)
    valid = np.asarray(frame["loss_mask"], float) > 0
    kept = valid & (np.asarray(frame["kept"], float) > 0)
    if "feat_is_q3" in frame.columns:
        q3 = np.asarray(frame["feat_is_q3"], float) > 0
    elif "quadrant" in frame.columns:
        q3 = np.asarray(frame["quadrant"].astype(str).str.startswith("Q3"))
    else:
        q3 = np.full(len(frame), np.nan)
    keep = float(kept.sum() / valid.sum()) if valid.any() else math.nan
    q3_frac = float(np.nanmean(q3[kept])) if kept.any() and not np.isnan(q3[kept]).all() else math.nan
    return keep, q3_frac, int(valid.sum())


# ---------------------------------------------------------------------------------------------- run
def run_suite(args: argparse.Namespace) -> int:
    from ta_opd.diagnostics.cli import analyze_gain, eval_bank, export_bank, merge_banks

    suite = Path(args.suite_dir)
    rows = read_mapping(suite)
    fc = suite / "fixed_context"
    fc.mkdir(parents=True, exist_ok=True)
    devices = ["--device", args.device, "--dtype", args.dtype]
    for flag in ("student_device", "teacher_device"):
        if getattr(args, flag):
            devices += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.allow_tokenizer_mismatch:
        devices.append("--allow-tokenizer-mismatch")
    chunking = ["--contexts-per-chunk", str(args.contexts_per_chunk), "--chunk-tokens", str(args.chunk_tokens)]

    contexts = Path(args.contexts) if args.contexts else fc / "contexts.jsonl"
    if args.contexts and not contexts.is_file():
        raise SystemExit(f"COMMON_CONTEXT / --contexts {contexts}: no such file")
    if not contexts.is_file():
        if not args.prompts:
            raise SystemExit("no shared contexts yet: give --prompts (to sample them from θ0) or --contexts")
        logger.info("sampling %d shared contexts from θ0 into %s", args.num_contexts, contexts)
        export_bank.main(["--student", args.student, "--prompts", args.prompts, "--out", str(contexts),
                          "--num-contexts", str(args.num_contexts), "--response-tokens", str(args.response_tokens),
                          "--seed", str(args.seed), "--shuffle-prompts", "--dtype", args.dtype,
                          "--device", args.student_device or args.device])  # fmt: skip
    baseline = Path(args.baseline_metrics) if args.baseline_metrics else fc / "theta0" / "token_stats.parquet"
    if args.baseline_metrics and not baseline.is_file():
        raise SystemExit(f"BASELINE_METRICS / --baseline-metrics {baseline}: no such file")
    if not baseline.is_file():
        logger.info("scoring θ0 once on the shared contexts into %s", baseline)
        eval_bank.main(["--contexts", str(contexts), "--teacher", args.teacher, "--student", f"theta0={args.student}",
                        "--out-dir", str(baseline.parent), "--k", str(args.k), "--support-ks", str(args.k),
                        *chunking, *devices])  # fmt: skip
    (fc / "sources.txt").write_text(f"contexts={contexts.resolve()}\nbaseline_metrics={baseline.resolve()}\n")

    for row in rows:
        run_dir = suite / row["run_dir"]
        name = run_dir.name
        weights = final_weights(run_dir)
        if not (run_dir / COMPLETE_MARKER).is_file() or weights is None:
            logger.warning("%s: not finished or no final checkpoint (SAVE_CHECKPOINT=1); not evaluated", name)
            continue
        out = run_dir / "fixed_context"
        bank = run_dir / "token_bank"
        merged = out / "token_bank_merged.parquet"
        if bank.is_dir() and not merged.is_file():
            merge_banks.main([str(bank), "--out", str(merged), "--label", name, "--drop-raw-topk",
                              "--allow-missing-columns"])  # fmt: skip
        stats = out / "eval" / "token_stats.parquet"
        if not stats.is_file():
            logger.info("%s: scoring the trained student on the shared contexts", name)
            eval_bank.main(["--contexts", str(contexts), "--teacher", args.teacher, "--baseline-metrics",
                            str(baseline), "--student", f"{TAU}={weights}", "--out-dir", str(out / "eval"),
                            "--k", str(args.k), "--support-ks", str(args.k), *chunking, *devices])  # fmt: skip
        if not (out / "gain" / "gain_summary.csv").is_file():
            analyze_gain.main(["--stats", str(stats), "--out-dir", str(out / "gain"), "--k", str(args.k),
                               "--bootstrap", str(args.bootstrap), "--seed", str(args.seed)])  # fmt: skip
    return write_tables([suite], fc, curve=None, k=args.k, n_boot=args.bootstrap, seed=args.seed)


# ---------------------------------------------------------------------------------------------- table
def run_row(suite: Path, row: dict[str, str], k: int, n_boot: int, seed: int) -> dict[str, Any] | None:
    """One run's Table-2 quantities, None when it has no evaluation yet."""
    from ta_opd.diagnostics import gain as G
    from ta_opd.diagnostics.cli.common import load_bank

    run_dir = suite / row["run_dir"]
    stats = run_dir / "fixed_context" / "eval" / "token_stats.parquet"
    if not stats.is_file():
        return None
    ns = argparse.Namespace(stats=str(stats), reference=None, runs=TAU, gain="relative", k=k, no_exact_c=False,
                            winsor="0.01,0.99", bootstrap=n_boot, seed=seed)  # fmt: skip
    bank = load_bank(ns)
    g = bank.gains[TAU]
    mean = G.bootstrap_mean_diff(g, np.ones(g.size, bool), None, bank.clusters, n_boot, seed)
    top, bottom = G.gap_groups(bank.features["C"], bank.features["q3"], 3)
    gap = G.bootstrap_mean_diff(g, top, bottom, bank.clusters, n_boot, seed)
    bank_dir = run_dir / "token_bank"
    keep, q3_frac, n_valid = bank_keep(bank_dir) if bank_dir.is_dir() else (math.nan, math.nan, 0)
    method = row.get("method") or row.get("alias") or row["mask"]
    return {
        "method": method,
        "mask": row["mask"],
        "ratio": float(row["ratio"]),
        "seed": row.get("seed", ""),
        "idx": row.get("idx", ""),
        "keep": keep,
        "G": mean.estimate,
        "G_ci_low": mean.ci_low,
        "G_ci_high": mean.ci_high,
        "G_per_keep": mean.estimate / keep if keep and math.isfinite(keep) else math.nan,
        "q3_fraction": q3_frac,
        "q3_gap": gap.estimate,
        "q3_gap_ci_low": gap.ci_low,
        "q3_gap_ci_high": gap.ci_high,
        "mean_kl_f_0": float(np.mean(bank.frame[f"{bank.reference}.kl_f"])),
        "mean_kl_f_tau": float(np.mean(bank.frame[f"{TAU}.kl_f"])),
        "n_eval_tokens": int(g.size),
        "n_bank_valid_tokens": n_valid,
        "run_dir": str(run_dir),
    }


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"


def table2_markdown(table: Any) -> str:
    """The paper's Table 2 form: a row per selector (and seed); per budget Keep, G [95 % CI], G/K, Q3 fraction."""
    ratios = sorted({float(r) for r in table["ratio"]})
    header = ["selector", "seed"]
    for r in ratios:
        pct = f"{100 * r:g} %"
        header += [f"Keep @ {pct}", f"G @ {pct} [95 % CI]", f"G/K @ {pct}", f"Q3 frac @ {pct}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, seed), part in table.groupby(["method", "seed"], sort=False):
        cells = [str(method), str(seed)]
        for r in ratios:
            hit = part[np.isclose(part["ratio"].astype(float), r)]
            if hit.empty:
                cells += ["", "", "", ""]
                continue
            x = hit.iloc[0]
            g = f"{_fmt(x['G'])} [{_fmt(x['G_ci_low'])}, {_fmt(x['G_ci_high'])}]"
            cells += [_fmt(x["keep"], 3), g, _fmt(x["G_per_keep"]), _fmt(x["q3_fraction"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(curve: Any, path: Path) -> None:
    from ta_opd.diagnostics.cli.common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, part in curve.groupby("method", sort=False):
        part = part.sort_values("ratio")
        line = ax.plot(part["ratio"], part["G"], marker="o", label=str(method))[0]
        ax.fill_between(part["ratio"], part["G_ci_low"], part["G_ci_high"], alpha=0.15, color=line.get_color())
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("budget ratio ρ")
    ax.set_ylabel("fixed-context gain G (95 % CI)")
    ax.set_title("Gain of the trained student vs the token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_tables(suites: list[Path], out: Path, curve: bool | None, k: int, n_boot: int, seed: int) -> int:
    """Write the table (and the curve: ``curve`` None → when the runs span more than one budget) under ``out``."""
    import pandas as pd

    from ta_opd.diagnostics.io import atomic_write_text, write_table

    rows = [r for s in suites for row in read_mapping(s) if (r := run_row(s, row, k, n_boot, seed)) is not None]
    if not rows:
        logger.warning("no evaluated run under %s: no table written", ", ".join(map(str, suites)))
        return 1
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows).sort_values(["method", "ratio", "seed"], kind="stable").reset_index(drop=True)
    write_table(out / "budget_table.csv", table)
    body = [
        "# Budget intervention on shared frozen contexts",
        "",
        "G: mean fixed-context gain (KL(teacher‖θ0) − KL(teacher‖θτ)) / KL(teacher‖θ0) per token, winsorised at "
        f"1 %/99 %, with a prompt-cluster bootstrap 95 % CI ({n_boot} resamples); Keep: kept share of the valid "
        "tokens in the run's token bank; G/K = G / Keep; Q3 frac: share of the kept tokens in Q3 (low H̃, high D̃).",
        "",
        table2_markdown(table),
        "",
    ]
    points = table[table["mask"] != "full"]
    if curve is None:
        curve = points["ratio"].nunique() > 1
    if curve:
        write_table(out / "gain_vs_ratio.csv", points[["method", "mask", "ratio", "seed", "keep", "G", "G_ci_low",
                                                        "G_ci_high", "G_per_keep"]])  # fmt: skip
        plot_curve(points, out / "gain_vs_ratio.png")
        body += ["![gain vs ratio](gain_vs_ratio.png)", ""]
    atomic_write_text(out / "budget_table.md", "\n".join(body))
    logger.info("wrote %s", out / "budget_table.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_suite(args)
    suites = [Path(s) for s in args.suite_dir]
    return write_tables(suites, Path(args.out_dir), args.curve, args.k, args.bootstrap, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
