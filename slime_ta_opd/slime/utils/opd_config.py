"""TA-OPD flags (METHOD.md §2-5) and the one builder of ``ta_opd``'s ``SelectionConfig`` from them.

The flag names are the release's (docs/slime_interfaces.md). Choices come from the
``ta_opd`` registries, so adding a selector or a normaliser there adds it to the CLI.
``ta_opd`` never sees an argparse Namespace: ``selection_config_from_args`` is the only
place the stack turns flags into its frozen config.
"""

from __future__ import annotations

import argparse
import logging

from ta_opd.aliases import METHOD_ALIASES
from ta_opd.normalize import NORMALIZERS
from ta_opd.selectors import SELECTORS

# The one definition of the TA-OPD flags and of the flag → SelectionConfig builder is the
# drop-in patch's (it has to work on an upstream checkout too); the stack reuses it.
from ta_opd.slime_patch.slime.rollout.tip_compat import selection_config_from_args
from ta_opd.slime_patch.slime.utils.ta_opd_arguments import add_ta_opd_arguments

logger = logging.getLogger(__name__)

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
    if args.opd_budget_min_keep_per_sample < 0:
        raise ValueError(f"--opd-budget-min-keep-per-sample must be >= 0, got {args.opd_budget_min_keep_per_sample}")
    if not 0.0 <= args.opd_budget_gamma <= 1.0:
        raise ValueError(f"--opd-budget-gamma must be in [0, 1], got {args.opd_budget_gamma}")
    if not 0.0 <= args.opd_compat_prefix_ema_alpha <= 1.0:
        raise ValueError(f"--opd-compat-prefix-ema-alpha must be in [0, 1], got {args.opd_compat_prefix_ema_alpha}")
    if not 0.0 <= args.opd_metric_q_low < args.opd_metric_q_high <= 1.0:
        raise ValueError(
            "--opd-metric-q-low/--opd-metric-q-high must satisfy 0 <= low < high <= 1, "
            f"got {args.opd_metric_q_low}, {args.opd_metric_q_high}"
        )
    if args.opd_exact_cmass_max_union < 1:
        raise ValueError(f"--opd-exact-cmass-max-union must be >= 1, got {args.opd_exact_cmass_max_union}")
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
