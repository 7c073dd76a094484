"""A small fault-injecting HTTP proxy on 127.0.0.1 (aiohttp), for the reliability tests.

Usage::

    proxy = FaultProxy("http://127.0.0.1:30000")   # starts on a free 127.0.0.1 port, in a thread
    proxy.fail_next(2, status=500)                   # the next 2 requests answer 500 (not forwarded)
    proxy.drop_next(1)                               # the next request: connection closed, no answer
    proxy.delay_next(1, seconds=3.0)                 # the next request waits 3 s before it is forwarded
    proxy.garble_next(1)                             # the next request: 200 with a body that is not JSON
    requests.post(proxy.url + "/generate", json=...)
    proxy.counts                                     # {"forwarded": .., "failed": .., "dropped": .., ...}
    proxy.stop()

Faults are queued in order and each applies to one request; when the queue is empty every
request is forwarded unchanged (method, path, query, body, Authorization header).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from typing import Any

import aiohttp
from aiohttp import web

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        if host != "127.0.0.1":
            raise ValueError(f"the test proxy binds 127.0.0.1 only, got {host!r}")
        self.upstream = upstream.rstrip("/")
        self.faults: deque[tuple[str, Any]] = deque()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(host), self.loop).result()
        self.url = f"http://{host}:{self.port}"

    # -- commands ---------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500) -> None:
        self._queue("fail", status, n)

    def drop_next(self, n: int) -> None:
        self._queue("drop", None, n)

    def delay_next(self, n: int, seconds: float) -> None:
        self._queue("delay", float(seconds), n)

    def garble_next(self, n: int) -> None:
        self._queue("garble", None, n)

    def _queue(self, kind: str, arg: Any, n: int) -> None:
        with self._lock:
            self.faults.extend([(kind, arg)] * n)

    def _next_fault(self) -> tuple[str, Any] | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    # -- server -----------------------------------------------------------------------------
    async def _start(self, host: str) -> int:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._next_fault()
        if fault is not None:
            kind, arg = fault
            self.counts[kind] += 1
            if kind == "fail":
                return web.Response(status=arg, text="injected failure")
            if kind == "drop":
                # close the connection without an answer (what a crashed server looks like mid-request)
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            if kind == "garble":
                return web.Response(status=200, text="<html>not json</html>", content_type="text/html")
            if kind == "delay":
                await asyncio.sleep(arg)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = f"{self.upstream}{request.rel_url}"
        async with self.session.request(request.method, url, data=body, headers=headers) as resp:
            payload = await resp.read()
            self.counts["forwarded"] += 1
            return web.Response(
                status=resp.status, body=payload, content_type=resp.content_type or "application/octet-stream"
            )

    def stop(self) -> None:
        async def close() -> None:
            await self.runner.cleanup()
            await self.session.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
