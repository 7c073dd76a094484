"""Batched, seedable next-token sampling and log-prob extraction for the embedded engine.

Everything here is a vectorised function of a ``[B, V]`` logits tensor plus per-row parameter
tensors, so one call serves a whole decode batch.

Randomness is *counter based*: the Gumbel noise of row ``b`` at generation step ``t`` for token
``v`` is a hash of ``(seed_b, t, v)``. A request's samples therefore depend only on its own seed
and never on which other requests happened to share its batch, which makes the server
deterministic under concurrent load (and lets a test replay a request exactly).

Log-probs follow SGLang's sampler: with ``temperature > 0`` the returned output log-probs are
``log_softmax(logits / temperature)`` (the temperature-scaled distribution, *before* top-k/top-p
truncation, as SGLang returns them unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set); greedy rows
(``temperature == 0``) return ``log_softmax(logits)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# Odd 32-bit constants of the "lowbias32" integer hash (public-domain mixing constants).
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GREEDY_EPS = 1e-6  # SGLang treats temperature below this as greedy


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32  # int64 products wrap mod 2**64; the low 32 bits stay exact
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    return x


def hash_seed(*parts: int) -> int:
    """Combine integers into one 32-bit seed (used for per-request seeds)."""
    acc = torch.tensor(0x9E3779B9, dtype=torch.int64)
    for part in parts:
        acc = _mix32(acc ^ _mix32(torch.tensor(int(part) & _MASK32, dtype=torch.int64)))
    return int(acc)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, V]`` that is a pure function of ``(seed_b, step_b, v)``."""
    device = seeds.device
    row = _mix32(seeds.to(torch.int64) * 0x9E3779B1 + _mix32(steps.to(torch.int64) + 0x632BE5AB))  # [B]
    cols = torch.arange(vocab, device=device, dtype=torch.int64)  # [V]
    h = _mix32(row[:, None] ^ _mix32(cols[None, :] * 0x85EBCA77 + 0x27D4EB2F))  # [B, V]
    u = ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)  # uniform in (0, 1), 24 bits
    return -torch.log(-torch.log(u))


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a decode batch (all ``[B]``)."""

    temperature: torch.Tensor  # float; 0 = greedy
    top_k: torch.Tensor  # int64; <= 0 or >= V = disabled
    top_p: torch.Tensor  # float in (0, 1]
    min_p: torch.Tensor  # float in [0, 1]
    seeds: torch.Tensor  # int64 per-request seed
    steps: torch.Tensor  # int64 tokens generated so far (the RNG counter)


def scaled_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """SGLang's output log-probs: ``log_softmax(logits / T)`` for sampled rows, raw for greedy rows."""
    greedy = temperature < _GREEDY_EPS
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits.dtype)
    return torch.log_softmax(logits.float() / scale[:, None].float(), dim=-1)


def sample_next(logprobs: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Next token ids ``[B]`` from temperature-scaled log-probs ``[B, V]`` with top-k / top-p / min-p.

    Sampling is Gumbel-max over the truncated distribution, which draws exactly from the
    renormalised top-k/top-p/min-p distribution.
    """
    greedy = params.temperature < _GREEDY_EPS
    if bool(greedy.all()):  # no row samples: no truncation or noise to compute
        return torch.argmax(logprobs, dim=-1)
    vocab = logprobs.shape[-1]
    masked = logprobs
    need_k = bool(((params.top_k > 0) & (params.top_k < vocab)).any())
    need_p = bool((params.top_p < 1.0).any())
    if need_k or need_p:
        sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)  # [B, V]
        drop = torch.zeros_like(sorted_lp, dtype=torch.bool)
        if need_k:
            k = torch.where(params.top_k > 0, params.top_k, torch.full_like(params.top_k, vocab)).clamp(max=vocab)
            drop |= torch.arange(vocab, device=logprobs.device)[None, :] >= k[:, None]
        if need_p:
            probs = sorted_lp.exp()
            # SGLang's rule: drop a token when the mass strictly before it already exceeds top_p.
            drop |= (probs.cumsum(-1) - probs) > params.top_p[:, None].to(probs.dtype)
        drop[:, 0] = False  # the most likely token always survives
        drop_in_vocab = torch.zeros_like(drop).scatter(-1, order, drop)
        masked = logprobs.masked_fill(drop_in_vocab, float("-inf"))
    if bool((params.min_p > 0).any()):
        threshold = logprobs.max(-1, keepdim=True).values + torch.log(params.min_p.clamp(min=1e-30))[:, None]
        masked = masked.masked_fill(logprobs < threshold, float("-inf"))
    noise = gumbel_noise(params.seeds, params.steps, vocab).to(masked.dtype)
    sampled = torch.argmax(masked + noise, dim=-1)
    return torch.where(greedy, torch.argmax(logprobs, dim=-1), sampled)


def topk_rows(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probs and ids per row, sorted descending: ``([N, k], [N, k])``."""
    k = min(k, logprobs.shape[-1])
    vals, ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    return vals, ids
