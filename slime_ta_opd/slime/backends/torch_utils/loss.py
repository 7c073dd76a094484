"""The ``policy_loss`` registry entry called on flat rows with the flags' settings (benchmarks/bench_sparse_head.py).

The trainers call every ``--loss-type`` through :mod:`slime.backends.train_step`; this is the same entry of
:data:`ta_opd.loss_registry.LOSSES` for a caller that holds the rows itself.
"""

from __future__ import annotations

from argparse import Namespace

import torch

from slime.backends.train_step import GLOBAL_TOKEN_MEAN, PER_SAMPLE_MEAN
from ta_opd.loss_registry import LOSSES, LossConfig, LossInputs


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
    """This micro-batch's share of the step's PPO-clip loss, and its clipped-token count.

    All inputs are flat ``[n]`` rows; ``mask`` selects the rows that count; ``args`` gives ``eps_clip``,
    ``eps_clip_high`` and ``calculate_per_token_loss``.
    """
    inputs = LossInputs(
        loss_mask=mask.bool(), logp=log_probs, old_logp=old_log_probs, advantages=advantages,
        sample_index=sample_index, global_token_count=global_token_count, global_sample_count=global_sample_count,
    )  # fmt: skip
    cfg = LossConfig(
        eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high,
        policy_reduction=GLOBAL_TOKEN_MEAN if args.calculate_per_token_loss else PER_SAMPLE_MEAN,
    )
    out = LOSSES.get("policy_loss").fn(inputs, cfg)
    return out.loss, out.clipped_tokens
