"""Every ``--loss-type``: one registry of :class:`LossSpec` entries, each declaring the inputs it reads.

A trainer asks the entry of its ``--loss-type`` what to compute (``spec.needs`` / ``spec.optional``, and which
rows: ``spec.rows``), fills a :class:`LossInputs` with exactly that, and calls ``spec.fn(inputs, cfg)``; it has no
branch per loss. Input names (:data:`INPUTS`):

- ``logp``: sampled-token log-probs log p_S(y_t) ``[N]``, with grad (the cheapest: one LM-head row per token);
- ``old_logp``, ``advantages``: the rollout's pre-step log-probs and OPD advantages ``[N]`` (detached);
- ``student``: the full-vocabulary student, logits ``[N, V]`` or an ``LMHeadInput``, with grad;
- ``teacher``: the full-vocabulary teacher (a teacher model in the trainer), no grad; the top-K variants take
  their top-K lists from it.

The row fields (``loss_mask``, ``target_ids``, ``sample_index``, ``position``, ``valid_mask``) and the step's
counts are always filled. ``rows="kept"``: the trainer may pass the kept rows only (loss mask all ones);
``rows="response"``: every response row with the loss mask (PW-OPSD's position weights count every valid token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ta_opd.chunked import LogitSource
from ta_opd.losses import LossOutput, Reduction, policy_loss, sft_loss
from ta_opd.registry import Registry
from ta_opd.sd_losses import (
    eopd_loss,
    jsd_loss,
    opsd_loss,
    pwopsd_loss,
    reopold_loss,
    student_topk,
    teacher_topk,
    topk_fkl_loss,
    topk_rkl_loss,
)

INPUTS = {
    "logp": "sampled-token log-probs log p_S(y_t) [N], with grad",
    "old_logp": "pre-step log-probs log p_old(y_t) [N] (rollout or trainer), detached",
    "advantages": "OPD advantages [N] (base estimator + λ·(log p_T − log p_old)), detached",
    "student": "full-vocabulary student (logits [N, V] or LMHeadInput), with grad",
    "teacher": "full-vocabulary teacher (logits [N, V] or LMHeadInput) from a teacher model in the trainer",
}
ROWS = ("kept", "response")


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of every loss (defaults of docs/method.md §1, §7–8).

    `temperature=None` means each full-vocabulary loss's default: 1.1 for the §7 family (opsd, pwopsd, eopd,
    reopold), 1.0 for the §8 variants (topk_rkl, topk_fkl, jsd). ``custom_fn(inputs)`` is custom_loss's function.
    """

    temperature: float | None = None
    fkl_clip: float = 0.05
    position_w_min: float = 0.25
    position_tau: float = 0.30
    position_s: float = 0.10
    pwopsd_reduction: str = "seq-mean-token-mean"  # global switch: "token-mean"
    reduction: str = "token-mean"  # reduction of opsd, eopd and the §8 losses
    policy_reduction: str = "seq-mean-token-mean"  # policy_loss and sft_loss (--calculate-per-token-loss: token-mean)
    eopd_eps_clip: float = 0.2
    eopd_entropy_gate: float = 0.8
    eopd_topk: int = 16
    reopold_lambda: float = 0.1
    reopold_warmup_steps: int = 50
    reopold_entropy_percentile: float = 0.8
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28
    topk: int = 16  # K of topk_rkl (student top-K) and topk_fkl (teacher top-K)
    topk_tail_bucket: bool = False
    topk_renormalize_teacher: bool = False
    jsd_beta: float = 0.5
    jsd_normalize: bool = True
    chunk_size: int | None = None
    custom_fn: Callable[[LossInputs], LossOutput | Tensor] | None = None

    def temp(self, default: float) -> float:
        return default if self.temperature is None else self.temperature


