"""Atomic writes: a file or a directory appears complete under its name, or not at all.

The one implementation shared by ``ta_opd`` (token bank, diagnostics I/O) and the stack
(``slime.utils.misc``, checkpoint and asset savers). Files go through a temp file in the same
directory, fsync and ``os.replace``; directories through a temp directory renamed into place.
Temp names start with ``.{name}.`` and hold ``.tmp``, so a caller can sweep the leftovers of a
killed writer with ``parent.glob(f".{name}.tmp*")`` (directories) or ``.{name}.*.tmp`` (files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary handle on a temp file next to ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    On any exception the temp file is removed and the exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via temp file + fsync + rename (no partial file on failure)."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp directory ``.{name}.tmp*`` next to ``path`` to fill; on a clean exit it replaces ``path``.

    An existing ``path`` is removed just before the rename. On any exception the temp directory
    is removed and the exception propagates; ``path`` is untouched.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
