"""The TA-OPD flags (METHOD.md §2-5) for an upstream slime checkout.

Upstream's ``slime/utils/arguments.py`` calls ``add_ta_opd_arguments(parser)`` right after
``add_on_policy_distillation_arguments`` (the installer adds those lines; ARGUMENTS_PATCH.md
shows them). The defaults are METHOD.md's; ``--opd-budget-mask full`` (the default) leaves
upstream OPD unchanged. A flag the parser already has (a future upstream version, or this
project's own parser) is left as it is, so calling this twice is harmless.
"""

from __future__ import annotations

import argparse

from ta_opd.aliases import METHOD_ALIASES, METHOD_FLAGS
from ta_opd.config import COMPAT_PROXIES, EXACT_CMASS_OVERFLOW
from ta_opd.normalize import NORMALIZERS
from ta_opd.selectors import SELECTORS

TOKEN_BANK_FORMATS = ("csv", "jsonl", "parquet")


def _names(registry) -> list[str]:
    return sorted(registry.names() if hasattr(registry, "names") else registry.keys())


def add_ta_opd_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every TA-OPD flag of docs/slime_interfaces.md on ``parser``; return the parser."""
    group = parser.add_argument_group("TA-OPD token selection (METHOD.md §2-5)")
    # an alias that also sets other flags (sft_teacher: the loss and the generate function) is a launcher
    # method, not a mask: as a mask it would silently mean `full`
    masks = sorted(set(_names(SELECTORS)) | (set(METHOD_ALIASES) - set(METHOD_FLAGS)))
    flags: list[tuple[str, dict]] = [
        ("--opd-topk-metrics-k", dict(type=int, default=16, help="K of the student and teacher top-K lists.")),
        (
            "--opd-budget-mask",
            dict(
                type=str,
                default="full",
                choices=masks,
                help="Token selector (mask name or release alias, e.g. teachability = dlearn_high); full keeps all.",
            ),
        ),
        ("--opd-budget-ratio", dict(type=float, default=1.0, help="Global budget ρ over a step's valid tokens.")),
        ("--opd-budget-mask-seed", dict(type=int, default=42, help="random selector seed (+ rollout index).")),
        (
            "--opd-budget-min-keep-per-sample",
            dict(type=int, default=1, help="Every sample with a valid token keeps at least this many."),
        ),
        ("--opd-budget-gamma", dict(type=float, default=0.5, help="split_budget_ca: budget share chosen by entropy.")),
        (
            "--opd-compat-proxy",
            dict(type=str, default="mass", choices=list(COMPAT_PROXIES), help="Compatibility proxy C."),
        ),
        ("--opd-compat-prefix-ema-alpha", dict(type=float, default=0.9, help="α of the prefix_ema proxy.")),
        (
            "--opd-metric-normalization",
            dict(type=str, default="batch_quantile", choices=_names(NORMALIZERS), help="Score normalisation."),
        ),
        ("--opd-metric-q-low", dict(type=float, default=0.05, help="Lower quantile of batch_quantile.")),
        ("--opd-metric-q-high", dict(type=float, default=0.95, help="Upper quantile of batch_quantile.")),
        (
            "--opd-exact-cmass",
            dict(action="store_true", default=False, help="Teacher log-probs on the student top-K union (exact C)."),
        ),
        ("--opd-exact-cmass-max-union", dict(type=int, default=4096, help="Largest id union sent for exact C.")),
        (
            "--opd-exact-cmass-overflow",
            dict(type=str, default="fallback", choices=list(EXACT_CMASS_OVERFLOW), help="Union above the limit."),
        ),
        ("--opd-token-bank-dir", dict(type=str, default=None, help="Write per-token statistics of each step here.")),
        ("--opd-token-bank-format", dict(type=str, default="csv", choices=list(TOKEN_BANK_FORMATS))),
        (
            "--opd-token-bank-raw-topk",
            dict(action="store_true", default=False, help="Also store the raw top-K lists in the bank."),
        ),
        ("--opd-token-bank-pair-id", dict(type=str, default=None, help="Teacher-student pair id in the bank.")),
        ("--opd-teacher-name", dict(type=str, default=None, help="Teacher name recorded in the bank.")),
        ("--opd-student-name", dict(type=str, default=None, help="Student name recorded in the bank.")),
        (
            "--custom-teacher-prefill-function-path",
            dict(
                type=str,
                default=None,
                help="(args, sample, payload) -> payload: rewrites the OPD reward function's teacher prefill "
                "request (e.g. the slime-ta-opd stack's self-distillation prompt).",
            ),
        ),
    ]
    for flag, kwargs in flags:
        try:
            group.add_argument(flag, **kwargs)
        except argparse.ArgumentError:
            continue  # already registered by this parser: keep its definition
    return parser
