"""ta_opd.loss_mask.valid_loss_mask: slime's conventions (None = all, removed = none) and the length check."""

from __future__ import annotations

import pytest
import torch

from ta_opd.loss_mask import valid_loss_mask


def test_hand_cases():
    assert valid_loss_mask(None, 3) == [1, 1, 1]
    assert valid_loss_mask(None, 3, removed=True) == [0, 0, 0]
    assert valid_loss_mask([1, 0, 1], 3) == [1, 0, 1]
    assert valid_loss_mask([1, 0, 1], 3, removed=True) == [0, 0, 0]
    assert valid_loss_mask([True, False], 2) == [1, 0]
    assert valid_loss_mask(torch.tensor([0, 1]), 2) == [0, 1]
    assert valid_loss_mask([], 0) == [] and valid_loss_mask(None, 0) == []
    assert all(type(v) is int for v in valid_loss_mask(torch.tensor([1, 1]), 2))


def test_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample 7: loss_mask length 2 != response_length 3"):
        valid_loss_mask([1, 1], 3, sample_index=7)
    with pytest.raises(ValueError, match="sample 7: loss_mask length 2 != response_length 3"):
        valid_loss_mask([1, 1], 3, removed=True, sample_index=7)  # a removed sample's mask is still checked
    with pytest.raises(ValueError, match="response_length must be >= 0, got -1"):
        valid_loss_mask(None, -1, sample_index=7)


def test_input_is_not_modified():
    mask = [1, 0, 1]
    out = valid_loss_mask(mask, 3, removed=True)
    assert mask == [1, 0, 1] and out == [0, 0, 0] and out is not mask
