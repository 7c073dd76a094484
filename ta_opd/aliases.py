"""Every name a user may type for a token selector: one table (docs/selectors.md is generated from it).

* the mask names of ``ta_opd.config.MASKS`` (each selector of ``ta_opd.selectors``) name themselves;
* ``SUITE_ALIASES``: the method suite's aliases (docs/method_suite.md), among them the original TA-OPD
  release's paper-facing names (``pure_opd``, ``teachability``, ...) and ``sft_teacher``;
* ``RELEASE_SYNONYMS``: the other names the release accepted, in its method-suite launcher and in its
  ``--opd-budget-mask`` choices (``full_opd``, ``none``, ``dlearn``, ``ta_softor``, ``high_c``, ...).

The table feeds train.py's ``--opd-budget-mask`` choices (``ta_opd.flags``), the launchers and the docs.
``METHOD_LIST`` / ``RUN_LIST`` entries (``name:ratio:idx``, separated by commas, spaces or newlines) are
parsed and checked here, for the launchers::

    python -m ta_opd.aliases parse-method-list "pure_opd:1.0:10 teachability:0.10:20"
    python -m ta_opd.aliases parse-run-list "dlearn_high:0.01:10,q3_highc:0.05:50"

Each prints one line per entry, ``idx name mask ratio [flag ...]``, or every error (exit 2). The module
imports only ``ta_opd.config`` (no torch): the launchers call it before anything starts.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ta_opd.config import MASKS, SelectionConfig

# The method suite's aliases (docs/method_suite.md) → mask name.
SUITE_ALIASES: dict[str, str] = {
    "pure_opd": "full",
    "teachability": "dlearn_high",
    "teachability_entropy": "ca_softor",
    "entropy": "entropy",
    "tip": "tip",
    "divergence": "divergence",
    "random": "random",
    "sft_teacher": "full",  # the SFT baseline row: no token selection (its loss is set by METHOD_FLAGS)
}

# The original release's other names → mask name (its method suite's method_to_mask and its train.py
# --opd-budget-mask choices); `none` is the release's default mask and means full OPD.
RELEASE_SYNONYMS: dict[str, str] = {
    "full_opd": "full",
    "none": "full",
    "teachability_high": "dlearn_high",
    "dlearn": "dlearn_high",
    "high_entropy": "entropy",
    "entropy_teachability": "ca_softor",
    "ta_softor": "ca_softor",
    "dlearn_entropy": "ca_softor",
    "teachability_entropy_split": "split_budget_ca",
    "entropy_teachability_split": "split_budget_ca",
    "ta_split": "split_budget_ca",
    "tip_softor": "tip",
    "q3_highC": "q3_highc",
    "high_d": "divergence",
    "raw_d": "divergence",
    "high_c": "compatibility",
    "q3_teachability_high": "q3_dlearn_high",
    "q3_teachability_low": "q3_dlearn_low",
}

# Every alias and synonym → mask name (mask names themselves are not listed: they resolve to themselves).
METHOD_ALIASES: dict[str, str] = {**SUITE_ALIASES, **RELEASE_SYNONYMS}

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

# Names whose budget ratio is forced to 1.0 whatever the entry says: everything meaning mask `full`.
FORCED_RATIO: dict[str, float] = {
    name: 1.0 for name in ("full", *METHOD_ALIASES) if METHOD_ALIASES.get(name, name) == "full"
}

ENTRY_EXAMPLE = "pure_opd:1.0:10 teachability:0.10:20"
IDX_MAX = 2**32 - 1  # idx names a run (and, in the release, picks its ports); the seed is shared by every entry
_ENTRY = re.compile(r"^([A-Za-z0-9_]+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?):([0-9]+)$")


def _check_table() -> None:
    for name, mask in METHOD_ALIASES.items():
        if mask not in MASKS:
            raise ImportError(f"ta_opd.aliases: {name!r} names mask {mask!r}, which is not in ta_opd.config.MASKS")
    clash = sorted((set(SUITE_ALIASES) & set(RELEASE_SYNONYMS)) | (set(RELEASE_SYNONYMS) & set(MASKS)))
    if clash:
        raise ImportError(f"ta_opd.aliases: {clash} listed twice")
    for name, mask in SUITE_ALIASES.items():
        if name in MASKS and mask != name:
            raise ImportError(f"ta_opd.aliases: the mask name {name!r} cannot mean mask {mask!r}")


_check_table()


def known_names() -> list[str]:
    """Every name ``resolve_alias`` accepts: mask names, suite aliases, release synonyms."""
    return sorted(set(MASKS) | set(METHOD_ALIASES))


def budget_mask_choices() -> list[str]:
    """The values of ``--opd-budget-mask``: every mask name and every alias that sets no other flag.

    An alias with its own train.py flags (``sft_teacher``: the loss and the generate function) is a launcher
    method, not a mask: as a mask it would silently mean ``full``.
    """
    return [*MASKS, *(a for a in METHOD_ALIASES if a not in METHOD_FLAGS and a not in MASKS)]


def method_flags(alias: str) -> tuple[str, ...]:
    """The extra train.py flags of a name (empty for every name but the launcher methods of METHOD_FLAGS)."""
    resolve_alias(alias)
    return METHOD_FLAGS.get(alias, ())


def resolve_alias(name: str) -> str:
    """Mask name for an alias or synonym; a mask name is passed through unchanged.

    Raises ValueError naming the value and listing the aliases and masks when it is neither.
    """
    if name in MASKS:
        return name
    if name in METHOD_ALIASES:
        return METHOD_ALIASES[name]
    raise ValueError(f"unknown method alias or mask {name!r}; aliases: {sorted(METHOD_ALIASES)}; masks: {list(MASKS)}")


# ---------------------------------------------------------------- METHOD_LIST / RUN_LIST


@dataclass(frozen=True)
class Entry:
    """One ``name:ratio:idx`` entry, checked: ``ratio`` keeps the text typed (run names use it), 1.0 for full."""

    idx: str  # decimal, leading zeros removed
    name: str
    mask: str
    ratio: str
    flags: tuple[str, ...]

    def line(self) -> str:
        return " ".join((self.idx, self.name, self.mask, self.ratio, *self.flags))


class EntryListError(ValueError):
    """Every problem of a METHOD_LIST / RUN_LIST (``errors``), found before anything runs."""

    def __init__(self, what: str, errors: list[str]) -> None:
        super().__init__("\n".join(f"{what}: {e}" for e in errors))
        self.errors = errors


def split_entries(text: str) -> list[str]:
    """Entries separated by commas, spaces, tabs or newlines (as the release's ``${LIST//,/ }``)."""
    return [e for e in re.split(r"[,\s]+", text) if e]


def parse_entries(text: str, what: str = "METHOD_LIST") -> list[Entry]:
    """Check every ``name:ratio:idx`` entry of ``text`` (all errors at once, ``EntryListError``).

    ``name``: a mask, alias or synonym of this table; ``ratio``: the budget ρ, checked by
    ``SelectionConfig.validate`` (> 0 with a mask; names meaning ``full`` are forced to 1.0);
    ``idx``: an integer in [0, 2^32 − 1], unique in the list: it names the run (the seed is not changed by it).
    """
    entries = split_entries(text)
    if not entries:
        raise EntryListError(what, [f"{what} is empty; expected entries like '{ENTRY_EXAMPLE}'"])
    errors: list[str] = []
    out: list[Entry] = []
    seen: set[str] = set()
    for raw in entries:
        m = _ENTRY.match(raw)
        if m is None:
            errors.append(f"malformed entry '{raw}' (expected alias:ratio:idx, e.g. teachability:0.10:20)")
            continue
        name, ratio, idx_text = m.groups()
        idx = idx_text.lstrip("0") or "0"
        if len(idx) > len(str(IDX_MAX)) or int(idx) > IDX_MAX:
            errors.append(f"entry '{raw}': idx {idx_text} is out of range (expected an integer in [0, {IDX_MAX}])")
            continue
        try:
            mask = resolve_alias(name)
        except ValueError:
            errors.append(f"entry '{raw}': unknown alias '{name}' (known: {' '.join(known_names())})")
            continue
        if mask == "full":
            ratio = "1.0"  # full OPD keeps every token whatever ratio the entry names
        else:
            try:
                SelectionConfig(mask=mask, ratio=float(ratio)).validate()
            except ValueError as e:
                errors.append(f"entry '{raw}': {e}")
                continue
        if idx in seen:
            errors.append(f"entry '{raw}': duplicate idx {idx} (each entry needs its own idx: it names the run)")
            continue
        seen.add(idx)
        out.append(Entry(idx, name, mask, ratio, METHOD_FLAGS.get(name, ())))
    if errors:
        raise EntryListError(what, errors)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ta_opd.aliases", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command, what in (("parse-method-list", "METHOD_LIST"), ("parse-run-list", "RUN_LIST")):
        sp = sub.add_parser(command, help=f"check a {what} and print 'idx name mask ratio [flag ...]' per entry")
        sp.add_argument("text", help="entries name:ratio:idx separated by commas, spaces or newlines")
        sp.set_defaults(what=what)
    sub.add_parser("table", help="print 'name mask [flag ...]' for every mask, alias and synonym")
    a = p.parse_args(argv)
    if a.command == "table":
        for name in (*MASKS, *(n for n in METHOD_ALIASES if n not in MASKS)):
            print(" ".join((name, resolve_alias(name), *METHOD_FLAGS.get(name, ()))))
        return 0
    try:
        entries = parse_entries(a.text, a.what)
    except EntryListError as e:
        for err in e.errors:
            print(f"error: {a.what}: {err}" if not err.startswith(a.what) else f"error: {err}", file=sys.stderr)
        return 2
    for entry in entries:
        print(entry.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
