"""Fixtures of the reliability tests: one embedded server on 127.0.0.1, a fault proxy in front of it."""

from __future__ import annotations

import pytest

from slime.backends.embedded_sglang.launch import launch_server

API_KEY = "reliability-key"


@pytest.fixture(scope="session")
def teacher_server(tiny_teacher_dir):
    """A real embedded server (the tiny teacher) with an API key, shared by the reliability tests; stopped by its
    handle (own pid only)."""
    srv = launch_server(tiny_teacher_dir, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture
def proxy(teacher_server):
    from fault_proxy import FaultProxy

    p = FaultProxy(teacher_server.url)
    yield p
    p.stop()
