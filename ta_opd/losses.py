"""The sampled-token losses (docs/method.md §1), the loss output type and the one owner of loss denominators.

Tensors are either flat rows ``[N]`` with ``sample_index [N]`` (int64, 0..B-1) naming each row's
sample, or padded ``[B, T]`` (a row is a sample; ``sample_index`` is then ignored). Masks are
the loss masks after token selection (bool or 0/1).

:class:`Reduction` is the public per-token → scalar helper (upstream slime's ``sum_of_sample_mean``):
a mode plus the step's counts, so that a micro-batch's loss is its exact share of the step's loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _flatten(values: Tensor, mask: Tensor, sample_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    if values.dim() == 2:
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(values)
        return values.reshape(-1), mask.reshape(-1), rows.reshape(-1)
    if values.dim() != 1:
        raise ValueError(f"values must be [N] or [B, T], got shape {tuple(values.shape)}")
    if sample_index is not None and sample_index.shape != values.shape:
        raise ValueError(f"sample_index shape {tuple(sample_index.shape)} != values shape {tuple(values.shape)}")
    return values, mask, sample_index


def agg_loss(
    values: Tensor,
    mask: Tensor,
    mode: str,
    sample_index: Tensor | None = None,
    global_token_count: int | Tensor | None = None,
    global_sample_count: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-token loss values to a scalar; the only place loss denominators are decided.

    Modes (named inner-then-outer, as verl does):
    - ``token-mean``: Σ_t m_t v_t / max(global_token_count, 1) — the global token mean of
      ``--calculate-per-token-loss`` (paper Eq. 7). Default count: Σ m of this call.
    - ``seq-mean-token-mean``: Σ_s (Σ_{t∈s} m v / max(Σ_{t∈s} m, 1)) / max(global_sample_count, 1) —
      per-sample mean over kept tokens, summed over samples, divided by the step's sample count
      (docs/method.md §1 default). Default count: number of samples in this call.
    - ``seq-mean-token-sum``: Σ_s Σ_{t∈s} m v / max(global_sample_count, 1).

    Passing the step's global counts makes the sum over micro-batches equal to the whole step's
    loss, whatever the micro-batching. An all-masked input gives 0 with a live graph.
    """
    if mode not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {mode!r}; expected one of {list(REDUCTIONS)}")
    flat, m, sidx = _flatten(values, mask, sample_index)
    m = m.to(flat.dtype)
    # v·m rather than v[m]: keeps the graph alive (and grads 0) when every token is masked; where() drops NaNs
    masked = torch.where(m > 0, flat, torch.zeros_like(flat)) * m
    if mode == "token-mean":
        count = m.sum() if global_token_count is None else torch.as_tensor(global_token_count, dtype=flat.dtype)
        return masked.sum() / torch.clamp_min(count.to(flat.dtype), 1.0)
    if sidx is None:
        raise ValueError(f"reduction {mode!r} needs sample_index for flat [N] values")
    sidx = sidx.to(torch.long)
    n_samples = int(sidx.max().item()) + 1 if sidx.numel() else 0
    per_sample_sum = torch.zeros(n_samples, dtype=flat.dtype, device=flat.device).index_add(0, sidx, masked)
    if mode == "seq-mean-token-mean":
        per_sample_cnt = torch.zeros(n_samples, dtype=flat.dtype, device=flat.device).index_add(0, sidx, m)
        per_sample = per_sample_sum / torch.clamp_min(per_sample_cnt, 1.0)
    else:
        per_sample = per_sample_sum
    if global_sample_count is None:
        global_sample_count = n_samples
    denom = torch.clamp_min(torch.as_tensor(global_sample_count, dtype=flat.dtype, device=flat.device), 1.0)
    return per_sample.sum() / denom + 0.0 * masked.sum()


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
class Reduction:
    """Per-token values → this (micro-)batch's share of the step's scalar loss (upstream's ``sum_of_sample_mean``).

    ``mode`` is an :func:`agg_loss` mode; the counts are the whole step's (``None``: this call's own).
    ``Reduction(...)(values, mask)`` is ``agg_loss(values, mask, mode, sample_index, counts...)``.
    """

    mode: str
    sample_index: Tensor | None = None
    global_token_count: int | Tensor | None = None
    global_sample_count: int | Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in REDUCTIONS:
            raise ValueError(f"unknown loss reduction {self.mode!r}; expected one of {list(REDUCTIONS)}")

    def __call__(self, values: Tensor, mask: Tensor) -> Tensor:
        return agg_loss(values, mask, self.mode, self.sample_index, self.global_token_count, self.global_sample_count)

    def coefficients(self, mask: Tensor) -> Tensor:
        """coef [N] float64 with ``self(v, mask) == Σ_t coef_t v_t`` (see :func:`reduction_coefficients`)."""
        return reduction_coefficients(
            mask, self.mode, self.sample_index, self.global_token_count, self.global_sample_count
        )


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns."""

    loss: Tensor  # scalar, with graph
    per_token: Tensor  # [N] detached per-token values ℓ_t (0 on rows outside the loss mask)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached 0-dim tensors (means over kept rows)
    clipped_tokens: Tensor | None = None  # 0-dim count of kept tokens on PPO-clip's clipped branch


def sampled_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor | None = None) -> float:
    """Mean of log p_S(y_t) − log p_T(y_t) over the rows of ``mask`` (all rows when None): the sampled-token
    estimate of KL(p_S‖p_T) on the student's samples (of KL(p_T‖p_S) negated on the teacher's); 0.0 over no row."""
    diff = student_logp.double() - teacher_logp.double()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.mean()) if diff.numel() else 0.0


def opd_advantages(
    teacher_logp: Tensor, student_logp: Tensor, kl_coef: float = 1.0, base: Tensor | None = None
) -> Tensor:
    """A_t = λ·(log p_T(y_t) − log p_S(y_t)) (+ the base estimator's advantage), detached (docs/method.md §1)."""
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp shape {tuple(teacher_logp.shape)} != student_logp shape {tuple(student_logp.shape)}"
        )
    adv = kl_coef * (teacher_logp.detach() - student_logp.detach())
    if base is not None:
        adv = adv + base.detach()
    return adv.detach()


