"""HF causal-LM config (Qwen2 / Qwen3 / Llama) → :class:`ModelShape` → Megatron ``TransformerConfig``.

The three families share one dense layout: RMSNorm pre-norm, RoPE (rotate-half), grouped-query
attention, SwiGLU MLP. They differ in bias on q/k/v (Qwen2), per-head RMSNorm on q and k (Qwen3)
and whether the LM head is tied to the embedding. Anything else (MoE, rope scaling, sliding
windows) is refused with the offending value rather than silently converted wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class ModelShape:
    """The facts the converter and the model builder need, read once from a HF config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # HF num_key_value_heads
    head_dim: int  # Megatron kv_channels
    ffn_hidden_size: int
    vocab_size: int  # the embedding rows (padded past the tokenizer, as in the HF checkpoint)
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def check_parallel(self, tp_size: int, pp_size: int = 1) -> None:
        """Raise ValueError unless the shape shards evenly over ``tp_size`` / ``pp_size``."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_query_groups),
            ("intermediate_size", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size),
        ):
            if value % tp_size:
                raise ValueError(f"--tensor-model-parallel-size {tp_size} does not divide {name}={value}")
        if self.num_layers % pp_size:
            raise ValueError(f"--pipeline-model-parallel-size {pp_size} does not divide num_layers={self.num_layers}")


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(f"rope scaling {params!r} is not supported by the Megatron converter (only default RoPE)")
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def shape_from_hf_config(hf_config: Any) -> ModelShape:
    """Read a transformers config object (or a dict of config.json) into a :class:`ModelShape`."""
    if isinstance(hf_config, dict):
        from transformers import AutoConfig

        kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
        hf_config = AutoConfig.for_model(hf_config["model_type"], **kwargs)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported by the Megatron converter")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by the Megatron converter")
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    qkv_bias = model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
    return ModelShape(
        model_type=model_type,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_layernorm=model_type == "qwen3",
    )


def transformer_config(
    shape: ModelShape,
    params_dtype: torch.dtype = torch.float32,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    use_cpu_initialization: bool = False,
    recompute: bool = False,
    **overrides: Any,
):
    """A Megatron ``TransformerConfig`` for ``shape``; fusions off so the local (non-TE) spec runs anywhere."""
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # HF computes q·k/sqrt(d) and the softmax in the activation dtype; so does Megatron's local path
        attention_softmax_in_fp32=True,
        # pipeline schedule: activations travel between stages in the weights' dtype; micro-batches are padded
        # to their own longest sample, so each p2p message sends its shape first
        pipeline_dtype=params_dtype,
        variable_seq_lengths=True,
        # no MoE layer here; the default ("allgather") dispatcher refuses variable_seq_lengths even in dense models
        moe_token_dispatcher_type="alltoall",
        # our losses are already each micro-batch's share of the step (global token/sample counts):
        # the schedule must not divide them by the number of micro-batches again
        calculate_per_token_loss=True,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# flag dest -> how to read the same fact from a ModelShape (the flags of scripts/models/*.sh)
_SHAPE_FLAGS = {
    "num_layers": lambda s: s.num_layers,
    "hidden_size": lambda s: s.hidden_size,
    "ffn_hidden_size": lambda s: s.ffn_hidden_size,
    "num_attention_heads": lambda s: s.num_attention_heads,
    "num_query_groups": lambda s: s.num_query_groups,
    "kv_channels": lambda s: s.head_dim,
    "vocab_size": lambda s: s.vocab_size,
    "rotary_base": lambda s: s.rope_theta,
    "norm_epsilon": lambda s: s.norm_eps,
}
_SHAPE_SWITCHES = {
    "qk_layernorm": lambda s: s.qk_layernorm,
    "add_qkv_bias": lambda s: s.qkv_bias,
    "untie_embeddings_and_output_weights": lambda s: not s.tie_word_embeddings,
}


def check_shape_flags(args: Any, shape: ModelShape) -> None:
    """Raise ValueError when model-shape flags given on the command line contradict the HF config."""
    bad = []
    for dest, read in _SHAPE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and float(value) != float(read(shape)):
            bad.append(f"--{dest.replace('_', '-')} {value} (HF config: {read(shape)})")
    for dest, read in _SHAPE_SWITCHES.items():
        # a switch only speaks when set, except the shape switches that upstream launchers always pass
        if getattr(args, dest, False) and not read(shape):
            bad.append(f"--{dest.replace('_', '-')} (HF config says no)")
    if bad:
        raise ValueError("model shape flags disagree with --hf-checkpoint: " + "; ".join(bad))
