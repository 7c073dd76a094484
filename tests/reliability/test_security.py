"""Security checks: loopback by default, constant-time key compare, pickle-free weight loading, no path escape."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import pickle
from argparse import Namespace
from pathlib import Path

import psutil
import pytest
import torch

from slime.backends.embedded_sglang import server as server_mod
from slime.backends.embedded_sglang.launch import ServerHandle, launch_engine_group, launch_router, launch_server
from slime.backends.embedded_sglang.server import get_parser, resolve_weights_path


def test_servers_default_to_loopback():
    assert get_parser().parse_args(["--model-path", "m"]).host == "127.0.0.1"
    for launcher in (launch_server, launch_engine_group, launch_router):
        assert inspect.signature(launcher).parameters["host"].default == "127.0.0.1", launcher.__name__
    cmd = ServerHandle("m", "127.0.0.1", 1, None).command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


@pytest.mark.slow
def test_running_server_listens_on_loopback_only(teacher_server):
    conns = [c for c in psutil.Process(teacher_server.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert conns and {c.laddr.ip for c in conns} == {"127.0.0.1"}


class _Engine:
    num_running = num_waiting = 0


async def _asgi_get(app, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_api_key_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    args = Namespace(api_key="s3cret", weights_root=None, model_path="/nonexistent/model")
    app = server_mod.create_app(_Engine(), args)
    assert asyncio.run(_asgi_get(app, "/get_load", [(b"authorization", b"Bearer wrong")])) == 401
    assert asyncio.run(_asgi_get(app, "/get_load", [])) == 401
    assert asyncio.run(_asgi_get(app, "/get_load", [(b"authorization", b"Bearer s3cret")])) == 200
    assert asyncio.run(_asgi_get(app, "/health", [])) == 200  # open, as SGLang
    assert calls == [
        (b"Bearer wrong", b"Bearer s3cret"),
        (b"", b"Bearer s3cret"),
        (b"Bearer s3cret", b"Bearer s3cret"),
    ]


def test_weights_path_cannot_escape_the_root(tmp_path):
    root = tmp_path / "weights"
    (root / "v1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_weights_path("v1", root) == (root / "v1").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "link", "v1/../../outside", "/"):
        with pytest.raises(ValueError, match="outside --weights-root"):
            resolve_weights_path(bad, root)
    for bad in ("", None, 3, ["v1"]):
        with pytest.raises(ValueError, match="model_path must be a non-empty string"):
            resolve_weights_path(bad, root)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_checkpoint_never_unpickles_code(tmp_path, tiny_student_dir):
    """A tampered optimizer.pt (with a matching manifest) holding a code-running pickle is refused unrun."""
    from transformers import AutoModelForCausalLM

    from slime.backends.torch_utils import checkpoint as ckpt
    from slime.utils.misc import atomic_write_json

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = ckpt.save_checkpoint(tmp_path / "ckpt", 0, model, opt, {}, {})
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"state": _Evil()}, path / "optimizer.pt")
    atomic_write_json(path / "manifest.json", ckpt._build_manifest(path))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_checkpoint(path, model, opt)
    assert not Path(_Evil.marker).exists()
