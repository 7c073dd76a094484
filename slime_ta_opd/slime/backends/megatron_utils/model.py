"""Megatron-core GPTModel from a HF checkpoint, and sampled-token log-probs with a vocab-parallel head.

Parallel layout from slime's flags: ``--tensor-model-parallel-size`` (TP), ``--pipeline-model-parallel-size``
(PP), ``--context-parallel-size`` (CP); data parallel = world / (TP·PP·CP). On a GPU the process group is
NCCL; on CPU it is gloo and :func:`~slime.backends.megatron_utils.cpu_shims.install_cpu_shims` runs first.

Log-probs never gather the vocabulary: each TP rank holds ``V/TP`` logits per row and Megatron's
``vocab_parallel_cross_entropy`` (= −log p(target)) all-reduces the max and the sum of exponentials.
Rows follow the torch backend's :class:`~slime.backends.torch_utils.model.ResponseBatch` (hidden state at
``P + j − 1`` predicts response token j), so the two backends score the very same positions.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slime.backends.megatron_utils.config import ModelShape, shape_from_hf_config, transformer_config
from slime.backends.megatron_utils.convert import hf_to_megatron, pp_stage, shard_tp, to_te_names
from slime.backends.torch_utils.model import ResponseBatch

logger = logging.getLogger(__name__)


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """``torch.distributed`` (env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE) plus Megatron's groups."""
    from megatron.core import parallel_state, tensor_parallel

    from slime.backends.megatron_utils.cpu_shims import install_cpu_shims

    on_cpu = install_cpu_shims()
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend="gloo" if on_cpu else "nccl", timeout=timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not a multiple of TP·PP·CP = {tensor_model_parallel_size}·"
            f"{pipeline_model_parallel_size}·{context_parallel_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )
    torch.manual_seed(seed)
    if not on_cpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def read_hf_config(hf_dir: str | os.PathLike):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)


def read_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint dir (``*.safetensors``, sharded or not), on CPU, in their stored dtype."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (a HF checkpoint directory is expected)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def build_gpt_model(
    shape: ModelShape,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    **config_kwargs: Any,
):
    """An (uninitialised-weights) GPTModel of ``shape`` for this rank's TP/PP position."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    shape.check_parallel(tp, pp)
    config = transformer_config(
        shape,
        params_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        use_cpu_initialization=not torch.cuda.is_available(),
        **config_kwargs,
    )
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=shape.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=shape.qk_layernorm, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta,
    )
    model.slime_uses_te = use_te  # type: ignore[attr-defined]
    return model


def rank_shard_from_hf(hf_state: dict[str, torch.Tensor], shape: ModelShape, use_te: bool = False):
    """This rank's Megatron tensors for a full HF state dict (TP/PP position from parallel_state)."""
    from megatron.core import parallel_state

    full = hf_to_megatron(hf_state, shape)
    stage = pp_stage(
        full,
        shape,
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    shard = shard_tp(
        stage,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    return to_te_names(shard) if use_te else shard


def load_shard(model, shard: dict[str, torch.Tensor]) -> None:
    """Copy ``shard`` into ``model``; every parameter must be covered (only ``_extra_state`` may be missing)."""
    own = model.state_dict()
    missing = [k for k in own if k not in shard and not k.endswith("_extra_state")]
    unexpected = [k for k in shard if k not in own]
    if missing or unexpected:
        raise ValueError(f"Megatron state mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for name, value in shard.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{name}: model shape {tuple(own[name].shape)} != converted {tuple(value.shape)}")
            own[name].copy_(value.to(own[name].dtype))


def load_gpt_from_hf(
    hf_dir: str | os.PathLike, params_dtype: torch.dtype = torch.float32, use_te: bool = False, **config_kwargs
):
    """GPTModel (this rank's part) with the HF checkpoint's weights; returns ``(model, shape)``."""
    shape = shape_from_hf_config(read_hf_config(hf_dir))
    model = build_gpt_model(shape, params_dtype=params_dtype, use_te=use_te, **config_kwargs)
    if torch.cuda.is_available():
        model = model.cuda()
    load_shard(model, rank_shard_from_hf(read_hf_state_dict(hf_dir), shape, use_te=use_te))
    return model, shape


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's mask convention: True = masked; ``[1, 1, T, T]``. Right padding needs nothing more."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, V/TP]`` logits of this TP rank's vocabulary slice on the last PP stage; on an earlier stage the
    ``[T, B, H]`` hidden states it hands to the next one (its input then comes from ``set_input_tensor``)."""
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    return model(input_ids, position_ids, attention_mask=causal_mask(seq, input_ids.device))


def logits_to_token_log_probs(logits_rows: torch.Tensor, target: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits/τ)[target] for vocab-parallel rows ``[n, V/TP]`` (targets are global ids)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    rows = logits_rows.float() if logits_rows.dtype in (torch.bfloat16, torch.float16) else logits_rows
    if temperature != 1.0:
        rows = rows / temperature
    # Megatron's kernel wants [s, b, V/TP]; it edits a copy of the logits, never the input
    return -vocab_parallel_cross_entropy(rows.unsqueeze(1), target.unsqueeze(1)).squeeze(1)


def response_log_probs(
    logits: torch.Tensor, batch: ResponseBatch, select: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """log π(y_t | c_t) from the ``[B, T, V/TP]`` logits of ``batch``: its response tokens (all, or ``select``)."""
    idx = torch.arange(batch.num_tokens) if select is None else select
    if idx.dtype == torch.bool:
        idx = idx.nonzero().squeeze(-1)
    dev = logits.device
    rows = logits[batch.row[idx].to(dev), batch.pred_pos[idx].to(dev)]  # [n, V/TP]
    return logits_to_token_log_probs(rows, batch.target[idx].to(dev), temperature)


def sampled_token_log_probs(
    model, batch: ResponseBatch, select: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """log π(y_t | c_t) of the response tokens of ``batch`` (all, or the rows ``select``), one per row (PP=1)."""
    return response_log_probs(forward_logits(model, batch.input_ids), batch, select, temperature)


def write_hf_config(shape_source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Copy config.json, generation config and tokenizer files of a HF dir (weights excluded)."""
    import shutil

    src, out = Path(shape_source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".pt")):
            shutil.copy2(f, out / f.name)
    json.loads((out / "config.json").read_text())  # fail early on a dir without a config
