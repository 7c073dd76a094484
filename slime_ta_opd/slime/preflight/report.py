"""Pre-flight results: statuses, check names, default tolerances, the report and downgrades (docs/preflight.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

CHECK_NAMES = (
    "tokenizer",
    "eos_pad",
    "padded_vocab",
    "chat_template",
    "position_alignment",
    "determinism",
    "topk",
    "teacher_temperature",
)

# Defaults of the numeric tolerances (the CLI exposes them; train.py uses these).
POSITION_TOL = 0.05  # mean |log p_copy - log p_rollout| (nats) at the right position; bf16 engines reach ~1e-2
SAMPLED_KL_TOL = 0.01  # |mean(log p_S - log p_T)| with teacher = student copy
DETERMINISM_REL_TOL = 0.05  # repeat spread allowed, as a fraction of the mean OPD signal |log p_T - log p_S|
DETERMINISM_ABS_TOL = 1e-3  # floor of that tolerance (nats), for pairs whose signal is tiny
TEMPERATURE_REL_TOL = 0.05  # measured effective teacher temperature vs requested
TOPK_SORT_TOL = 1e-5
TOPK_MATCH_TOL = 1e-4  # the sampled token's log-prob vs its entry in the same position's top-K list


@dataclass
class CheckResult:
    """One check's outcome: ``status`` with the measured number(s) in ``measured`` and the why in ``detail``."""

    name: str
    status: str
    measured: str
    detail: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.status:<4} {self.name:<19} {self.measured}"
        if self.detail:
            text += "\n" + "\n".join("     " + row for row in self.detail.splitlines())
        return text


@dataclass
class PreflightReport:
    """All check results of one pre-flight; ``ok`` is False when any check FAILs (after downgrades)."""

    results: list[CheckResult]
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == FAIL]

    def get(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check {name!r} in this report; checks: {[r.name for r in self.results]}")

    def format(self) -> str:
        head = f"OPD pre-flight ({self.elapsed_s:.1f} s): " + (
            "all checks passed" if self.ok else f"FAILED: {', '.join(self.failed)}"
        )
        tail = ""
        if not self.ok:
            tail = (
                "\nThe run is stopped. Fix the pair, or downgrade a check you accept with "
                + " ".join(f"--preflight-warn {n}" for n in self.failed)
                + " (or --skip-preflight to skip all; see docs/preflight.md)."
            )
        return "\n".join([head] + [r.line() for r in self.results]) + tail

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "elapsed_s": self.elapsed_s,
            "checks": [
                {"name": r.name, "status": r.status, "measured": r.measured, "detail": r.detail, "values": r.values}
                for r in self.results
            ],
        }


class PreflightError(RuntimeError):
    """Raised when a pre-flight check FAILs; ``report`` holds every result."""

    def __init__(self, report: PreflightReport):
        super().__init__(report.format())
        self.report = report


def validate_check_names(names: Iterable[str]) -> list[str]:
    names = list(names or [])
    unknown = sorted(set(names) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown pre-flight check name(s) {unknown}; expected some of {list(CHECK_NAMES)}")
    return names


def apply_downgrades(results: Sequence[CheckResult], warn: Iterable[str]) -> list[CheckResult]:
    """FAIL → WARN for every check named in ``warn`` (``--preflight-warn NAME``), saying so."""
    warn = set(validate_check_names(warn))
    out = []
    for r in results:
        if r.status == FAIL and r.name in warn:
            r = replace(
                r, status=WARN, detail=(r.detail + "\n" if r.detail else "") + "(FAIL downgraded by --preflight-warn)"
            )
        out.append(r)
    return out


def fmt_value(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
