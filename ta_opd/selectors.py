"""Selectors (``--opd-budget-mask``) and their scores; higher = kept first (docs/method.md §3–4).

Features are the batch-normalised statistics of one rollout step: H̃ = Norm(H), D̃ = Norm(D),
C̃ = Norm(C_proxy), DC̃ = Norm(D · C_proxy), D^L = D̃·C̃ (learnable disagreement),
D^I = D̃·(1 − C̃) (incompatible disagreement), and the Q3 quadrant
{H̃ < median(H̃) and D̃ ≥ median(D̃)}. Adding a selector: its name in ``ta_opd.config.MASKS`` (the
option's choices), its score function and one ``_register`` here; names outside MASKS are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ta_opd.config import MASKS, SelectionConfig
from ta_opd.normalize import normalize, normalize_with_ranks
from ta_opd.registry import Registry
from ta_opd.stats import TokenStats


@dataclass
class Features:
    """Normalised per-token features of one step, every tensor ``[N]`` float64 in [0, 1] (``is_q3`` bool)."""

    h: Tensor  # H̃
    d: Tensor  # D̃
    c: Tensor  # C̃
    dc: Tensor  # DC̃ = Norm(D · C)
    d_learn: Tensor  # D^L = D̃ · C̃
    d_incompat: Tensor  # D^I = D̃ · (1 − C̃)
    is_q3: Tensor  # bool: H̃ < median(H̃) and D̃ ≥ median(D̃)
    h_median: float
    d_median: float

    def as_dict(self) -> dict[str, Tensor]:
        normalised = {"h_norm": self.h, "d_norm": self.d, "c_norm": self.c, "dc_norm": self.dc}
        return normalised | {"d_learn": self.d_learn, "d_incompat": self.d_incompat, "is_q3": self.is_q3}


def soft_or(a: Tensor, b: Tensor) -> Tensor:
    """a + b − a·b, high when either is high (both in [0, 1]).

    Written as 1 − (1 − a)(1 − b): the same value, but exactly 1 whenever an input is 1, so the
    many tokens clipped to 1 by the normalisation tie exactly and the documented tie rule decides.
    """
    return 1.0 - (1.0 - a) * (1.0 - b)


def compute_features(stats: TokenStats, cfg: SelectionConfig) -> Features:
    """H̃, D̃, C̃, DC̃, D^L, D^I and the Q3 flag over all tokens of the step (docs/method.md §3–4)."""

    def norm(x: Tensor) -> Tensor:
        return normalize(x, cfg.normalization, cfg.q_low, cfg.q_high)

    args = (cfg.normalization, cfg.q_low, cfg.q_high)
    # medians of the normalised values over all tokens of the step (the normalisation's population)
    h, (h_med,) = normalize_with_ranks(stats.entropy_norm, *args, ranks=(0.5,))
    d, (d_med,) = normalize_with_ranks(stats.kl_f_union, *args, ranks=(0.5,))
    c, dc = norm(stats.compat), norm(stats.kl_f_union * stats.compat)
    is_q3 = (h < h_med) & (d >= d_med)
    return Features(
        h=h,
        d=d,
        c=c,
        dc=dc,
        d_learn=d * c,
        d_incompat=d * (1.0 - c),
        is_q3=is_q3,
        h_median=float(h_med),
        d_median=float(d_med),
    )


ScoreFn = Callable[[Features, SelectionConfig, int], Tensor]


@dataclass(frozen=True)
class SelectorSpec:
    """A selector: its score, whether low scores go first, and whether only Q3 tokens compete."""

    score_fn: ScoreFn
    ascending: bool = False
    uses_q3: bool = False
    description: str = ""


SELECTORS: Registry[SelectorSpec] = Registry("mask")


def _register(name: str, fn: ScoreFn, description: str, ascending: bool = False, uses_q3: bool = False) -> None:
    if name not in MASKS:
        raise ValueError(f"selector {name!r} is not declared in ta_opd.config.MASKS (the --opd-budget-mask choices)")
    SELECTORS.register(name, SelectorSpec(fn, ascending, uses_q3, description))


def ca_softor_score(f: Features, cfg: SelectionConfig) -> Tensor:
    """soft-OR(H̃, DC̃) (released code, default) or soft-OR(H̃, D̃·C̃) (paper variant)."""
    return soft_or(f.h, f.dc) if cfg.ca_softor_variant == "code" else soft_or(f.h, f.d_learn)


def random_score(n: int, cfg: SelectionConfig, rollout_index: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform scores from a private generator seeded with seed + rollout index (reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed) + int(rollout_index))
    return torch.rand(n, generator=gen, dtype=torch.float64).to(device)


def q3_score(f: Features) -> Tensor:
    """(1 − H̃)·DC̃: the score of q3 and of split_budget_ca's second part."""
    return (1.0 - f.h) * f.dc


