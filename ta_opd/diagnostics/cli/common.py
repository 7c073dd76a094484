"""Shared loading for the analysis tools: the eval table → gains and training-code features.

pandas/matplotlib are imported inside functions (``ta_opd`` imports torch/numpy at module level).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ta_opd.diagnostics import gain as G


def analysis_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An analysis tool's parser: its module doc as the description (usage kept verbatim) and the common flags."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    return p


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats", "--input", required=True, help="token_stats.{parquet,csv} from eval_fixed_context_bank.")
    p.add_argument("--out-dir", "--output-dir", required=True, help="Where tables, plots and the report go.")
    p.add_argument("--reference", default=None, help="θ0 column prefix (default: the first student in the table).")
    p.add_argument("--runs", default=None, help="Comma list of θτ prefixes to analyse (default: all others).")
    p.add_argument("--gain", default="relative", choices=list(G.GAIN_MODES), help="docs/method.md §6.3 (relative).")
    p.add_argument("--k", type=int, default=16, help="Top-K of the selector features (must be in the table).")
    p.add_argument("--no-exact-c", action="store_true", help="Use the lower-bound C (teacher top-K) for C̃.")
    p.add_argument("--winsor", default="0.01,0.99", help="Winsorising quantiles for ranking/means.")
    p.add_argument("--bootstrap", type=int, default=1000, help="Prompt-cluster bootstrap resamples (1000).")
    p.add_argument("--seed", type=int, default=0, help="Bootstrap / random-selector seed.")


@dataclass
class Bank:
    """One loaded eval table: per-token columns, gains per run, and the reference's selector view."""

    frame: Any
    reference: str
    runs: list[str]
    gains: dict[str, np.ndarray]  # run → winsorised gain [N]
    raw_gains: dict[str, np.ndarray]  # run → gain [N]
    clusters: np.ndarray  # prompt id per token [N]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # H, D, C, D_learn, D_incompat, q3, ...
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: Any = None
    raw_features: Any = None


def student_prefixes(columns: list[str]) -> list[str]:
    """Student names in column order (a student ``X`` has a column ``X.kl_f``)."""
    return [c[: -len(".kl_f")] for c in columns if c.endswith(".kl_f") and not c.startswith("topk.")]


def _decode_lists(values: Any) -> np.ndarray:
    rows = [json.loads(v) if isinstance(v, str) else list(v) for v in values]
    return np.asarray(rows, dtype=np.float64)


def bank_batch(frame: Any, reference: str, k: int, exact: bool) -> Any:
    """A ``TokenBatch`` of the whole bank at ``k`` from the reference's stored top-K lists."""
    from ta_opd.diagnostics.selection import make_token_batch

    needed = ["topk.student_topk_ids", "topk.student_topk_logp", "topk.teacher_topk_ids", "topk.teacher_topk_logp"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"the stats table lacks {missing}: run eval_fixed_context_bank with this reference")
    s_ids = _decode_lists(frame["topk.student_topk_ids"])
    if s_ids.shape[1] < k:
        raise ValueError(f"the stats table holds top-{s_ids.shape[1]} lists; --k {k} needs at least {k}")

    def col(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(np.array(frame[name]), dtype=dtype)

    def lists(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(_decode_lists(frame[name])[:, :k], dtype=dtype)

    sample_index = torch.as_tensor(np.unique(np.asarray(frame["context_id"]), return_inverse=True)[1])
    return make_token_batch(
        lists("topk.student_topk_ids", torch.long),
        lists("topk.student_topk_logp"),
        lists("topk.teacher_topk_ids", torch.long),
        lists("topk.teacher_topk_logp"),
        col("token_id", torch.long),
        col(f"{reference}.student_logp_sampled"),
        col("teacher_logp_sampled"),
        position=col("position", torch.long),
        response_length=col("response_length", torch.long),
        sample_index=sample_index.long(),
        teacher_logp_on_student_ids=lists("topk.teacher_logp_on_student_topk") if exact else None,
    )


def feature_arrays(features: Any) -> dict[str, np.ndarray]:
    """The normalised features of ``ta_opd`` as numpy: H, D, C, DC, D_learn, D_incompat, q3 (docs/method.md §3–4)."""
    names = {"H": "h", "D": "d", "C": "c", "DC": "dc", "D_learn": "d_learn", "D_incompat": "d_incompat", "q3": "is_q3"}
    out = {}
    for key, name in names.items():
        value = getattr(features, name, None)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"ta_opd features have no tensor field {name!r} (for {key})")
        out[key] = value.detach().cpu().double().numpy()
    out["q3"] = out["q3"].astype(bool)
    return out


def load_bank(args: argparse.Namespace, k: int | None = None, need_features: bool = True) -> Bank:
    from ta_opd.diagnostics.io import read_table, require_numeric_columns
    from ta_opd.diagnostics.selection import bank_scores, selection_config

    frame = read_table(args.stats)
    students = student_prefixes(list(frame.columns))
    if len(students) < 2:
        raise SystemExit(f"{args.stats}: need θ0 and at least one θτ (found students {students})")
    reference = args.reference or students[0]
    if reference not in students:
        raise SystemExit(f"--reference {reference!r} is not one of {students}")
    runs = [s for s in students if s != reference] if not args.runs else args.runs.split(",")
    unknown = [r for r in runs if r not in students]
    if unknown:
        raise SystemExit(f"--runs {unknown} not in the table (students: {students})")
    # every column read below as a number (a damaged cell is named here, not as a numpy error later)
    require_numeric_columns(frame, args.stats, [f"{s}.kl_f" for s in (reference, *runs)])
    if "prompt_id" not in frame.columns:
        raise ValueError(f"{args.stats}: table lacks column(s) ['prompt_id']")
    lo, hi = (float(x) for x in args.winsor.split(","))
    raw = {r: G.gain(frame[f"{reference}.kl_f"], frame[f"{r}.kl_f"], args.gain) for r in runs}
    bank = Bank(
        frame=frame,
        reference=reference,
        runs=runs,
        gains={r: G.winsorize(g, lo, hi) for r, g in raw.items()},
        raw_gains=raw,
        clusters=np.asarray(frame["prompt_id"]).astype(str),
    )
    if need_features:
        numeric = ["token_id", "position", "response_length", "teacher_logp_sampled"]
        numeric.append(f"{reference}.student_logp_sampled")
        require_numeric_columns(frame, args.stats, numeric)
        if "context_id" not in frame.columns:
            raise ValueError(f"{args.stats}: table lacks column(s) ['context_id']")
        k = args.k if k is None else k
        exact = not args.no_exact_c
        bank.batch = bank_batch(frame, reference, k, exact)
        cfg = selection_config(k, exact=exact, seed=args.seed)
        _, bank.raw_features, bank.scores = bank_scores(bank.batch, cfg)
        bank.features = feature_arrays(bank.raw_features)
    return bank


def out_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(frame: Any, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table of a DataFrame (no tabulate dependency)."""
    cols = list(frame.columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return format(float(v), floatfmt) if np.isfinite(v) else "nan"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> None:
    import io

    from ta_opd.diagnostics.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
