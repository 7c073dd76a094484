"""Self-distillation loss family and other OPD loss variants (docs/method.md §7–8).

Every loss is a pure function of tensors and a loss mask (the mask *after* token selection,
so selectors combine with every loss) and returns a `LossOutput`. Denominators belong to
`ta_opd.losses.agg_loss` alone; a loss only names its reduction mode.

Full-vocabulary inputs (`student`, `teacher`) are either logits `[N, V]` or
`LMHeadInput(hidden [N, H], weight [V, H])`. With `chunk_size=None` (default), logits run the
naive path (one pass over `[N, V]`, `agg_loss` on per-token values) and an `LMHeadInput` runs
the fused chunked path of `ta_opd.chunked` (peak memory ~ `[chunk, V]`); `chunk_size=0` forces
the naive path, `chunk_size>0` forces chunks of that many rows. Both give the same values and
gradients (tests/ta_opd/test_chunked.py). The teacher is never differentiated.

Rows: N response tokens of a batch, flattened; `sample_index [N]` (int64, 0..B-1) names each
row's sample, `position [N]` its 0-based position in the response (rows of one sample in
position order when omitted). The `--loss-type` registry over these functions is `ta_opd.loss_registry.LOSSES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor

from ta_opd.chunked import (
    LMHeadInput,
    LogitSource,
    TokenFn,
    chunked_loss,
    chunked_token_stats,
    materialize_logits,
    num_rows,
)
from ta_opd.losses import LossOutput, Reduction
from ta_opd.sd_kernels import (
    check_temperature,
    chunk_rows,
    divergence_token,
    eopd_token,
    gather_logprobs,
    jsd_token,
    opsd_token,
    position_weights,
    reopold_stats,
    reopold_token,
    teacher_topk,
    topk_fkl_token,
    topk_rkl_token,
    valid_rank_in_sample,
)

__all__ = [
    "LossOutput",
    "eopd_loss",
    "gather_logprobs",
    "jsd_loss",
    "opsd_loss",
    "position_weights",
    "pwopsd_loss",
    "reopold_loss",
    "student_topk",
    "teacher_divergence",
    "teacher_topk",
    "topk_fkl_loss",
    "topk_rkl_loss",
    "valid_rank_in_sample",
]


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def _naive_path(student: LogitSource, chunk_size: int | None) -> bool:
    """True when `student` is evaluated in one pass over [N, V] (see the module doc for `chunk_size`)."""
    return chunk_size == 0 or (chunk_size is None and not isinstance(student, LMHeadInput))


def _run(
    token_fn: TokenFn,
    student: LogitSource,
    teacher: LogitSource | None,
    extras: Mapping[str, Tensor],
    mask: Tensor,
    reduce: Reduction,
    chunk_size: int | None,
    weights: Tensor | None = None,
) -> LossOutput:
    """Naive or chunked `reduce(w · token_fn(...), mask)`; `weights` w [N]: PW-OPSD's constant factor."""
    if mask.dtype != torch.bool or mask.shape != (num_rows(student),):
        raise ValueError(f"loss_mask must be bool [N] = [{num_rows(student)}], got {mask.dtype} {tuple(mask.shape)}")
    if _naive_path(student, chunk_size):
        s_logits = materialize_logits(student)
        t_logits = None if teacher is None else materialize_logits(teacher).detach()
        result = token_fn(s_logits, t_logits, extras)
        values, aux = (result[0], dict(result[1])) if isinstance(result, tuple) else (result, {})
        loss = reduce(values if weights is None else values * weights, mask)
        per_token = torch.where(mask, values.detach(), torch.zeros_like(values.detach()))
        aux = {k: torch.where(mask, v.detach(), torch.zeros_like(v.detach())) for k, v in aux.items()}
    else:
        rows = chunk_rows(student, chunk_size)
        coef = reduce.coefficients(mask)
        if weights is not None:
            coef = coef * weights.detach().to(coef.dtype)
        loss, per_token, aux = chunked_loss(token_fn, student, teacher, extras, coef, rows)
    count = mask.sum().clamp_min(1)
    metrics = {f"{k}_mean": (v.double().sum() / count).detach() for k, v in aux.items()}
    metrics["per_token_mean"] = (per_token.double().sum() / count).detach()
    return LossOutput(loss=loss, per_token=per_token, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# The losses (pure functions)
# ---------------------------------------------------------------------------------------------


def opsd_loss(
    student: LogitSource,
    teacher: LogitSource,
    loss_mask: Tensor,
    *,
    temperature: float = 1.1,
    clip: float = 0.05,
    reduction: str = "token-mean",
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """OPSD (§7): ℓ_t = Σ_v min(p_T(v)(log p_T(v) − log p_S(v)), clip); loss = Σ ℓ_t / N_valid."""
    check_temperature(temperature)
    fn = partial(opsd_token, temperature=temperature, clip=clip)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, {}, loss_mask, red, chunk_size)


def pwopsd_loss(
    student: LogitSource,
    teacher: LogitSource,
    loss_mask: Tensor,
    sample_index: Tensor,
    *,
    position: Tensor | None = None,
    valid_mask: Tensor | None = None,
    temperature: float = 1.1,
    clip: float = 0.05,
    w_min: float = 0.25,
    tau: float = 0.30,
    s: float = 0.10,
    reduction: str = "seq-mean-token-mean",
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """PW-OPSD (§7): OPSD terms weighted by w_t; per-sample Σ w ℓ / L_b, mean over samples.

    `reduction="token-mean"` is the global switch (Σ w ℓ / N_valid). Positions f_t use
    `valid_mask` (default: `loss_mask`); pass the pre-selection mask to keep response positions
    when a selector removed tokens.
    """
    check_temperature(temperature)
    weights = position_weights(loss_mask if valid_mask is None else valid_mask, sample_index, position, w_min, tau, s)
    if global_sample_count is None and reduction != "token-mean":
        # "mean over samples with a valid token" (§7): agg_loss's default counts every sample id.
        global_sample_count = int(torch.unique(sample_index[loss_mask]).numel())
    fn = partial(opsd_token, temperature=temperature, clip=clip)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    out = _run(fn, student, teacher, {}, loss_mask, red, chunk_size, weights)
    kept = loss_mask.bool()
    out.metrics["position_weight_mean"] = (weights[kept].sum() / kept.sum().clamp_min(1)).detach()
    return out


def eopd_loss(
    student: LogitSource,
    teacher: LogitSource,
    target_ids: Tensor,
    loss_mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    temperature: float = 1.1,
    eps_clip: float = 0.2,
    entropy_gate: float = 0.8,
    topk: int = 16,
    reduction: str = "token-mean",
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """EOPD (§7): PPO-clip with A = sg(log p_T(y) − log p_old(y)) + 1[H(p_T) > gate]·top-K FKL(p̃_T ‖ p_S).

    `old_logp [N]` defaults to the current log p_S(y) detached (ratio 1, one on-policy epoch).
    """
    check_temperature(temperature)
    extras = {"target_ids": target_ids.long()}
    if old_logp is not None:
        extras["old_logp"] = old_logp.detach()
    fn = partial(eopd_token, temperature=temperature, eps_clip=eps_clip, gate=entropy_gate, k=topk)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, extras, loss_mask, red, chunk_size)


def reopold_loss(
    student: LogitSource,
    teacher: LogitSource,
    target_ids: Tensor,
    loss_mask: Tensor,
    *,
    step: int,
    temperature: float = 1.1,
    lam: float = 0.1,
    warmup_steps: int = 50,
    entropy_percentile: float = 0.8,
    global_token_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """REOPOLD (§7): loss = −Σ R̂·M·log p_S(y) / Σ M with R̂ = max(R, log(λ/(1−λ))).

    M = 1[R ≥ floor] while step < warmup_steps, then 1[H_S ≥ q(entropy_percentile)] with the
    quantile over the loss-masked rows given here. `global_token_count`, if given, must be Σ M.
    """
    check_temperature(temperature)
    if not 0.0 < lam < 1.0 or not 0.0 <= entropy_percentile <= 1.0:
        raise ValueError(f"need 0 < lam < 1 and 0 <= entropy_percentile <= 1, got {lam}, {entropy_percentile}")
    extras = {"target_ids": target_ids.long()}
    stat_fn = partial(reopold_stats, temperature=temperature)
    if _naive_path(student, chunk_size):
        with torch.no_grad():
            t_logits = materialize_logits(teacher)
            stats = stat_fn(materialize_logits(student).detach(), t_logits.detach(), extras)
    else:
        rows = torch.nonzero(loss_mask).flatten()
        stats = chunked_token_stats(stat_fn, student, teacher, extras, chunk_rows(student, chunk_size), rows=rows)
    reward = stats["logp_t"] - stats["logp_s"]  # R_t (detached)   [N]
    floor = math.log(lam / (1.0 - lam))
    reward_hat = reward.clamp_min(floor)  # R̂_t
    if step < warmup_steps:
        keep = reward >= floor
    elif bool(loss_mask.any()):
        threshold = torch.quantile(stats["entropy_s"][loss_mask].double(), entropy_percentile)
        keep = stats["entropy_s"].double() >= threshold
    else:
        keep = torch.zeros_like(loss_mask)
    mask = loss_mask & keep
    extras["reward"] = reward_hat.detach()
    fn = partial(reopold_token, temperature=temperature)
    out = _run(fn, student, teacher, extras, mask, Reduction("token-mean", None, global_token_count), chunk_size)
    n_valid = loss_mask.sum().clamp_min(1)
    out.metrics["keep_ratio"] = (mask.sum() / n_valid).detach().double()
    out.metrics["reward_mean"] = (torch.where(loss_mask, reward, 0).sum() / n_valid).detach().double()
    return out


def topk_rkl_loss(
    student: LogitSource,
    student_topk_ids: Tensor,
    teacher_logp_on_student_topk: Tensor,
    loss_mask: Tensor,
    *,
    student_topk_old_logp: Tensor | None = None,
    temperature: float = 1.0,
    eps_clip: float = 0.2,
    eps_clip_high: float = 0.28,
    reduction: str = "token-mean",
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Top-K student-support reverse KL (§8): Σ_k PPO-clip(A_{t,k} = w_k (log p_T(k) − log p_old(k))).

    ids [N, K] (−1 padding) are the student's top-K (rollout), `student_topk_old_logp [N, K]`
    their rollout log-probs (default: current, detached), `teacher_logp_on_student_topk [N, K]`
    the teacher's log-probs of the same ids (teacher prefill with `token_ids_logprob`, or
    `gather_logprobs(teacher, ids)`); w = old student probs renormalised on the top-K.
    """
    check_temperature(temperature)
    extras = {
        "student_topk_ids": student_topk_ids.long(),
        "teacher_logp_on_student_topk": teacher_logp_on_student_topk.detach(),
    }
    if student_topk_old_logp is not None:
        extras["student_topk_old_logp"] = student_topk_old_logp.detach()
    fn = partial(topk_rkl_token, temperature=temperature, eps_clip=eps_clip, eps_clip_high=eps_clip_high)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, None, extras, loss_mask, red, chunk_size)


def topk_fkl_loss(
    student: LogitSource,
    teacher_topk_ids: Tensor,
    teacher_topk_logp: Tensor,
    loss_mask: Tensor,
    *,
    tail_bucket: bool = False,
    renormalize_teacher: bool = False,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Teacher top-K forward KL (§8): Σ_{v∈TopK_T} p_T(v)(log p_T(v) − log p_S(v)), p_S full-vocabulary.

    `tail_bucket=True` adds the remaining mass as one outcome, (1 − P_T) log((1 − P_T)/(1 − P_S)),
    which makes ℓ a KL over K + 1 outcomes (≥ 0). `renormalize_teacher=True` uses p̃_T
    renormalised on its top-K instead (also ≥ 0; the tail bucket is then empty and ignored).
    Without either, ℓ can be slightly negative when the student puts more mass on TopK_T.
    """
    check_temperature(temperature)
    extras = {"teacher_topk_ids": teacher_topk_ids.long(), "teacher_topk_logp": teacher_topk_logp.detach()}
    fn = partial(topk_fkl_token, temperature=temperature, tail_bucket=tail_bucket, renormalize=renormalize_teacher)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, None, extras, loss_mask, red, chunk_size)


def jsd_loss(
    student: LogitSource,
    teacher: LogitSource,
    loss_mask: Tensor,
    *,
    beta: float = 0.5,
    normalize: bool = True,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Generalised JSD_β (§8) over the full vocabulary, M = β p_T + (1 − β) p_S.

    `normalize=True` (default) divides by β(1 − β), so the loss is continuous in β with limits
    KL(p_T ‖ p_S) at β → 0 and KL(p_S ‖ p_T) at β → 1, the values used at the endpoints (and
    within sqrt(machine eps) of them, where the quotient loses precision).
    `normalize=False` gives the unscaled β KL(p_T‖M) + (1−β) KL(p_S‖M) (GKD's convention) inside
    (0, 1); the endpoints stay forward / reverse KL.
    """
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    fn = partial(jsd_token, temperature=temperature, beta=float(beta), normalize=normalize)
    red = Reduction(reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, {}, loss_mask, red, chunk_size)


# ---------------------------------------------------------------------------------------------
# Derived inputs and metrics (no grad, chunked)
# ---------------------------------------------------------------------------------------------


def _detached(source: LogitSource) -> LogitSource:
    if isinstance(source, LMHeadInput):
        bias = None if source.bias is None else source.bias.detach()
        return LMHeadInput(source.hidden.detach(), source.weight.detach(), bias)
    return source.detach()


def student_topk(
    student: LogitSource, teacher: LogitSource, k: int, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """topk_rkl's inputs from full distributions: the student's top-k ids ``[N, k]``, their log-probs under the
    current (detached) student as the old policy, and the teacher's log-probs of the same ids."""
    size = chunk_rows(student, chunk_size)
    ids, old = teacher_topk(_detached(student), k, temperature=temperature, chunk_size=size)
    return ids, old, gather_logprobs(teacher, ids, temperature=temperature, chunk_size=size)


def teacher_divergence(
    student: LogitSource, teacher: LogitSource, loss_mask: Tensor, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Means over the rows of ``loss_mask`` of the full-vocabulary KL(p_S‖p_T) (``teacher_rkl``) and
    KL(p_T‖p_S) (``teacher_fkl``) at τ = 1, float64, no grad; {} over no row."""
    rows = loss_mask.nonzero().squeeze(-1)
    if rows.numel() == 0:
        return {}
    s = _detached(student)
    stats = chunked_token_stats(divergence_token, s, teacher, {}, chunk_rows(s, chunk_size), rows=rows)
    return {f"teacher_{k}": v[rows].mean() for k, v in stats.items()}
