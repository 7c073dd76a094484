"""ta_opd.coalesce: concurrent single-prompt /generate requests become batched ones, answers unchanged."""

from __future__ import annotations

import asyncio

import pytest

from ta_opd.coalesce import GenerateCoalescer, batchable, merge_payloads


class FakeServer:
    """Answers a /generate payload as SGLang does: a dict for one prompt, a list for a batch."""

    def __init__(self, fail: Exception | None = None, short: bool = False):
        self.calls: list[dict] = []
        self.fail = fail
        self.short = short

    def one(self, ids, sp, shared):
        return {"ids": list(ids), "temperature": sp.get("temperature"), "start": shared.get("logprob_start_len")}

    async def send(self, url, payload):
        self.calls.append(payload)
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        ids = payload["input_ids"]
        if ids and isinstance(ids[0], list):
            sps = payload.get("sampling_params", {})
            sps = sps if isinstance(sps, list) else [sps] * len(ids)
            answers = [self.one(i, sp, payload) for i, sp in zip(ids, sps, strict=True)]
            return answers[:-1] if self.short else answers
        return self.one(ids, payload.get("sampling_params", {}), payload)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_become_one_batch_with_the_same_answers():
    server = FakeServer()

    async def main():
        c = GenerateCoalescer(server.send)
        payloads = [{"input_ids": [i, i + 1], "sampling_params": {"temperature": 1.0}} for i in range(5)]
        answers = await asyncio.gather(*(c.submit("u", p) for p in payloads))
        return c, answers

    c, answers = run(main())
    assert len(server.calls) == 1
    assert server.calls[0]["input_ids"] == [[i, i + 1] for i in range(5)]
    assert server.calls[0]["sampling_params"] == {"temperature": 1.0}  # equal: sent once, not as a list
    assert answers == [{"ids": [i, i + 1], "temperature": 1.0, "start": None} for i in range(5)]
    assert c.stats == {"requests": 5, "batches": 1}


def test_requests_that_differ_in_a_shared_field_go_in_separate_batches():
    server = FakeServer()

    async def main():
        c = GenerateCoalescer(server.send)
        payloads = [
            {"input_ids": [7] * (1 + i % 2), "logprob_start_len": i % 2, "return_logprob": True} for i in range(6)
        ]
        return await asyncio.gather(*(c.submit("u", p) for p in payloads))

    answers = run(main())
    assert sorted(len(call["input_ids"]) for call in server.calls) == [3, 3]
    assert {call["logprob_start_len"] for call in server.calls} == {0, 1}
    assert [a["start"] for a in answers] == [i % 2 for i in range(6)]  # each answer back to its own request


def test_different_sampling_params_become_a_list_and_chunks_split_the_batch():
    server = FakeServer()

    async def main():
        c = GenerateCoalescer(server.send)
        payloads = [{"input_ids": [i], "sampling_params": {"temperature": float(i)}} for i in range(5)]
        return await asyncio.gather(*(c.submit("u", p, chunks=2) for p in payloads))

    answers = run(main())
    assert [len(call["input_ids"]) for call in server.calls] == [3, 2]
    assert server.calls[0]["sampling_params"] == [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 2.0}]
    assert [a["temperature"] for a in answers] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_max_batch_caps_a_request_and_a_later_request_starts_a_new_batch():
    server = FakeServer()

    async def main():
        c = GenerateCoalescer(server.send, max_batch=2)
        first = await asyncio.gather(*(c.submit("u", {"input_ids": [i]}) for i in range(5)))
        second = await c.submit("u", {"input_ids": [9]})  # alone: sent as the single-prompt payload
        return first, second

    first, second = run(main())
    assert [len(call["input_ids"]) if isinstance(call["input_ids"][0], list) else 1 for call in server.calls] == [
        2,
        2,
        1,
        1,
    ]
    assert [a["ids"] for a in first] == [[0], [1], [2], [3], [4]]
    assert server.calls[-1] == {"input_ids": [9]} and second["ids"] == [9]


def test_a_request_that_cannot_be_batched_is_sent_as_it_is():
    server = FakeServer()
    odd = [
        {"text": "1+1="},
        {"input_ids": [[1], [2]]},
        {"input_ids": [1], "sampling_params": {"n": 2}},
        {"input_ids": [1], "image_data": "x"},
        {"input_ids": [1], "stream": True},
    ]
    assert not any(batchable(p) for p in odd)
    assert batchable({"input_ids": [1, 2], "sampling_params": {"n": 1}, "rid": "a", "top_logprobs_num": 3})

    async def main():
        c = GenerateCoalescer(server.send)
        await asyncio.gather(*(c.submit("u", p) for p in odd[1:3]))

    run(main())
    assert server.calls == odd[1:3]


def test_a_failed_batch_fails_every_request_of_it():
    server = FakeServer(fail=RuntimeError("HTTP 500 from u"))

    async def main():
        c = GenerateCoalescer(server.send)
        return await asyncio.gather(*(c.submit("u", {"input_ids": [i]}) for i in range(3)), return_exceptions=True)

    results = run(main())
    assert len(server.calls) == 1
    assert all(isinstance(r, RuntimeError) and "HTTP 500" in str(r) for r in results)


def test_an_answer_list_of_the_wrong_length_is_an_error_naming_both_lengths():
    server = FakeServer(short=True)

    async def main():
        c = GenerateCoalescer(server.send)
        return await asyncio.gather(*(c.submit("u", {"input_ids": [i]}) for i in range(3)), return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, ValueError) for r in results)
    assert "expected a list of 3 answers" in str(results[0]) and "a list of 2" in str(results[0])


def test_requests_that_join_a_round_later_still_share_the_batch():
    server = FakeServer()

    async def late(c, i):
        await asyncio.sleep(0)  # one extra round of the loop before sending
        return await c.submit("u", {"input_ids": [i]})

    async def main():
        c = GenerateCoalescer(server.send)
        return await asyncio.gather(c.submit("u", {"input_ids": [0]}), late(c, 1), late(c, 2))

    answers = run(main())
    assert len(server.calls) == 1 and [a["ids"] for a in answers] == [[0], [1], [2]]


def test_merge_payloads_lists_rids_and_keeps_shared_fields():
    merged = merge_payloads(
        [
            {"input_ids": [1], "rid": "a", "return_logprob": True, "top_logprobs_num": 4},
            {"input_ids": [2, 3], "rid": "b", "return_logprob": True, "top_logprobs_num": 4},
        ]
    )
    assert merged == {"input_ids": [[1], [2, 3]], "rid": ["a", "b"], "return_logprob": True, "top_logprobs_num": 4}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_batch_is_refused(bad):
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        GenerateCoalescer(FakeServer().send, max_batch=bad)


def test_loads_json_matches_the_standard_library_including_nan_and_infinity():
    import json
    import math

    from ta_opd.coalesce import loads_json

    text = '{"meta_info": {"lp": [[-0.25, 3, null], [-1e-07, 4, null]], "ok": true}, "text": "12"}'
    assert loads_json(text) == json.loads(text) == loads_json(text.encode())
    inf, nan, one = loads_json(b"[-Infinity, NaN, 1]")  # tokens orjson refuses: the standard library's values
    assert inf == -math.inf and math.isnan(nan) and one == 1
    with pytest.raises(ValueError):
        loads_json(b"{not json")
