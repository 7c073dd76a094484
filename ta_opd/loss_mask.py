"""A sample's loss mask before token selection, in slime's conventions (one implementation).

slime stores ``loss_mask`` per sample over its response tokens: ``None`` means every token is
supervised, and a sample flagged ``remove_sample`` keeps its place in the batch but supervises
nothing. The stack's rollout (train data) and the drop-in patch's ``post_process_rewards``
(the valid tokens the budget counts, docs/method.md §5) both normalise through this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["valid_loss_mask"]


def valid_loss_mask(
    loss_mask: Sequence[Any] | None, response_length: int, *, removed: bool = False, sample_index: Any = None
) -> list[int]:
    """The 0/1 mask of one sample's supervisable response tokens, one int per response token.

    ``loss_mask`` None → all ones; ``removed`` → all zeros (after the length check). A mask whose
    length is not ``response_length`` raises ``ValueError`` naming ``sample_index``.
    """
    response_length = int(response_length)
    if response_length < 0:
        raise ValueError(f"sample {sample_index}: response_length must be >= 0, got {response_length}")
    if loss_mask is None:
        return [0 if removed else 1] * response_length
    if len(loss_mask) != response_length:
        raise ValueError(
            f"sample {sample_index}: loss_mask length {len(loss_mask)} != response_length {response_length}"
        )
    if removed:
        return [0] * response_length
    return [int(v) for v in loss_mask]
