"""Optional compiled kernels, loaded with ctypes: the per-row statistics and exact order statistics
(``stats_kernel.c``), and the packing of SGLang's top-K lists into arrays (``pack_kernel.c``).

``ta_opd.stats`` and ``ta_opd.order_stats`` are numpy; with a C compiler on the machine their hot loops
run here instead, with bit-identical results (the statistics: the same IEEE operations in the same order,
exp/log stay numpy's; order statistics are elements of the input), several times faster.

Nothing is needed at install time: the first use compiles the kernel with ``$CC`` (else ``cc``) into
``$TA_OPD_NATIVE_CACHE`` (default ``~/.cache/slime-ta-opd/native``), under a name keyed by the source, the
compiler and the CPU, written to a temporary file and renamed into place (concurrent processes never load
a half-written library). No compiler, or a failed build: a warning, and numpy.

``pack_kernel.c`` reads Python lists through the C API, so it also needs the interpreter's headers
(``Python.h``; e.g. the ``python3-dev`` package); without them ``pack_topk`` stays in Python.

``TA_OPD_NATIVE``: ``auto`` (default), ``0``/``off`` (numpy only), ``1``/``require`` (raise if a kernel
cannot be built).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("stats_kernel.c")
PACK_SOURCE = Path(__file__).with_name("pack_kernel.c")
# -ffp-contract=off: no fused multiply-add (numpy rounds a*b before +c); no -ffast-math: sums keep their order
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-fPIC", "-shared")
PACK_CFLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared")
MODES = ("auto", "0", "off", "1", "require")


def native_mode() -> str:
    mode = os.environ.get("TA_OPD_NATIVE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TA_OPD_NATIVE={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _cache_dir() -> Path:
    root = os.environ.get("TA_OPD_NATIVE_CACHE") or os.path.join(Path.home(), ".cache", "slime-ta-opd", "native")
    return Path(root)


def _cpu_signature() -> str:
    """The CPU model and feature flags: a library built with -march=native is only reused on the same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str, out: Path, source: Path = SOURCE, flags: tuple[str, ...] = CFLAGS) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, f64, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.ta_prep_f64.argtypes = [i64, i64, i64, vp, vp, i64, vp, vp]
    lib.ta_prep_f32.argtypes = [i64, i64, i64, vp, vp, i64, vp, vp]
    lib.ta_norm.argtypes = [i64, i64, i64, vp, vp, vp, vp]
    lib.ta_row_stats.argtypes = [i64, i64, i64, i64, f64, f64, f64] + [vp] * 15 + [i64]
    lib.ta_kth.argtypes = [i64, vp, i64, vp, vp]
    for fn in (lib.ta_prep_f64, lib.ta_prep_f32, lib.ta_norm, lib.ta_row_stats):
        fn.restype = None
    lib.ta_kth.restype = ctypes.c_int
    return lib


def _compiled(what: str, stem: str, source: Path, flags: tuple[str, ...], *extra: str, check=None) -> Path:
    """The cached shared object of ``source``, built first if missing. Its name is keyed by the source, the
    compiler, the flags, ``extra`` and the CPU; ``check`` (optional) runs once a compiler is found."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'} not on PATH)")
    if check is not None:
        check()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), cc, version, " ".join(flags), *extra, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    lib_path = _cache_dir() / f"{stem}_{key}.so"
    if not lib_path.is_file():
        logger.info("building the ta_opd %s: %s", what, lib_path)
        _build(cc, lib_path, source, flags)
    return lib_path


def _kernel(what: str, fallback: str, open_lib):
    """``open_lib()`` unless ``TA_OPD_NATIVE`` is off. On any failure the caller's fallback does the same work,
    only slower: None and a warning, or an error under ``TA_OPD_NATIVE=require``."""
    mode = native_mode()
    if mode in ("0", "off"):
        return None
    try:
        return open_lib()
    except Exception as e:
        if mode in ("1", "require"):
            raise RuntimeError(f"TA_OPD_NATIVE={mode}: the {what} is unavailable: {e}") from e
        logger.warning("ta_opd %s unavailable, %s: %s", what, fallback, e)
        return None


def _open_stats() -> ctypes.CDLL:
    return _declare(ctypes.CDLL(str(_compiled("statistics kernel", "ta_opd_stats", SOURCE, CFLAGS))))


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    return _kernel("statistics kernel", "using numpy (about 5x slower)", _open_stats)


def stats_kernel() -> ctypes.CDLL | None:
    """The loaded kernel, or None (numpy path). Built on first use; the result is cached per process."""
    return _load()


def _open_pack() -> ctypes.PyDLL:
    include = sysconfig.get_paths()["include"]

    def check() -> None:
        if not os.path.isfile(os.path.join(include, "Python.h")):
            raise RuntimeError(f"no Python.h in {include} (install the interpreter's development headers)")

    flags = (*PACK_CFLAGS, f"-I{include}")
    lib_path = _compiled("top-K packing kernel", "ta_opd_pack", PACK_SOURCE, flags, sys.version, check=check)
    lib = ctypes.PyDLL(str(lib_path))  # PyDLL: the GIL stays held, the kernel reads Python objects
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.ta_pack_topk.argtypes = [ctypes.py_object, i64, i64, vp, vp, vp]
    lib.ta_pack_topk.restype = i64
    return lib


@functools.lru_cache(maxsize=1)
def _load_pack() -> ctypes.PyDLL | None:
    return _kernel("top-K packing kernel", "packing in Python (slower)", _open_pack)


def pack_kernel() -> ctypes.PyDLL | None:
    """The loaded top-K packing kernel, or None (Python path). Built on first use, cached per process."""
    return _load_pack()
