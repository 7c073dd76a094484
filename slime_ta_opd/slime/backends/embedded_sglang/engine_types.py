"""The embedded engine's request, result and batch-state types (``slime.backends.embedded_sglang.engine``)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch


class EngineUnavailable(RuntimeError):
    """The engine cannot serve generation now (memory released, weights undefined, shutting down): HTTP 503."""


class EngineRequestError(RuntimeError):
    """The engine failed while serving these requests (the others are unaffected): HTTP 500 naming the error."""


@dataclass
class GenRequest:
    """One validated generation request (one prompt, one sample). Built by ``protocol.parse_generate``."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_strs: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # user ids; EOS added unless ignore_eos
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # resolved by the engine: -1 -> no input log-probs
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    logprob_temperature: float | None = None  # extension: divide logits by T before the prefill log-softmax
    seed: int | None = None  # per-request sampling seed; None -> derived from --random-seed and arrival order


@dataclass
class GenResult:
    """Raw engine output of one request; ``protocol.build_answer`` turns it into SGLang's JSON."""

    output_ids: list[int]
    finish_reason: dict[str, Any]
    prompt_tokens: int
    # Input side, already in SGLang's layout: entry 0 is None; ids are input_ids[logprob_start_len:].
    input_token_logprobs_val: list[float | None] = field(default_factory=list)
    input_token_logprobs_idx: list[int] = field(default_factory=list)
    input_top_logprobs_val: list[list[float] | None] = field(default_factory=list)
    input_top_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    input_token_ids_logprobs_val: list[list[float] | None] = field(default_factory=list)
    input_token_ids_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    output_token_logprobs_val: list[float] = field(default_factory=list)
    output_top_logprobs_val: list[list[float]] = field(default_factory=list)
    output_top_logprobs_idx: list[list[int]] = field(default_factory=list)
    output_token_ids_logprobs_val: list[list[float]] = field(default_factory=list)
    cached_tokens: int = 0
    e2e_latency: float = 0.0


@dataclass
class _Prefilled:
    """A prompt's prefill: KV per layer (``[1, H_kv, L, D]``) or None, hidden ``[L, H]``, last logits ``[V]``."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    hidden: torch.Tensor
    last_logits: torch.Tensor


@dataclass
class _Row:
    """A running generation row."""

    req: GenRequest
    future: Future
    start: float
    cached_tokens: int
    result: GenResult
    stop_ids: list[int]
    max_stop_chars: int


class _Running:
    """Decode-batch state: KV cache + per-row tensors, kept aligned with ``rows``."""

    def __init__(
        self,
        rows: list[_Row],
        cache: Any,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        last_tokens: torch.Tensor,
        device: torch.device,
    ):
        self.rows = rows
        self.cache = cache  # DynamicCache; per layer keys/values [B, H_kv, C, D]
        self.mask = mask  # [B, C] long: 1 where the cache column holds a real token of that row
        self.next_pos = next_pos  # [B] position id of the next input token
        self.last_tokens = last_tokens  # [B] the token to feed next
        self.device = device

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: list[int]) -> None:
        """Keep only rows ``idx`` (in that order)."""
        index = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in idx]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)

    def merge(self, other: _Running) -> None:
        """Append ``other``'s rows; the shorter cache is zero-padded on the right (masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], 0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], 0)
        self.rows += other.rows
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA; else the named dtype."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in table:
        raise ValueError(f"--dtype {name!r} is not supported; expected auto or one of {sorted(table)}")
    return table[name]
