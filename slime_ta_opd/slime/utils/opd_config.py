"""TA-OPD flags (METHOD.md §2-5) and the one builder of ``ta_opd``'s ``SelectionConfig`` from them.

The flag names are the release's (docs/slime_interfaces.md). Choices come from the
``ta_opd`` registries, so adding a selector or a normaliser there adds it to the CLI.
``ta_opd`` never sees an argparse Namespace: ``selection_config_from_args`` is the only
place the stack turns flags into its frozen config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Used only while ``ta_opd`` cannot be imported (it is part of this project, so normally never).
_FALLBACK_MASKS = (
    "full",
    "dlearn_high",
    "ca_softor",
    "entropy",
    "tip",
    "divergence",
    "random",
    "compatibility",
    "dincompat_high",
    "split_budget_ca",
    "q3",
    "q3_highc",
    "q3_lowc",
    "q3_dlearn_high",
    "q3_dlearn_low",
    "q3_dincompat_high",
)
_FALLBACK_ALIASES = {
    "pure_opd": "full",
    "teachability": "dlearn_high",
    "teachability_entropy": "ca_softor",
    "entropy": "entropy",
    "tip": "tip",
    "divergence": "divergence",
    "random": "random",
}
_FALLBACK_NORMALIZERS = ("batch_quantile", "batch_minmax", "none")
COMPAT_PROXIES = ("mass", "set", "bc", "prefix_ema")
EXACT_CMASS_OVERFLOW = ("fallback", "truncate", "error")
TOKEN_BANK_FORMATS = ("csv", "jsonl", "parquet")


def _names(registry: Any) -> list[str]:
    if hasattr(registry, "names"):
        return list(registry.names())
    return list(registry.keys())


def mask_names() -> list[str]:
    """Selector names of ``ta_opd.selectors.SELECTORS`` (METHOD.md §4)."""
    try:
        from ta_opd.selectors import SELECTORS

        return _names(SELECTORS)
    except (ImportError, AttributeError):
        return list(_FALLBACK_MASKS)


def method_aliases() -> dict[str, str]:
    """Script aliases (pure_opd, teachability, ...) → mask names, from ``ta_opd.aliases``."""
    try:
        from ta_opd.aliases import METHOD_ALIASES

        return dict(METHOD_ALIASES)
    except (ImportError, AttributeError):
        return dict(_FALLBACK_ALIASES)


def normalizer_names() -> list[str]:
    """Names of ``ta_opd.normalize.NORMALIZERS`` (METHOD.md §3)."""
    try:
        from ta_opd.normalize import NORMALIZERS

        return _names(NORMALIZERS)
    except (ImportError, AttributeError):
        return list(_FALLBACK_NORMALIZERS)


def add_ta_opd_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    masks = mask_names()
    aliases = method_aliases()
    mask_choices = sorted(set(masks) | set(aliases))
    g = parser.add_argument_group("TA-OPD token selection (METHOD.md §2-5)")
    g.add_argument(
        "--opd-topk-metrics-k",
        type=int,
        default=16,
        help="K of the student and teacher top-K lists (top_logprobs_num) used by the selection statistics.",
    )
    g.add_argument(
        "--opd-budget-mask",
        type=str,
        default="full",
        choices=mask_choices,
        help="Token selector (a mask name, or a method alias resolved to one). 'full' keeps every token.",
    )
    g.add_argument(
        "--opd-budget-ratio",
        type=float,
        default=1.0,
        help="Global token budget ρ over all valid tokens of a rollout step; ρ >= 1 keeps all.",
    )
    g.add_argument(
        "--opd-budget-mask-seed", type=int, default=42, help="Seed of the 'random' selector (+ rollout index)."
    )
    g.add_argument(
        "--opd-budget-min-keep-per-sample",
        type=int,
        default=1,
        help="Every sample with a valid token keeps at least this many tokens (topped up by the ca_softor score).",
    )
    g.add_argument(
        "--opd-budget-gamma", type=float, default=0.5, help="split_budget_ca: share of the budget chosen by entropy."
    )
    g.add_argument(
        "--opd-compat-proxy",
        type=str,
        default="mass",
        choices=list(COMPAT_PROXIES),
        help="Compatibility proxy C: teacher mass on the student top-K, overlap, BC, or its prefix EMA.",
    )
    g.add_argument("--opd-compat-prefix-ema-alpha", type=float, default=0.9, help="α of the prefix_ema proxy.")
    g.add_argument(
        "--opd-metric-normalization",
        type=str,
        default="batch_quantile",
        choices=sorted(normalizer_names()),
        help="How raw scores are mapped to [0, 1] over the tokens of a rollout step.",
    )
    g.add_argument("--opd-metric-q-low", type=float, default=0.05, help="Lower quantile of batch_quantile.")
    g.add_argument("--opd-metric-q-high", type=float, default=0.95, help="Upper quantile of batch_quantile.")
    g.add_argument(
        "--opd-exact-cmass",
        action="store_true",
        default=False,
        help="Ask the teacher for log-probs of the union of the sample's student top-K ids (token_ids_logprob).",
    )
    g.add_argument("--opd-exact-cmass-max-union", type=int, default=4096, help="Largest id union sent for exact C.")
    g.add_argument(
        "--opd-exact-cmass-overflow",
        type=str,
        default="fallback",
        choices=list(EXACT_CMASS_OVERFLOW),
        help="Union above the limit: keep the lower bound (fallback), truncate it, or raise (error).",
    )
    g.add_argument(
        "--opd-token-bank-dir", type=str, default=None, help="Write per-token statistics of every step here."
    )
    g.add_argument("--opd-token-bank-format", type=str, default="csv", choices=list(TOKEN_BANK_FORMATS))
    g.add_argument(
        "--opd-token-bank-raw-topk",
        action="store_true",
        default=False,
        help="Also store the raw student/teacher top-K lists in the token bank.",
    )
    g.add_argument("--opd-token-bank-pair-id", type=str, default=None, help="Teacher-student pair id in the bank.")
    g.add_argument("--opd-teacher-name", type=str, default=None, help="Teacher name recorded in the bank/metrics.")
    g.add_argument("--opd-student-name", type=str, default=None, help="Student name recorded in the bank/metrics.")
    return parser


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
        if args.opd_budget_ratio <= 0:
            raise ValueError(f"--opd-budget-ratio must be > 0 with mask {mask}, got {args.opd_budget_ratio}")
        if args.opd_topk_metrics_k < 1:
            raise ValueError(f"mask {mask} needs --opd-topk-metrics-k >= 1, got {args.opd_topk_metrics_k}")
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


# SelectionConfig fields whose flag is not simply ``--opd-<field>`` (field name → args attribute).
_FIELD_TO_ARG: dict[str, str] = {
    "k": "opd_topk_metrics_k",
    "topk": "opd_topk_metrics_k",
    "mask": "opd_budget_mask",
    "selector": "opd_budget_mask",
    "ratio": "opd_budget_ratio",
    "seed": "opd_budget_mask_seed",
    "min_keep_per_sample": "opd_budget_min_keep_per_sample",
    "gamma": "opd_budget_gamma",
    "normalization": "opd_metric_normalization",
    "q_low": "opd_metric_q_low",
    "q_high": "opd_metric_q_high",
    "kl_coef": "opd_kl_coef",
}


def selection_config_from_args(args: argparse.Namespace):
    """``ta_opd.config.SelectionConfig`` from the flags: field ``x`` takes ``args.opd_x``.

    A few short field names map through ``_FIELD_TO_ARG``; fields with no flag keep the
    config's default. The config is validated before it is returned.
    """
    from ta_opd.config import SelectionConfig

    kwargs = {}
    for f in dataclasses.fields(SelectionConfig):
        name = f"opd_{f.name}" if hasattr(args, f"opd_{f.name}") else _FIELD_TO_ARG.get(f.name)
        if name is not None and hasattr(args, name):
            kwargs[f.name] = getattr(args, name)
    cfg = SelectionConfig(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
