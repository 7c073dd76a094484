"""The frozen configuration of token selection (docs/method.md §2–5): every option's default, choices and range.

Each field of ``SelectionConfig`` carries an ``Option`` (its ``--opd-*`` flag, help text, choices and
valid range) in its dataclass metadata. That is the one definition of a TA-OPD option: the stack's flags
and the launchers' checks are generated from it (``ta_opd.flags``, ``python -m ta_opd.aliases``), and
``SelectionConfig.validate`` is the one validator (the stack, the slime patch and the launchers call it).

This module imports nothing from ``ta_opd``: the selector and normaliser registries implement the names
declared here (``MASKS``, ``NORMALIZATIONS``) and refuse any other, and method aliases are resolved to mask
names before a config is built (``ta_opd.aliases.resolve_alias``). ``ta_opd`` never sees an argparse
Namespace.

Non-finite sampled-token log-probs (``nonfinite_policy``): a NaN/inf teacher or student log-prob
of a valid token is a server fault, never a statistic. ``"error"`` (default) raises ValueError
naming the sample and position before anything is selected; ``"drop"`` removes such tokens from
the valid set (loss mask 0) and counts them in ``metrics["opd/nonfinite_logp_tokens"]``.
Non-finite entries *inside* top-K lists are a normal part of the format and are dropped from
the list (docs/method.md §2).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Selector names (--opd-budget-mask), in the order of ta_opd.selectors.SELECTORS, which registers a score for
# each and refuses any other name. Adding a selector: its name here, its score there.
MASKS = (
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
# Normalisations (--opd-metric-normalization), implemented by ta_opd.normalize.NORMALIZERS.
NORMALIZATIONS = ("batch_quantile", "batch_minmax", "none")
COMPAT_PROXIES = ("mass", "set", "bc", "prefix_ema")
CA_SOFTOR_VARIANTS = ("code", "paper")
EXACT_CMASS_OVERFLOW = ("fallback", "truncate", "error")
NONFINITE_POLICIES = ("error", "drop")


@dataclass(frozen=True)
class Range:
    """``low <(=) value <(=) high``; ``None`` leaves a side open. ``text`` overrides the generated wording."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    finite: bool = True  # refuse NaN / ±inf
    text: str | None = None
    note: str | None = None  # why, appended to the message in parentheses

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)))

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        lo = None if self.low is None else f"{'>=' if self.low_inclusive else '>'} {_num(self.low)}"
        hi = None if self.high is None else f"{'<=' if self.high_inclusive else '<'} {_num(self.high)}"
        if lo and hi:
            left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"  # type: ignore[arg-type]
        return lo or hi or ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


UNIT = Range(0, 1)
# Seeds reach numpy / torch generators that take 32-bit seeds.
SEED = Range(0, 2**32, high_inclusive=False, text="in [0, 2^32)", note="a 32-bit seed")


@dataclass(frozen=True)
class Option:
    """How one ``SelectionConfig`` field is set and checked."""

    flag: str | None  # the stack's flag (upstream / release name); None: set in code only
    help: str
    choices: tuple[str, ...] | None = None
    range: Range | None = None  # numeric fields; a finite value is always required


def _option(default: Any, flag: str | None, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(flag, help, **kw)})


