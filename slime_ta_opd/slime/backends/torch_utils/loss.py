"""The torch trainer's policy loss: wiring only; every formula comes from :mod:`ta_opd.losses`.

METHOD.md §1: the OPD advantage ``A_t = λ·(log p_T(y_t) − log p_old(y_t))`` (detached) is added to
the base estimator's advantage (0 for pure distillation), the per-token loss is PPO-clip, and the
reduction is the per-sample mean over kept tokens summed over samples divided by the step's
sample count (default) or the global token mean (``--calculate-per-token-loss``). The step-level
counts are passed in, so a micro-batch's loss is its exact share of the step's loss and the sum
of micro-batch gradients does not depend on how the step was split.
"""

from __future__ import annotations

from argparse import Namespace

import torch

from ta_opd.losses import agg_loss, opd_advantages, ppo_clip_policy_loss

PER_SAMPLE_MEAN = "seq-mean-token-mean"
GLOBAL_TOKEN_MEAN = "token-mean"


def reduction_mode(args: Namespace) -> str:
    return GLOBAL_TOKEN_MEAN if getattr(args, "calculate_per_token_loss", False) else PER_SAMPLE_MEAN


# Estimators whose advantage is the sample's scalar reward broadcast over its response tokens:
# the group normalisation already happened in the rollout's reward post-process, as upstream.
REWARD_BROADCAST_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")


def base_advantages(args: Namespace, rewards: torch.Tensor, response_lengths: list[int]) -> list[torch.Tensor]:
    """Per-token base advantages of ``--advantage-estimator``, one tensor per sample.

    Pure distillation (every reward 0) gives 0 under any estimator. GRPO-family estimators
    broadcast the (already group-normalised) reward; estimators that need a critic or
    discounted returns are refused for non-zero rewards rather than silently dropped.
    """
    if not bool((rewards != 0).any()):
        return [torch.zeros(n, dtype=rewards.dtype) for n in response_lengths]
    if args.advantage_estimator not in REWARD_BROADCAST_ESTIMATORS:
        raise NotImplementedError(
            f"the torch backend supports --advantage-estimator {'/'.join(REWARD_BROADCAST_ESTIMATORS)} with task "
            f"rewards (or any estimator for pure distillation with rewards 0), got {args.advantage_estimator!r}"
        )
    return [torch.full((n,), float(r), dtype=rewards.dtype) for r, n in zip(rewards, response_lengths, strict=True)]


def compute_advantages(
    args: Namespace,
    old_log_probs: list[torch.Tensor],
    teacher_log_probs: list[torch.Tensor] | None,
    rewards: list[float],
    response_lengths: list[int],
) -> list[torch.Tensor]:
    """Per-sample advantage tensors (detached): base estimator + OPD term when ``--use-opd``."""
    dtype = old_log_probs[0].dtype if old_log_probs else torch.float32
    base = base_advantages(args, torch.as_tensor(rewards, dtype=dtype), response_lengths)
    if not getattr(args, "use_opd", False):
        return base
    if teacher_log_probs is None:
        raise ValueError("--use-opd needs teacher_log_probs in the rollout data, got none")
    return [
        opd_advantages(t.to(o.dtype), o, kl_coef=args.opd_kl_coef, base=b).detach()
        for t, o, b in zip(teacher_log_probs, old_log_probs, base, strict=True)
    ]


def policy_loss(
    args: Namespace,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sample_index: torch.Tensor,
    global_token_count: int,
    global_sample_count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step's PPO-clip loss, and its clipped-token count (for metrics).

    All inputs are flat ``[n]`` rows of the micro-batch; ``mask`` selects the rows that count
    (all ones on the sparse path, the loss mask on the dense path); ``sample_index`` is local.
    """
    per_token, clipfrac = ppo_clip_policy_loss(
        log_probs, old_log_probs, advantages, eps_clip=args.eps_clip, eps_clip_high=args.eps_clip_high
    )
    loss = agg_loss(
        per_token,
        mask,
        reduction_mode(args),
        sample_index=sample_index,
        global_token_count=global_token_count,
        global_sample_count=global_sample_count,
    )
    clipped = (clipfrac.to(per_token.dtype) * mask.to(per_token.dtype)).sum().detach()
    return loss, clipped
