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
    "sft_teacher": "full",  # the SFT baseline row: no token selection (its loss is set by METHOD_FLAGS)
}

# Aliases whose budget ratio is fixed whatever the entry says.
FORCED_RATIO: dict[str, float] = {"pure_opd": 1.0, "sft_teacher": 1.0}

# train.py flags an alias adds besides ``--opd-budget-mask MASK --opd-budget-ratio RATIO`` (the launcher appends
# them to the entry's flags). ``sft_teacher``: off-policy SFT on teacher samples of the same prompts
# (slime.rollout.sft_baseline), the baseline row of a method suite. No value may contain whitespace.
METHOD_FLAGS: dict[str, tuple[str, ...]] = {
    "sft_teacher": (
        "--loss-type",
        "sft_loss",
        "--custom-generate-function-path",
        "slime.rollout.sft_baseline.generate_with_teacher",
    ),
}


def method_flags(alias: str) -> tuple[str, ...]:
    """The extra train.py flags of a method alias (empty for the token selectors)."""
    if alias not in METHOD_ALIASES:
        raise ValueError(f"unknown method alias {alias!r}; aliases: {sorted(METHOD_ALIASES)}")
    return METHOD_FLAGS.get(alias, ())


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
