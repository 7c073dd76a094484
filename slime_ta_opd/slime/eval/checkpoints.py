"""The checkpoint a run is evaluated at, as a plain HF directory ``<run>_merged`` with a ``.ready_for_eval`` sentinel.

Usage::

    prepare_eval_checkpoint outputs/self_distillation/qwen3-1.7b_pwopsd_s0                 # checkpoint 100
    prepare_eval_checkpoint RUN --checkpoint latest
    prepare_eval_checkpoint RUN --checkpoint 50 --out eval_models/run_step50 --force
    prepare_eval_checkpoint RUN --base-model /models/Qwen3-1.7B      # a LoRA adapter whose config names no base

The PW-OPSD release trains with periodic saves (every 25 steps) and evaluates checkpoint 100. A run directory
holds checkpoints in one of two layouts:

* the stack's trainer (``--save RUN/checkpoints``): ``RUN/checkpoints/iter_<rollout id, 7 digits>/model`` is
  already a full HF checkpoint (a LoRA student is saved with its adapter merged), copied as it is; rollout ids
  count from 0, so checkpoint 100 (after 100 steps) is ``iter_0000099``;
* a peft/TRL run: ``RUN/checkpoint-<step>/`` with ``adapter_config.json``: the adapter is merged into its base
  model (``base_model_name_or_path`` of the adapter config, or ``--base-model``) with peft's ``merge_and_unload``.

The result is written to a temporary directory and renamed to ``<run>_merged`` (or ``--out``), then
``.ready_for_eval`` (JSON: source, step, time) is written last, so an evaluation queue that waits for the sentinel
never reads a half-written model. An existing ready directory is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from slime.eval.cli import run_printing_path
from ta_opd.atomic_io import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

READY_SENTINEL = ".ready_for_eval"
RELEASE_CHECKPOINT = 100  # the step the PW-OPSD release evaluates
_ITER = re.compile(r"^iter_(\d+)$")
_PEFT = re.compile(r"^checkpoint-(\d+)$")


def available_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{step: directory}`` of every checkpoint of ``run_dir`` (both layouts; a step in both is an error)."""
    found: dict[int, Path] = {}
    candidates = [(p, _ITER) for p in (run_dir / "checkpoints").glob("iter_*")]
    candidates += [(p, _PEFT) for p in run_dir.glob("checkpoint-*")]
    for path, pattern in candidates:
        m = pattern.match(path.name)
        if not m or not path.is_dir():
            continue
        # iter_<r> is saved after rollout r (counted from 0): r + 1 steps done; checkpoint-<n> is after n steps
        step = int(m.group(1)) + 1 if pattern is _ITER else int(m.group(1))
        source = path / "model" if pattern is _ITER else path
        if step in found:
            raise ValueError(f"{run_dir}: step {step} is saved twice ({found[step]} and {source})")
        found[step] = source
    return found


def choose_checkpoint(run_dir: Path, checkpoint: str | int = RELEASE_CHECKPOINT) -> tuple[int, Path]:
    """(step, directory) of ``checkpoint`` (a step, or ``latest``) in ``run_dir``; a clear error when absent."""
    found = available_checkpoints(run_dir)
    if not found:
        raise ValueError(
            f"{run_dir} holds no checkpoint (expected checkpoints/iter_<step>/model or checkpoint-<step>/); "
            "train with periodic saves (--save RUN/checkpoints --save-interval 25)"
        )
    if checkpoint == "latest":
        step = max(found)
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise ValueError(f"checkpoint {checkpoint!r}: expected a step number or 'latest'") from None
        if step not in found:
            raise ValueError(f"{run_dir} has no checkpoint at step {step}; it has steps {sorted(found)}")
    return step, found[step]


def merged_dir(run_dir: Path) -> Path:
    """``<run>_merged`` beside the run directory (the release's name)."""
    return run_dir.parent / f"{run_dir.name}_merged"


def is_ready(model_dir: Path) -> bool:
    return (model_dir / READY_SENTINEL).is_file()


def _merge_adapter(adapter_dir: Path, base_model: str | None, out: Path) -> None:
    """Write base + LoRA (peft ``merge_and_unload``) as a HF checkpoint with the tokenizer into ``out``."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PeftConfig.from_pretrained(str(adapter_dir))
    base = base_model or config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(
            f"{adapter_dir}: the adapter's base model {base!r} is not a local directory; pass --base-model DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(str(out))


def prepare(
    run_dir: str | os.PathLike,
    checkpoint: str | int = RELEASE_CHECKPOINT,
    out: str | os.PathLike | None = None,
    base_model: str | None = None,
    force: bool = False,
) -> Path:
    """Make ``<run>_merged`` (or ``out``) from the chosen checkpoint and write its ``.ready_for_eval``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} does not exist")
    target = Path(out) if out is not None else merged_dir(run)
    step, source = choose_checkpoint(run, checkpoint)
    if target.exists():
        if is_ready(target) and not force:
            logger.info("%s is ready already (--force rebuilds it)", target)
            return target
        if not force:
            raise ValueError(f"{target} exists without {READY_SENTINEL} (an interrupted merge?); --force replaces it")
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        if (source / "adapter_config.json").is_file():
            _merge_adapter(source, base_model, tmp)
            how = "lora-merged"
        else:
            if not (source / "config.json").is_file():
                raise ValueError(f"{source} is neither a HF checkpoint (config.json) nor a peft adapter")
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            how = "copied"
    record = {
        "run": str(run.resolve()),
        "source": str(source.resolve()),
        "step": step,
        "how": how,
        "time": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    atomic_write_text(target / READY_SENTINEL, json.dumps(record, indent=2) + "\n")
    logger.info("%s: step %d %s into %s", run, step, how, target)
    return target


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_eval_checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="the training run's directory")
    p.add_argument(
        "--checkpoint", default=str(RELEASE_CHECKPOINT), help="step to evaluate, or 'latest' (default: 100)"
    )
    p.add_argument("--out", default=None, help="output directory (default: <run>_merged)")
    p.add_argument("--base-model", default=None, help="base model directory of a LoRA adapter")
    p.add_argument("--force", action="store_true", help="rebuild an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    return run_printing_path(lambda a: prepare(a.run_dir, a.checkpoint, a.out, a.base_model, a.force), args)


if __name__ == "__main__":
    sys.exit(main())
