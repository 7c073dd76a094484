"""Per-token kernels of the self-distillation losses and PW-OPSD position weights (docs/method.md §7–8).

A kernel maps one chunk of rows, `(student_logits [n, V], teacher_logits [n, V] | None, extras)`,
to per-token values `[n]` (or `(values, aux)`); `ta_opd.sd_losses` binds hyper-parameters with
`functools.partial` and hands the kernel to the naive path or to `ta_opd.chunked`. The teacher
logits arrive detached. Kernels assume finite student logits (LM-head outputs); the teacher may
put −inf on masked vocabulary entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ta_opd.chunked import LogitSource, auto_chunk_size, chunked_token_stats, vocab_size
from ta_opd.losses import ppo_clip_policy_loss


def scaled_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def p_log_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """p·(log p − log q) elementwise with 0·log 0 = 0 (p = exp(logp))."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def full_p_log_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Full-vocabulary p·(log p − log q) with fewer [n, V] temporaries than `p_log_ratio`.

    log p may contain −inf (a masked vocabulary entry): it is clamped to the most negative finite
    value so that 0·(finite) = 0. log q must be finite where p = 0 (LM-head log-probs always are).
    """
    if not logp.requires_grad:
        logp = logp.clamp_min(torch.finfo(logp.dtype).min)
    return logp.exp() * (logp - logq)


def kl_divergence(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Full-vocabulary KL(a‖b) = Σ_v a(v)(log a(v) − log b(v)) of each row ``[n, V]`` → ``[n]``: the one
    implementation (the JSD endpoints, the trainer's teacher-divergence metric, the fixed-context diagnostic)."""
    return full_p_log_ratio(logp_a, logp_b).sum(-1)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ---------------------------------------------------------------------------------------------
# Per-token kernels (operate on one chunk: logits [n, V]); all detach the teacher
# ---------------------------------------------------------------------------------------------


def opsd_token(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float, clip: float) -> Tensor:
    # ℓ_t = Σ_v min(p_T(v)(log p_T(v) − log p_S(v)), clip)   [n]
    ls = scaled_log_softmax(s, temperature)  # [n, V]
    lt = scaled_log_softmax(t, temperature)  # [n, V]
    return full_p_log_ratio(lt, ls).clamp(max=clip).sum(-1)


def eopd_token(
    s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float, eps_clip: float, gate: float, k: int
) -> tuple[Tensor, dict[str, Tensor]]:
    ls = scaled_log_softmax(s, temperature)  # [n, V]
    lt = scaled_log_softmax(t, temperature)  # [n, V]
    y = ex["target_ids"].unsqueeze(-1)  # [n, 1]
    logp = ls.gather(-1, y).squeeze(-1)  # log p_S(y_t)  [n]
    old = ex["old_logp"] if "old_logp" in ex else logp.detach()
    adv = (lt.gather(-1, y).squeeze(-1) - old).detach()  # A_t = sg(log p_T(y_t) − log p_old(y_t))
    ppo, _ = ppo_clip_policy_loss(logp, old, adv, eps_clip, eps_clip)
    entropy_t = -full_p_log_ratio(lt, torch.zeros((), dtype=lt.dtype)).sum(-1)  # H(p_T) in nats  [n]
    top_lt, top_ids = lt.topk(min(k, lt.shape[-1]), dim=-1)  # [n, K]
    log_pt_tilde = F.log_softmax(top_lt, dim=-1)  # p̃_T renormalised on the teacher's top-K
    fkl = p_log_ratio(log_pt_tilde, ls.gather(-1, top_ids)).sum(-1)  # [n]
    gate_on = entropy_t > gate
    value = ppo + gate_on.to(ppo.dtype) * fkl
    return value, {"ppo": ppo.detach(), "fkl_topk": fkl.detach(), "gate": gate_on.to(ppo.dtype)}


def reopold_stats(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float) -> dict[str, Tensor]:
    ls = scaled_log_softmax(s, temperature)
    lt = scaled_log_softmax(t, temperature)
    y = ex["target_ids"].unsqueeze(-1)
    return {
        "logp_s": ls.gather(-1, y).squeeze(-1),
        "logp_t": lt.gather(-1, y).squeeze(-1),
        "entropy_s": -full_p_log_ratio(ls, torch.zeros((), dtype=ls.dtype)).sum(-1),
    }


