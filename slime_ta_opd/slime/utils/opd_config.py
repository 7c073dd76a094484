"""The stack's TA-OPD flags (docs/method.md §2-5) and their checks.

The flags are generated from ``ta_opd.config.SelectionConfig`` (``ta_opd.flags``: names as the release's,
defaults, choices and ranges from the config's fields), so adding an option there adds it here.
``validate_ta_opd_args`` resolves a method alias, builds the config with its one validator
(``SelectionConfig.validate``, errors in flag terms) and adds the rules that involve the stack's other flags.
``ta_opd`` never sees an argparse Namespace.
"""

from __future__ import annotations

import argparse

from ta_opd.aliases import resolve_alias
from ta_opd.flags import add_ta_opd_arguments, config_from_args

__all__ = ["add_ta_opd_arguments", "needs_student_topk", "validate_ta_opd_args"]


def validate_ta_opd_args(args: argparse.Namespace) -> None:
    """Resolve a method alias in ``--opd-budget-mask`` and reject bad or contradictory TA-OPD flags (ValueError)."""
    args.opd_budget_mask = resolve_alias(args.opd_budget_mask)
    config_from_args(args)  # every value checked by SelectionConfig.validate, messages naming the flags
    mask = args.opd_budget_mask
    if mask != "full":
        if not args.use_opd:
            raise ValueError(f"--opd-budget-mask {mask} needs --use-opd (token selection only applies to OPD)")
        if args.opd_type != "sglang":
            raise ValueError(
                f"--opd-budget-mask {mask} needs --opd-type sglang: selection uses the teacher server's top-K, "
                f"got --opd-type {args.opd_type}"
            )
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
    return bool(args.use_opd) and args.opd_topk_metrics_k > 0
