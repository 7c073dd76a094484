"""Hypothesis fuzzing of the parsers that take outside input: junk in, a clear error (or a valid result) out.

* the embedded server's ``/generate`` validation (``protocol.parse_generate``): only ``RequestError`` (400);
* the JSONL data source: only ValueError/KeyError naming ``path:line``;
* ``pack_topk`` / ``TokenBatch.from_sample_lists`` on server-shaped junk: only ValueError/TypeError, and
  a result that is well-formed (shapes, padding, finite kept entries).
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slime.backends.embedded_sglang.engine import GenRequest
from slime.backends.embedded_sglang.protocol import RequestError, parse_generate
from slime.rollout.data_source import Dataset
from ta_opd.topk import PAD_ID, TokenBatch, pack_topk

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 99 for c in text]


class FakeEngine:
    tokenizer = FakeTokenizer()
    vocab_size = 128
    context_length = 64


KEYS = ["text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
        "token_ids_logprob", "rid", "logprob_temperature", "custom_labels", "stream", "n"]  # fmt: skip
SP_KEYS = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "n",
           "sampling_seed", "ignore_eos", "regex", "frequency_penalty", "bogus"]  # fmt: skip

generate_bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    st.fixed_dictionaries(
        {
            "input_ids": st.lists(st.integers(-5, 140), max_size=70)
            | st.lists(st.lists(st.integers(-5, 140), max_size=5), max_size=3),
            "sampling_params": st.dictionaries(st.sampled_from(SP_KEYS), json_values, max_size=5),
        },
        optional={k: json_values for k in ("return_logprob", "logprob_start_len", "top_logprobs_num", "rid")},
    ),
)


@FUZZ
@given(body=generate_bodies)
def test_generate_validation_only_raises_request_error(body):
    try:
        reqs, _ = parse_generate(body, FakeEngine(), max_new_tokens_cap=1000)
    except RequestError as e:
        assert str(e)  # a message for the 400 body
        return
    assert reqs and all(isinstance(r, GenRequest) for r in reqs)
    for r in reqs:
        assert r.input_ids and all(0 <= t < FakeEngine.vocab_size for t in r.input_ids)
        assert len(r.input_ids) < FakeEngine.context_length and 0 <= r.max_new_tokens <= 1000


jsonl_lines = st.lists(
    st.one_of(
        st.text(max_size=30),
        json_values.map(json.dumps),
        st.fixed_dictionaries({"input": json_values, "label": json_values}).map(json.dumps),
    ),
    min_size=1,
    max_size=5,
)


@FUZZ
@given(lines=jsonl_lines)
def test_jsonl_data_source_errors_name_the_line(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n", encoding="utf-8")
    try:
        ds = Dataset(str(path), label_key="label")
    except (ValueError, KeyError) as e:
        msg = str(e)
        assert f"{path}:" in msg or "holds no usable prompts" in msg, msg
        return
    assert all(isinstance(s.prompt, str) and s.prompt for s in ds.samples)


entries = st.lists(
    st.one_of(st.none(), st.lists(st.one_of(json_scalars, st.floats()), max_size=4)),
    max_size=6,
)
positions = st.lists(st.one_of(st.none(), entries), max_size=6)


@FUZZ
@given(rows=positions, k=st.integers(0, 5))
def test_pack_topk_on_junk(rows, k):
    try:
        ids, logp = pack_topk(rows, k)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    assert ids.shape == logp.shape == (len(rows), k) and ids.dtype == torch.long
    kept = ids != PAD_ID
    assert torch.isfinite(logp[kept]).all() and (logp[~kept] == float("-inf")).all()
    assert (ids[kept] >= 0).all()


@FUZZ
@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    student=st.lists(positions, max_size=3),
    teacher=st.lists(positions, max_size=3),
    teacher_lp=st.lists(st.lists(st.floats() | st.none(), max_size=5), max_size=3),
    masks=st.lists(st.lists(st.integers(0, 1), max_size=5), max_size=3),
    k=st.integers(0, 3),
)
def test_token_batch_from_junk_lists(lengths, student, teacher, teacher_lp, masks, k):
    sampled = [[7] * n for n in lengths]
    try:
        batch = TokenBatch.from_sample_lists(student, teacher, sampled, None, teacher_lp, masks, k)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    batch.validate()
    assert batch.n_tokens == sum(lengths)


@pytest.mark.parametrize("bad_id", [float("inf"), float("nan"), 1e300])
def test_pack_topk_junk_ids_raise_value_error(bad_id):
    with pytest.raises(ValueError, match="token id"):
        pack_topk([[[-0.5, bad_id, None]]], 2)
