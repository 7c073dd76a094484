"""Megatron checkpoints: ``torch_dist`` (Megatron-LM directory layout) and HF export.

``torch_dist`` layout (what Megatron-LM and upstream slime read with ``--load``)::

    DIR/latest_checkpointed_iteration.txt      # "N" (the newest complete iteration)
    DIR/iter_000000N/                          # megatron.core.dist_checkpointing files
        .metadata  __*_*.distcp  common.pt  metadata.json
    DIR/iter_000000N/slime_trainer_state.json  # rollout id, step, weight version (this stack)

``--load`` follows the rule of :mod:`slime.utils.run_dirs` (:func:`checkpoint_to_load`): a directory with the
tracker file, or one ``iter_*``/``release`` directory itself; never a silent fresh start when asked to load.

The sharded state is ``{"model": model.sharded_state_dict()}``: parallelism-agnostic, so a checkpoint
written at TP=1 by ``tools/convert_hf_to_torch_dist.py`` loads at any TP/PP. The tracker file is
written last, so a crash mid-save leaves the previous iteration as the newest.

HF export gathers TP shards (all-gather on the TP group) and PP stages (gather_object to rank 0),
then runs :func:`~slime.backends.megatron_utils.convert.megatron_to_hf`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slime.backends.megatron_utils.config import ModelShape
from slime.backends.megatron_utils.convert import from_te_names, megatron_to_hf, merge_tp, pp_merge
from slime.utils.run_dirs import resolve_load
from ta_opd.atomic_io import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "slime_trainer_state.json"


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named by the tracker file, or None for an empty/new directory."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f"{tracker}: expected an iteration number or 'release', got {text!r}") from e


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_torch_dist(
    model, root: str | os.PathLike, iteration: int, trainer_state: dict[str, Any] | None = None
) -> Path:
    """Collective: every rank calls it. Writes ``iter_{iteration}`` then updates the tracker (rank 0)."""
    from megatron.core import dist_checkpointing

    out = iter_dir(root, iteration)
    if _rank0():
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out))
    if dist.is_initialized():
        dist.barrier()
    if _rank0():
        (out / TRAINER_STATE).write_text(json.dumps({"iteration": iteration, **(trainer_state or {})}, indent=1))
        atomic_write_text(Path(root) / TRACKER, str(iteration))
    if dist.is_initialized():
        dist.barrier()
    return out


def checkpoint_dir(root: str | os.PathLike, iteration: int | None = None) -> Path:
    """The directory of ``iteration`` (default: the tracker's) under ``root``, ``release`` as Megatron-LM does."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {TRACKER} (not a torch_dist checkpoint directory)")
    path = iter_dir(root, iteration)
    if not path.is_dir() and (Path(root) / "release").is_dir():
        path = Path(root) / "release"
    if not path.is_dir():
        raise FileNotFoundError(f"{root}: {TRACKER} names iteration {iteration}, but {path} does not exist")
    return path


def checkpoint_to_load(load: str | os.PathLike | None, save: str | os.PathLike | None) -> Path | None:
    """The checkpoint directory ``--load`` names (rule in slime.utils.run_dirs), or None to start fresh."""
    target = resolve_load(load, save)
    if target is None:
        return None
    if target.kind == "latest":
        return checkpoint_dir(target.path)
    if not (target.path / ".metadata").is_file():
        raise FileNotFoundError(f"--load {str(target.path)!r} is not a torch_dist checkpoint (no .metadata)")
    return target.path


def _iteration_of(path: Path) -> int:
    m = re.fullmatch(r"iter_(\d+)", path.name)
    return int(m.group(1)) if m else 0


def load_torch_dist(model, root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """Collective: load the model weights of ``iteration`` (default: the tracker's); returns the trainer state."""
    return load_torch_dist_dir(model, checkpoint_dir(root, iteration))


def load_torch_dist_dir(model, path: str | os.PathLike) -> dict[str, Any]:
    """Collective: load the model weights of the checkpoint directory ``path``; returns the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    iteration = _iteration_of(path)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}")
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return {"iteration": iteration}
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_file}: unreadable trainer state ({e})") from e
    if not isinstance(state, dict) or not all(type(state.get(k, 0)) is int for k in ("iteration", "rollout_id")):
        raise ValueError(f"{state_file}: expected an object with integer 'iteration' and 'rollout_id', got {state!r}")
    return {"iteration": iteration, **state}


def gather_megatron_state_dict(model, shape: ModelShape) -> dict[str, torch.Tensor] | None:
    """Collective: the full Megatron state (TP=1, global layer ids, local-spec names) on rank 0, None elsewhere."""
    from megatron.core import parallel_state

    local = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if getattr(model, "slime_uses_te", False):
        local = from_te_names(local)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for name in sorted(local):
            parts = [torch.empty_like(local[name]) for _ in range(tp)]
            dist.all_gather(parts, local[name].contiguous(), group=group)
            for r in range(tp):
                shards[r][name] = parts[r]
        stage = merge_tp(shards)
    else:
        stage = dict(local)
    stage = {k: v.cpu() for k, v in stage.items()}
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages: list[Any] = [None] * pp
        if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            dist.gather_object(
                stage,
                stages if _rank0() else None,
                dst=0,
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return pp_merge(stages, shape) if _rank0() else None
    return stage if _rank0() else None


def gather_hf_state_dict(model, shape: ModelShape) -> dict[str, torch.Tensor] | None:
    """Collective: HF-named full tensors on rank 0 (None elsewhere)."""
    full = gather_megatron_state_dict(model, shape)
    return None if full is None else megatron_to_hf(full, shape)


def save_hf_dir(hf_state: dict[str, torch.Tensor], out_dir: str | os.PathLike, config_dir: str | os.PathLike) -> Path:
    """Write ``hf_state`` as model.safetensors plus ``config_dir``'s config/tokenizer files, atomically."""
    from safetensors.torch import save_file

    from slime.backends.megatron_utils.model import write_hf_config

    with atomic_dir(out_dir) as tmp:
        write_hf_config(config_dir, tmp)
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
    return Path(out_dir)
