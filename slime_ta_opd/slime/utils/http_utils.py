"""Async HTTP client helpers for talking to SGLang-API servers and the router.

``post(url, payload)`` and ``get(url)`` keep upstream slime's names and first arguments.
One aiohttp session per event loop is shared by every call (connection reuse); each call
has a timeout, and transient failures (connection errors, timeouts, HTTP 5xx and 429) are
retried a bounded number of times with exponential backoff plus jitter (the policy of
``ta_opd.retry``, shared with the drop-in patch's teacher scoring). Anything else, or
running out of retries, raises ``HTTPRequestError`` naming the url, the attempts and the
last error. A call never returns a silent empty answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Any

import aiohttp

from ta_opd.coalesce import GenerateCoalescer, loads_json
from ta_opd.retry import RETRYABLE_HTTP_STATUS, RetriesExhausted, RetryPolicy, Transient, log_retry, retry_async

logger = logging.getLogger(__name__)

# Defaults, replaced by ``init_http_client(args)`` (flags --http-timeout, --http-max-retries, --api-key).
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_BASE_S = 0.5
DEFAULT_BACKOFF_MAX_S = 10.0
DEFAULT_CONNECTION_LIMIT = 256

_config: dict[str, Any] = {
    "timeout": DEFAULT_TIMEOUT_S,
    "max_retries": DEFAULT_MAX_RETRIES,
    "api_key": None,
    "connection_limit": DEFAULT_CONNECTION_LIMIT,
    "batch_requests": False,  # --sglang-batch-requests: post_generate batches concurrent requests
    "batch_max_size": 256,
}
_sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
# Counters for metrics: "retries" (transient failures that were retried), "failures"
# (calls that raised), "requests" (calls made). Read with ``get_retry_stats()``.
_stats: Counter[str] = Counter()

# transport failures worth another attempt (besides the RETRYABLE_HTTP_STATUS answers)
_TRANSIENT_ERRORS = (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class HTTPRequestError(RuntimeError):
    """A request that failed for good: non-retryable status, bad body, or retries exhausted."""

    def __init__(self, message: str, *, url: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


def _failed(message: str, *, url: str, attempts: int, status: int | None = None) -> HTTPRequestError:
    """Count a call that failed for good and build its error (the caller raises it)."""
    _stats["failures"] += 1
    return HTTPRequestError(message, url=url, attempts=attempts, status=status)


def init_http_client(args) -> None:
    """Take timeout, retry budget and API key for our own servers from the parsed flags."""
    _config["timeout"] = float(args.http_timeout)
    _config["max_retries"] = int(args.http_max_retries)
    _config["api_key"] = args.api_key
    _config["batch_requests"] = bool(args.sglang_batch_requests)
    _config["batch_max_size"] = int(args.sglang_batch_max_size)
    concurrency = args.sglang_server_concurrency
    if concurrency:
        _config["connection_limit"] = max(DEFAULT_CONNECTION_LIMIT, int(concurrency))


def get_retry_stats() -> dict[str, int]:
    """Counts since start (or the last reset): requests, retries, failures."""
    return {"requests": _stats["requests"], "retries": _stats["retries"], "failures": _stats["failures"]}


def reset_retry_stats() -> dict[str, int]:
    """Return the counts and zero them (the rollout reports them per step)."""
    out = get_retry_stats()
    _stats.clear()
    return out


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    entry = _sessions.get(id(loop))
    if entry is None or entry[0] is not loop or entry[1].closed:
        connector = aiohttp.TCPConnector(limit=_config["connection_limit"])
        session = aiohttp.ClientSession(connector=connector)
        _sessions[id(loop)] = (loop, session)
        return session
    return entry[1]


async def close_session() -> None:
    """Close the current loop's shared session (call before the loop ends)."""
    entry = _sessions.pop(id(asyncio.get_running_loop()), None)
    if entry is not None and not entry[1].closed:
        await entry[1].close()


def _headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    key = api_key if api_key is not None else _config["api_key"]
    if key:
        out.setdefault("Authorization", f"Bearer {key}")
    return out


