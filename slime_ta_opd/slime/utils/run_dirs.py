"""A run's directories, settled before any actor or server starts (train.py calls :func:`prepare_run_dirs`).

1. Every output path is checked: created if missing, refused if it or a parent is a regular file, probed with a
   real write (``--save``, ``--output-dir``, ``--metrics-path``, ``--tb-project-name``, ``--opd-token-bank-dir``).
2. ``--load`` is classified by :func:`resolve_load` (the rule below); what cannot be what the user meant is
   refused here rather than silently training from scratch.
3. ``--save`` is locked for the run's life (:class:`SaveDirLock`, ``fcntl.flock`` on ``DIR/slime_save.lock``,
   which holds the holder's pid); a second run on the same directory is refused with that pid. Only then are the
   temp directories a crashed save left behind (``.iter_*.tmp*``) removed: no other run can be writing them.

The ``--load`` rule (docs/training.md):

* a directory holding ``latest_checkpointed_iteration.txt``: resume from the checkpoint it names;
* one checkpoint directory itself (``iter_NNNNNNN``/``release``, or holding a checkpoint's files): load exactly it;
* a directory with ``iter_*`` entries but no pointer file: refused (which one is complete is unknown);
* a regular file: refused;
* a missing or checkpoint-less directory: a fresh start only when it is also ``--save`` (upstream's "resume if
  present" pattern, ``--load DIR --save DIR``); otherwise refused, since nothing there can ever be loaded.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

POINTER = "latest_checkpointed_iteration.txt"  # upstream slime / Megatron-LM's tracker file
LOCK_NAME = "slime_save.lock"
STALE_TEMP_GLOB = ".iter_*.tmp*"  # ta_opd.atomic_io's temp names for iter_* checkpoint directories
_CKPT_NAME = re.compile(r"^(iter_\d+|release)$")
# files that make a directory a checkpoint itself: the torch trainer's and Megatron's torch_dist's
_CKPT_MARKERS = ("manifest.json", "trainer_state.json", ".metadata", "slime_trainer_state.json", "common.pt")


class OutputPathError(ValueError):
    """An output path that cannot be written (names the flag and the path)."""


class SaveDirLockedError(RuntimeError):
    """``--save`` is held by another run."""


# ---------------------------------------------------------------------------------------------- output paths
def check_output_dir(flag: str, path: str | os.PathLike) -> Path:
    """Create ``path`` (a directory) if needed and prove it writable; :class:`OutputPathError` otherwise."""
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "is" if part == p else f"is under {str(part)!r}, which is"
                raise OutputPathError(
                    f"{flag} {str(p)!r} {what} a {'file' if part.is_file() else 'non-directory'}: expected a "
                    "directory (or a path whose parents are directories) that this run can write"
                )
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".slime_write_probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{flag} {str(p)!r} is not writable: {e.strerror or e}") from e
    return p


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` is a file this run appends to: its directory is checked, and an existing ``path`` must be a
    regular file that opens for appending."""
    p = Path(path)
    check_output_dir(f"{flag} (its directory)", p.parent)
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise OutputPathError(f"{flag} {str(p)!r} exists and is not a regular file")
        try:
            with open(p, "a"):
                pass
        except OSError as e:
            raise OutputPathError(f"{flag} {str(p)!r} is not writable: {e.strerror or e}") from e
    return p


def check_output_paths(args: Namespace) -> None:
    """Every path the run will write, checked before anything starts (the first failure is raised)."""
    if args.save is not None:
        check_output_dir("--save", args.save)
    check_output_dir("--output-dir", args.output_dir)
    check_output_file("--metrics-path", args.metrics_path or os.path.join(args.output_dir, "metrics.jsonl"))
    if args.use_tensorboard and args.tb_project_name:
        check_output_dir("--tb-project-name", args.tb_project_name)
    if args.opd_token_bank_dir is not None:
        check_output_dir("--opd-token-bank-dir", args.opd_token_bank_dir)


# ---------------------------------------------------------------------------------------------- --load
@dataclass(frozen=True)
class LoadTarget:
    """What ``--load`` names: ``kind`` "latest" (``path`` holds the pointer file) or "checkpoint" (``path`` is
    one checkpoint directory)."""

    kind: str
    path: Path


def _same_dir(a: str | os.PathLike, b: str | os.PathLike | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_load(load: str | os.PathLike | None, save: str | os.PathLike | None) -> LoadTarget | None:
    """Apply the ``--load`` rule (module docstring); None means start fresh. Checks the layout only: the
    backend verifies the checkpoint's files when it loads them."""
    if load is None:
        return None
    p = Path(load)
    if not p.exists():
        if _same_dir(p, save):
            logger.info("--load %s does not exist yet (same as --save): starting fresh", p)
            return None
        raise FileNotFoundError(f"--load {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(
            f"--load {str(p)!r} is a file: expected a checkpoint directory (a --save directory holding {POINTER}, "
            "or one of its iter_* directories)"
        )
    if (p / POINTER).exists():
        return LoadTarget("latest", p)
    if _CKPT_NAME.match(p.name) or any((p / m).exists() for m in _CKPT_MARKERS):
        return LoadTarget("checkpoint", p)
    iters = sorted(c.name for c in p.glob("iter_*"))
    if iters:
        raise ValueError(
            f"--load {str(p)!r} holds {', '.join(iters[:3])}{' ...' if len(iters) > 3 else ''} but no {POINTER}: "
            "refusing to guess which checkpoint is complete; pass one iter_* directory as --load"
        )
    if _same_dir(p, save):
        logger.info("--load %s holds no checkpoint yet (same as --save): starting fresh", p)
        return None
    raise ValueError(
        f"--load {str(p)!r} holds no checkpoint (no {POINTER}, not an iter_* checkpoint directory): refusing to "
        "train from scratch when asked to load. Point --load at a --save directory or one of its iter_* "
        "directories; use the same directory for --load and --save to resume only when a checkpoint exists; "
        "drop --load to start fresh"
    )


# ---------------------------------------------------------------------------------------------- --save lock
class SaveDirLock:
    """An exclusive ``flock`` on ``DIR/slime_save.lock`` (holding the pid), for one run's life.

    The lock file is left in place on release: removing it would let a third run lock a fresh inode while a
    second one still waits on the old one. The kernel drops the lock when the process dies (kill -9 included)."""

    def __init__(self, save_dir: str | os.PathLike):
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> SaveDirLock:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputPathError(f"--save {str(self.save_dir)!r}: cannot lock {self.path}: {e}") from e
            raise SaveDirLockedError(
                f"--save {str(self.save_dir)!r} is in use by another run (pid {holder}, lock {self.path}): two runs "
                "writing one checkpoint directory corrupt each other; wait for it to end or use another --save"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        sweep_stale_temps(self.save_dir)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SaveDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sweep_stale_temps(save_dir: str | os.PathLike) -> list[Path]:
    """Remove what a crashed save left (``.iter_*.tmp*``). Call only with the lock held."""
    removed = []
    for stale in Path(save_dir).glob(STALE_TEMP_GLOB):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if removed:
        logger.info("removed %d temp dir(s) of an interrupted save in %s", len(removed), save_dir)
    return removed


def prepare_run_dirs(args: Namespace) -> SaveDirLock | None:
    """Output paths checked, ``--load`` classified, ``--save`` locked; returns the lock to release at the end."""
    check_output_paths(args)
    resolve_load(args.load, args.save)
    return SaveDirLock(args.save).acquire() if args.save is not None else None
