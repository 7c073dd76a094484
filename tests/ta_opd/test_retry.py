"""ta_opd.retry: the backoff schedule by hand, which errors are retried, and the error after the last attempt."""

from __future__ import annotations

import asyncio
import logging

import pytest

import ta_opd.retry as retry
from ta_opd.retry import RetriesExhausted, RetryPolicy, Transient, describe_error, retry_async


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []

    async def fake_sleep(seconds):
        waited.append(seconds)

    monkeypatch.setattr(retry.asyncio, "sleep", fake_sleep)
    return waited


def test_delay_doubles_up_to_the_cap_with_jitter_in_half_to_one_and_a_half():
    policy = RetryPolicy(max_retries=6, backoff_base_s=0.5, backoff_max_s=3.0)
    # u = 0.5 is the midpoint: the bare schedule 0.5, 1, 2, then the 3 s cap
    assert [policy.delay(r, 0.5) for r in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(2, 0.0) == 0.5 and policy.delay(2, 0.999) == pytest.approx(1.499)
    assert policy.attempts == 7
    with pytest.raises(ValueError, match="retry counts from 1"):
        policy.delay(0, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_retries=-1), "max_retries must be an int >= 0, got -1"),
        (dict(max_retries=1.5), "max_retries"),
        (dict(backoff_base_s=-0.1), "backoff_base_s must be a number of seconds >= 0"),
        (dict(backoff_max_s=float("nan")), "backoff_max_s"),
    ],
)
def test_policy_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


def test_transient_failures_are_retried_then_the_answer_returned(sleeps):
    calls, retried = [], []

    async def flaky(attempt):
        calls.append(attempt)
        if attempt == 1:
            raise Transient("HTTP 503: busy")
        if attempt == 2:
            raise ConnectionError("reset")
        return "answer"

    policy = RetryPolicy(max_retries=3, backoff_base_s=1.0, backoff_max_s=10.0)
    out = asyncio.run(
        retry_async(
            flaky,
            policy,
            transient=(ConnectionError,),
            on_retry=lambda a, e, d: retried.append((a, describe_error(e), d)),
            uniform=lambda: 0.5,
        )
    )
    assert out == "answer" and calls == [1, 2, 3]
    assert retried == [(1, "HTTP 503: busy", 1.0), (2, "ConnectionError: reset", 2.0)]
    assert sleeps == [1.0, 2.0]


def test_other_errors_propagate_at_once(sleeps):
    calls = []

    async def bad(attempt):
        calls.append(attempt)
        raise PermissionError("HTTP 401")

    with pytest.raises(PermissionError, match="HTTP 401"):
        asyncio.run(retry_async(bad, RetryPolicy(max_retries=5), transient=(ConnectionError,)))
    assert calls == [1] and sleeps == []


def test_exhausted_retries_raise_with_the_attempts_and_the_last_error(sleeps):
    async def down(attempt):
        raise TimeoutError(f"attempt {attempt}")

    with pytest.raises(RetriesExhausted) as info:
        asyncio.run(retry_async(down, RetryPolicy(max_retries=2), transient=(TimeoutError,)))
    assert info.value.attempts == 3 and str(info.value.last_error) == "attempt 3"
    assert info.value.__cause__ is info.value.last_error
    assert str(info.value) == "failed after 3 attempts; last error: TimeoutError: attempt 3"
    assert len(sleeps) == 2  # no wait after the last attempt

    with pytest.raises(RetriesExhausted, match="failed after 1 attempts"):
        asyncio.run(retry_async(down, RetryPolicy(max_retries=0), transient=(TimeoutError,)))


def test_log_retry_counts_and_warns(caplog):
    counts = {"requests": 1}
    on_retry = retry.log_retry(logging.getLogger("t"), "POST http://x/generate", RetryPolicy(max_retries=4), counts)
    with caplog.at_level(logging.WARNING, logger="t"):
        on_retry(2, Transient("HTTP 502: bad gateway"), 1.25)
    assert counts == {"requests": 1, "retries": 1}
    assert caplog.messages == ["POST http://x/generate failed (HTTP 502: bad gateway); retry 2/4 in 1.25s"]