@dataclass
class LossInputs:
    """Per-row tensors of one (micro-)batch: the row fields, the step's counts, and the inputs a loss declared."""

    loss_mask: Tensor  # [N] bool, after token selection
    student: LogitSource | None = None
    teacher: LogitSource | None = None
    logp: Tensor | None = None  # [N] log p_S(y_t), with grad
    old_logp: Tensor | None = None  # [N] log p_old(y_t)
    advantages: Tensor | None = None  # [N]
    target_ids: Tensor | None = None  # [N] sampled tokens y_t
    sample_index: Tensor | None = None  # [N] (per-sample reductions, pwopsd)
    position: Tensor | None = None  # [N] 0-based response position (pwopsd)
    valid_mask: Tensor | None = None  # [N] bool, pre-selection valid tokens (pwopsd positions)
    student_topk_ids: Tensor | None = None  # [N, K] (topk_rkl; default: from student)
    student_topk_old_logp: Tensor | None = None  # [N, K] (topk_rkl)
    teacher_logp_on_student_topk: Tensor | None = None  # [N, K] (topk_rkl)
    teacher_topk_ids: Tensor | None = None  # [N, K] (topk_fkl; default: from teacher)
    teacher_topk_logp: Tensor | None = None  # [N, K] (topk_fkl)
    step: int = 0  # optimizer step (reopold warm-up)
    global_token_count: int | Tensor | None = None  # the step's kept tokens
    global_sample_count: int | Tensor | None = None  # the step's samples
    samples_with_kept: int | Tensor | None = None  # the step's samples with a kept token (pwopsd)

    def require(self, loss: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"loss {loss!r} needs inputs {missing}")

    def reduction(self, mode: str) -> Reduction:
        """The public reduction helper over these rows and the step's counts (``reduction(mode)(values, mask)``)."""
        return Reduction(mode, self.sample_index, self.global_token_count, self.global_sample_count)


