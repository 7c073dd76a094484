"""The frozen configuration of token selection (METHOD.md §2–5); built by the stack from its flags.

`ta_opd` never sees an argparse Namespace: the stack and the slime patch turn flags into a
`SelectionConfig`, whose defaults are METHOD.md's.

Non-finite sampled-token log-probs (`nonfinite_policy`): a NaN/inf teacher or student log-prob
of a valid token is a server fault, never a statistic. ``"error"`` (default) raises ValueError
naming the sample and position before anything is selected; ``"drop"`` removes such tokens from
the valid set (loss mask 0) and counts them in ``metrics["opd/nonfinite_logp_tokens"]``.
Non-finite entries *inside* top-K lists are a normal part of the format and are dropped from
the list (METHOD.md §2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COMPAT_PROXIES = ("mass", "set", "bc", "prefix_ema")
CA_SOFTOR_VARIANTS = ("code", "paper")
EXACT_CMASS_OVERFLOW = ("fallback", "truncate", "error")
NONFINITE_POLICIES = ("error", "drop")


@dataclass(frozen=True)
class SelectionConfig:
    """Every knob of TA-OPD token selection; field names mirror the ``--opd-*`` flags."""

    mask: str = "full"  # --opd-budget-mask (a mask name, not an alias)
    ratio: float = 1.0  # --opd-budget-ratio ρ
    seed: int = 42  # --opd-budget-mask-seed (random selector: seed + rollout index)
    min_keep_per_sample: int = 1  # --opd-budget-min-keep-per-sample
    gamma: float = 0.5  # --opd-budget-gamma (split_budget_ca)
    compat_proxy: str = "mass"  # --opd-compat-proxy
    prefix_ema_alpha: float = 0.9  # --opd-compat-prefix-ema-alpha
    normalization: str = "batch_quantile"  # --opd-metric-normalization
    q_low: float = 0.05  # --opd-metric-q-low
    q_high: float = 0.95  # --opd-metric-q-high
    topk_k: int = 16  # --opd-topk-metrics-k
    ca_softor_variant: str = "code"  # released code (default) or the paper's variant
    exact_cmass: bool = False  # --opd-exact-cmass
    exact_cmass_max_union: int = 4096  # --opd-exact-cmass-max-union
    exact_cmass_overflow: str = "fallback"  # --opd-exact-cmass-overflow
    nonfinite_policy: str = "error"

    @property
    def selecting(self) -> bool:
        """True when a selector actually masks tokens (a mask other than full and ρ < 1)."""
        return self.mask != "full" and self.ratio < 1.0

    def validate(self) -> SelectionConfig:
        """Raise ValueError for any value outside its domain; returns self for chaining."""
        from ta_opd.normalize import NORMALIZERS
        from ta_opd.selectors import SELECTORS

        if self.mask not in SELECTORS:
            from ta_opd.aliases import METHOD_ALIASES

            hint = (
                f" (the alias {self.mask!r} means mask {METHOD_ALIASES[self.mask]!r})"
                if (self.mask in METHOD_ALIASES)
                else ""
            )
            raise ValueError(f"unknown mask {self.mask!r}{hint}; expected one of {SELECTORS.names()}")
        if self.mask != "full" and not self.ratio > 0:  # ρ ≥ 1 is valid and means no masking (METHOD.md §5)
            raise ValueError(f"budget ratio must be > 0 with mask {self.mask!r}, got {self.ratio}")
        if self.normalization not in NORMALIZERS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {NORMALIZERS.names()}")
        if self.compat_proxy not in COMPAT_PROXIES:
            raise ValueError(f"unknown compat proxy {self.compat_proxy!r}; expected one of {list(COMPAT_PROXIES)}")
        if self.ca_softor_variant not in CA_SOFTOR_VARIANTS:
            raise ValueError(
                f"unknown ca_softor variant {self.ca_softor_variant!r}; expected one of {list(CA_SOFTOR_VARIANTS)}"
            )
        if self.exact_cmass_overflow not in EXACT_CMASS_OVERFLOW:
            raise ValueError(
                f"unknown exact-cmass overflow rule {self.exact_cmass_overflow!r}; "
                f"expected one of {list(EXACT_CMASS_OVERFLOW)}"
            )
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"unknown nonfinite policy {self.nonfinite_policy!r}; expected one of {list(NONFINITE_POLICIES)}"
            )
        if not 0.0 <= self.q_low < self.q_high <= 1.0:
            raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={self.q_low}, q_high={self.q_high}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.prefix_ema_alpha <= 1.0:
            raise ValueError(f"prefix_ema_alpha must be in [0, 1], got {self.prefix_ema_alpha}")
        if self.min_keep_per_sample < 0:
            raise ValueError(f"min_keep_per_sample must be >= 0, got {self.min_keep_per_sample}")
        if self.topk_k < 0 or (self.mask != "full" and self.topk_k < 1):
            raise ValueError(f"topk_k must be >= 1 with mask {self.mask!r}, got {self.topk_k}")
        if self.exact_cmass_max_union < 1:
            raise ValueError(f"exact_cmass_max_union must be >= 1, got {self.exact_cmass_max_union}")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SelectionConfig:
        """Build from a dict of field names; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SelectionConfig fields {unknown}; expected some of {sorted(names)}")
        return cls(**dict(values))