def reopold_token(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float) -> Tensor:
    # ℓ_t = −R̂_t · log p_S(y_t)   (R̂ detached; the mask M is applied by the reduction)
    logp = scaled_log_softmax(s, temperature).gather(-1, ex["target_ids"].unsqueeze(-1)).squeeze(-1)
    return -ex["reward"] * logp


def topk_rkl_token(
    s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float, eps_clip: float, eps_clip_high: float
) -> Tensor:
    ids = ex["student_topk_ids"]  # [n, K], −1 padding
    tlogp = ex["teacher_logp_on_student_topk"]  # log p_T(k)  [n, K]
    logp = scaled_log_softmax(s, temperature).gather(-1, ids.clamp_min(0))  # log p_θ(k)  [n, K]
    old = ex["student_topk_old_logp"] if "student_topk_old_logp" in ex else logp.detach()
    valid = (ids >= 0) & torch.isfinite(old) & torch.isfinite(tlogp)  # [n, K]
    zero = torch.zeros_like(logp)
    old = torch.where(valid, old, zero)
    masked_old = torch.where(valid, old, torch.full_like(old, -math.inf))
    lse = torch.logsumexp(masked_old, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.where(valid, (old - lse).exp(), zero)  # w_k: old student probs renormalised on top-K
    adv = torch.where(valid, w * (tlogp - old), zero).detach()  # A_{t,k} = w_k (log p_T(k) − log p_old(k))
    ppo, _ = ppo_clip_policy_loss(torch.where(valid, logp, zero), old, adv, eps_clip, eps_clip_high)
    return torch.where(valid, ppo, zero).sum(-1)  # Σ_k PPO-clip per (t, k)   [n]


def topk_fkl_token(
    s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float, tail_bucket: bool, renormalize: bool
) -> Tensor:
    ids = ex["teacher_topk_ids"]  # [n, K], −1 padding
    lt = ex["teacher_topk_logp"]  # log p_T(v), v ∈ TopK_T   [n, K]
    valid = (ids >= 0) & torch.isfinite(lt)
    neg_inf = torch.full_like(lt, -math.inf)
    lt = torch.where(valid, lt, neg_inf)
    if renormalize:
        lse = torch.logsumexp(lt, dim=-1, keepdim=True)
        lt = torch.where(valid, lt - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)), neg_inf)
    ls_k = scaled_log_softmax(s, temperature).gather(-1, ids.clamp_min(0))  # log p_S(v)  [n, K]
    ls_k = torch.where(valid, ls_k, torch.zeros_like(ls_k))
    value = p_log_ratio(lt, ls_k).sum(-1)  # Σ_{v∈TopK_T} p_T(v)(log p_T(v) − log p_S(v))
    if tail_bucket and not renormalize:
        # Remaining mass as one more outcome: (1 − P_T) log((1 − P_T)/(1 − P_S)), P = mass on TopK_T.
        tail_t = (1.0 - lt.exp().sum(-1)).clamp_min(0.0)
        lse_s = torch.logsumexp(torch.where(valid, ls_k, neg_inf), dim=-1).clamp_max(0.0)
        log_tail_s = torch.log((-torch.expm1(lse_s)).clamp_min(torch.finfo(s.dtype).tiny))
        log_tail_t = torch.log(tail_t.clamp_min(torch.finfo(s.dtype).tiny))
        value = value + torch.where(tail_t > 0, tail_t * (log_tail_t - log_tail_s), torch.zeros_like(tail_t))
    return value


def jsd_token(
    s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor], *, temperature: float, beta: float, normalize: bool
) -> Tensor:
    ls = scaled_log_softmax(s, temperature)
    lt = scaled_log_softmax(t, temperature)
    if normalize:
        # JSD_β/(β(1−β)) cancels catastrophically near the endpoints (rounding ~ eps/β); within
        # sqrt(eps) of one the limit itself is used, so the error stays O(sqrt(eps)) either way.
        snap = math.sqrt(torch.finfo(s.dtype).eps)
        beta = 0.0 if beta < snap else 1.0 if beta > 1.0 - snap else beta
    if beta == 0.0:
        return kl_divergence(lt, ls)  # KL(p_T ‖ p_S), the β → 0 limit
    if beta == 1.0:
        return kl_divergence(ls, lt)  # KL(p_S ‖ p_T), the β → 1 limit
    # M = β p_T + (1 − β) p_S;  JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    value = beta * full_p_log_ratio(lt, lm).sum(-1) + (1.0 - beta) * full_p_log_ratio(ls, lm).sum(-1)
    return value / (beta * (1.0 - beta)) if normalize else value


