"""Script aliases of the method suite (METHOD.md §4) mapped to selector (mask) names: one table."""

from __future__ import annotations

# alias used in METHOD_LIST entries → mask name of ta_opd.selectors.SELECTORS
METHOD_ALIASES: dict[str, str] = {
    "pure_opd": "full",
    "teachability": "dlearn_high",
    "teachability_entropy": "ca_softor",
    "entropy": "entropy",
    "tip": "tip",
    "divergence": "divergence",
    "random": "random",
}

# Aliases whose budget ratio is fixed whatever the entry says.
FORCED_RATIO: dict[str, float] = {"pure_opd": 1.0}


def resolve_alias(name: str) -> str:
    """Mask name for a method alias; a mask name is passed through unchanged.

    Raises ValueError naming the value and listing the aliases and masks when it is neither.
    """
    from ta_opd.selectors import SELECTORS

    if name in METHOD_ALIASES:
        return METHOD_ALIASES[name]
    if name in SELECTORS:
        return name
    raise ValueError(
        f"unknown method alias or mask {name!r}; aliases: {sorted(METHOD_ALIASES)}; masks: {SELECTORS.names()}"
    )
