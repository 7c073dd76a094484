"""Atomic file I/O for the diagnostic tools: JSONL, tables (parquet/CSV), text.

The atomic writes themselves are ``ta_opd.atomic_io``'s (re-exported here for the tools).
pandas/pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ta_opd.atomic_io import atomic_write_bytes, atomic_write_text

__all__ = [
    "TABLE_FORMATS",
    "atomic_write_bytes",
    "atomic_write_text",
    "read_jsonl",
    "read_table",
    "require_numeric_columns",
    "table_format",
    "write_jsonl",
    "write_table",
]

TABLE_FORMATS = ("parquet", "csv")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    return rows


def table_format(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"{path}: table files must end in one of {['.' + f for f in TABLE_FORMATS]}")
    return suffix


def write_table(path: str | os.PathLike[str], frame: Any) -> Path:
    """Write a pandas DataFrame as parquet or CSV (by suffix), atomically."""
    import io as _io

    fmt = table_format(path)
    buf = _io.BytesIO()
    if fmt == "parquet":
        frame.to_parquet(buf, index=False)
    else:
        frame.to_csv(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def read_table(path: str | os.PathLike[str]) -> Any:
    """Read a parquet or CSV table into a pandas DataFrame."""
    import pandas as pd

    fmt = table_format(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such table")
    try:
        return pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:  # pandas/pyarrow messages do not name the file
        if isinstance(exc, UnicodeDecodeError):
            data = Path(path).read_bytes()
            line = data.count(b"\n", 0, exc.start) + 1 if exc.start < len(data) else "?"
            raise ValueError(f"{path}: not valid UTF-8 near line {line}") from None
        raise ValueError(f"{path}: damaged {fmt} table ({type(exc).__name__}: {exc})") from exc


def require_numeric_columns(frame: Any, path: str | os.PathLike[str], columns: Iterable[str]) -> None:
    """Refuse a table that lacks ``columns`` or holds a non-numeric cell in one (names the file, column, line)."""
    import pandas as pd

    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: table lacks column(s) {missing}")
    for name in columns:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna() & frame[name].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            where = f"line {row + 2}" if table_format(path) == "csv" else f"row {row}"  # CSV: after the header
            raise ValueError(f"{path}: {where}: column {name!r}: {frame[name].iloc[row]!r} is not a number")