_register("full", lambda f, cfg, r: torch.ones_like(f.h), "every valid token (ratio forced to 1.0)")
_register("dlearn_high", lambda f, cfg, r: f.d_learn, "D^L = D̃·C̃, learnable disagreement (TA-OPD)")
_register("ca_softor", lambda f, cfg, r: ca_softor_score(f, cfg), "soft-OR(H̃, DC̃) (TA-OPD + entropy)")
_register("entropy", lambda f, cfg, r: f.h, "H̃, student top-K entropy")
_register("tip", lambda f, cfg, r: soft_or(f.h, f.d), "soft-OR(H̃, D̃), TIP-style")
_register("divergence", lambda f, cfg, r: f.d, "D̃, raw union forward KL")
_register(
    "random", lambda f, cfg, r: random_score(f.h.shape[0], cfg, r, f.h.device), "uniform, same budget (seed + rollout)"
)
_register("compatibility", lambda f, cfg, r: f.c, "C̃, compatibility alone")
_register("dincompat_high", lambda f, cfg, r: f.d_incompat, "D^I = D̃·(1 − C̃), incompatible disagreement")
_register(
    "split_budget_ca",
    lambda f, cfg, r: q3_score(f),
    "round(γ·n) by H̃, the rest by (1 − H̃)·DC̃, topped up by ca_softor (score shown: (1 − H̃)·DC̃)",
)
_register("q3", lambda f, cfg, r: q3_score(f), "Q3 tokens ranked by (1 − H̃)·DC̃", uses_q3=True)
_register("q3_highc", lambda f, cfg, r: f.c, "Q3 tokens, highest C̃ first", uses_q3=True)
_register("q3_lowc", lambda f, cfg, r: f.c, "Q3 tokens, lowest C̃ first", ascending=True, uses_q3=True)
_register("q3_dlearn_high", lambda f, cfg, r: f.d_learn, "Q3 tokens, highest D^L first", uses_q3=True)
_register("q3_dlearn_low", lambda f, cfg, r: f.d_learn, "Q3 tokens, lowest D^L first", ascending=True, uses_q3=True)
_register("q3_dincompat_high", lambda f, cfg, r: f.d_incompat, "Q3 tokens, highest D^I first", uses_q3=True)
if SELECTORS.names() != list(MASKS):
    raise ImportError(f"ta_opd.selectors registers {SELECTORS.names()}, ta_opd.config.MASKS declares {list(MASKS)}")


class SelectorScores(Mapping[str, Tensor]):
    """Every registered selector's score ``[N]``, computed on first access and kept (a step needs one or two;
    the token bank and the diagnostics read them all)."""

    def __init__(self, features: Features, cfg: SelectionConfig, rollout_index: int = 0) -> None:
        self._features, self._cfg, self._rollout_index = features, cfg, rollout_index
        self._cache: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._cache:
            if name not in SELECTORS:
                raise KeyError(f"unknown mask {name!r}; expected one of {', '.join(SELECTORS.names())}")
            self._cache[name] = SELECTORS.get(name).score_fn(self._features, self._cfg, self._rollout_index)
        return self._cache[name]

    def __contains__(self, name: object) -> bool:
        return name in SELECTORS

    def __iter__(self) -> Iterator[str]:
        return iter(SELECTORS.names())

    def __len__(self) -> int:
        return len(SELECTORS.names())


def selector_scores(features: Features, cfg: SelectionConfig, rollout_index: int = 0) -> SelectorScores:
    """Every registered selector's score ``[N]`` (for the token bank and the diagnostics), computed lazily."""
    return SelectorScores(features, cfg, rollout_index)
