"""http_utils: bounded retries with backoff on transient failures, clear fatal errors, API key header."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp import web

from slime.utils import http_utils
from slime.utils.async_utils import run
from slime.utils.http_utils import HTTPRequestError, get, get_retry_stats, post, reset_retry_stats


class FlakyServer:
    """A real aiohttp server on 127.0.0.1 that fails the first ``fail_times`` requests with ``status``."""

    def __init__(self, fail_times: int, status: int = 503):
        self.fail_times = fail_times
        self.status = status
        self.calls = 0
        self.headers: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.headers.append(dict(request.headers))
        if self.calls <= self.fail_times:
            return web.Response(status=self.status, text="try later")
        if request.path == "/empty":
            return web.Response(status=200, text="")
        body = await request.json() if request.method == "POST" else {}
        return web.json_response({"echo": body, "calls": self.calls})

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture
def flaky(request):
    server = FlakyServer(*request.param)
    yield server
    server.stop()


@pytest.mark.parametrize("flaky", [(2, 503)], indirect=True)
def test_retries_transient_failures_then_succeeds(flaky):
    reset_retry_stats()
    out = run(post(f"{flaky.url}/generate", {"a": 1}, max_retries=3, backoff_base=0.01, api_key="k"))
    assert out == {"echo": {"a": 1}, "calls": 3}
    assert flaky.calls == 3
    assert get_retry_stats() == {"requests": 1, "retries": 2, "failures": 0}
    assert all(h.get("Authorization") == "Bearer k" for h in flaky.headers)


@pytest.mark.parametrize("flaky", [(10, 429)], indirect=True)
def test_fatal_error_after_budget_names_url_and_attempts(flaky):
    reset_retry_stats()
    with pytest.raises(HTTPRequestError, match=r"failed after 3 attempts; last error: HTTP 429") as info:
        run(post(f"{flaky.url}/generate", {}, max_retries=2, backoff_base=0.01))
    assert info.value.url.endswith("/generate") and info.value.attempts == 3
    assert flaky.calls == 3 and get_retry_stats()["failures"] == 1


@pytest.mark.parametrize("flaky", [(10, 401)], indirect=True)
def test_client_errors_are_not_retried(flaky):
    with pytest.raises(HTTPRequestError, match="HTTP 401 \\(not retried\\)"):
        run(post(f"{flaky.url}/generate", {}, max_retries=5, backoff_base=0.01))
    assert flaky.calls == 1


@pytest.mark.parametrize("flaky", [(0, 200)], indirect=True)
def test_empty_answer_is_an_error_not_silence(flaky):
    with pytest.raises(HTTPRequestError, match="empty body"):
        run(get(f"{flaky.url}/empty", max_retries=0))
    assert run(get(f"{flaky.url}/empty", max_retries=0, expect_json=False)) == ""


def test_connection_refused_is_retried_then_fatal():
    port = http_utils.find_available_port()
    with pytest.raises(HTTPRequestError, match=rf"127.0.0.1:{port}/x failed after 2 attempts"):
        run(get(f"http://127.0.0.1:{port}/x", max_retries=1, backoff_base=0.01, timeout=5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_retries"):
        run(get("http://127.0.0.1:1/", max_retries=-1))
