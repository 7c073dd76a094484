"""Checkpoint conversion CLIs: HF ↔ Megatron ``torch_dist`` (installed as ``convert_hf_to_torch_dist`` and
``convert_torch_dist_to_hf``; wrappers in tools/).

Usage::

    convert_hf_to_torch_dist --hf-checkpoint /models/Qwen3-1.7B --save /models/Qwen3-1.7B_torch_dist
    convert_torch_dist_to_hf --input-dir /ckpt/run1 --output-dir /models/run1_hf [--origin-hf-dir /models/Qwen3-1.7B]

One process at TP=PP=1 (``torch_dist`` is parallelism-agnostic: the trainer reshards on load). It runs on
CPU (gloo) or one GPU (NCCL); memory ≈ 2× the checkpoint. Tensors keep the checkpoint's dtype, so
HF → torch_dist → HF gives back byte-identical tensors. The HF config and tokenizer files are copied to
``SAVE/hf_config/`` so the reverse direction needs no ``--origin-hf-dir``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HF_CONFIG_SUBDIR = "hf_config"


def _single_process_env() -> None:
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the checkpoint mixes floating dtypes {sorted(map(str, dtypes))}; pass --dtype")
    return dtypes.pop()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_to_torch_dist(hf_checkpoint: str, save: str, iteration: int = 0, dtype: str | None = None) -> Path:
    """Convert a HF dir to ``SAVE/iter_{iteration}`` (+ tracker); returns the iteration dir."""
    from slime.backends.megatron_utils import require_megatron

    require_megatron()
    from slime.backends.megatron_utils.checkpoint import save_torch_dist
    from slime.backends.megatron_utils.config import shape_from_hf_config
    from slime.backends.megatron_utils.model import (
        build_gpt_model,
        destroy_parallel,
        initialize_parallel,
        load_shard,
        rank_shard_from_hf,
        read_hf_config,
        read_hf_state_dict,
        write_hf_config,
    )

    _single_process_env()
    initialize_parallel(1, 1)
    try:
        hf_state = read_hf_state_dict(hf_checkpoint)
        params_dtype = DTYPES[dtype] if dtype else _stored_dtype(hf_state)
        shape = shape_from_hf_config(read_hf_config(hf_checkpoint))
        model = build_gpt_model(shape, params_dtype=params_dtype)
        load_shard(model, rank_shard_from_hf(hf_state, shape))
        out = save_torch_dist(model, save, iteration, trainer_state={"source": str(hf_checkpoint)})
        write_hf_config(hf_checkpoint, Path(save) / HF_CONFIG_SUBDIR)
        return out
    finally:
        destroy_parallel()


def torch_dist_to_hf(
    input_dir: str, output_dir: str, origin_hf_dir: str | None = None, iteration: int | None = None
) -> Path:
    """Convert a ``torch_dist`` checkpoint (newest iteration by default) to a HF dir."""
    from slime.backends.megatron_utils import require_megatron

    require_megatron()
    from slime.backends.megatron_utils.checkpoint import gather_hf_state_dict, load_torch_dist, save_hf_dir
    from slime.backends.megatron_utils.config import shape_from_hf_config
    from slime.backends.megatron_utils.model import (
        build_gpt_model,
        destroy_parallel,
        initialize_parallel,
        read_hf_config,
    )

    config_dir = origin_hf_dir or str(Path(input_dir) / HF_CONFIG_SUBDIR)
    if not (Path(config_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"no HF config at {config_dir!r}: pass --origin-hf-dir (the HF checkpoint the run started from)"
        )
    _single_process_env()
    initialize_parallel(1, 1)
    try:
        hf_config = read_hf_config(config_dir)
        shape = shape_from_hf_config(hf_config)
        dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model = build_gpt_model(shape, params_dtype=dtype)
        load_torch_dist(model, input_dir, iteration)
        hf_state = gather_hf_state_dict(model, shape)
        assert hf_state is not None  # one process: rank 0
        return save_hf_dir(hf_state, output_dir, config_dir)
    finally:
        destroy_parallel()


def hf_to_torch_dist_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_hf_to_torch_dist", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-checkpoint", required=True, help="HF checkpoint dir (Qwen2 / Qwen3 / Llama).")
    p.add_argument("--save", required=True, help="Output torch_dist dir (Megatron-LM layout).")
    p.add_argument("--iteration", type=int, default=0, help="Iteration number of the written checkpoint.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: the checkpoint's own dtype.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(hf_to_torch_dist(a.hf_checkpoint, a.save, a.iteration, a.dtype))
    return 0


def torch_dist_to_hf_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_torch_dist_to_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", required=True, help="torch_dist dir (with latest_checkpointed_iteration.txt).")
    p.add_argument("--output-dir", required=True, help="HF dir to write (replaced atomically).")
    p.add_argument("--origin-hf-dir", default=None, help="HF dir for config/tokenizer (default INPUT/hf_config).")
    p.add_argument("--iteration", type=int, default=None, help="Default: the tracker file's iteration.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(torch_dist_to_hf(a.input_dir, a.output_dir, a.origin_hf_dir, a.iteration))
    return 0


if __name__ == "__main__":
    sys.exit(hf_to_torch_dist_main())
