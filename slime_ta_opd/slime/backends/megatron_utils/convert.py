"""HF (Qwen2 / Qwen3 / Llama) ↔ Megatron-core GPTModel state dicts, with TP sharding and PP stages.

Our own converter (mbridge does the same for more families; these three need ~200 lines and no
CUDA). Every step is a pure function of a ``{name: tensor}`` dict, so each is tested alone:

    hf  --hf_to_megatron-->  full (TP=1, global layer ids)  --pp_stage-->  stage  --shard_tp-->  rank shard
    hf  <--megatron_to_hf--  full                            <--pp_merge--  stages <--merge_tp--  rank shards

Layout facts (Megatron local spec; ``to_te_names`` renames the two fused norms for the TE spec):

| HF | Megatron | TP split |
|---|---|---|
| ``model.embed_tokens.weight`` [V, H] | ``embedding.word_embeddings.weight`` | dim 0 (vocab parallel) |
| ``lm_head.weight`` [V, H] (absent when tied) | ``output_layer.weight`` (absent when tied, PP=1) | dim 0 |
| ``model.norm.weight`` | ``decoder.final_layernorm.weight`` | replicated |
| ``layers.i.input_layernorm.weight`` | ``decoder.layers.i.input_layernorm.weight`` | replicated |
| ``q_proj``, ``k_proj``, ``v_proj`` (weight, bias) | ``self_attention.linear_qkv`` | dim 0, by query group |
| ``q_norm``, ``k_norm`` (Qwen3) | ``self_attention.q_layernorm`` / ``k_layernorm`` | replicated |
| ``o_proj.weight`` [H, nh·d] | ``self_attention.linear_proj.weight`` | dim 1 |
| ``post_attention_layernorm.weight`` | ``decoder.layers.i.pre_mlp_layernorm.weight`` | replicated |
| ``gate_proj``, ``up_proj`` [F, H] | ``mlp.linear_fc1.weight`` [2F, H] = [gate; up] | each half on dim 0 |
| ``down_proj.weight`` [H, F] | ``mlp.linear_fc2.weight`` | dim 1 |

QKV interleaving: Megatron stores, per query group g, the group's ``heads_per_group`` query heads,
then its key head, then its value head: rows ``[q_g0 … q_g(h-1), k_g, v_g]`` of ``head_dim`` each,
groups one after another. A TP rank therefore holds whole groups (``num_query_groups % tp == 0``).
The fused fc1 is ``[gate; up]`` per rank: rank r holds ``[gate_r; up_r]``, not a slice of the concatenation.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from slime.backends.megatron_utils.config import ModelShape

Tensors = dict[str, Tensor]

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# per-layer names that map one to one
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_LAYER_SIMPLE_INV = {v: k for k, v in _LAYER_SIMPLE.items()}

# TP split dimension by Megatron name suffix (absent: replicated)
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
_FC1 = "linear_fc1.weight"

_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: ModelShape) -> Tensor:
    g, h, d = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    tail = q.shape[1:]  # (H,) for weights, () for biases
    q = q.reshape(g, h * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(g * (h + 2) * d, *tail)


def _split_qkv(qkv: Tensor, shape: ModelShape) -> tuple[Tensor, Tensor, Tensor]:
    g, h, d = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (h + 2) * d, *tail)
    q, k, v = grouped.split([h * d, d, d], dim=1)
    return q.reshape(g * h * d, *tail), k.reshape(g * d, *tail), v.reshape(g * d, *tail)


def hf_to_megatron(hf: Tensors, shape: ModelShape) -> Tensors:
    """HF state dict → full Megatron state dict (TP=1, global layer ids). Unknown HF keys are an error."""
    out: Tensors = {}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in hf:
            raise KeyError(f"HF state dict has no {name!r} (model_type {shape.model_type})")
        used.add(name)
        return hf[name]

    out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if shape.tie_word_embeddings:
        used.add("lm_head.weight")  # a tied checkpoint may still carry the (identical) head
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    for i in range(shape.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mg_name in _LAYER_SIMPLE.items():
            if "_norm." in hf_name and not shape.qk_layernorm:
                continue
            out[mp + mg_name] = take(hp + hf_name)
        out[mp + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            take(hp + "self_attn.q_proj.weight"),
            take(hp + "self_attn.k_proj.weight"),
            take(hp + "self_attn.v_proj.weight"),
            shape,
        )
        if shape.qkv_bias:
            out[mp + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                take(hp + "self_attn.q_proj.bias"),
                take(hp + "self_attn.k_proj.bias"),
                take(hp + "self_attn.v_proj.bias"),
                shape,
            )
        out[mp + "mlp.linear_fc1.weight"] = torch.cat(
            [take(hp + "mlp.gate_proj.weight"), take(hp + "mlp.up_proj.weight")], dim=0
        )
    unknown = sorted(k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"HF state dict has keys the {shape.model_type} converter does not know: {unknown[:8]}")
    return out


def megatron_to_hf(mg: Tensors, shape: ModelShape) -> Tensors:
    """Full Megatron state dict (TP=1, global layer ids) → HF state dict (no ``lm_head`` when tied)."""
    mg = {k: v for k, v in mg.items() if not k.endswith("_extra_state")}
    out: Tensors = {
        "model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
        "model.norm.weight": mg["decoder.final_layernorm.weight"],
    }
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for name, value in mg.items():
        m = _MG_LAYER.match(name)
        if m is None:
            continue
        i, rest = m.group(1), m.group(2)
        hp = f"model.layers.{i}."
        if rest in _LAYER_SIMPLE_INV:
            out[hp + _LAYER_SIMPLE_INV[rest]] = value
        elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = _split_qkv(value, shape)
            out[hp + f"self_attn.q_proj.{kind}"] = q
            out[hp + f"self_attn.k_proj.{kind}"] = k
            out[hp + f"self_attn.v_proj.{kind}"] = v
        elif rest == "mlp.linear_fc1.weight":
            gate, up = value.chunk(2, dim=0)
            out[hp + "mlp.gate_proj.weight"] = gate
            out[hp + "mlp.up_proj.weight"] = up
        else:
            raise ValueError(f"Megatron key {name!r} has no HF counterpart in the {shape.model_type} converter")
    return out


def _tp_dim(name: str) -> int | None:
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def shard_tp(full: Tensors, tp_size: int, tp_rank: int) -> Tensors:
    """The TP rank's slice of every tensor (contiguous clones, so the shard owns its memory)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    out: Tensors = {}
    for name, value in full.items():
        if name.endswith(_FC1):
            gate, up = value.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0).clone()
            continue
        dim = _tp_dim(name)
        if dim is None:
            out[name] = value.clone()
            continue
        if value.shape[dim] % tp_size:
            raise ValueError(f"{name}: dim {dim} of size {value.shape[dim]} does not split over TP={tp_size}")
        out[name] = value.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_tp(shards: list[Tensors]) -> Tensors:
    """Inverse of :func:`shard_tp`: one full dict from the TP ranks' dicts (in rank order)."""
    out: Tensors = {}
    for name in shards[0]:
        if name.endswith("_extra_state"):
            continue
        parts = [s[name] for s in shards]
        if name.endswith(_FC1):
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts), strict=True)
            out[name] = torch.cat([*gates, *ups], dim=0)
            continue
        dim = _tp_dim(name)
        out[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return out


def layer_offset(shape: ModelShape, pp_size: int, pp_rank: int) -> int:
    return pp_rank * (shape.num_layers // pp_size)


def pp_stage(full: Tensors, shape: ModelShape, pp_size: int, pp_rank: int) -> Tensors:
    """The PP stage's tensors with local layer ids (embedding on the first stage, head and norm on the last)."""
    shape.check_parallel(1, pp_size)
    per_stage = shape.num_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    start = layer_offset(shape, pp_size, pp_rank)
    out: Tensors = {}
    for name, value in full.items():
        m = _MG_LAYER.match(name)
        if m is not None:
            i = int(m.group(1))
            if start <= i < start + per_stage:
                out[f"decoder.layers.{i - start}.{m.group(2)}"] = value
        elif name.startswith("embedding.") and first:
            out[name] = value
        elif (name.startswith("decoder.final_layernorm") or name.startswith("output_layer")) and last:
            out[name] = value
    if last and not first and shape.tie_word_embeddings:
        # tied head under PP: Megatron keeps a copy on the last stage, kept in sync by an all-reduce of grads
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    return out


def pp_merge(stages: list[Tensors], shape: ModelShape) -> Tensors:
    """Inverse of :func:`pp_stage`: global layer ids; the last stage's tied-head copy is dropped."""
    pp_size = len(stages)
    out: Tensors = {}
    for rank, stage in enumerate(stages):
        start = layer_offset(shape, pp_size, rank)
        for name, value in stage.items():
            m = _MG_LAYER.match(name)
            if m is not None:
                out[f"decoder.layers.{int(m.group(1)) + start}.{m.group(2)}"] = value
            elif name == "output_layer.weight" and shape.tie_word_embeddings:
                continue
            else:
                out[name] = value
    return out


def _rename_layer_params(state: Tensors, names: dict[str, str]) -> Tensors:
    """``decoder.layers.<i>.<param>`` → ``decoder.layers.<i>.<names[param]>`` for the params in ``names``."""
    out: Tensors = {}
    for name, value in state.items():
        m = _MG_LAYER.match(name)
        if m is not None and m.group(2) in names:
            name = f"decoder.layers.{m.group(1)}.{names[m.group(2)]}"
        out[name] = value
    return out


def to_te_names(state: Tensors) -> Tensors:
    """Local-spec names → Transformer-Engine-spec names (the two pre-norms fuse into the next linear)."""
    return _rename_layer_params(state, _TE_NAMES)


def from_te_names(state: Tensors) -> Tensors:
    """Transformer-Engine-spec names → local-spec names (the inverse of ``to_te_names``)."""
    return _rename_layer_params(state, {v: k for k, v in _TE_NAMES.items()})
