"""Merge token banks across runs and ranks into one table (dedupe, one schema).

Usage:
    merge_token_banks BANK_DIR_OR_FILE [...] --out merged.parquet [--label NAME ...] [--allow-missing-columns]

Reads every ``step*_rank*.{csv,jsonl,parquet}`` (or release-layout ``rollout_*.{csv,jsonl}``, read under
the native column names) of each input directory (or the given files),
adds a ``run`` column (``--label`` per input, default the directory name), drops duplicate rows
of the same (run, pair_id, rollout_id, sample_id, position) — e.g. a step written twice after a
resume — keeping the last file's copy, and writes ``--out`` (.parquet, .csv or .jsonl).
Files whose columns differ are an error naming both column sets, unless
``--allow-missing-columns`` (missing columns become empty). ``--out`` must lie outside every input:
an ``--out`` that is an input, is inside an input directory or contains an input (symlinks and hard
links followed) is refused before anything is read or written.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
KEY = ["run", "pair_id", "rollout_id", "sample_id", "position"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_token_banks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="Token bank directories or files.")
    p.add_argument("--out", "--output", required=True, help="Merged table (.parquet, .csv or .jsonl).")
    p.add_argument("--drop-raw-topk", action="store_true", help="Leave the raw top-K list columns out.")
    p.add_argument("--label", action="append", default=None, help="Run label per input (repeat, same order).")
    p.add_argument("--allow-missing-columns", action="store_true")
    return p


def bank_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such token bank directory or file")
    files = sorted(f for ext in ("csv", "jsonl", "parquet") for f in path.glob(f"step*_rank*.{ext}"))
    files += sorted(f for ext in ("csv", "jsonl") for f in path.glob(f"rollout_*.{ext}"))
    if not files:
        raise ValueError(f"{path}: no step*_rank*.{{csv,jsonl,parquet}} (or rollout_*.{{csv,jsonl}}) token bank files")
    return files


def check_out_path(out: str, inputs: list[str]) -> None:
    """Raise ``ValueError`` when ``out`` is, is inside, or contains one of ``inputs`` (resolved paths)."""
    out_path = Path(out).resolve()
    for item in inputs:
        in_path = Path(item).resolve()
        if out_path == in_path or (out_path.exists() and in_path.exists() and os.path.samefile(out_path, in_path)):
            relation = "is"
        elif out_path.is_relative_to(in_path):
            relation = "is inside"
        elif in_path.is_relative_to(out_path):
            relation = "contains"
        else:
            continue
        raise ValueError(
            f"--out {out} (resolves to {out_path}) {relation} the input {item} (resolves to {in_path}); "
            "writing it would overwrite or mix into an input: pick an --out path outside every input"
        )


def merge(inputs: list[str], labels: list[str] | None, allow_missing: bool) -> Any:
    import pandas as pd

    from ta_opd.token_bank import read_token_bank_file

    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} --label values for {len(inputs)} inputs")
    frames, schema, schema_file = [], None, None
    for i, item in enumerate(inputs):
        path = Path(item)
        label = labels[i] if labels else (path.name if path.is_dir() else path.parent.name)
        for f in bank_files(path):
            frame = pd.DataFrame(read_token_bank_file(f))
            cols = set(frame.columns)
            if schema is None:
                schema, schema_file = cols, f
            elif cols != schema and not allow_missing:
                raise ValueError(
                    f"token bank schemas differ: {f} has extra {sorted(cols - schema)} and lacks "
                    f"{sorted(schema - cols)} compared with {schema_file} (--allow-missing-columns merges anyway)"
                )
            frame.insert(0, "run", label)
            frames.append(frame)
    merged = pd.concat(frames, ignore_index=True, sort=False)
    for col in ("rollout_id", "position", "sample_index", "rank", "sampled_id", "loss_mask", "kept"):
        if col in merged.columns:
            merged[col] = pd.to_numeric(merged[col])
    key = [k for k in KEY if k in merged.columns]
    merged["_key"] = merged[key].astype(object).map(str).agg("|".join, axis=1)  # missing values (None) as text too
    before = len(merged)
    merged = merged.drop_duplicates("_key", keep="last").drop(columns="_key").reset_index(drop=True)
    if before != len(merged):
        logger.info("dropped %d duplicate token rows", before - len(merged))
    return merged


def main(argv: list[str] | None = None) -> int:
    from ta_opd.diagnostics.io import atomic_write_text, write_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        check_out_path(args.out, args.inputs)
        merged = merge(args.inputs, args.label, args.allow_missing_columns)
        if args.drop_raw_topk:
            from ta_opd.token_bank import RAW_TOPK_COLUMNS

            merged = merged.drop(columns=[c for c in RAW_TOPK_COLUMNS if c in merged.columns])
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"merge_token_banks: {exc}") from exc
    if args.out.endswith(".jsonl"):
        atomic_write_text(args.out, merged.to_json(orient="records", lines=True))
    else:
        write_table(args.out, merged)
    logger.info("merged %d token rows into %s", len(merged), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