def divergence_token(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``rkl`` = KL(p_S‖p_T) and ``fkl`` = KL(p_T‖p_S) at τ = 1, in float64 (a metric, never differentiated)."""
    ls, lt = F.log_softmax(s.detach().double(), -1), F.log_softmax(t.double(), -1)
    return {"rkl": kl_divergence(ls, lt), "fkl": kl_divergence(lt, ls)}


# ---------------------------------------------------------------------------------------------
# Position weights (PW-OPSD)
# ---------------------------------------------------------------------------------------------


def valid_rank_in_sample(
    valid_mask: Tensor, sample_index: Tensor, position: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(i_t [N] 1-based index among its sample's valid tokens (0 if invalid), L_b [N] valid length)."""
    if sample_index.shape != valid_mask.shape:
        raise ValueError(f"sample_index {tuple(sample_index.shape)} must match mask {tuple(valid_mask.shape)}")
    n = valid_mask.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=valid_mask.device)
        return empty, empty
    sid = sample_index.long()
    if int(sid.min()) < 0:
        raise ValueError(f"sample_index must be >= 0, got min {int(sid.min())}")
    key = sid if position is None else sid * (int(position.max()) + 1) + position.long()
    perm = torch.sort(key, stable=True).indices  # rows grouped by sample, in position order
    v_sorted = valid_mask[perm].long()
    cum = torch.cumsum(v_sorted, 0)
    excl = cum - v_sorted
    n_samples = int(sid.max()) + 1
    s_sorted = sid[perm]
    start = torch.full((n_samples,), n, dtype=torch.long, device=sid.device).scatter_reduce(
        0, s_sorted, excl, reduce="amin"
    )
    rank = torch.empty_like(cum)
    rank[perm] = torch.where(v_sorted.bool(), cum - start[s_sorted], torch.zeros_like(cum))
    lengths = torch.zeros(n_samples, dtype=torch.long, device=sid.device).index_add_(0, sid, valid_mask.long())
    return rank, lengths[sid]


def position_weights(
    valid_mask: Tensor,
    sample_index: Tensor,
    position: Tensor | None = None,
    w_min: float = 0.25,
    tau: float = 0.30,
    s: float = 0.10,
) -> Tensor:
    """w_t = w_min + (1 − w_min)·σ((f_t − τ)/s), f_t = (i_t − 0.5)/L_b (docs/method.md §7); 0 if invalid."""
    if not (0.0 <= w_min <= 1.0) or not s > 0:
        raise ValueError(f"need 0 <= w_min <= 1 and s > 0, got w_min={w_min}, s={s}")
    rank, length = valid_rank_in_sample(valid_mask, sample_index, position)
    f = (rank.double() - 0.5) / length.clamp_min(1).double()
    w = w_min + (1.0 - w_min) * torch.sigmoid((f - tau) / s)
    return torch.where(valid_mask, w, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------
# Teacher-side helpers (no grad, chunked)
# ---------------------------------------------------------------------------------------------


def chunk_rows(source: LogitSource, chunk_size: int | None) -> int:
    """Rows per chunk: `chunk_size` when given, else `auto_chunk_size` for the source's vocabulary."""
    return chunk_size or auto_chunk_size(vocab_size(source))


def teacher_topk(
    teacher: LogitSource, k: int, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(ids [N, k] int64, log-probs [N, k]) of the top-k of softmax(logits / temperature)."""

    def fn(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logp, ids = scaled_log_softmax(s, temperature).topk(min(k, s.shape[-1]), dim=-1)
        return {"ids": ids, "logp": logp}

    stats = chunked_token_stats(fn, teacher, None, {}, chunk_rows(teacher, chunk_size))
    return stats["ids"], stats["logp"]


def gather_logprobs(
    source: LogitSource, ids: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """log softmax(logits / temperature) at ids [N, K] (−inf where id < 0), no grad."""

    def fn(s: Tensor, t: Tensor | None, ex: Mapping[str, Tensor]) -> dict[str, Tensor]:
        lp = scaled_log_softmax(s, temperature).gather(-1, ex["ids"].clamp_min(0))
        return {"logp": torch.where(ex["ids"] >= 0, lp, torch.full_like(lp, -math.inf))}

    return chunked_token_stats(fn, source, None, {"ids": ids.long()}, chunk_rows(source, chunk_size))["logp"]