@dataclass(frozen=True)
class SelectionConfig:
    """Every knob of TA-OPD token selection (defaults: docs/method.md); ``Option`` metadata on each field."""

    mask: str = _option(
        "full",
        "--opd-budget-mask",
        "Token selector (mask name or release alias, e.g. teachability = dlearn_high); full keeps all.",
        choices=MASKS,
    )
    ratio: float = _option(
        1.0,
        "--opd-budget-ratio",
        "Global budget ρ over a step's valid tokens (> 0 with a mask other than full; >= 1 keeps every token).",
        range=Range(),
    )
    seed: int = _option(42, "--opd-budget-mask-seed", "random selector seed (+ rollout index).", range=SEED)
    min_keep_per_sample: int = _option(
        1,
        "--opd-budget-min-keep-per-sample",
        "Every sample with a valid token keeps at least this many.",
        range=Range(0),
    )
    gamma: float = _option(0.5, "--opd-budget-gamma", "split_budget_ca: budget share chosen by entropy.", range=UNIT)
    compat_proxy: str = _option("mass", "--opd-compat-proxy", "Compatibility proxy C.", choices=COMPAT_PROXIES)
    prefix_ema_alpha: float = _option(0.9, "--opd-compat-prefix-ema-alpha", "α of the prefix_ema proxy.", range=UNIT)
    normalization: str = _option(
        "batch_quantile", "--opd-metric-normalization", "Score normalisation.", choices=NORMALIZATIONS
    )
    q_low: float = _option(0.05, "--opd-metric-q-low", "Lower quantile of batch_quantile.", range=UNIT)
    q_high: float = _option(0.95, "--opd-metric-q-high", "Upper quantile of batch_quantile.", range=UNIT)
    topk_k: int = _option(
        16,
        "--opd-topk-metrics-k",
        "K of the student and teacher top-K lists.",
        range=Range(0, note="0 turns the lists off; a mask other than full needs >= 1"),
    )
    ca_softor_variant: str = _option(
        "code", None, "ca_softor score: the released code's soft-OR(H, DC) or the paper's.", choices=CA_SOFTOR_VARIANTS
    )
    exact_cmass: bool = _option(False, "--opd-exact-cmass", "Teacher log-probs on the student top-K union (exact C).")
    exact_cmass_max_union: int = _option(
        4096, "--opd-exact-cmass-max-union", "Largest id union sent for exact C.", range=Range(1)
    )
    exact_cmass_overflow: str = _option(
        "fallback", "--opd-exact-cmass-overflow", "Union above the limit.", choices=EXACT_CMASS_OVERFLOW
    )
    nonfinite_policy: str = _option(
        "error", None, "A non-finite sampled-token log-prob: raise, or drop the token.", choices=NONFINITE_POLICIES
    )

    @property
    def selecting(self) -> bool:
        """True when a selector actually masks tokens (a mask other than full and ρ < 1)."""
        return self.mask != "full" and self.ratio < 1.0

    def validate(self, names: Mapping[str, str] | None = None) -> SelectionConfig:
        """The one validator of TA-OPD options: raise ValueError naming the field, the value and what was expected.

        Checks each field's type, choices and range (its ``Option``), then the rules between fields
        (docs/method.md §5: ρ ≤ 0 with a mask is an error, ρ ≥ 1 or mask ``full`` means no masking).
        ``names`` maps field names to what messages call them (the stack passes its flags). Returns self.
        """

        def n(name: str) -> str:
            return (names or {}).get(name, name)

        for f, opt in options():
            _check_field(n(f.name), f, opt, getattr(self, f.name))
        if self.mask != "full" and not self.ratio > 0:
            raise ValueError(
                f"{n('ratio')} must be > 0 with {n('mask')} {self.mask!r} (the share of a step's valid tokens kept; "
                f">= 1 keeps every token), got {self.ratio}"
            )
        if not self.q_low < self.q_high:
            raise ValueError(
                f"need 0 <= {n('q_low')} < {n('q_high')} <= 1, got {n('q_low')}={self.q_low}, "
                f"{n('q_high')}={self.q_high}"
            )
        if self.mask != "full" and self.topk_k < 1:
            raise ValueError(f"{n('topk_k')} must be >= 1 with {n('mask')} {self.mask!r}, got {self.topk_k}")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SelectionConfig:
        """Build from a dict of field names; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SelectionConfig fields {unknown}; expected some of {sorted(names)}")
        return cls(**dict(values))


def options() -> Iterator[tuple[dataclasses.Field, Option]]:
    """Every ``SelectionConfig`` field with its ``Option``, in field order."""
    for f in dataclasses.fields(SelectionConfig):
        yield f, f.metadata["option"]


def _check_field(name: str, f: dataclasses.Field, opt: Option, value: Any) -> None:
    kind = type(f.default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if kind is str:
        if not isinstance(value, str) or (opt.choices is not None and value not in opt.choices):
            hint = (
                " (a method alias such as 'teachability' names a mask: ta_opd.aliases.resolve_alias)"
                if f.name == "mask"
                else ""
            )
            raise ValueError(f"unknown {name} {value!r}; expected one of {list(opt.choices or ())}{hint}")
        return
    numeric = numbers.Integral if kind is int else numbers.Real  # numpy scalars included
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    rng = opt.range or Range()
    note = f" ({rng.note})" if rng.note else ""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not rng.contains(value):
        raise ValueError(f"{name} must be {rng.describe()}{note}, got {value}")
