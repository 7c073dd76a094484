"""Self-distillation loss family and other OPD loss variants (METHOD.md §7–8).

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
position order when omitted). `LOSSES` maps a loss name to `fn(inputs, cfg) -> LossOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from ta_opd.chunked import (
    LMHeadInput,
    LogitSource,
    TokenFn,
    auto_chunk_size,
    chunked_loss,
    chunked_token_stats,
    materialize_logits,
    num_rows,
    vocab_size,
)
from ta_opd.losses import agg_loss
from ta_opd.registry import Registry
from ta_opd.sd_kernels import (
    check_temperature,
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
    "LOSSES",
    "LossOutput",
    "SDLossConfig",
    "SDLossInputs",
    "eopd_loss",
    "gather_logprobs",
    "jsd_loss",
    "opsd_loss",
    "position_weights",
    "pwopsd_loss",
    "reduction_coefficients",
    "reopold_loss",
    "teacher_topk",
    "topk_fkl_loss",
    "topk_rkl_loss",
    "valid_rank_in_sample",
]


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar, with graph
    per_token: Tensor  # [N] detached per-token values ℓ_t (0 on rows outside the loss mask)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached 0-dim tensors


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def reduction_coefficients(
    mask: Tensor,
    mode: str,
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
) -> Tensor:
    """coef [N] float64 with agg_loss(v, mask, mode, ...) == Σ_t coef_t v_t for every v.

    Every agg_loss mode is linear in v, so its gradient with respect to v is this vector;
    asking agg_loss for it keeps agg_loss the one owner of denominators.
    """
    probe = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        out = agg_loss(
            probe,
            mask,
            mode,
            sample_index=sample_index,
            global_token_count=global_token_count,
            global_sample_count=global_sample_count,
        )
        if not out.requires_grad:
            return torch.zeros_like(probe).detach()
        (coef,) = torch.autograd.grad(out, probe, allow_unused=True)
    return torch.zeros_like(probe).detach() if coef is None else coef.detach()


@dataclass(frozen=True)
class _Reduction:
    mask: Tensor  # [N] bool
    mode: str
    sample_index: Tensor | None = None
    global_token_count: int | Tensor | None = None
    global_sample_count: int | Tensor | None = None
    weights: Tensor | None = None  # [N] extra per-token factor (PW-OPSD w_t), constant


def _naive_path(student: LogitSource, chunk_size: int | None) -> bool:
    """True when `student` is evaluated in one pass over [N, V] (see the module doc for `chunk_size`)."""
    return chunk_size == 0 or (chunk_size is None and not isinstance(student, LMHeadInput))


def _run(
    token_fn: TokenFn,
    student: LogitSource,
    teacher: LogitSource | None,
    extras: Mapping[str, Tensor],
    red: _Reduction,
    chunk_size: int | None,
) -> LossOutput:
    """Naive or chunked evaluation of `agg_loss(w · token_fn(...), mask, mode)`."""
    mask = red.mask
    if mask.dtype != torch.bool or mask.shape != (num_rows(student),):
        raise ValueError(f"loss_mask must be bool [N] = [{num_rows(student)}], got {mask.dtype} {tuple(mask.shape)}")
    agg_kwargs = dict(
        sample_index=red.sample_index,
        global_token_count=red.global_token_count,
        global_sample_count=red.global_sample_count,
    )
    if _naive_path(student, chunk_size):
        s_logits = materialize_logits(student)
        t_logits = None if teacher is None else materialize_logits(teacher).detach()
        result = token_fn(s_logits, t_logits, extras)
        values, aux = (result[0], dict(result[1])) if isinstance(result, tuple) else (result, {})
        weighted = values if red.weights is None else values * red.weights
        loss = agg_loss(weighted, mask, red.mode, **agg_kwargs)
        per_token = torch.where(mask, values.detach(), torch.zeros_like(values.detach()))
        aux = {k: torch.where(mask, v.detach(), torch.zeros_like(v.detach())) for k, v in aux.items()}
    else:
        rows = chunk_size or auto_chunk_size(vocab_size(student))
        coef = reduction_coefficients(mask, red.mode, **agg_kwargs)
        if red.weights is not None:
            coef = coef * red.weights.detach().to(coef.dtype)
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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, {}, red, chunk_size)


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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count, weights)
    out = _run(fn, student, teacher, {}, red, chunk_size)
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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, extras, red, chunk_size)


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
        size = chunk_size or auto_chunk_size(vocab_size(student))
        stats = chunked_token_stats(stat_fn, student, teacher, extras, size, rows=rows)
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
    out = _run(fn, student, teacher, extras, _Reduction(mask, "token-mean", None, global_token_count), chunk_size)
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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, None, extras, red, chunk_size)


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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, None, extras, red, chunk_size)


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
    red = _Reduction(loss_mask, reduction, sample_index, global_token_count, global_sample_count)
    return _run(fn, student, teacher, {}, red, chunk_size)


# ---------------------------------------------------------------------------------------------
# Registry: name -> fn(inputs, cfg) -> LossOutput
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDLossConfig:
    """Hyper-parameters of every loss here (defaults of METHOD.md §7–8).

    `temperature=None` means each loss's default: 1.1 for the §7 family (opsd, pwopsd, eopd,
    reopold), 1.0 for the §8 variants (topk_rkl, topk_fkl, jsd).
    """

    temperature: float | None = None
    fkl_clip: float = 0.05
    position_w_min: float = 0.25
    position_tau: float = 0.30
    position_s: float = 0.10
    pwopsd_reduction: str = "seq-mean-token-mean"  # global switch: "token-mean"
    reduction: str = "token-mean"  # reduction of opsd, eopd and the §8 losses
    eopd_eps_clip: float = 0.2
    eopd_entropy_gate: float = 0.8
    eopd_topk: int = 16
    reopold_lambda: float = 0.1
    reopold_warmup_steps: int = 50
    reopold_entropy_percentile: float = 0.8
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28
    topk_tail_bucket: bool = False
    topk_renormalize_teacher: bool = False
    jsd_beta: float = 0.5
    jsd_normalize: bool = True
    chunk_size: int | None = None

    def temp(self, default: float) -> float:
        return default if self.temperature is None else self.temperature


@dataclass
class SDLossInputs:
    """Per-row tensors of one (micro-)batch; which fields a loss needs is in docs/self_distillation.md."""

    student: LogitSource  # logits [N, V] or LMHeadInput
    loss_mask: Tensor  # [N] bool, after token selection
    teacher: LogitSource | None = None  # full teacher distribution (opsd, pwopsd, eopd, reopold, jsd)
    target_ids: Tensor | None = None  # [N] sampled tokens y_t (eopd, reopold)
    old_logp: Tensor | None = None  # [N] log p_old(y_t) (eopd)
    sample_index: Tensor | None = None  # [N] (pwopsd; per-sample reductions)
    position: Tensor | None = None  # [N] 0-based response position (pwopsd)
    valid_mask: Tensor | None = None  # [N] bool, pre-selection valid tokens (pwopsd positions)
    student_topk_ids: Tensor | None = None  # [N, K] (topk_rkl)
    student_topk_old_logp: Tensor | None = None  # [N, K] (topk_rkl)
    teacher_logp_on_student_topk: Tensor | None = None  # [N, K] (topk_rkl)
    teacher_topk_ids: Tensor | None = None  # [N, K] (topk_fkl)
    teacher_topk_logp: Tensor | None = None  # [N, K] (topk_fkl)
    step: int = 0  # optimizer step (reopold warm-up)
    global_token_count: int | Tensor | None = None
    global_sample_count: int | Tensor | None = None

    def require(self, loss: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"loss {loss!r} needs inputs {missing}")


LossFn = Callable[[SDLossInputs, SDLossConfig], LossOutput]
LOSSES: Registry[LossFn] = Registry("loss")  # name -> fn(inputs, cfg); CLI choices = LOSSES.names()


def _counts(x: SDLossInputs) -> dict:
    return dict(
        sample_index=x.sample_index,
        global_token_count=x.global_token_count,
        global_sample_count=x.global_sample_count,
    )


@LOSSES.decorator("opsd")
def _opsd(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("opsd", "teacher")
    return opsd_loss(
        x.student, x.teacher, x.loss_mask, temperature=c.temp(1.1), clip=c.fkl_clip, reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@LOSSES.decorator("pwopsd")
def _pwopsd(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("pwopsd", "teacher", "sample_index")
    return pwopsd_loss(
        x.student, x.teacher, x.loss_mask, x.sample_index, position=x.position, valid_mask=x.valid_mask,
        temperature=c.temp(1.1), clip=c.fkl_clip, w_min=c.position_w_min, tau=c.position_tau, s=c.position_s,
        reduction=c.pwopsd_reduction, global_token_count=x.global_token_count,
        global_sample_count=x.global_sample_count, chunk_size=c.chunk_size,
    )  # fmt: skip


@LOSSES.decorator("eopd")
def _eopd(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("eopd", "teacher", "target_ids")
    return eopd_loss(
        x.student, x.teacher, x.target_ids, x.loss_mask, old_logp=x.old_logp, temperature=c.temp(1.1),
        eps_clip=c.eopd_eps_clip, entropy_gate=c.eopd_entropy_gate, topk=c.eopd_topk, reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@LOSSES.decorator("reopold")
def _reopold(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("reopold", "teacher", "target_ids")
    return reopold_loss(
        x.student, x.teacher, x.target_ids, x.loss_mask, step=x.step, temperature=c.temp(1.1),
        lam=c.reopold_lambda, warmup_steps=c.reopold_warmup_steps,
        entropy_percentile=c.reopold_entropy_percentile, global_token_count=x.global_token_count,
        chunk_size=c.chunk_size,
    )  # fmt: skip


@LOSSES.decorator("topk_rkl")
def _topk_rkl(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("topk_rkl", "student_topk_ids", "teacher_logp_on_student_topk")
    return topk_rkl_loss(
        x.student, x.student_topk_ids, x.teacher_logp_on_student_topk, x.loss_mask,
        student_topk_old_logp=x.student_topk_old_logp, temperature=c.temp(1.0), eps_clip=c.eps_clip,
        eps_clip_high=c.eps_clip_high, reduction=c.reduction, chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@LOSSES.decorator("topk_fkl")
def _topk_fkl(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("topk_fkl", "teacher_topk_ids", "teacher_topk_logp")
    return topk_fkl_loss(
        x.student, x.teacher_topk_ids, x.teacher_topk_logp, x.loss_mask, tail_bucket=c.topk_tail_bucket,
        renormalize_teacher=c.topk_renormalize_teacher, temperature=c.temp(1.0), reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@LOSSES.decorator("jsd")
def _jsd(x: SDLossInputs, c: SDLossConfig) -> LossOutput:
    x.require("jsd", "teacher")
    return jsd_loss(
        x.student, x.teacher, x.loss_mask, beta=c.jsd_beta, normalize=c.jsd_normalize, temperature=c.temp(1.0),
        reduction=c.reduction, chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip
