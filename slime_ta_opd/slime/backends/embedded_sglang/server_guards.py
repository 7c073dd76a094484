"""Access guards of the embedded server (``server``): bind address, API key, weight paths and the body-size cap."""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

API_KEY_ENV = "SGLANG_API_KEY"  # how launchers pass the key: never on the command line (/proc/PID/cmdline)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to bind non-loopback host {host!r} without --api-key: anyone on the network could drive "
            "the model and overwrite its weights; pass --api-key KEY or bind 127.0.0.1"
        )


def resolve_weights_path(requested: Any, roots: Path | Sequence[Path]) -> Path:
    """The real directory ``requested`` names, if inside one of ``roots`` (no traversal, no symlink escape).

    A relative path is taken relative to the first root.
    """
    if not isinstance(requested, str) or not requested:
        raise ValueError(f"model_path must be a non-empty string, got {requested!r}")
    root_list = [roots] if isinstance(roots, Path) else list(roots)
    roots_real = [Path(r).resolve() for r in root_list]
    target = Path(requested)
    if not target.is_absolute():
        target = roots_real[0] / target
    real = target.resolve()
    if not any(os.path.commonpath([str(real), str(r)]) == str(r) for r in roots_real):
        shown = ", ".join(repr(str(r)) for r in roots_real)
        raise ValueError(f"model_path {requested!r} resolves to {str(real)!r}, outside --weights-root {shown}")
    if not real.is_dir():
        raise ValueError(f"model_path {requested!r} is not a directory")
    return real


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``$SGLANG_API_KEY`` (in that order); the variable is
    removed from this process's environment once read."""
    from_env = os.environ.pop(API_KEY_ENV, None) or None
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {args.api_key_file!r} could not be read: {exc}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file!r} holds an empty key")
        return key
    return from_env


class BodyLimitMiddleware:
    """ASGI middleware: 413 when the request body (declared or streamed) exceeds ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _send_json(send, 413, {"error": {"message": self._msg(declared)}})
                    return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(seen)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge as exc:
            await _send_json(send, 413, {"error": {"message": self._msg(exc.args[0])}})

    def _msg(self, size: int) -> str:
        return f"request body of {size} bytes exceeds --max-body-bytes {self.max_bytes}"


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """ASGI middleware: 401 unless ``Authorization: Bearer KEY`` (constant-time compare) on every path except
    ``open_paths`` and ``OPTIONS`` (a plain ASGI wrapper: no task or body copy per request)."""

    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and not scope["path"].startswith(self.open_paths):
            header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            if not hmac.compare_digest(header, self.expected):
                message = "Unauthorized: missing or wrong 'Authorization: Bearer <api key>' header"
                await _send_json(send, 401, {"error": {"message": message}})
                return
        await self.app(scope, receive, send)