async def _request(
    method: str,
    url: str,
    payload: Any = None,
    *,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    backoff_base: float = DEFAULT_BACKOFF_BASE_S,
    backoff_max: float = DEFAULT_BACKOFF_MAX_S,
    expect_json: bool = True,
) -> Any:
    timeout = _config["timeout"] if timeout is None else float(timeout)
    max_retries = _config["max_retries"] if max_retries is None else int(max_retries)
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    policy = RetryPolicy(max_retries=max_retries, backoff_base_s=backoff_base, backoff_max_s=backoff_max)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    hdrs = _headers(api_key, headers)
    _stats["requests"] += 1

    async def attempt_once(attempt: int) -> Any:
        session = _session()
        async with session.request(method, url, json=payload, headers=hdrs, timeout=client_timeout) as resp:

            def failed(what: str) -> Exception:
                return _failed(f"{method} {url} {what}", url=url, attempts=attempt, status=resp.status)

            body = await resp.text()
            if resp.status in RETRYABLE_HTTP_STATUS:
                raise Transient(f"HTTP {resp.status}: {body[:300]}")
            if resp.status >= 400:
                raise failed(f"failed with HTTP {resp.status} (not retried): {body[:500]}")
            if not expect_json:
                return body
            if not body.strip():
                raise failed(f"returned HTTP {resp.status} with an empty body; expected JSON")
            try:
                return loads_json(body)
            except ValueError as e:
                raise failed(f"returned a body that is not JSON: {body[:300]!r}") from e

    on_retry = log_retry(logger, f"{method} {url}", policy, counts=_stats)
    try:
        return await retry_async(attempt_once, policy, transient=_TRANSIENT_ERRORS, on_retry=on_retry)
    except RetriesExhausted as e:
        raise _failed(f"{method} {url} {e}", url=url, attempts=e.attempts) from e.last_error


async def post(
    url: str, payload: Any, max_retries: int | None = None, headers: dict[str, str] | None = None, **options: Any
) -> Any:
    """POST ``payload`` as JSON and return the decoded JSON answer (see the module doc for retries).

    ``max_retries`` counts retries after the first attempt (attempts = max_retries + 1).
    ``api_key`` (or the one from ``init_http_client``) is sent as ``Authorization: Bearer``.
    Keyword ``options``: ``api_key``, ``timeout``, ``backoff_base``, ``backoff_max``, ``expect_json``.
    """
    return await _request("POST", url, payload, max_retries=max_retries, headers=headers, **options)


_coalescers: dict[int, tuple[asyncio.AbstractEventLoop, GenerateCoalescer]] = {}


async def post_generate(url: str, payload: dict[str, Any], chunks: int = 1) -> Any:
    """POST one prompt's SGLang ``/generate`` request; its answer dict.

    With ``--sglang-batch-requests`` (``init_http_client``) the requests in flight together go out as
    batched requests (``ta_opd.coalesce``), split into ``chunks`` batches (one per engine behind the
    router); each HTTP request has ``post``'s timeout and retries. Otherwise this is ``post``."""
    if not _config["batch_requests"]:
        return await post(url, payload)
    loop = asyncio.get_running_loop()
    entry = _coalescers.get(id(loop))
    if entry is None or entry[0] is not loop or entry[1].max_batch != _config["batch_max_size"]:
        entry = (loop, GenerateCoalescer(post, max_batch=_config["batch_max_size"]))
        _coalescers[id(loop)] = entry
    return await entry[1].submit(url, payload, chunks=chunks)


async def get(url: str, max_retries: int | None = None, headers: dict[str, str] | None = None, **options: Any) -> Any:
    """GET ``url``; JSON answer decoded (or the text with ``expect_json=False``); options as for ``post``."""
    return await _request("GET", url, None, max_retries=max_retries, headers=headers, **options)


def is_port_available(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def find_available_port(base_port: int = 0, host: str = "127.0.0.1") -> int:
    """A free port: the OS's pick for ``base_port=0``, else the first free one from ``base_port`` up."""
    if base_port == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    port = base_port
    while not is_port_available(port, host):
        port += 1
        if port > 65535:
            raise RuntimeError(f"no free port at or above {base_port} on {host}")
    return port
