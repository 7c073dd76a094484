"""train.py flags of the original TA-OPD release and of upstream slime that the rest of the parser lacks.

Implemented here (they mean something on a CPU too):

* ``--save-debug-rollout-data PATH`` — every rollout step's samples (after generation and teacher scoring,
  before selection) saved to ``PATH`` with ``{rollout_id}`` filled in (upstream's format: a ``torch.save`` of
  ``{"rollout_id": i, "samples": [Sample.to_dict(), ...]}``).
* ``--load-debug-rollout-data PATH`` — the samples of each step read back from such files instead of
  generating (no engine is asked; the teacher's answers come from the file); the selection and the training
  step run as usual.
* ``--debug-rollout-only`` — rollouts (and their token bank / saved samples) only: no training step, no
  checkpoint, no weight push.
* ``--opd-token-bank-layout native|release`` — the token bank's file names and columns (``ta_opd.token_bank``).
* ``--allow-tokenizer-mismatch`` — a teacher whose tokenizer differs from the student's only in added or
  special tokens is accepted once pre-flight has proved every shared id decodes to the same string
  (``slime.preflight.tokenizer_checks``); disjoint vocabularies are still refused.

Accepted and ignored, with one warning line each (Megatron / SGLang / Ray tuning that has no meaning in this
stack's trainers, or that its own flags already cover): ``IGNORED_FLAGS``.

A flag that another part of the parser already defines is not added again (that definition wins).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# flag -> (argparse kind: "switch" | "value", why it is ignored here)
IGNORED_FLAGS: dict[str, tuple[str, str]] = {
    "--optimizer": ("value", "the trainers use Adam(W) (--adam-beta1/--adam-beta2/--weight-decay)"),
    "--sglang-mem-fraction-static": (
        "value",
        "embedded engines allocate on demand; real SGLang engines use --sglang-server-args",
    ),
    "--sglang-cuda-graph-max-bs": ("value", "CUDA graphs are SGLang-server tuning (--sglang-server-args)"),
    "--sglang-enable-metrics": ("switch", "SGLang's Prometheus metrics are server tuning"),
    "--balance-data": ("switch", "micro-batches are already balanced by token count"),
    "--qkv-format": ("value", "Megatron attention layout tuning"),
    "--attention-backend": ("value", "Megatron/TE attention kernel choice"),
    "--attention-dropout": ("value", "dropout is off in distillation"),
    "--hidden-dropout": ("value", "dropout is off in distillation"),
    "--accumulate-allreduce-grads-in-fp32": ("switch", "gradients are reduced in fp32 already"),
    "--attention-softmax-in-fp32": ("switch", "the attention softmax runs in fp32 already"),
    "--no-rope-fusion": ("switch", "Megatron kernel fusion switch"),
    "--no-masked-softmax-fusion": ("switch", "Megatron kernel fusion switch"),
    "--no-persist-layer-norm": ("switch", "Megatron kernel fusion switch"),
    "--no-gradient-accumulation-fusion": ("switch", "Megatron kernel fusion switch"),
    "--expert-model-parallel-size": ("value", "no mixture-of-experts models here"),
    "--expert-tensor-parallel-size": ("value", "no mixture-of-experts models here"),
    "--wandb-key": ("value", "metrics go to metrics.jsonl / TensorBoard; never pass keys on a command line"),
}


class _Ignored(argparse.Action):
    """Stores the value (so a config can still read it) and logs one line saying the flag has no effect."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        why = (self.help or "").removeprefix("Accepted, ignored: ").rstrip(".")
        logger.warning("%s is accepted for compatibility and ignored here: %s", option_string, why)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_compat_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the release / upstream-slime flags above to ``parser`` (those it does not define already)."""
    have = set(parser._option_string_actions)
    g = parser.add_argument_group("release / upstream slime compatibility")

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            g.add_argument(flag, **kw)

    add(
        "--save-debug-rollout-data",
        type=str,
        default=None,
        help="Save each step's samples to this path ({rollout_id} filled in; torch.save of Sample dicts).",
    )
    add(
        "--load-debug-rollout-data",
        type=str,
        default=None,
        help="Read each step's samples from this path ({rollout_id} filled in) instead of generating.",
    )
    add(
        "--debug-rollout-only",
        action="store_true",
        default=False,
        help="Rollouts only (token bank, saved samples): no training step, checkpoint or weight push.",
    )
    add(
        "--opd-token-bank-layout",
        type=str,
        default="native",
        choices=["native", "release"],
        help="Token bank file names and columns: native (step*_rank*.*) or the original release's "
        "(rollout_NNNNNN.csv or .jsonl, summary.csv, config.json).",
    )
    add("--allow-tokenizer-mismatch", action="store_true", default=False,
        help="Accept a teacher whose tokenizer differs from the student's only in added/special tokens "
        "(every shared id must decode to the same string; pre-flight reports the differing ids).")  # fmt: skip
    for flag, (kind, why) in IGNORED_FLAGS.items():
        if kind == "switch":
            add(flag, action=_Ignored, nargs=0, default=False, help=f"Accepted, ignored: {why}.")
        else:
            add(flag, action=_Ignored, type=str, default=None, help=f"Accepted, ignored: {why}.")


def debug_rollout_path(template: str, rollout_id: int) -> Path:
    """``template`` with ``{rollout_id}`` filled in (a template without it names one file per run)."""
    try:
        return Path(template.format(rollout_id=rollout_id))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"debug rollout path {template!r}: only {{rollout_id}} may appear in braces ({exc})"
        ) from None


def save_debug_rollout(args: Any, rollout_id: int, samples: list[Any]) -> Path | None:
    """``--save-debug-rollout-data``: this step's samples to disk (atomically); the path, or None when off."""
    template = getattr(args, "save_debug_rollout_data", None)
    if not template:
        return None
    import torch

    path = debug_rollout_path(template, rollout_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"rollout_id": int(rollout_id), "samples": [s.to_dict() for s in samples]}, tmp)
    os.replace(tmp, path)
    return path


def load_debug_rollout(args: Any, rollout_id: int) -> list[Any] | None:
    """``--load-debug-rollout-data``: this step's samples from disk, or None when the flag is off.

    Read with ``weights_only=True``: a file holding anything but plain data (code) is refused, never run.
    """
    template = getattr(args, "load_debug_rollout_data", None)
    if not template:
        return None
    import torch

    from slime.utils.types import Sample

    path = debug_rollout_path(template, rollout_id)
    if not path.is_file():
        raise FileNotFoundError(f"--load-debug-rollout-data: no saved rollout for step {rollout_id} at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / format errors do not name the file
        why = f"{type(exc).__name__}: {exc}"
        raise ValueError(f"--load-debug-rollout-data: {path} is not a saved rollout ({why})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or not data["samples"]:
        raise ValueError(f"--load-debug-rollout-data: {path} holds no samples (expected {{'samples': [...]}})")
    return [Sample.from_dict(s) for s in data["samples"]]
