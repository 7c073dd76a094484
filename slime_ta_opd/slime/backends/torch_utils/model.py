"""HF causal-LM helpers for the torch trainer: batching of rollout samples and sampled-token log-probs.

The sparse LM head (issue 9 item 1): the backbone runs over every token (attention needs the
whole context), but the LM head, the log-softmax and the gather run only on the rows whose
log-prob is needed — for the loss these are the response positions with ``loss_mask = 1``.
With ρ = 0.1 that is about a tenth of the [tokens × vocab] work and memory of the dense path.
The dense path (``logits = model(ids).logits``) is kept behind a switch for comparison.

Position convention: the hidden state at absolute position ``p`` predicts the token at ``p + 1``,
so response token ``j`` of a sample with prompt length ``P`` is scored from the hidden state at
``P + j − 1``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(path: str | os.PathLike, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load a HF causal LM from a local directory (no download) in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-step saves/loads would flood the log
    if dtype not in DTYPES:
        raise ValueError(f"unknown train dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not os.path.isdir(path):
        raise ValueError(f"model path {str(path)!r} is not a directory (expected a HF checkpoint dir)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    return model.to(device)


@dataclass
class ResponseBatch:
    """Rollout samples as one right-padded batch plus flat coordinates of every response token.

    N = total response tokens of the samples in the batch; rows are ordered sample by sample.
    Right padding is exact for a causal LM: a real token never attends to a later pad.
    """

    input_ids: torch.Tensor  # [B, T] int64, right-padded
    row: torch.Tensor  # [N] int64, batch row of the token
    pred_pos: torch.Tensor  # [N] int64, position whose hidden state predicts the token (P + j − 1)
    target: torch.Tensor  # [N] int64, the sampled token id
    sample_index: torch.Tensor  # [N] int64, 0..B-1 (local to this batch)
    position: torch.Tensor  # [N] int64, j = index inside the sample's response

    @property
    def num_tokens(self) -> int:
        return int(self.target.numel())


def build_response_batch(
    tokens: list[list[int]], prompt_lengths: list[int], response_lengths: list[int], pad_id: int = 0
) -> ResponseBatch:
    """Pack samples (``tokens`` = prompt + response ids) into a :class:`ResponseBatch`."""
    if not (len(tokens) == len(prompt_lengths) == len(response_lengths)):
        raise ValueError(
            f"tokens ({len(tokens)}), prompt_lengths ({len(prompt_lengths)}) and response_lengths "
            f"({len(response_lengths)}) must have one entry per sample"
        )
    for i, (toks, p, r) in enumerate(zip(tokens, prompt_lengths, response_lengths, strict=True)):
        if p < 1 or r < 0 or p + r != len(toks):
            raise ValueError(
                f"sample {i}: prompt_length={p} + response_length={r} must equal len(tokens)={len(toks)} "
                "with a non-empty prompt"
            )
    batch_size = len(tokens)
    max_len = max((len(t) for t in tokens), default=1)
    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
    for i, toks in enumerate(tokens):
        input_ids[i, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
    resp = torch.as_tensor(response_lengths, dtype=torch.long)
    prompt = torch.as_tensor(prompt_lengths, dtype=torch.long)
    sample_index = torch.repeat_interleave(torch.arange(batch_size), resp)
    # position j inside the response: running index minus the start offset of its sample
    starts = torch.cumsum(resp, 0) - resp
    position = torch.arange(int(resp.sum())) - starts[sample_index]
    pred_pos = prompt[sample_index] + position - 1
    target = input_ids[sample_index, pred_pos + 1]
    return ResponseBatch(input_ids, sample_index.clone(), pred_pos, target, sample_index, position)


def _backbone_and_head(model):
    backbone = model.base_model
    head = model.get_output_embeddings()
    if backbone is model or head is None:
        raise TypeError(f"{type(model).__name__} has no separate backbone/LM head; use the dense path")
    return backbone, head


def last_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The backbone's final hidden states [B, T, H] (after the final norm), no LM head applied."""
    backbone, _ = _backbone_and_head(model)
    return backbone(input_ids=input_ids, use_cache=False).last_hidden_state


def _logp_of_rows(head, hidden_rows: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden_rows).float() if hidden_rows.dtype in (torch.bfloat16, torch.float16) else head(hidden_rows)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def sampled_token_log_probs(
    model,
    batch: ResponseBatch,
    select: torch.Tensor | None = None,
    temperature: float = 1.0,
    sparse: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log π(y_t | c_t) for the response tokens of ``batch`` (all of them, or the rows ``select``).

    ``select``: bool [N] or int64 indices into the N response tokens; the result has one entry
    per selected token, in order. ``sparse=True`` gathers the selected hidden states first and
    applies the LM head to those rows only (in chunks of ``chunk_size`` rows if given);
    ``sparse=False`` materialises the full [B, T, V] logits (the reference path).
    Logits are divided by ``temperature`` (the rollout temperature), as the engines do.
    """
    idx = torch.arange(batch.num_tokens) if select is None else select
    if idx.dtype == torch.bool:
        idx = idx.nonzero().squeeze(-1)
    row, pos, target = batch.row[idx], batch.pred_pos[idx], batch.target[idx]
    if not sparse:
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, -1)
        return logp[row, pos, target.to(logp.device)]
    hidden = last_hidden_states(model, batch.input_ids)
    _, head = _backbone_and_head(model)
    rows = hidden[row.to(hidden.device), pos.to(hidden.device)]  # [n, H]
    target = target.to(hidden.device)
    if chunk_size is None or rows.shape[0] <= chunk_size:
        return _logp_of_rows(head, rows, target, temperature)
    parts = [
        _logp_of_rows(head, rows[s : s + chunk_size], target[s : s + chunk_size], temperature)
        for s in range(0, rows.shape[0], chunk_size)
    ]
    return torch.cat(parts)


def sparse_head_matches_dense(model, vocab_size: int, atol: float | None = None) -> bool:
    """Cheap self-check that ``logits == lm_head(last_hidden_state)`` for this architecture.

    Models that post-process logits (soft-capping, logit scales) would make the sparse path
    wrong; the trainer falls back to the dense path for them.
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(1, vocab_size), (1, 8), generator=gen)
    param = next(model.parameters())
    device = param.device
    if atol is None:  # half precision rounds the two matmul layouts differently; a wrong head differs by O(1)
        atol = 5e-2 if param.dtype in (torch.bfloat16, torch.float16) else 1e-4
    batch = build_response_batch([ids[0].tolist()], [2], [6])
    batch.input_ids = batch.input_ids.to(device)
    with torch.no_grad():
        try:
            sparse = sampled_token_log_probs(model, batch, sparse=True)
        except TypeError:
            return False
        dense = sampled_token_log_probs(model, batch, sparse=False)
    return bool(torch.allclose(sparse.double(), dense.double(), atol=atol, rtol=0))
