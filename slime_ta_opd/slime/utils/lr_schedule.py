"""The learning-rate schedule of both trainers, under upstream slime / Megatron-LM's flag names.

``lr_at(n, schedule)`` is the LR of the optimizer step taken after ``n`` applied steps, with
Megatron's ``OptimizerParamScheduler.get_lr`` semantics (iteration-based):

- warm-up, ``n <= W`` (W = ``--lr-warmup-iters``, or ``--lr-warmup-fraction`` × D):
  ``init + (lr − init) · n / W`` with init = ``--lr-warmup-init`` (0 by default, so the first
  step of a warm-up runs at LR 0, as Megatron's does);
- ``constant``: ``lr`` after the warm-up;
- past the decay, ``n > D`` (D = ``--lr-decay-iters``): ``min_lr``;
- ``linear``: ``min_lr + (lr − min_lr)(1 − r)``, ``cosine``: ``min_lr + (lr − min_lr)·½(1 + cos πr)``
  with r = (n − W)/(D − W);
- ``inverse-square-root``: ``max(min_lr, lr · sqrt(max(W, 1)) / sqrt(max(n, 1)))``.

The LR depends on ``n`` alone, so a run resumed from a checkpoint (which stores ``n`` as the
trainer's ``global_step``) continues the same schedule; skipped non-finite steps do not count,
as Megatron does not step its scheduler for them. ``resolve_lr_schedule_args`` fills the default D
(the run's optimizer steps: ``--num-rollout`` × steps per rollout, as Megatron defaults to
``--train-iters``) and refuses contradictory settings; ``validate_args`` calls it.
"""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass

__all__ = ["LR_DECAY_STYLES", "LRSchedule", "lr_at", "resolve_lr_schedule_args"]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
DECAYING_STYLES = ("linear", "cosine")  # the styles that need --lr-decay-iters (D)


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # the peak LR (Megatron's max_lr), --lr
    min_lr: float = 0.0
    decay_style: str = "constant"
    warmup_steps: float = 0.0  # W; a fraction of D gives a non-integer W, as Megatron's sample-based count can
    decay_steps: int | None = None  # D; needed by linear and cosine
    warmup_init: float = 0.0

    def __post_init__(self) -> None:
        if self.decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr decay style must be one of {list(LR_DECAY_STYLES)}, got {self.decay_style!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.warmup_init < 0:
            raise ValueError(f"warm-up steps and init LR must be >= 0, got {self.warmup_steps}, {self.warmup_init}")
        if self.decay_style in DECAYING_STYLES:
            if self.decay_steps is None or self.decay_steps <= 0:
                raise ValueError(f"lr decay style {self.decay_style!r} needs decay steps > 0, got {self.decay_steps}")
            if self.warmup_steps >= self.decay_steps:
                raise ValueError(
                    f"warm-up steps {self.warmup_steps} must be < decay steps {self.decay_steps} "
                    f"(lr decay style {self.decay_style!r})"
                )

    @classmethod
    def from_args(cls, args: Namespace) -> LRSchedule:
        """The schedule of a validated namespace (``resolve_lr_schedule_args`` has run)."""
        return cls(
            lr=float(args.lr),
            min_lr=float(args.min_lr),
            decay_style=args.lr_decay_style,
            warmup_steps=_warmup_steps(args),
            decay_steps=args.lr_decay_iters,
            warmup_init=float(args.lr_warmup_init),
        )


def lr_at(step: int, s: LRSchedule) -> float:
    """LR of the optimizer step taken after ``step`` applied steps (Megatron's get_lr; module doc)."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    if s.warmup_steps > 0 and step <= s.warmup_steps:
        return s.warmup_init + (s.lr - s.warmup_init) * float(step) / float(s.warmup_steps)
    if s.decay_style == "constant":
        return s.lr
    if s.decay_steps is not None and step > s.decay_steps:
        return s.min_lr
    if s.decay_style == "inverse-square-root":
        return max(s.min_lr, s.lr * math.sqrt(max(s.warmup_steps, 1.0)) / math.sqrt(max(step, 1)))
    assert s.decay_steps is not None  # __post_init__: linear and cosine have D > W
    ratio = (step - s.warmup_steps) / (s.decay_steps - s.warmup_steps)  # in [0, 1]
    coeff = 1.0 - ratio if s.decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return s.min_lr + coeff * (s.lr - s.min_lr)


def _warmup_steps(args: Namespace) -> float:
    if args.lr_warmup_fraction is not None:
        return float(args.lr_warmup_fraction) * float(args.lr_decay_iters)
    return float(args.lr_warmup_iters)


def resolve_lr_schedule_args(args: Namespace) -> None:
    """Default ``--lr-decay-iters`` and check the schedule flags (in place; needs ``global_batch_size`` set).

    D defaults to the run's optimizer steps, ``--num-rollout`` × (rollout_batch_size ×
    n_samples_per_prompt / global_batch_size). With ``--num-epoch`` instead of ``--num-rollout`` that
    number is only known once the data source is read, so a style that needs D then asks for it.
    """
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise ValueError(
            f"--lr-warmup-fraction {args.lr_warmup_fraction} and --lr-warmup-iters {args.lr_warmup_iters} both set: "
            "give one of them (as Megatron)"
        )
    if args.lr_decay_iters is None and args.num_rollout is not None:
        steps_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
        args.lr_decay_iters = args.num_rollout * steps_per_rollout
    needs_decay = args.lr_decay_style in DECAYING_STYLES or args.lr_warmup_fraction is not None
    if needs_decay and not args.lr_decay_iters:
        if args.lr_decay_style in DECAYING_STYLES:
            what = f"--lr-decay-style {args.lr_decay_style}"
        else:
            what = f"--lr-warmup-fraction {args.lr_warmup_fraction}"
        raise ValueError(
            f"{what} needs the number of decay steps: pass --lr-decay-iters N or --num-rollout "
            f"(default D = num_rollout × optimizer steps per rollout; got lr_decay_iters={args.lr_decay_iters}, "
            f"num_rollout={args.num_rollout})"
        )
    try:
        LRSchedule.from_args(args)
    except ValueError as e:
        raise ValueError(
            f"learning-rate schedule (--lr {args.lr}, --min-lr {args.min_lr}, --lr-decay-style "
            f"{args.lr_decay_style}, --lr-warmup-iters {args.lr_warmup_iters}, --lr-warmup-fraction "
            f"{args.lr_warmup_fraction}, --lr-decay-iters {args.lr_decay_iters}): {e}"
        ) from e
