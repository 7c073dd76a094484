"""Non-finite training values: a NaN/inf loss or gradient norm is never applied, saved or pushed.

``--nonfinite-policy stop`` (default): the step raises :class:`NonFiniteError` before the optimizer step, so the
weights, the optimizer state and every checkpoint on disk stay as they were and train.py stops before its save.
``--nonfinite-policy skip``: the gradients are dropped, the optimizer does not step (``train/skipped_steps``
counts it) and the run goes on. Independently of the policy, weights are checked before every checkpoint and
every push to the engines (:func:`check_finite_weights`), so non-finite weights never leave the trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm or weight that is NaN or infinite; nothing was applied, saved or pushed."""


def first_nonfinite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN/inf, else None (one reduction per tensor)."""
    for name, tensor in named_tensors:
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and tensor.numel()
            and not bool(torch.isfinite(tensor).all())
        ):
            return name
    return None


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite tensor before ``what`` (a save, a push) happens."""
    bad = first_nonfinite(named_tensors)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to {what}: weight {bad!r} holds NaN/inf (a diverged step?); nothing was written or sent, "
            "the existing checkpoints are untouched"
        )


def step_is_finite(loss: float, grad_norm: float, policy: str, where: str) -> bool:
    """Whether the step may be applied. A non-finite ``loss``/``grad_norm`` raises under ``stop`` and returns
    False (with a warning) under ``skip``; ``where`` names the step in the message."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"--nonfinite-policy {policy!r}: expected one of {NONFINITE_POLICIES}")
    detail = f"{where}: non-finite train/loss={loss} or train/grad_norm={grad_norm}"
    if policy == "stop":
        raise NonFiniteError(
            f"{detail}; the update was not applied and no checkpoint was written or rotated. Check --lr, the loss "
            "coefficients and the rollout data, or pass --nonfinite-policy skip to skip such steps"
        )
    logger.warning("%s: optimizer step skipped (--nonfinite-policy skip)", detail)
    return False
