"""Flag → ``ta_opd`` adapters shared by the TA-OPD patch files (docs/method.md §2-5).

The original release kept its TIP-style compatibility helpers in this module: the
mapping from the method-suite script aliases (``pure_opd``, ``teachability``, ``tip``, ...)
to mask names, and the normalisation of flag values before a selector runs. Here it is
the one place where the patch turns slime's flat argparse namespace into
``ta_opd.config.SelectionConfig``; every formula (scores, budget, metrics) stays in ``ta_opd``.

Every value is read with ``getattr`` and a missing flag falls back to ``SelectionConfig``'s
own default (docs/method.md's defaults), so the patch also runs on an upstream checkout whose
``arguments.py`` registers only some of the TA-OPD flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ta_opd.aliases import resolve_alias
from ta_opd.config import SelectionConfig
from ta_opd.flags import FIELD_TO_DEST, config_from_args

__all__ = [
    "CONFIG_FIELD_TO_ARG",
    "FULL_MASK",
    "normalize_mask_name",
    "selecting",
    "selection_config_from_args",
    "student_topk_required",
    "topk_k",
]

# SelectionConfig field ← slime flag (argparse attribute), from ta_opd.flags. Fields without a flag keep the
# config default; so does any flag the running checkout did not register.
CONFIG_FIELD_TO_ARG: dict[str, str] = dict(FIELD_TO_DEST)

FULL_MASK = "full"


def normalize_mask_name(name: str) -> str:
    """A mask name as the selectors registry spells it.

    Accepts the release's script aliases (``teachability`` → ``dlearn_high``, ``pure_opd`` →
    ``full``, ...; ``ta_opd.aliases``), any letter case and ``-`` for ``_`` (``dlearn-high``).
    Unknown names raise ``ValueError`` from ``ta_opd`` listing the valid ones.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--opd-budget-mask must be a non-empty selector name, got {name!r}")
    return resolve_alias(name.strip().lower().replace("-", "_"))


def selection_config_from_args(args: Any) -> SelectionConfig:
    """``SelectionConfig`` from the ``--opd-*`` flags present on ``args`` (aliases resolved, validated by the one
    validator, ``SelectionConfig.validate``, with errors in flag terms): ``ta_opd.flags.config_from_args``."""
    return config_from_args(args)


def topk_k(args: Any) -> int:
    """K of the top-K lists (``--opd-topk-metrics-k``, default from ``SelectionConfig``); 0 disables them."""
    value = getattr(args, "opd_topk_metrics_k", None)
    if value is None:
        value = {f.name: f.default for f in dataclasses.fields(SelectionConfig)}["topk_k"]
    k = int(value)
    if k < 0:
        raise ValueError(f"--opd-topk-metrics-k must be >= 0, got {k}")
    return k


def selecting(args: Any) -> bool:
    """Whether a selector other than ``full`` is configured (then both top-K lists are required)."""
    mask = getattr(args, "opd_budget_mask", None)
    return mask is not None and normalize_mask_name(mask) != FULL_MASK


def student_topk_required(args: Any) -> bool:
    """Whether teacher scoring needs the student's top-K before the teacher request.

    True for a selector, for exact C (the requested ids are the student's top-K union) and for
    the token bank (which records the statistics of every token).
    """
    if topk_k(args) == 0:
        return False
    return (
        selecting(args)
        or bool(getattr(args, "opd_exact_cmass", False))
        or getattr(args, "opd_token_bank_dir", None) is not None
    )
