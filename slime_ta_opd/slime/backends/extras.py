"""The optional extras of the scale-out backends (``megatron``, ``sglang``): whether one is installed, and the
install hint when it is not. Imports nothing of the backends, so any of them may use it."""

from __future__ import annotations

import importlib.util

# extra name -> (module that must import, what the extra brings)
EXTRAS = {
    "megatron": ("megatron.core", "the Megatron-core trainer (--train-backend megatron)"),
    "sglang": ("sglang", "real SGLang engines (--rollout-backend sglang)"),
}


class MissingExtraError(ValueError):
    """A forced backend needs an optional extra that is not installed."""


def install_hint(extra: str) -> str:
    module, what = EXTRAS[extra]
    return (
        f"{what} needs the optional extra {extra!r} ({module} is not importable): "
        f"pip install -e '.[{extra}]'  (or: pip install 'slime-ta-opd[{extra}]')"
    )


def extra_available(extra: str) -> bool:
    """True when the extra's top module can be found (checked without importing it: no CUDA init)."""
    module = EXTRAS[extra][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing raises instead of returning None
        return False


def require_extra(extra: str) -> None:
    """Raise :class:`MissingExtraError` (with the pip line) when the extra's top module cannot be found."""
    if not extra_available(extra):
        raise MissingExtraError(install_hint(extra))
