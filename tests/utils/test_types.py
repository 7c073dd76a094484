"""Sample: to_dict/from_dict round trip, reward value, response appends."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from slime.utils.types import Sample


def test_round_trip_with_status_and_tensors():
    s = Sample(
        index=3,
        group_index=1,
        prompt="1+1=",
        tokens=[1, 2, 3, 4],
        response="2",
        response_length=2,
        label="2",
        reward={"meta_info": {"x": 1}},
        loss_mask=[1, 0],
        rollout_log_probs=[-0.5, -1.0],
        teacher_log_probs=torch.tensor([-0.25, -2.0]),
        status=Sample.Status.TRUNCATED,
        metadata={"student_top_logprobs": [[[-0.1, 5, None]], [[-0.2, 6, None]]]},
    )
    d = s.to_dict()
    assert d["status"] == "truncated" and d["teacher_log_probs"] == [-0.25, -2.0]
    json.dumps(d)  # plain data only
    back = Sample.from_dict(json.loads(json.dumps(d)))
    assert back.status is Sample.Status.TRUNCATED
    assert back.to_dict() == d
    assert Sample.from_dict({**d, "extra_field": 7}).extra_field == 7


def test_unknown_status_is_an_error():
    with pytest.raises(ValueError, match="unknown Sample status 'bogus'"):
        Sample.from_dict({"status": "bogus"})


def test_get_reward_value():
    assert Sample(reward=1.5).get_reward_value(SimpleNamespace(reward_key=None)) == 1.5
    assert Sample(reward={"acc": 1.0}).get_reward_value(SimpleNamespace(reward_key="acc")) == 1.0
    with pytest.raises(KeyError, match="'acc'"):
        Sample(reward=0.0).get_reward_value(SimpleNamespace(reward_key="acc"))


def test_append_response_tokens_keeps_fields_aligned():
    s = Sample(tokens=[9, 9])
    s.append_response_tokens(tokens=[1, 2], log_probs=[-1.0, -2.0], meta_info={"finish_reason": {"type": "stop"}})
    s.append_response_tokens(tokens=[3], trainable=False)
    assert s.tokens == [9, 9, 1, 2, 3] and s.response_length == 3
    assert s.loss_mask == [1, 1, 0] and s.rollout_log_probs == [-1.0, -2.0, 0.0]
    assert s.status is Sample.Status.COMPLETED
    s.append_response_tokens(tokens=[], log_probs=[], meta_info={"finish_reason": {"type": "length"}})
    assert s.status is Sample.Status.TRUNCATED
    with pytest.raises(ValueError, match="log_probs length"):
        s.append_response_tokens(tokens=[1], log_probs=[])
