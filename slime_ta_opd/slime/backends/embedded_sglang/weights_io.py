"""Reading ``/update_weights_from_disk`` weights: only regular ``*.safetensors`` files inside ``--weights-root``.

The directory is resolved by ``server.resolve_weights_path``; here every *file* is resolved too (a
``model.safetensors`` symlink to a file outside the root is refused) and opened without blocking and without
following a link swapped in after the check (``O_NONBLOCK | O_NOFOLLOW``): a FIFO, socket or device named
``*.safetensors`` is refused by ``fstat`` before a byte is read, so a read can never wait for a writer. The
tensors are read from that very descriptor (``/proc/self/fd``), so what was checked is what is loaded.

The server calls this on a worker thread: the event loop (``/health`` included) never waits on a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import torch


def _inside(real: Path, roots: Sequence[Path]) -> bool:
    return any(os.path.commonpath([str(real), str(r)]) == str(r) for r in roots)


def _open_regular(path: Path, roots: Sequence[Path]) -> int:
    """A read-only descriptor of ``path`` if it resolves to a regular file inside ``roots`` (``ValueError`` if not)."""
    real = path.resolve()
    if not _inside(real, roots):
        shown = ", ".join(repr(str(r)) for r in roots)
        raise ValueError(f"weights file {str(path)!r} resolves to {str(real)!r}, outside --weights-root {shown}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # a socket (ENXIO), a link swapped in after resolve (ELOOP), no permission, ...
        raise ValueError(f"weights file {str(path)!r} cannot be opened as a regular file: {e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"weights file {str(path)!r} is {kind}: only regular *.safetensors files are read")
    return fd


def read_safetensors_dir(directory: Path, roots: Sequence[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of ``directory`` (on CPU), each file checked as above."""
    from safetensors.torch import load, load_file

    roots_real = [Path(r).resolve() for r in roots]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(directory)!r} (only safetensors weights are accepted)")
    fds = [_open_regular(f, roots_real) for f in files]  # every file checked before any is read
    loaded: dict[str, torch.Tensor] = {}
    try:
        for f, fd in zip(files, fds, strict=True):
            proc = Path(f"/proc/self/fd/{fd}")
            try:
                if proc.exists():  # Linux: the checked descriptor itself, memory-mapped
                    loaded.update(load_file(str(proc), device="cpu"))
                else:
                    with os.fdopen(os.dup(fd), "rb") as fh:
                        loaded.update(load(fh.read()))
            except Exception as e:
                raise ValueError(f"weights file {str(f)!r} is not a readable safetensors file: {e}") from e
    finally:
        for fd in fds:
            os.close(fd)
    return loaded
