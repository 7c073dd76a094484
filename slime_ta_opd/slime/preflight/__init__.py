"""Fail-closed pre-flight checks of a student/teacher pair before OPD training (docs/preflight.md).

Each check returns a ``CheckResult`` (PASS / WARN / FAIL / SKIP with the measured number). A FAIL
stops the run unless the user downgrades that check by name (``--preflight-warn NAME``). The checks
are pure functions (``tokenizer_checks``: two tokenizers; ``answer_checks``: SGLang-shaped answer
lists), so the standalone tool, ``train.py`` and tests share them. ``probe.run_checks`` gets real
rollouts from the student server and teacher scores through the OPD module itself, then runs them;
``run_preflight(args, rollout_manager)`` is the ``train.py`` hook; ``cli`` is ``opd-preflight``.

Checks, in order: ``tokenizer``, ``eos_pad``, ``padded_vocab``, ``chat_template``,
``position_alignment``, ``determinism``, ``topk``, ``teacher_temperature``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from slime.preflight.answer_checks import (
    check_determinism,
    check_position_alignment,
    check_teacher_temperature,
    check_topk,
)
from slime.preflight.report import (
    CHECK_NAMES,
    DETERMINISM_ABS_TOL,
    DETERMINISM_REL_TOL,
    FAIL,
    PASS,
    POSITION_TOL,
    SAMPLED_KL_TOL,
    SKIP,
    TEMPERATURE_REL_TOL,
    WARN,
    CheckResult,
    PreflightError,
    PreflightReport,
    apply_downgrades,
    validate_check_names,
)
from slime.preflight.tokenizer_checks import (
    DEFAULT_CONVERSATIONS,
    check_chat_template,
    check_eos_pad,
    check_padded_vocab,
    check_tokenizer,
    render_chat,
)

__all__ = [
    "CHECK_NAMES",
    "DEFAULT_CONVERSATIONS",
    "DETERMINISM_ABS_TOL",
    "DETERMINISM_REL_TOL",
    "FAIL",
    "PASS",
    "POSITION_TOL",
    "SAMPLED_KL_TOL",
    "SKIP",
    "TEMPERATURE_REL_TOL",
    "WARN",
    "CheckResult",
    "PreflightError",
    "PreflightReport",
    "apply_downgrades",
    "check_chat_template",
    "check_determinism",
    "check_eos_pad",
    "check_padded_vocab",
    "check_position_alignment",
    "check_teacher_temperature",
    "check_tokenizer",
    "check_topk",
    "preflight_applies",
    "render_chat",
    "run_preflight",
    "validate_check_names",
]

logger = logging.getLogger(__name__)


def preflight_applies(args: Any) -> bool:
    """Pre-flight needs a teacher server: ``--use-opd --opd-type sglang``."""
    return bool(getattr(args, "use_opd", False)) and getattr(args, "opd_type", None) == "sglang"


def run_preflight(args: Any, rollout_manager: Any) -> PreflightReport:
    """Run every check on the RolloutManager's student router and teacher; raise ``PreflightError`` on FAIL.

    Called by ``train.py`` before the first rollout (unless ``--skip-preflight``). The student and
    teacher tokenizers come from ``--hf-checkpoint`` and ``--opd-teacher-hf-checkpoint`` (else the
    teacher server's ``/get_model_info`` path, when it exists on this machine).
    """
    import ray

    from slime.preflight.probe import PreflightOptions, PreflightTarget, run_checks

    if not preflight_applies(args):
        logger.info("pre-flight: skipped (needs --use-opd --opd-type sglang: a teacher server to check)")
        return PreflightReport([])
    info = ray.get(rollout_manager.server_info.remote())
    rm_url = info.get("rm_url") or getattr(args, "rm_url", None)
    if not rm_url:
        raise ValueError("pre-flight: the rollout manager reports no teacher URL (rm_url)")
    run_args = copy.copy(args)
    run_args.rm_url = rm_url
    run_args.sglang_router_ip, run_args.sglang_router_port = (
        info.get("sglang_router_ip"),
        info.get("sglang_router_port"),
    )
    target = PreflightTarget(
        student_url=info["router_url"],
        teacher_urls=[rm_url.rsplit("/generate", 1)[0]],
        student_path=getattr(args, "hf_checkpoint", None),
        teacher_path=getattr(args, "opd_teacher_hf_checkpoint", None),
        api_key=getattr(args, "api_key", None),
    )
    options = PreflightOptions(allow_tokenizer_mismatch=bool(getattr(args, "allow_tokenizer_mismatch", False)))
    report = run_checks(run_args, target, warn=getattr(args, "preflight_warn", None) or (), options=options)
    for line in report.format().splitlines():
        (logger.info if report.ok else logger.error)("%s", line)
    if not report.ok:
        raise PreflightError(report)
    return report
