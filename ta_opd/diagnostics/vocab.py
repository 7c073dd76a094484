"""Two tokenizers' vocabularies compared id by id: the check behind ``--allow-tokenizer-mismatch``.

OPD and the fixed-context diagnostic compare token *ids*. Two tokenizers that agree on every regular token and
differ only in added/special tokens (a DeepSeek-R1-Distill-Qwen teacher with a Qwen2.5 student: the same 151,643
byte-level tokens, other ``<|...|>`` tokens after them) can still be compared on the ids they share. Anything
else — a regular token with another id, an id that decodes to another string below the added tokens, or
vocabularies that share nothing — cannot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class VocabComparison:
    """What differs between a student's and a teacher's vocabulary (``token → id`` maps)."""

    shared_ids: int  # ids 0 .. shared_ids-1 decode to the same string on both sides
    student_size: int
    teacher_size: int
    differing: list[tuple[int, str | None, str | None]] = field(default_factory=list)  # (id, student, teacher)
    regular_differing: list[tuple[int, str | None, str | None]] = field(default_factory=list)  # not added/special

    @property
    def identical(self) -> bool:
        return not self.differing and self.student_size == self.teacher_size

    @property
    def compatible(self) -> bool:
        """Only added/special tokens differ and the two share at least one regular id."""
        return self.shared_ids > 0 and not self.regular_differing

    def reason(self) -> str:
        """Why the two are not compatible (empty when they are)."""
        if self.shared_ids == 0:
            return "the vocabularies share no id with the same string (disjoint tokenizers)"
        if self.regular_differing:
            shown = ", ".join(f"id {i}: student {s!r} / teacher {t!r}" for i, s, t in self.regular_differing[:5])
            return f"{len(self.regular_differing)} regular (not added/special) token(s) differ: {shown}"
        return ""

    def describe(self) -> str:
        """The differing ids, for a report line."""
        shown = ", ".join(f"id {i}: student {s!r} / teacher {t!r}" for i, s, t in self.differing[:8])
        more = f" (+{len(self.differing) - 8} more)" if len(self.differing) > 8 else ""
        return f"{len(self.differing)} id(s) differ from id {self.shared_ids} on: {shown}{more}"


def compare_vocabularies(
    student: Mapping[str, int],
    teacher: Mapping[str, int],
    student_added: Iterable[str] = (),
    teacher_added: Iterable[str] = (),
) -> VocabComparison:
    """Compare two ``token → id`` maps; ``*_added``: the added/special token strings of each side."""
    s_inv = {int(i): t for t, i in student.items()}
    t_inv = {int(i): t for t, i in teacher.items()}
    added = set(student_added) | set(teacher_added)
    ids = sorted(set(s_inv) | set(t_inv))
    differing = [(i, s_inv.get(i), t_inv.get(i)) for i in ids if s_inv.get(i) != t_inv.get(i)]
    shared = differing[0][0] if differing else (ids[-1] + 1 if ids else 0)
    # an id at or past the first difference is only comparable when it is an added/special token on each side
    regular = [
        (i, s, t)
        for i, s, t in ((i, s_inv.get(i), t_inv.get(i)) for i in ids if i >= shared)
        if (s is not None and s not in added) or (t is not None and t not in added)
    ]
    regular = [row for row in regular if row[1] != row[2]]
    return VocabComparison(shared, len(student), len(teacher), differing, regular)


def added_tokens(tokenizer: object) -> set[str]:
    """The added and special token strings of a Hugging Face tokenizer."""
    out = {str(getattr(a, "content", a)) for a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    return out | {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}


def shared_vocabulary(
    student: Mapping[str, int], teacher: Mapping[str, int], added: Iterable[str], names: tuple[str, str] = ("", "")
) -> int:
    """The number of leading ids both vocabularies share; ValueError (with the reason) when they are not
    compatible. ``added``: the added/special token strings of both tokenizers."""
    added = set(added)
    cmp = compare_vocabularies(student, teacher, added, added)
    if not cmp.compatible:
        raise ValueError(f"tokenizers {names[0]!r} and {names[1]!r} cannot be compared by id: {cmp.reason()}")
    return cmp.shared_ids
