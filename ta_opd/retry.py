"""Bounded retries with exponential backoff and jitter around an operation the caller supplies.

Only the policy lives here: the caller makes the call (an HTTP request, say), decides which of its
errors are transient and what to count or log. The stack's HTTP client (``slime.utils.http_utils``)
and the drop-in slime patch's teacher scoring both use it, so the two retry the same way.

Retry r (1-based) waits ``min(backoff_max_s, backoff_base_s · 2^(r-1)) · (0.5 + u)``, u ~ U[0, 1):
exponential growth, a cap, and jitter in [0.5, 1.5) so that many clients do not retry in step.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "RETRYABLE_HTTP_STATUS",
    "RetriesExhausted",
    "RetryPolicy",
    "Transient",
    "describe_error",
    "log_retry",
    "retry_async",
]

T = TypeVar("T")

# HTTP answers worth another attempt: rate limiting and the server-side 5xx a restart or overload gives.
RETRYABLE_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``max_retries`` retries after the first attempt."""

    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("backoff_base_s", "backoff_max_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    @property
    def attempts(self) -> int:
        """Attempts in all: the first one plus ``max_retries``."""
        return self.max_retries + 1

    def delay(self, retry: int, u: float) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), given a uniform draw ``u`` in [0, 1)."""
        if retry < 1:
            raise ValueError(f"retry counts from 1, got {retry}")
        return min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (retry - 1)) * (0.5 + u)


class Transient(Exception):
    """Raised by an operation for a failure worth another attempt (an HTTP 503, say); the message says what."""


class RetriesExhausted(Exception):
    """Every attempt failed transiently; ``last_error`` is the last failure (also the ``__cause__``)."""

    def __init__(self, attempts: int, last_error: BaseException):
        super().__init__(f"failed after {attempts} attempts; last error: {describe_error(last_error)}")
        self.attempts = attempts
        self.last_error = last_error


def describe_error(error: BaseException) -> str:
    """One line for logs and messages: a ``Transient``'s own message, else ``TypeName: message``."""
    return str(error) if isinstance(error, Transient) else f"{type(error).__name__}: {error}"


def log_retry(
    logger: logging.Logger, what: str, policy: RetryPolicy, counts: MutableMapping[str, int] | None = None
) -> Callable[[int, BaseException, float], None]:
    """An ``on_retry`` for ``retry_async``: a warning "<what> failed (<error>); retry r/N in d s", and
    ``counts["retries"] += 1`` when ``counts`` is given (the caller's per-step metrics)."""

    def on_retry(attempt: int, error: BaseException, delay: float) -> None:
        if counts is not None:
            counts["retries"] = counts.get("retries", 0) + 1
        logger.warning(
            "%s failed (%s); retry %d/%d in %.2fs", what, describe_error(error), attempt, policy.max_retries, delay
        )

    return on_retry


async def retry_async(
    operation: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    transient: tuple[type[BaseException], ...] = (),
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    uniform: Callable[[], float] = random.random,
) -> T:
    """Await ``operation(attempt)`` (attempt = 1, 2, ...) until it returns, and return its result.

    A ``Transient`` or an exception of a ``transient`` type is retried after ``policy.delay``;
    ``on_retry(attempt, error, delay)`` runs before each wait (to count or log it). Any other
    exception propagates at once. After ``policy.attempts`` transient failures raises
    ``RetriesExhausted`` from the last one.
    """
    retry_on = (Transient, *transient)
    last_error: BaseException | None = None
    for attempt in range(1, policy.attempts + 1):
        try:
            return await operation(attempt)
        except retry_on as e:
            last_error = e
        if attempt < policy.attempts:
            delay = policy.delay(attempt, uniform())
            if on_retry is not None:
                on_retry(attempt, last_error, delay)
            await asyncio.sleep(delay)
    assert last_error is not None  # policy.attempts >= 1 and every pass that did not return set it
    raise RetriesExhausted(policy.attempts, last_error) from last_error