def ppo_clip_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_clip: float = 0.2, eps_clip_high: float | None = 0.28
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss max(−A·r, −A·clip(r, 1−ε, 1+ε_high)), r = π_θ/π_old (docs/method.md §1).

    Returns (loss [same shape], clipped [bool, same shape]: the clipped branch was taken).
    With r = 1 (first epoch of a fully on-policy step) the loss is −A·log-prob's value and its
    gradient is −A·∇log π.
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, clipped > unclipped


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    reduction: Reduction,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = 0.28,
) -> LossOutput:
    """The OPD PPO-clip loss (§1): ``reduction`` of :func:`ppo_clip_policy_loss` over the rows of ``mask``."""
    per_token, clipped = ppo_clip_policy_loss(
        logp, old_logp, advantages, eps_clip=eps_clip, eps_clip_high=eps_clip_high
    )
    m = mask.bool()
    return LossOutput(
        loss=reduction(per_token, m),
        per_token=torch.where(m, per_token.detach(), torch.zeros_like(per_token.detach())),
        clipped_tokens=(clipped & m).sum().detach(),
    )


def sft_loss(logp: Tensor, mask: Tensor, reduction: Reduction) -> LossOutput:
    """Supervised NLL: ``reduction`` of −log p_S(y_t) over the rows of ``mask``; metric ``sft_nll`` (its mean)."""
    m = mask.bool()
    nll = torch.where(m, -logp.detach().double(), torch.zeros((), dtype=torch.float64, device=logp.device))
    return LossOutput(
        loss=reduction(-logp, m),
        per_token=nll.to(logp.dtype),
        metrics={"sft_nll": nll.sum() / m.sum().clamp_min(1)},
    )
