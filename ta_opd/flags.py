"""The TA-OPD flags (``--opd-*``): generated from ``SelectionConfig``'s fields, and flags → config.

Each field's ``Option`` (``ta_opd.config``) gives the flag name, default, help and choices; this module
turns them into ``argparse`` arguments and turns a parsed namespace back into a validated
``SelectionConfig``. ``add_ta_opd_arguments`` registers them with the token-bank flags
(``ta_opd.token_bank``) on any slime parser: the stack's (``slime.utils.opd_config``) or an upstream
checkout's (the slime patch), so each flag is defined once. ``--opd-budget-mask`` also takes every
alias and synonym of ``ta_opd.aliases`` (``teachability``, ``none``, ...), resolved to its mask name.
"""

from __future__ import annotations

import argparse
from typing import Any

from ta_opd.aliases import budget_mask_choices, resolve_alias
from ta_opd.config import SelectionConfig, options
from ta_opd.token_bank import TOKEN_BANK_FORMATS, TOKEN_BANK_LAYOUTS

GROUP_TITLE = "TA-OPD token selection (docs/method.md §2-5)"

# The token bank's flags (ta_opd.token_bank.TokenBankWriter.from_args reads them).
TOKEN_BANK_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--opd-token-bank-dir", dict(type=str, default=None, help="Write per-token statistics of each step here.")),
    ("--opd-token-bank-format", dict(type=str, default="csv", choices=list(TOKEN_BANK_FORMATS))),
    (
        "--opd-token-bank-layout",
        dict(
            type=str,
            default="native",
            choices=list(TOKEN_BANK_LAYOUTS),
            help="native: this project's files and columns; release: the original release's (rollout_NNNNNN.csv, "
            "summary.csv, config.json and its column names).",
        ),
    ),
    (
        "--opd-token-bank-raw-topk",
        dict(action="store_true", default=False, help="Also store the raw top-K lists in the bank."),
    ),
    ("--opd-token-bank-pair-id", dict(type=str, default=None, help="Teacher-student pair id in the bank.")),
    ("--opd-teacher-name", dict(type=str, default=None, help="Teacher name recorded in the bank.")),
    ("--opd-student-name", dict(type=str, default=None, help="Student name recorded in the bank.")),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# SelectionConfig field → its flag, and the flag's argparse dest (fields without a flag keep their default).
FIELD_TO_FLAG: dict[str, str] = {f.name: opt.flag for f, opt in options() if opt.flag}
FIELD_TO_DEST: dict[str, str] = {name: _dest(flag) for name, flag in FIELD_TO_FLAG.items()}


def selection_flag_specs() -> list[tuple[str, dict[str, Any]]]:
    """``(flag, add_argument kwargs)`` for every flagged field, in field order."""
    specs: list[tuple[str, dict[str, Any]]] = []
    for f, opt in options():
        if opt.flag is None:
            continue
        if isinstance(f.default, bool):
            kwargs: dict[str, Any] = dict(action="store_true", default=f.default)
        else:
            kwargs = dict(type=type(f.default), default=f.default)
            if f.name == "mask":
                kwargs["choices"] = budget_mask_choices()
            elif opt.choices is not None:
                kwargs["choices"] = list(opt.choices)
        kwargs["help"] = opt.help
        specs.append((opt.flag, kwargs))
    return specs


def add_ta_opd_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every TA-OPD flag in one group of ``parser``; returns the parser.

    A flag the parser already has (a later upstream version, or a second call) is left as it is.
    """
    group = parser.add_argument_group(GROUP_TITLE)
    for flag, kwargs in (*selection_flag_specs(), *TOKEN_BANK_FLAGS):
        try:
            group.add_argument(flag, **kwargs)
        except argparse.ArgumentError:
            continue
    return parser


def config_from_args(args: Any) -> SelectionConfig:
    """``SelectionConfig`` from the flags on ``args`` (alias resolved, validated; errors name the flags).

    A flag ``args`` does not have (an upstream checkout that registers only some) keeps the field default.
    """
    values = {
        name: getattr(args, dest) for name, dest in FIELD_TO_DEST.items() if getattr(args, dest, None) is not None
    }
    if "mask" in values:
        try:
            values["mask"] = resolve_alias(values["mask"])
        except ValueError as e:
            raise ValueError(f"--opd-budget-mask: {e}") from None
    return SelectionConfig(**values).validate(names=FIELD_TO_FLAG)
