"""Aggregate downstream results over seeds: mean ± sample std, deltas, the Table-3 and PW-OPSD tables.

Usage::

    aggregate_results EVAL_ROOT --out-dir EVAL_ROOT/summary                       # Table-3 layout
    aggregate_results EVAL_ROOT --layout pwopsd --metric avg@12 --out-dir ...      # PW-OPSD layout
    aggregate_results EVAL_ROOT --base base --full-opd pure_opd --benchmarks AIME24 AIME25 MATH-500

Input layout (what ``scripts/eval/run_downstream_*.sh`` and ``tools/eval_math.py`` write)::

    EVAL_ROOT/<method>/[<budget>/]seed<N>/**/results_*.json     lm-eval output (--output_path)
    EVAL_ROOT/<method>/[<budget>/]seed<N>/**/per_problem.jsonl  tools/eval_math.py output (+ its results.csv)

With ``--layout pwopsd`` the two levels are ``<model_tag>/<method>`` instead of ``<method>/<budget>``. A
missing budget level reads as budget ``-`` (the base student, full OPD). Several lm-eval result files under
one seed directory are merged (the newest file wins a task). lm-eval metrics are fractions and are reported
in percent; a task is mapped to its benchmark and metric by ``BENCHMARKS`` (``--metric-for BENCH=KEY`` overrides;
a task not listed keeps its own name and its first accuracy-like metric). ``per_problem.jsonl`` gives
``avg@k``, ``pass@k`` and ``maj@k`` per dataset (k from the ``results.csv`` beside it), recomputed at full
precision from the per-problem values.

Writes to ``--out-dir``: ``scores.csv`` (one row per method × budget × seed × benchmark × metric),
``summary.csv`` (per method × budget × benchmark × metric: seeds, mean, sample std with ddof = 1, delta vs the
base student and vs full OPD; full precision), ``table3.csv`` / ``table3.md`` (methods × benchmarks + Avg,
``mean ± std`` rounded to ``--digits`` in the markdown) or ``pwopsd.csv`` / ``pwopsd.md`` (model × method,
Avg@k per benchmark and their mean). Avg is the mean of the benchmark means; its std is over the per-seed
averages of the seeds that have every benchmark.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ta_opd.atomic_io import atomic_write_text

NO_BUDGET = "-"
_SEED_DIR = re.compile(r"^seed(\d+)$")
# Accuracy-like metrics, in the order a task not in BENCHMARKS is read by.
_FALLBACK_METRICS = ("exact_match", "acc_norm", "acc", "pass@1", "prompt_level_strict_acc", "f1")


@dataclass(frozen=True)
class Benchmark:
    name: str  # the column header (the paper's name)
    tasks: tuple[str, ...]  # lm-eval task names (or tools/eval_math.py dataset names) that report it
    metrics: tuple[str, ...]  # lm-eval metric keys, the first present wins ("exact_match" matches "exact_match,*")


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("AIME24", ("aime24",), ("exact_match",)),
    Benchmark("AIME25", ("aime25",), ("exact_match",)),
    Benchmark(
        "GPQA-D",
        (
            "gpqa_diamond_cot_zeroshot",
            "gpqa_diamond_zeroshot",
            "gpqa_diamond_cot_n_shot",
            "gpqa_diamond_n_shot",
            "gpqa_diamond_generative_n_shot",
        ),
        ("exact_match,flexible-extract", "acc_norm", "exact_match", "acc"),
    ),  # fmt: skip
    Benchmark("HumanEval", ("humaneval", "humaneval_instruct"), ("pass@1",)),
    Benchmark("IFEval", ("ifeval",), ("prompt_level_strict_acc", "inst_level_strict_acc")),
    Benchmark("MATH-500", ("hendrycks_math500", "minerva_math500", "math500", "math_500"), ("exact_match",)),
    Benchmark("HMMT25", ("hmmt25", "hmmt_feb_2025"), ("exact_match",)),
    Benchmark("GSM8K", ("gsm8k_cot", "gsm8k"), ("exact_match,strict-match", "exact_match")),
    Benchmark("MATH-hard", ("leaderboard_math_hard",), ("exact_match",)),
)
_BY_TASK = {task: b for b in BENCHMARKS for task in b.tasks}
_ORDER = {b.name: i for i, b in enumerate(BENCHMARKS)}


@dataclass(frozen=True)
class Score:
    """One number of one evaluated checkpoint: ``key1``/``key2`` are method/budget (or model/method)."""

    key1: str
    key2: str
    seed: int
    benchmark: str
    metric: str
    value: float  # percent
    source: str


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof = 1); the std of fewer than two values is NaN."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


# ----------------------------------------------------------------------------------------------- reading


def pick_metric(result: dict, preferred: Sequence[str]) -> tuple[str, float] | None:
    """The first metric of ``preferred`` in an lm-eval task result: ``name`` matches ``name`` or ``name,<filter>``."""
    numeric = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for want in preferred:
        if want in numeric:
            return want, float(numeric[want])
        for key in sorted(numeric):
            if key.startswith(want + ",") and "_stderr" not in key:
                return key, float(numeric[key])
    return None


def lmeval_scores(results: dict[str, dict], overrides: dict[str, str]) -> list[tuple[str, str, float]]:
    """(benchmark, metric, percent) per task of an lm-eval ``results`` dict."""
    out = []
    for task, result in results.items():
        if not isinstance(result, dict):
            continue
        bench = _BY_TASK.get(task)
        name = bench.name if bench else task
        preferred = (overrides[name],) if name in overrides else bench.metrics if bench else _FALLBACK_METRICS
        picked = pick_metric(result, preferred)
        if picked is None:
            if name in overrides:
                raise ValueError(f"task {task!r} has no metric {overrides[name]!r} (it has {sorted(result)})")
            continue
        out.append((name, picked[0], 100.0 * picked[1]))
    return out


def math_eval_scores(per_problem: Path) -> list[tuple[str, str, float]]:
    """(benchmark, metric, percent) per dataset of a tools/eval_math.py ``per_problem.jsonl``: avg@k, pass@k,
    maj@k as the unweighted mean over problems (k from the ``results.csv`` beside it)."""
    ks: dict[str, int] = {}
    results_csv = per_problem.with_name("results.csv")
    if not results_csv.is_file():
        raise ValueError(f"{per_problem}: no results.csv beside it (it names k)")
    with results_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            ks[row["dataset"]] = int(row["k"])
    by_dataset: dict[str, list[dict]] = {}
    for i, line in enumerate(per_problem.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                by_dataset.setdefault(rec["dataset"], []).append(rec)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{per_problem}:{i}: not a per-problem record ({exc})") from None
    out = []
    for dataset, recs in by_dataset.items():
        if dataset not in ks:
            raise ValueError(f"{results_csv}: no row for dataset {dataset!r} of {per_problem}")
        bench = _BY_TASK.get(dataset.lower())
        name = bench.name if bench else dataset
        for field, metric in (("avg", "avg@"), ("pass", "pass@"), ("maj", "maj@")):
            out.append((name, f"{metric}{ks[dataset]}", 100.0 * math.fsum(float(r[field]) for r in recs) / len(recs)))
    return out


def _keys(root: Path, path: Path) -> tuple[str, str, int]:
    parts = path.relative_to(root).parts
    for i, part in enumerate(parts[:-1]):
        m = _SEED_DIR.match(part)
        if m:
            if i == 1:
                return parts[0], NO_BUDGET, int(m.group(1))
            if i == 2:
                return parts[0], parts[1], int(m.group(1))
            break
    raise ValueError(
        f"{path}: expected EVAL_ROOT/<method>/[<budget>/]seed<N>/... below {root} (see aggregate_results --help)"
    )


def collect(root: str | Path, overrides: dict[str, str] | None = None) -> list[Score]:
    """Every score below ``root`` (the input layout of the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"EVAL_ROOT {str(root)!r} is not a directory")
    overrides = overrides or {}
    merged: dict[tuple[str, str, int], dict[str, tuple[float, dict, Path]]] = {}
    scores: list[Score] = []
    for path in sorted(root.rglob("results_*.json")):
        key = _keys(root, path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not an lm-eval results file ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ValueError(f"{path}: not an lm-eval results file (no 'results' object)")
        mtime = path.stat().st_mtime
        tasks = merged.setdefault(key, {})
        for task, result in data["results"].items():
            if task not in tasks or tasks[task][0] <= mtime:
                tasks[task] = (mtime, result, path)
    for (k1, k2, seed), tasks in merged.items():
        for task, (_, result, path) in tasks.items():
            for bench, metric, value in lmeval_scores({task: result}, overrides):
                scores.append(Score(k1, k2, seed, bench, metric, value, str(path)))
    for path in sorted(root.rglob("per_problem.jsonl")):
        k1, k2, seed = _keys(root, path)
        scores += [Score(k1, k2, seed, b, m, v, str(path)) for b, m, v in math_eval_scores(path)]
    if not scores:
        raise ValueError(f"no results_*.json or per_problem.jsonl with scores below {root}")
    seen: dict[tuple, Score] = {}
    for s in scores:
        ident = (s.key1, s.key2, s.seed, s.benchmark, s.metric)
        if ident in seen:
            raise ValueError(f"two results for {ident}: {seen[ident].source} and {s.source}")
        seen[ident] = s
    return scores


# ----------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Cell:
    key1: str
    key2: str
    benchmark: str
    metric: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    std: float
    delta_vs_base: float
    delta_vs_full_opd: float


def summarize(
    scores: Iterable[Score], base: str = "base", full_opd: str = "pure_opd", layout: str = "table3"
) -> list[Cell]:
    """Mean ± std over seeds per (key1, key2, benchmark, metric), with deltas of the means.

    table3: the base student is ``key1 == base`` and full OPD ``key1 == full_opd`` (each must have one budget).
    pwopsd: ``key2 == base`` within the same model (``key1``); no full-OPD delta.
    """
    groups: dict[tuple[str, str, str, str], list[Score]] = {}
    for s in scores:
        groups.setdefault((s.key1, s.key2, s.benchmark, s.metric), []).append(s)
    means = {key: mean_std([s.value for s in members])[0] for key, members in groups.items()}

    def reference(k1: str, k2: str, bench: str, metric: str, method: str) -> float:
        if layout == "pwopsd":
            if method != base:
                return math.nan
            return means.get((k1, base, bench, metric), math.nan)
        found = {key[1] for key in means if key[0] == method and key[2:] == (bench, metric)}
        if len(found) > 1:
            raise ValueError(f"method {method!r} has several budgets {sorted(found)}; it is a reference: keep one")
        return means[(method, found.pop(), bench, metric)] if found else math.nan

    cells = []
    for (k1, k2, bench, metric), members in groups.items():
        members = sorted(members, key=lambda s: s.seed)
        mean, std = mean_std([s.value for s in members])
        cells.append(
            Cell(
                k1,
                k2,
                bench,
                metric,
                tuple(s.seed for s in members),
                tuple(s.value for s in members),
                mean,
                std,
                mean - reference(k1, k2, bench, metric, base),
                mean - reference(k1, k2, bench, metric, full_opd) if layout == "table3" else math.nan,
            )
        )
    return sorted(cells, key=lambda c: (c.key1, c.key2, _ORDER.get(c.benchmark, len(_ORDER)), c.benchmark, c.metric))


@dataclass(frozen=True)
class Row:
    """One row of a Table-3 / PW-OPSD table: a cell per benchmark and their average."""

    key1: str
    key2: str
    cells: dict[str, Cell]
    avg_mean: float
    avg_std: float
    avg_delta_vs_base: float
    avg_delta_vs_full_opd: float
    n_seeds: int


def _mean_or_nan(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return math.fsum(xs) / len(xs) if xs else math.nan


def table_rows(
    cells: Sequence[Cell],
    benchmarks: Sequence[str] | None = None,
    metric: str | None = None,
    order1: Sequence[str] = (),
) -> tuple[list[str], list[Row]]:
    """(benchmark columns, rows): per (key1, key2) the cell of each benchmark at ``metric`` (default: the first
    metric a benchmark has), and Avg over the columns (NaN when a column is missing)."""
    chosen: dict[tuple[str, str, str], Cell] = {}
    for c in cells:
        if metric is not None and c.metric != metric:
            continue
        chosen.setdefault((c.key1, c.key2, c.benchmark), c)
    if not chosen:
        raise ValueError(f"no scores with metric {metric!r}" if metric else "no scores")
    found = sorted({k[2] for k in chosen}, key=lambda b: (_ORDER.get(b, len(_ORDER)), b))
    columns = list(benchmarks) if benchmarks else found
    missing = [b for b in columns if b not in found]
    if missing:
        raise ValueError(f"benchmarks {missing} have no scores (found: {found})")
    rank = {k: i for i, k in enumerate(order1)}
    pairs = sorted({k[:2] for k in chosen}, key=lambda p: (rank.get(p[0], len(rank)), p[0], p[1]))
    rows = []
    for k1, k2 in pairs:
        row_cells = {b: chosen[(k1, k2, b)] for b in columns if (k1, k2, b) in chosen}
        complete = len(row_cells) == len(columns)
        avg_std = math.nan
        n_seeds = max((len(c.seeds) for c in row_cells.values()), default=0)
        if complete:
            common = set.intersection(*(set(c.seeds) for c in row_cells.values()))
            per_seed = [
                math.fsum(dict(zip(c.seeds, c.values, strict=True))[s] for c in row_cells.values()) / len(columns)
                for s in sorted(common)
            ]
            avg_std = mean_std(per_seed)[1] if per_seed else math.nan

        def avg(field: str, cells_: dict[str, Cell] = row_cells, ok: bool = complete) -> float:
            return _mean_or_nan([getattr(c, field) for c in cells_.values()]) if ok else math.nan

        rows.append(
            Row(k1, k2, row_cells, avg("mean"), avg_std, avg("delta_vs_base"), avg("delta_vs_full_opd"), n_seeds)
        )
    return columns, rows


# ----------------------------------------------------------------------------------------------- writing


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return buf.getvalue()


def scores_csv(scores: Sequence[Score], labels: tuple[str, str]) -> str:
    rows = sorted(scores, key=lambda s: (s.key1, s.key2, s.seed, s.benchmark, s.metric))
    return _csv_text(
        [*labels, "seed", "benchmark", "metric", "value", "source"],
        ([s.key1, s.key2, s.seed, s.benchmark, s.metric, repr(s.value), s.source] for s in rows),
    )


def summary_csv(cells: Sequence[Cell], labels: tuple[str, str]) -> str:
    return _csv_text(
        [*labels, "benchmark", "metric", "n_seeds", "seeds", "mean", "std", "delta_vs_base", "delta_vs_full_opd"],
        (
            [c.key1, c.key2, c.benchmark, c.metric, len(c.seeds), " ".join(map(str, c.seeds)), c.mean, c.std,
             c.delta_vs_base, c.delta_vs_full_opd]
            for c in cells
        ),
    )  # fmt: skip


def table_csv(columns: Sequence[str], rows: Sequence[Row], labels: tuple[str, str], full_opd: bool) -> str:
    """The wide table at full precision: per benchmark mean, std, deltas; then Avg."""
    suffixes = ["mean", "std", "delta_vs_base"] + (["delta_vs_full_opd"] if full_opd else [])
    header = [*labels, "n_seeds"] + [f"{b}_{s}" for b in columns for s in suffixes] + [f"avg_{s}" for s in suffixes]
    body = []
    for r in rows:
        line: list = [r.key1, r.key2, r.n_seeds]
        for b in columns:
            c = r.cells.get(b)
            if c is None:
                line += [math.nan] * len(suffixes)
                continue
            line += [getattr(c, s) for s in suffixes]  # the suffixes are Cell's field names
        line += [r.avg_mean, r.avg_std, r.avg_delta_vs_base] + ([r.avg_delta_vs_full_opd] if full_opd else [])
        body.append(line)
    return _csv_text(header, body)


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta(x: float, digits: int) -> str:
    return "" if math.isnan(x) else f"{x:+.{digits}f}"


def table_markdown(
    columns: Sequence[str],
    rows: Sequence[Row],
    labels: tuple[str, str],
    digits: int,
    title: str,
    full_opd: bool,
    base: str = "base",
) -> str:
    """The table for reading: ``mean ± std`` (seeds' sample std) and, in brackets, the difference to the base
    student's mean; then Avg and its deltas."""
    extra = ["Δ base"] + (["Δ full OPD"] if full_opd else [])
    header = [labels[0], labels[1], "seeds", *columns, "Avg", *extra]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for r in rows:
        is_base = (r.key1 if full_opd else r.key2) == base
        cells = []
        for b in columns:
            c = r.cells.get(b)
            text = _fmt(c.mean, c.std, digits) if c else "n/a"
            if c and not is_base and not math.isnan(c.delta_vs_base):
                text += f" ({c.delta_vs_base:+.{digits}f})"
            cells.append(text)
        deltas = [_delta(r.avg_delta_vs_base, digits)]
        if full_opd:
            deltas.append(_delta(r.avg_delta_vs_full_opd, digits))
        lines.append(
            "| " + " | ".join([r.key1, r.key2, str(r.n_seeds), *cells, _fmt(r.avg_mean, r.avg_std, digits), *deltas])
            + " |"
        )  # fmt: skip
    lines += [
        "",
        f"Percent; mean ± sample std (ddof = 1) over seeds, rounded to {digits} digits (full precision in the CSV). "
        "In brackets: the difference to the base student's mean. Avg: the mean of the benchmark means; "
        "Δ: the Avg's difference to the reference row's.",
    ]
    return "\n".join(lines) + "\n"


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, key = item.partition("=")
        if not sep or not name or not key:
            raise ValueError(f"--metric-for {item!r}: expected BENCHMARK=METRIC_KEY (e.g. GSM8K=exact_match)")
        out[name] = key
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aggregate_results", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("eval_root", help="the directory in the input layout above")
    p.add_argument("--out-dir", default=None, help="where the tables go (default EVAL_ROOT/summary)")
    p.add_argument("--layout", choices=["table3", "pwopsd"], default="table3")
    p.add_argument("--base", default="base", help="the base student's method name (deltas are against it)")
    p.add_argument("--full-opd", default="pure_opd", help="full OPD's method name (table3 layout)")
    p.add_argument("--benchmarks", nargs="+", default=None, help="columns, in order (default: every one found)")
    p.add_argument(
        "--metric", default=None, help="the metric of every column (e.g. avg@12; default: each benchmark's first)"
    )
    p.add_argument(
        "--metric-for", action="append", default=[], metavar="BENCH=KEY", help="the lm-eval metric key of a benchmark"
    )
    p.add_argument("--order", nargs="+", default=None, help="row order of methods (table3) or models (pwopsd)")
    p.add_argument("--digits", type=int, default=2, help="decimals in the markdown table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        if args.digits < 0:
            raise ValueError(f"--digits must be >= 0, got {args.digits}")
        labels = ("method", "budget") if args.layout == "table3" else ("model", "method")
        scores = collect(args.eval_root, _parse_overrides(args.metric_for))
        cells = summarize(scores, args.base, args.full_opd, args.layout)
        order = args.order or ([args.base, args.full_opd] if args.layout == "table3" else [])
        metric = args.metric
        columns, rows = table_rows(cells, args.benchmarks, metric, order)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out_dir or Path(args.eval_root) / "summary")
    out.mkdir(parents=True, exist_ok=True)
    full = args.layout == "table3"
    name = "table3" if full else "pwopsd"
    title = "Downstream results (Table 3 layout)" if full else f"PW-OPSD layout ({metric or 'first metric'})"
    atomic_write_text(out / "scores.csv", scores_csv(scores, labels))
    atomic_write_text(out / "summary.csv", summary_csv(cells, labels))
    atomic_write_text(out / f"{name}.csv", table_csv(columns, rows, labels, full))
    md = table_markdown(columns, rows, labels, args.digits, title, full, args.base)
    atomic_write_text(out / f"{name}.md", md)
    print(md, end="")
    print(f"wrote {out}/{{scores,summary,{name}}}.csv and {name}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