LossFn = Callable[[LossInputs, LossConfig], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss-type``: its function and the inputs it reads (names of :data:`INPUTS`)."""

    name: str
    fn: LossFn
    needs: frozenset[str]
    optional: frozenset[str] = field(default_factory=frozenset)
    rows: str = "kept"

    def __post_init__(self) -> None:
        unknown = sorted((self.needs | self.optional) - INPUTS.keys())
        if unknown or self.rows not in ROWS:
            raise ValueError(f"loss {self.name!r}: unknown inputs {unknown} or rows {self.rows!r} (expected {ROWS})")

    @property
    def wants(self) -> frozenset[str]:
        """Every input the trainer should supply when it can (``needs`` plus ``optional``)."""
        return self.needs | self.optional


LOSSES: Registry[LossSpec] = Registry("loss type")  # --loss-type choices = LOSSES.names()


def register_loss(name: str, needs: set[str], optional: set[str] = frozenset(), rows: str = "kept"):
    """Decorator: register ``fn(inputs, cfg) -> LossOutput`` as ``--loss-type name``."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES.register(name, LossSpec(name, fn, frozenset(needs), frozenset(optional), rows))
        return fn

    return wrap


def loss_types_needing(input_name: str) -> tuple[str, ...]:
    """The loss types whose ``needs`` include ``input_name`` (e.g. ``"teacher"``: a teacher model in the trainer)."""
    if input_name not in INPUTS:
        raise ValueError(f"unknown loss input {input_name!r}; expected one of {sorted(INPUTS)}")
    return tuple(name for name, spec in LOSSES.items() if input_name in spec.needs)


def _counts(x: LossInputs) -> dict:
    return dict(
        sample_index=x.sample_index,
        global_token_count=x.global_token_count,
        global_sample_count=x.global_sample_count,
    )


# ------------------------------------------------------------------------------------- sampled-token losses


@register_loss("policy_loss", needs={"logp", "old_logp", "advantages"})
def _policy(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("policy_loss", "logp", "old_logp", "advantages")
    dt = x.logp.dtype
    return policy_loss(
        x.logp, x.old_logp.to(dt), x.advantages.to(dt), x.loss_mask, x.reduction(c.policy_reduction),
        eps_clip=c.eps_clip, eps_clip_high=c.eps_clip_high,
    )  # fmt: skip


@register_loss("sft_loss", needs={"logp"})
def _sft(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("sft_loss", "logp")
    return sft_loss(x.logp, x.loss_mask, x.reduction(c.policy_reduction))


@register_loss("custom_loss", needs={"student"}, optional={"teacher", "old_logp", "advantages"})
def _custom(x: LossInputs, c: LossConfig) -> LossOutput:
    if c.custom_fn is None:
        raise ValueError("loss 'custom_loss' needs LossConfig.custom_fn (--custom-loss-function-path)")
    out = c.custom_fn(x)
    return out if isinstance(out, LossOutput) else LossOutput(out, torch.zeros(0), {})


# ------------------------------------------------------------------------------ full-vocabulary losses (§7-8)


@register_loss("opsd", needs={"student", "teacher"})
def _opsd(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("opsd", "student", "teacher")
    return opsd_loss(
        x.student, x.teacher, x.loss_mask, temperature=c.temp(1.1), clip=c.fkl_clip, reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@register_loss("pwopsd", needs={"student", "teacher"}, rows="response")
def _pwopsd(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("pwopsd", "student", "teacher", "sample_index")
    # §7: the mean over the samples with a kept token
    samples = x.samples_with_kept if x.samples_with_kept is not None else x.global_sample_count
    return pwopsd_loss(
        x.student, x.teacher, x.loss_mask, x.sample_index, position=x.position, valid_mask=x.valid_mask,
        temperature=c.temp(1.1), clip=c.fkl_clip, w_min=c.position_w_min, tau=c.position_tau, s=c.position_s,
        reduction=c.pwopsd_reduction, global_token_count=x.global_token_count, global_sample_count=samples,
        chunk_size=c.chunk_size,
    )  # fmt: skip


@register_loss("eopd", needs={"student", "teacher"})
def _eopd(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("eopd", "student", "teacher", "target_ids")
    return eopd_loss(
        x.student, x.teacher, x.target_ids, x.loss_mask, old_logp=x.old_logp, temperature=c.temp(1.1),
        eps_clip=c.eopd_eps_clip, entropy_gate=c.eopd_entropy_gate, topk=c.eopd_topk, reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@register_loss("reopold", needs={"student", "teacher"})
def _reopold(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("reopold", "student", "teacher", "target_ids")
    # REOPOLD's mask M and its entropy percentile are per call: normalise by Σ M of these rows, then weight the
    # call by its share of the step's kept tokens (exact when the step is one call)
    out = reopold_loss(
        x.student, x.teacher, x.target_ids, x.loss_mask, step=x.step, temperature=c.temp(1.1),
        lam=c.reopold_lambda, warmup_steps=c.reopold_warmup_steps,
        entropy_percentile=c.reopold_entropy_percentile, chunk_size=c.chunk_size,
    )  # fmt: skip
    if x.global_token_count is None:
        return out
    share = float(x.loss_mask.sum()) / max(float(x.global_token_count), 1.0)
    return LossOutput(out.loss * share, out.per_token, out.metrics, out.clipped_tokens)


@register_loss("topk_rkl", needs={"student", "teacher"})
def _topk_rkl(x: LossInputs, c: LossConfig) -> LossOutput:
    ids, old, t_on_ids = x.student_topk_ids, x.student_topk_old_logp, x.teacher_logp_on_student_topk
    if ids is None:  # the student's top-K under the current weights (old = current, detached)
        x.require("topk_rkl", "student", "teacher")
        ids, old, t_on_ids = student_topk(x.student, x.teacher, c.topk, c.temp(1.0), c.chunk_size)
    x.require("topk_rkl", "student")
    if t_on_ids is None:
        raise ValueError("loss 'topk_rkl' needs inputs ['teacher_logp_on_student_topk'] with student_topk_ids")
    return topk_rkl_loss(
        x.student, ids, t_on_ids, x.loss_mask, student_topk_old_logp=old, temperature=c.temp(1.0),
        eps_clip=c.eps_clip, eps_clip_high=c.eps_clip_high, reduction=c.reduction, chunk_size=c.chunk_size,
        **_counts(x),
    )  # fmt: skip


@register_loss("topk_fkl", needs={"student", "teacher"})
def _topk_fkl(x: LossInputs, c: LossConfig) -> LossOutput:
    ids, logp = x.teacher_topk_ids, x.teacher_topk_logp
    if ids is None:  # the teacher's top-K
        x.require("topk_fkl", "student", "teacher")
        ids, logp = teacher_topk(x.teacher, c.topk, temperature=c.temp(1.0), chunk_size=c.chunk_size)
    x.require("topk_fkl", "student")
    if logp is None:
        raise ValueError("loss 'topk_fkl' needs inputs ['teacher_topk_logp'] with teacher_topk_ids")
    return topk_fkl_loss(
        x.student, ids, logp, x.loss_mask, tail_bucket=c.topk_tail_bucket,
        renormalize_teacher=c.topk_renormalize_teacher, temperature=c.temp(1.0), reduction=c.reduction,
        chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip


@register_loss("jsd", needs={"student", "teacher"})
def _jsd(x: LossInputs, c: LossConfig) -> LossOutput:
    x.require("jsd", "student", "teacher")
    return jsd_loss(
        x.student, x.teacher, x.loss_mask, beta=c.jsd_beta, normalize=c.jsd_normalize, temperature=c.temp(1.0),
        reduction=c.reduction, chunk_size=c.chunk_size, **_counts(x),
    )  # fmt: skip
