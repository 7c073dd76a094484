"""TA-OPD flags (METHOD.md §2-5) and the one builder of ``ta_opd``'s ``SelectionConfig`` from them.

The flag names are the release's (docs/slime_interfaces.md). Choices come from the
``ta_opd`` registries, so adding a selector or a normaliser there adds it to the CLI.
``ta_opd`` never sees an argparse Namespace: ``selection_config_from_args`` is the only
place the stack turns flags into its frozen config.
"""

from __future__ import annotations

import argparse
import logging
import re

from ta_opd.aliases import METHOD_ALIASES
from ta_opd.normalize import NORMALIZERS
from ta_opd.selectors import SELECTORS

# The one definition of the TA-OPD flags and of the flag → SelectionConfig builder is the
# drop-in patch's (it has to work on an upstream checkout too); the stack reuses it.
from slime_patch.slime.rollout.tip_compat import CONFIG_FIELD_TO_ARG, selection_config_from_args
from slime_patch.slime.utils.ta_opd_arguments import add_ta_opd_arguments

logger = logging.getLogger(__name__)

# whole-word SelectionConfig field names, longest first (q_low before a shorter prefix could match)
_FIELD_NAMES = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, CONFIG_FIELD_TO_ARG), key=len, reverse=True)) + r")\b"
)


def _flag(arg_name: str) -> str:
    return "--" + arg_name.replace("_", "-")


__all__ = [
    "add_ta_opd_arguments",
    "mask_names",
    "method_aliases",
    "needs_student_topk",
    "normalizer_names",
    "selection_config_from_args",
    "validate_ta_opd_args",
]


def mask_names() -> list[str]:
    """Selector names of ``ta_opd.selectors.SELECTORS`` (METHOD.md §4)."""
    return SELECTORS.names()


def method_aliases() -> dict[str, str]:
    """Script aliases (pure_opd, teachability, ...) → mask names, from ``ta_opd.aliases``."""
    return dict(METHOD_ALIASES)


def normalizer_names() -> list[str]:
    """Names of ``ta_opd.normalize.NORMALIZERS`` (METHOD.md §3)."""
    return NORMALIZERS.names()


def validate_ta_opd_args(args: argparse.Namespace) -> None:
    """Resolve method aliases and reject contradictory TA-OPD flags (raises ValueError)."""
    aliases = method_aliases()
    masks = set(mask_names())
    mask = args.opd_budget_mask
    if mask not in masks and mask in aliases:
        args.opd_budget_mask = mask = aliases[mask]
    if mask not in masks:
        raise ValueError(f"--opd-budget-mask {mask!r} is not a selector; expected one of {sorted(masks)}")
    if args.opd_topk_metrics_k < 0:
        raise ValueError(f"--opd-topk-metrics-k must be >= 0, got {args.opd_topk_metrics_k}")
    selecting = mask != "full"
    if selecting:
        if not args.use_opd:
            raise ValueError(f"--opd-budget-mask {mask} needs --use-opd (token selection only applies to OPD)")
        if args.opd_type != "sglang":
            raise ValueError(
                f"--opd-budget-mask {mask} needs --opd-type sglang: selection uses the teacher server's top-K, "
                f"got --opd-type {args.opd_type}"
            )
        if args.opd_topk_metrics_k < 1:
            raise ValueError(f"mask {mask} needs --opd-topk-metrics-k >= 1, got {args.opd_topk_metrics_k}")
    if not 0.0 < args.opd_budget_ratio <= 1.0:
        raise ValueError(
            f"--opd-budget-ratio must be > 0 and <= 1 (the share of a step's valid tokens kept), "
            f"got {args.opd_budget_ratio}"
        )
    # the value ranges are SelectionConfig.validate's (one definition); its messages name config fields,
    # which become the flags here
    try:
        selection_config_from_args(args)
    except ValueError as e:
        raise ValueError(_FIELD_NAMES.sub(lambda m: _flag(CONFIG_FIELD_TO_ARG[m.group(0)]), str(e))) from None
    if args.opd_exact_cmass and not args.use_opd:
        raise ValueError("--opd-exact-cmass needs --use-opd")
    if args.opd_token_bank_dir is not None and not args.use_opd:
        raise ValueError("--opd-token-bank-dir needs --use-opd (the bank records OPD token statistics)")


def needs_student_topk(args: argparse.Namespace) -> bool:
    """Whether the rollout must ask the student engine for its per-position top-K.

    Decision: with --use-opd and K > 0 the rollout always requests top_logprobs_num = K, even
    for the 'full' mask, so selection metrics and the token bank are available for full OPD
    runs as well (the cost is K extra entries per token in the engine's answer).
    """
    return bool(getattr(args, "use_opd", False)) and int(getattr(args, "opd_topk_metrics_k", 0) or 0) > 0
