"""Small helpers shared by the stack: plug-in loading by dotted path, atomic writes (``ta_opd.atomic_io``)."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from ta_opd.atomic_io import atomic_write_text  # re-exported: the stack's one atomic write


@cache
def load_function(path: str) -> Callable[..., Any]:
    """Load ``pkg.module.attr`` (a function or a class) named by a flag or config string.

    Raises ValueError for a malformed path, ImportError naming the module when it cannot be
    imported, AttributeError naming the attribute when the module lacks it, and TypeError
    when the attribute is not callable.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"plug-in path must be a non-empty dotted string 'pkg.module.fn', got {path!r}")
    path = path.strip()
    # upstream also accepts "pkg/module.py:fn"-free dotted form only; keep one syntax.
    module_path, _, attr = path.rpartition(".")
    if not module_path or not attr:
        raise ValueError(f"plug-in path {path!r} must look like 'pkg.module.fn' (module path, a dot, a name)")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        raise ImportError(f"cannot load plug-in {path!r}: module {module_path!r} not found ({e})") from e
    try:
        fn = getattr(module, attr)
    except AttributeError as e:
        raise AttributeError(f"cannot load plug-in {path!r}: module {module_path!r} has no attribute {attr!r}") from e
    if not callable(fn):
        raise TypeError(f"plug-in {path!r} is a {type(fn).__name__}, not a callable")
    return fn


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
