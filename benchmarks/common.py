"""Pieces the benchmark scripts share: the spread of repeated timings, the rollout batch a trainer takes,
the shared command-line options and the result output.

Each ``bench_*.py`` puts this folder on ``sys.path`` and imports ``common``, so it works both when run as a
script and when ``run_all.py`` or the smoke tests load it by file path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spread(values: list[float]) -> dict:
    """Median, min, max and all of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def reference():
    """The per-token reference implementation of the selectors (tests/ta_opd/reference.py)."""
    sys.path.insert(0, str(ROOT / "tests" / "ta_opd"))
    import reference  # noqa: PLC0415

    return reference


def train_data(batch) -> dict:
    """A scored rollout batch (``Sample`` objects) as the rollout-data dict a trainer's ``train`` takes."""
    return {
        "tokens": [list(s.tokens) for s in batch],
        "response_lengths": [s.response_length for s in batch],
        "prompt_lengths": [len(s.tokens) - s.response_length for s in batch],
        "loss_masks": [list(s.loss_mask) for s in batch],
        "rewards": [0.0] * len(batch),
        "rollout_log_probs": [list(s.rollout_log_probs) for s in batch],
        "teacher_log_probs": [s.teacher_log_probs.tolist() for s in batch],
    }


def scoring_requests(batch: list[tuple[list[int], list[int]]], top_k: int, **per_request) -> list:
    """Teacher-scoring requests (no new tokens, log-probs of the response) of ``(prompt, response)`` pairs.

    ``per_request``: more ``GenRequest`` fields, each a function of the request's index.
    """
    from slime.backends.embedded_sglang.engine import GenRequest  # noqa: PLC0415

    return [
        GenRequest(
            rid=str(i),
            input_ids=prompt + response,
            max_new_tokens=0,
            return_logprob=True,
            logprob_start_len=len(prompt) - 1,
            top_logprobs_num=top_k,
            **{name: field(i) for name, field in per_request.items()},
        )
        for i, (prompt, response) in enumerate(batch)
    ]


def parser(doc: str) -> argparse.ArgumentParser:
    """A command line whose ``--help`` shows the module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def met(ok: bool) -> str:
    """A target's verdict in a table."""
    return "MET" if ok else "NOT MET"


def add_run_options(parser: argparse.ArgumentParser, quick_kwargs: dict) -> None:
    """``--threads``, ``--quick`` (the module's ``QUICK_KWARGS``) and ``--out``."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {quick_kwargs}")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def emit(text: str, res: dict, out: str | None, indent: int = 1) -> None:
    """Print ``text`` and, with ``out``, write ``res`` there as JSON (atomically)."""
    print(text)
    if out:
        from ta_opd.atomic_io import atomic_write_text  # noqa: PLC0415

        atomic_write_text(out, json.dumps(res, indent=indent))
