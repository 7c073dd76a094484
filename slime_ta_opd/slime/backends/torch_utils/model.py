"""HF causal-LM helpers for the torch trainer: batching of rollout samples and sampled-token log-probs.

The sparse LM head: the backbone runs over every token (attention needs the
whole context), but the LM head, the log-softmax and the gather run only on the rows whose
log-prob is needed — for the loss these are the response positions with ``loss_mask = 1``.
With ρ = 0.1 that is about a tenth of the [tokens × vocab] work and memory of the dense path.
The dense path (``logits = model(ids).logits``) is kept behind a switch for comparison.

On the sparse path the head, the log-softmax and the gather run in tiles of [rows, vocabulary
slice] inside one autograd function. A tile holds as many logits as a chunk of
``--lm-head-chunk-size`` full rows (about 2^24 by default), so no ``[rows × vocab]`` temporary exists
in the no-grad old-log-prob pass (all response tokens), whose peak is bounded by the tile, not by
the number of tokens. For backward it keeps the gathered hidden rows and one log-sum-exp per row,
and recomputes each tile's logits; with the weight-gradient buffer below and rows ≤ H it keeps the
rows' logits instead (no more numbers than the ``[V, H]`` gradient the buffer saves), so backward
does two matmuls, not three.

The weight gradient: :func:`attach_head_grad_buffer` gives the head weight a persistent buffer
(``weight.main_grad``, Megatron's name for its gradient-accumulation-fusion buffer). Backward then
writes ∂W tile by tile straight into ``weight.grad`` (into the buffer when ``.grad`` is None, adding
when it is set), so no ``[V, H]`` gradient is allocated per step, and ``.grad`` holds exactly what
plain autograd would have accumulated.

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
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Default LM-head chunk: about 2^24 logits per [rows, V] temporary (64 MiB in float32), i.e.
# 110 rows at V = 151,936. A chunk holds at most ~2 such temporaries at a time.
DEFAULT_LM_HEAD_CHUNK_ELEMENTS = 1 << 24


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


def lm_head_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per LM-head chunk: ``chunk_size`` if given, else about 2^24 logits per chunk."""
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"LM-head chunk size must be > 0 rows, got {chunk_size}")
        return int(chunk_size)
    return max(1, DEFAULT_LM_HEAD_CHUNK_ELEMENTS // max(int(vocab_size), 1))


def _head_logits(hidden_rows, weight, bias, temperature: float) -> torch.Tensor:
    """``(h Wᵀ + b) / τ`` of a chunk of rows, in float32 for half-precision weights (as the engines do)."""
    logits = torch.nn.functional.linear(hidden_rows, weight, bias)
    if logits.dtype in HALF_DTYPES:
        logits = logits.float()
    if temperature != 1.0:
        logits = logits.div_(temperature)  # no graph here: only called inside _SampledTokenLogProb
    return logits


def _tiles(n: int, width: int, vocab: int, chunk_rows: int) -> tuple[int, int]:
    """(rows per block, vocabulary entries per tile) of the sparse head: each [rows, vocab slice] tile has
    as many logits as a chunk of ``chunk_rows`` full rows. A block holds all rows while their [rows, H]
    hidden states stay within that budget, so one slice of W serves every row at once (wide matmuls; W
    is read once per block, not once per row chunk) and each slice of ∂W is written once."""
    budget = max(chunk_rows * vocab, 1)
    block = max(1, min(n, max(chunk_rows, budget // max(width, 1))))
    return block, max(1, budget // block)


def attach_head_grad_buffer(model) -> torch.Tensor | None:
    """Give the LM-head weight a persistent float32/float64 gradient buffer, ``weight.main_grad``; returns it.

    The sparse head's backward then writes the weight gradient in place: into ``weight.grad`` when it is set
    (accumulation over micro-batches), else into the buffer, which becomes ``weight.grad``. Zeroing with
    ``set_to_none=True`` needs no memset (the next step overwrites the buffer), and a step without a backward
    leaves ``.grad`` None as usual. Returns None (nothing attached) when the head is not a plain
    ``nn.Linear``, its weight is frozen, or half precision (its gradient is accumulated in float32).
    """
    try:
        _, head = _backbone_and_head(model)
    except TypeError:
        return None
    weight = head.weight if _is_plain_linear(head) else None
    if weight is None or not weight.requires_grad or weight.dtype in HALF_DTYPES:
        return None
    buffer = getattr(weight, "main_grad", None)
    if not _fits(buffer, weight):
        buffer = weight.main_grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return buffer


def _fits(t: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the weight gradient can be written into ``t`` in place."""
    return (
        t is not None
        and t.shape == weight.shape
        and t.dtype == weight.dtype
        and t.device == weight.device
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.requires_grad
    )


def _grad_accumulated(weight: torch.Tensor) -> bool:
    """Whether the running backward accumulates into ``weight.grad`` (``.backward()`` reaching the weight; not
    ``torch.autograd.grad`` nor ``backward(inputs=...)`` without it). Only valid inside a backward."""
    try:
        return bool(torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(weight).node))
    except (AttributeError, RuntimeError):  # autograd.grad() raises here: it returns the gradient instead
        return False


def _weight_grad_target(weight: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(tensor to write ∂W into in place, whether it holds nothing of this backward yet); (None, _) = return ∂W.

    In place only for a weight with :func:`attach_head_grad_buffer`'s buffer and no gradient hooks (they must see
    the gradient), in a backward that accumulates into ``.grad``: add to ``.grad`` if it is set, else overwrite
    the buffer and make it ``.grad``.
    """
    buffer = getattr(weight, "main_grad", None)
    hooked = weight._backward_hooks or weight._post_accumulate_grad_hooks
    if buffer is None or hooked or not weight.is_leaf or not _grad_accumulated(weight):
        return None, False
    if weight.grad is not None:
        return (weight.grad, False) if _fits(weight.grad, weight) else (None, False)
    if not _fits(buffer, weight):
        return None, False
    weight.grad = buffer
    return buffer, True


def _keeps_logits(n: int, weight: torch.Tensor) -> bool:
    """Forward keeps the rows' logits for backward when the weight has a gradient buffer and they hold no more
    numbers than the weight (n·V ≤ V·H): at most the [V, H] gradient the in-place accumulation no longer
    allocates, so the peak stays below that of the head without the buffer (which recomputes them)."""
    return 0 < n <= weight.shape[1] and weight.requires_grad and _fits(getattr(weight, "main_grad", None), weight)


class _SampledTokenLogProb(torch.autograd.Function):
    """``log softmax((h Wᵀ + b) / τ)[y]`` per row, in tiles of [rows, vocabulary slice] (``_tiles``).

    Forward: the log-sum-exp of each row accumulated over the vocabulary slices (running max and sum). Saves
    hidden [n, H], targets [n], log-sum-exp [n] and, with a gradient buffer and n ≤ H (``_keeps_logits``), the
    tiles' logits. Backward takes each tile's logits (kept, or recomputed): ``∂ log p(y) / ∂ logits = (onehot(y) −
    softmax) / τ``, then ``∂h += g·W[slice]`` and ``∂W[slice] += gᵀ·h`` (in float32 for half-precision
    weights), ∂W in place into ``weight.grad`` where :func:`_weight_grad_target` allows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temperature: float, chunk_rows: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        out_dtype = torch.float32 if hidden.dtype in HALF_DTYPES else hidden.dtype
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)  # [n]
        lse = torch.empty(n, dtype=out_dtype, device=hidden.device)  # [n]
        keep = any(ctx.needs_input_grad[:3]) and _keeps_logits(n, weight)
        kept: list[torch.Tensor] = []  # the tiles' logits, block by block, slice by slice
        block, tile = _tiles(n, hidden.shape[1], vocab, chunk_rows)
        for r in range(0, n, block):
            h, y = hidden[r : r + block], target[r : r + block]
            # log-sum-exp over the vocabulary slices, online: running max m and Σ exp(z − m)
            run_max = torch.full((h.shape[0],), float("-inf"), dtype=out_dtype, device=h.device)
            run_sum = torch.zeros(h.shape[0], dtype=out_dtype, device=h.device)
            picked = torch.empty(h.shape[0], dtype=out_dtype, device=h.device)  # z_y
            for v in range(0, vocab, tile):
                b = None if bias is None else bias[v : v + tile]
                logits = _head_logits(h, weight[v : v + tile], b, temperature)  # [R, Vb]
                hit = (y >= v) & (y < v + logits.shape[1])
                if bool(hit.any()):
                    rows = hit.nonzero().squeeze(-1)
                    picked[rows] = logits[rows, y[rows] - v]
                new_max = torch.maximum(run_max, logits.amax(dim=1))
                if keep:
                    kept.append(logits)
                    shifted = logits - new_max[:, None]
                else:
                    shifted = logits.sub_(new_max[:, None])
                run_sum.mul_(torch.exp(run_max - new_max)).add_(shifted.exp_().sum(dim=1))
                run_max = new_max
                del logits, shifted
            lse[r : r + block] = run_max + torch.log(run_sum)
            logp[r : r + block] = picked - lse[r : r + block]
        ctx.save_for_backward(hidden, weight, bias, target, lse, *kept)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, target, lse, *kept = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        acc = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w, fresh = _weight_grad_target(weight) if need_w else (None, False)
        in_place = grad_w is not None
        if need_w and not in_place:
            grad_w, fresh = torch.empty(weight.shape, dtype=acc, device=weight.device), True
        grad_b = torch.empty(vocab, dtype=acc, device=weight.device) if need_b else None
        block, tile = _tiles(n, hidden.shape[1], vocab, chunk_rows)
        tiles = iter(kept)
        for r in range(0, n, block):
            h = hidden[r : r + block]  # [R, H]
            y = target[r : r + block]
            g = grad_logp[r : r + block].to(acc).unsqueeze(-1)  # [R, 1]
            row_lse = lse[r : r + block].unsqueeze(-1)
            for v in range(0, vocab, tile):
                w = weight[v : v + tile]  # [Vb, H]
                b = None if bias is None else bias[v : v + tile]
                # ∂ log p(y) / ∂ logits = (onehot(y) − softmax) / τ, scaled by the incoming gradient g
                logits = next(tiles).sub(row_lse) if kept else _head_logits(h, w, b, temperature).sub_(row_lse)
                grad_logits = logits.exp_().mul_(-g)  # [R, Vb]
                hit = (y >= v) & (y < v + w.shape[0])
                if bool(hit.any()):
                    rows = hit.nonzero().squeeze(-1)
                    grad_logits.index_put_((rows, y[rows] - v), g[rows, 0], accumulate=True)
                if temperature != 1.0:
                    grad_logits.div_(temperature)
                if grad_h is not None:
                    if weight.dtype == acc:
                        grad_h[r : r + block].addmm_(grad_logits, w)
                    else:
                        grad_h[r : r + block] += (grad_logits.to(weight.dtype) @ w).to(acc)
                if grad_w is not None:  # [Vb, H], written in place (out=, addmm_): no [Vb, H] temporary
                    if r == 0 and fresh:
                        torch.mm(grad_logits.t(), h.to(acc), out=grad_w[v : v + tile])
                    else:
                        grad_w[v : v + tile].addmm_(grad_logits.t(), h.to(acc))
                if grad_b is not None:
                    gb = grad_logits.sum(0).to(acc)
                    if r == 0:
                        grad_b[v : v + tile] = gb
                    else:
                        grad_b[v : v + tile] += gb
                del logits, grad_logits
        if n == 0:
            for t in (grad_w if fresh else None, grad_b):
                if t is not None:
                    t.zero_()
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        if in_place:
            grad_w = None  # already in weight.grad
        elif grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _is_plain_linear(head) -> bool:
    # a subclass (LoRA, quantised) or a hook may change what head(x) computes: use plain autograd then
    return type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


def _logp_of_rows(head, hidden_rows: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden_rows).float() if hidden_rows.dtype in HALF_DTYPES else head(hidden_rows)
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
    applies the LM head to those rows only, in chunks of ``chunk_size`` rows (default: about 2^24
    logits per chunk), with and without grad; ``sparse=False`` materialises the full [B, T, V]
    logits (the reference path).
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
        logp = torch.log_softmax(logits.float() if logits.dtype in HALF_DTYPES else logits, -1)
        return logp[row, pos, target.to(logp.device)]
    hidden = last_hidden_states(model, batch.input_ids)
    _, head = _backbone_and_head(model)
    rows = hidden[row.to(hidden.device), pos.to(hidden.device)]  # [n, H]
    target = target.to(hidden.device)
    if _is_plain_linear(head):
        chunk_rows = lm_head_chunk_rows(head.out_features, chunk_size)
        return _SampledTokenLogProb.apply(rows, head.weight, head.bias, target, float(temperature), chunk_rows)
    chunk_rows = lm_head_chunk_rows(getattr(head, "out_features", 0) or 1, chunk_size)
    parts = [
        _logp_of_rows(head, rows[s : s + chunk_rows], target[s : s + chunk_rows], temperature)
        for s in range(0, rows.shape[0], chunk_rows)
    ]
    return torch.cat(parts) if parts else rows.new_zeros(0)


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
        atol = 5e-2 if param.dtype in HALF_DTYPES else 1e-4
    batch = build_response_batch([ids[0].tolist()], [2], [6])
    batch.input_ids = batch.input_ids.to(device)
    with torch.no_grad():
        try:
            sparse = sampled_token_log_probs(model, batch, sparse=True)
        except TypeError:
            return False
        dense = sampled_token_log_probs(model, batch, sparse=False)
    return bool(torch.allclose(sparse.double(), dense.double(), atol=atol, rtol=0))
