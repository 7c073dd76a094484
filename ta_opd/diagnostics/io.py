"""Atomic file I/O for the diagnostic tools: JSONL, tables (parquet/CSV), text.

pandas/pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TABLE_FORMATS = ("parquet", "csv")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via temp file + fsync + rename (no partial file on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


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
    return pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
