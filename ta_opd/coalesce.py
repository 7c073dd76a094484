"""Batch concurrent single-prompt SGLang ``/generate`` requests into one request per group.

A rollout sends one ``/generate`` request per sample (upstream slime's plug-in API is per sample: the
generate function and the OPD teacher scoring each post one prompt). On a small model most of a server's
time then goes to per-request HTTP, JSON and scheduling work rather than the model. SGLang's
``/generate`` also takes a batch (``input_ids`` as a list of lists) and answers with a list in the same
order, so requests that are in flight at the same moment can share one request without changing the API
the plug-ins see.

:class:`GenerateCoalescer` does that. ``await coalescer.submit(url, payload)`` returns the same answer
dict a single request would have got. Requests are grouped by URL and by every payload field except
``input_ids``, ``sampling_params`` and ``rid`` (two requests with a different ``logprob_start_len`` or
``top_logprobs_num`` go in different groups, so a router that only knows scalar fields forwards the
batch unchanged). ``sampling_params`` becomes a per-prompt list when the prompts' differ; ``rid`` is a
per-prompt list whenever the requests carry one (all or none of a batch do). A group is
sent once the event loop has run one full round without a new request joining it (the requests of one
``asyncio.gather`` all join within that round), or as soon as it holds ``max_batch`` requests. With
``chunks`` > 1 a group is split into that many batches sent concurrently (one per engine behind a
round-robin router).

A payload that cannot be batched safely is sent on its own: ``text`` instead of ``input_ids``, a nested
``input_ids`` (already a batch), ``n`` > 1 samples, or a field outside :data:`BATCHABLE_FIELDS`. If the
batched request fails, every request of the batch gets that error; an answer that is not a list of the
batch's length is an error naming the URL and both lengths.

The transport is the caller's ``send(url, payload) -> answer`` coroutine (its timeouts and retries
apply to the batch), so this module imports no HTTP library.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["BATCHABLE_FIELDS", "GenerateCoalescer", "batchable", "loads_json"]

# Fields of a single-prompt /generate payload this module knows how to batch: the per-prompt ones become
# lists, the others are shared by the batch (and so must be equal; they are part of the group key).
PER_PROMPT_FIELDS = ("input_ids", "sampling_params", "rid")
SHARED_FIELDS = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "token_ids_logprob",
    "logprob_temperature",
    "custom_labels",
    "stream",
)
BATCHABLE_FIELDS = frozenset(PER_PROMPT_FIELDS + SHARED_FIELDS)

Send = Callable[[str, dict[str, Any]], Awaitable[Any]]

try:  # an answer with top-K lists is megabytes of small lists: orjson parses it ~3x faster than json
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson comes with sglang-router, a dependency of the stack
    _orjson = None


def loads_json(data: bytes | str) -> Any:
    """Decode a server's JSON answer: with orjson when it is installed, else (and for the ``NaN``/``Infinity``
    tokens orjson refuses) with the standard library; the same values either way."""
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(data)


def batchable(payload: Any) -> bool:
    """Whether ``payload`` is a single-prompt ``/generate`` request that can join a batch."""
    if not isinstance(payload, dict) or not set(payload) <= BATCHABLE_FIELDS or payload.get("stream"):
        return False
    ids = payload.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return False
    sp = payload.get("sampling_params", {})
    return isinstance(sp, dict) and int(sp.get("n", 1) or 1) == 1


class _Group:
    __slots__ = ("items", "seen", "scheduled")

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.seen = 0  # len(items) at the last round of the loop
        self.scheduled = False


class GenerateCoalescer:
    """Group concurrent single-prompt ``/generate`` requests into batched ones (see the module doc).

    ``send(url, payload)``: the caller's transport, awaited once per batch. ``max_batch``: the most
    prompts in one request (>= 1). Use one instance per event loop.
    """

    def __init__(self, send: Send, max_batch: int = 256):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self._send = send
        self.max_batch = max_batch
        self._groups: dict[tuple[str, str, int], _Group] = {}
        self._tasks: set[asyncio.Task] = set()
        self.stats = {"requests": 0, "batches": 0}  # prompts submitted, HTTP requests sent

    async def submit(self, url: str, payload: dict[str, Any], chunks: int = 1) -> Any:
        """The answer to ``payload`` (one prompt), sent in a batch with the other requests in flight."""
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.stats["requests"] += 1
        if not batchable(payload):
            self.stats["batches"] += 1
            return await self._send(url, payload)
        shared = {k: v for k, v in payload.items() if k not in PER_PROMPT_FIELDS}
        shared["rid?"] = "rid" in payload  # a batch has a rid for every prompt or for none
        key = (url, json.dumps(shared, sort_keys=True, default=repr), chunks)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        group.items.append((payload, future))
        if len(group.items) >= self.max_batch * chunks:
            self._flush(key)
        elif not group.scheduled:
            group.scheduled = True
            loop.call_soon(self._round, key, group)
        return await future

    def _round(self, key: tuple[str, str, int], group: _Group) -> None:
        """One round of the loop has passed: send the group unless it grew during it."""
        if self._groups.get(key) is not group:  # already sent (it filled up)
            return
        if len(group.items) > group.seen:
            group.seen = len(group.items)
            asyncio.get_running_loop().call_soon(self._round, key, group)
            return
        self._flush(key)

    def _flush(self, key: tuple[str, str, int]) -> None:
        group = self._groups.pop(key, None)
        if group is None or not group.items:
            return
        url, _, chunks = key
        items = group.items
        n_batches = min(chunks, len(items))
        size = -(-len(items) // n_batches)
        for start in range(0, len(items), size):
            task = asyncio.ensure_future(self._send_batch(url, items[start : start + size]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, url: str, items: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        payloads = [p for p, _ in items]
        self.stats["batches"] += 1
        try:
            if len(payloads) == 1:
                answers = [await self._send(url, payloads[0])]
            else:
                answers = await self._send(url, merge_payloads(payloads))
                if not isinstance(answers, list) or len(answers) != len(payloads):
                    got = f"a list of {len(answers)}" if isinstance(answers, list) else type(answers).__name__
                    raise ValueError(
                        f"batched /generate to {url}: expected a list of {len(payloads)} answers (one per prompt), "
                        f"got {got}"
                    )
        except BaseException as exc:  # every request of the batch is told; nothing is left waiting
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), answer in zip(items, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One batched payload from single-prompt ones that share every field but the per-prompt ones."""
    out = {k: v for k, v in payloads[0].items() if k not in PER_PROMPT_FIELDS}
    out["input_ids"] = [list(p["input_ids"]) for p in payloads]
    sps = [p.get("sampling_params", {}) for p in payloads]
    if any(sp != sps[0] for sp in sps):
        out["sampling_params"] = sps
    elif "sampling_params" in payloads[0]:
        out["sampling_params"] = sps[0]
    if "rid" in payloads[0]:
        out["rid"] = [p["rid"] for p in payloads]
    return out
