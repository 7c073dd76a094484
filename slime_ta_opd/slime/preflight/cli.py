"""``opd-preflight``: check a student/teacher pair before an OPD run (docs/preflight.md).

Usage:
    # from checkpoints: starts embedded SGLang-compatible servers on 127.0.0.1, stops them after
    opd-preflight --student /ckpt/Qwen3-1.7B --teacher /ckpt/Qwen3-4B
    # against running servers (SGLang or the embedded server); paths give the tokenizers
    opd-preflight --student-url http://127.0.0.1:30000 --teacher-url http://127.0.0.1:30001 \\
        --student /ckpt/Qwen3-1.7B --teacher /ckpt/Qwen3-4B --api-key KEY
    # every teacher replica is scored and compared (determinism)
    opd-preflight --student S --teacher T --teacher-url http://t0:30001 --teacher-url http://t1:30001
    # accept a known failure as a warning, by check name; temperature-scaled teacher scoring
    opd-preflight --student S --teacher T --warn chat_template --opd-teacher-temperature 0.7

Exit status: 0 all checks pass (or warn), 1 a check FAILs, 2 usage error. ``--json FILE`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from slime import preflight as pf
from slime.preflight.probe import PreflightOptions, PreflightTarget, run_checks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd-preflight",
        description="Fail-closed checks of an OPD student/teacher pair (docs/preflight.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="checks: " + ", ".join(pf.CHECK_NAMES),
    )
    p.add_argument(
        "--student", help="Student HF checkpoint directory (tokenizer; a server is started without --student-url)."
    )
    p.add_argument(
        "--teacher", help="Teacher HF checkpoint directory (tokenizer; a server is started without --teacher-url)."
    )
    p.add_argument("--student-url", help="Running student server (SGLang /generate API), e.g. http://127.0.0.1:30000.")
    p.add_argument("--teacher-url", action="append", default=[], help="Running teacher server; repeat for replicas.")
    p.add_argument(
        "--teacher-replicas", type=int, default=1, help="Teacher servers to start from --teacher (default 1)."
    )
    p.add_argument("--api-key", default=None, help="Authorization: Bearer KEY for the servers.")
    p.add_argument("--device", default=None, help="Device of started servers (cpu | cuda; default: the server's).")
    p.add_argument("--warn", "--preflight-warn", dest="warn", action="append", default=[], choices=pf.CHECK_NAMES,
                   metavar="CHECK", help="Downgrade this check's FAIL to WARN (repeat).")  # fmt: skip
    p.add_argument("--opd-topk-metrics-k", type=int, default=16, help="K of the top-K lists (the run's value).")
    p.add_argument("--opd-teacher-temperature", type=float, default=1.0, help="The run's teacher scoring temperature.")
    p.add_argument("--rollout-temperature", type=float, default=1.0, help="The run's sampling temperature.")
    p.add_argument("--num-rollouts", type=int, default=4, help="Student rollouts to check (default 4).")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Tokens per rollout (default 32).")
    p.add_argument("--repeats", type=int, default=2, help="Scoring requests per teacher URL (default 2).")
    p.add_argument("--prompt-data", default=None, help="JSONL of prompts (first --num-rollouts rows).")
    p.add_argument("--input-key", default="prompt", help="Prompt key in --prompt-data (string or messages).")
    p.add_argument(
        "--position-tol", type=float, default=pf.POSITION_TOL, help="Mean |Δ log p| allowed, teacher = student."
    )
    p.add_argument("--kl-tol", type=float, default=pf.SAMPLED_KL_TOL, help="|sampled KL| allowed, teacher = student.")
    p.add_argument(
        "--determinism-rel-tol", type=float, default=pf.DETERMINISM_REL_TOL, help="Spread / OPD signal allowed."
    )
    p.add_argument("--determinism-abs-tol", type=float, default=pf.DETERMINISM_ABS_TOL, help="Spread floor (nats).")
    p.add_argument("--json", default=None, help="Write the report as JSON to this file.")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="Accept tokenizers differing only in added/special tokens (a WARN).")  # fmt: skip
    return p


def _prompts(path: str | None, key: str, n: int) -> list[Any] | None:
    if not path:
        return None
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                value = json.loads(line).get(key)
                if isinstance(value, str):
                    rows.append([{"role": "user", "content": value}])
                elif isinstance(value, list):
                    rows.append(value)
            if len(rows) >= n:
                break
    if not rows:
        raise ValueError(f"--prompt-data {path}: no prompt under key {key!r}")
    return rows


def _run_args(ns: argparse.Namespace) -> argparse.Namespace:
    """The run's flag namespace (parser defaults) with the values that shape teacher scoring."""
    from slime.utils.arguments import get_parser

    args = get_parser().parse_args([])
    args.use_opd, args.opd_type = True, "sglang"
    args.opd_topk_metrics_k = ns.opd_topk_metrics_k
    args.opd_teacher_temperature = ns.opd_teacher_temperature
    args.rollout_temperature = ns.rollout_temperature
    args.api_key = ns.api_key
    args.hf_checkpoint = ns.student
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not (ns.student or ns.student_url):
        parser.error("give --student PATH or --student-url URL")
    if not (ns.teacher or ns.teacher_url):
        parser.error("give --teacher PATH or --teacher-url URL")
    if ns.opd_teacher_temperature <= 0 or ns.rollout_temperature <= 0:
        parser.error("temperatures must be > 0")
    options = PreflightOptions(
        num_rollouts=ns.num_rollouts,
        max_new_tokens=ns.max_new_tokens,
        repeats=ns.repeats,
        prompts=_prompts(ns.prompt_data, ns.input_key, ns.num_rollouts),
        position_tol=ns.position_tol,
        kl_tol=ns.kl_tol,
        determinism_rel_tol=ns.determinism_rel_tol,
        determinism_abs_tol=ns.determinism_abs_tol,
        allow_tokenizer_mismatch=ns.allow_tokenizer_mismatch,
    )
    with ExitStack() as stack:
        student_url = ns.student_url
        teacher_urls = list(ns.teacher_url)
        if not student_url or not teacher_urls:
            from slime.backends.embedded_sglang.launch import launch_server

            extra = ("--device", ns.device) if ns.device else ()

            def start(path: str) -> str:
                handle = launch_server(path, api_key=ns.api_key, extra_args=extra)
                stack.callback(handle.stop)
                print(f"started an embedded server for {path} at {handle.url} (pid {handle.pid})", file=sys.stderr)
                return handle.url

            if not student_url:
                student_url = start(ns.student)
            if not teacher_urls:
                teacher_urls = [start(ns.teacher) for _ in range(max(1, ns.teacher_replicas))]
        report = run_checks(
            _run_args(ns),
            PreflightTarget(student_url, teacher_urls, ns.student, ns.teacher, ns.api_key),
            warn=ns.warn,
            options=options,
        )
    print(report.format())
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
