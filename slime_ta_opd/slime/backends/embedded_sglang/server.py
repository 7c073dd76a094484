"""Embedded SGLang-API-compatible HTTP server over a HF causal LM (FastAPI + uvicorn).

Usage::

    python -m slime.backends.embedded_sglang.server --model-path DIR [--host 127.0.0.1] [--port 30000]
        [--api-key KEY] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]
        [--max-running-requests 64] [--max-prefill-tokens 16384] [--max-new-tokens-cap 32768]
        [--max-body-bytes 67108864] [--weights-root DIR] [--random-seed 0] [--context-length N]

Speaks SGLang's native API (``/generate``, ``/health``, ``/health_generate``, ``/flush_cache``,
``/update_weights_from_disk``, ``/get_model_info``, ``/get_server_info``, plus ``/model_info``,
``/server_info``, ``/get_load`` which the sglang-router probes), the weight-sync routes
(``/init_weights_update_group``, ``/update_weights_from_distributed``, ``/destroy_weights_update_group``,
``/update_weights_from_tensor``) and ``/release_memory_occupation``/``/resume_memory_occupation``.
See docs/embedded_server.md.

Security: binds 127.0.0.1 by default and refuses a non-loopback host without ``--api-key``;
``Authorization: Bearer KEY`` is checked in constant time on every route except ``/health*``
(as SGLang does); request bodies above ``--max-body-bytes`` get 413; ``max_new_tokens`` above
``--max-new-tokens-cap`` gets 400; ``/update_weights_from_disk`` only reads ``*.safetensors``
below ``--weights-root``; ``/update_weights_from_tensor`` unpickles only torch's tensor-rebuild
functions and types (anything else in the payload is refused).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from slime.backends.embedded_sglang.engine import Engine, GenRequest
from slime.backends.embedded_sglang.protocol import RequestError, build_answer, parse_generate

logger = logging.getLogger("slime.embedded_sglang")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_OPEN_PATHS = ("/health", "/metrics")  # SGLang leaves health probes open even with an API key


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


KEEP_ALIVE_S = 120


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


def _error(status: int, message: str) -> JSONResponse:
    """SGLang's error body: ``{"error": {"message": ...}}``."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_app(engine: Engine, args: argparse.Namespace) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    app = FastAPI(title="slime embedded SGLang server", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = args.api_key
    weights_root = (
        [Path(r) for r in args.weights_root] if args.weights_root else [Path(args.model_path).resolve().parent]
    )
    started = time.time()
    state = {"served": 0}

    @app.middleware("http")
    async def check_api_key(request: Request, call_next: Any) -> Response:
        if api_key and request.method != "OPTIONS" and not request.url.path.startswith(_OPEN_PATHS):
            header = request.headers.get("authorization", "")
            expected = f"Bearer {api_key}"
            if not hmac.compare_digest(header.encode(), expected.encode()):
                return _error(401, "Unauthorized: missing or wrong 'Authorization: Bearer <api key>' header")
        return await call_next(request)

    async def run_requests(reqs: list[GenRequest]) -> list[dict]:
        futs = [asyncio.wrap_future(f) for f in engine.submit_many(reqs)]
        results = await asyncio.gather(*futs)
        return [build_answer(r, res, engine) for r, res in zip(reqs, results, strict=True)]

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        try:
            reqs, as_list = parse_generate(body, engine, args.max_new_tokens_cap)
        except RequestError as exc:
            return _error(400, str(exc))
        try:
            answers = await run_requests(reqs)
        except RuntimeError as exc:  # the engine refused (e.g. its memory is released): the client is told why
            return _error(503, str(exc))
        state["served"] += len(answers)
        return JSONResponse(answers if as_list else answers[0])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        req = GenRequest(rid=f"HEALTH_CHECK_{time.time_ns()}", input_ids=[0], max_new_tokens=1, temperature=0.0)
        try:
            await asyncio.wait_for(asyncio.wrap_future(engine.submit(req)), timeout=args.health_timeout)
        except Exception as exc:  # any failure means unhealthy
            return _error(503, f"health generation failed: {exc!r}")
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok, msg = await asyncio.wrap_future(engine.flush_cache())
        return PlainTextResponse(msg, status_code=200 if ok else 400)

    async def json_object(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, JSONResponse({"success": False, "message": f"body is not valid JSON: {exc}"}, status_code=400)
        if not isinstance(body, dict):
            return None, JSONResponse({"success": False, "message": "body must be a JSON object"}, status_code=400)
        return body, None

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        try:
            path = resolve_weights_path(body.get("model_path"), weights_root)
        except ValueError as exc:
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        ok, msg = await asyncio.wrap_future(engine.update_weights_from_disk(str(path)))
        if ok and isinstance(body.get("weight_version"), str):
            engine.weight_version = body["weight_version"]
        return JSONResponse({"success": ok, "message": msg, "num_paused_requests": 0}, status_code=200 if ok else 400)

    def answer(ok: bool, msg: str) -> Response:
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    def field_error(body: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> str | None:
        for name, types in fields.items():
            if not isinstance(body.get(name), types) or isinstance(body.get(name), bool) and bool not in types:
                got = type(body.get(name)).__name__ if name in body else "nothing"
                return f"field {name!r} must be {' or '.join(t.__name__ for t in types)}, got {got}"
        return None

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        bad = field_error(
            body,
            {"master_address": (str,), "master_port": (int,), "rank_offset": (int,), "world_size": (int,),
             "group_name": (str,), "backend": (str,)},
        )  # fmt: skip
        if bad is None and not 0 < body["rank_offset"] < body["world_size"]:
            bad = f"rank_offset {body['rank_offset']} must be in [1, world_size={body['world_size']})"
        if bad is not None:
            return answer(False, bad)
        ok, msg = await asyncio.wrap_future(engine.init_weights_update_group(body))
        return answer(ok, msg)

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        bad = field_error(body, {"names": (list,), "dtypes": (list,), "shapes": (list,), "group_name": (str,)})
        if bad is None and not len(body["names"]) == len(body["dtypes"]) == len(body["shapes"]):
            bad = f"names, dtypes and shapes differ in length: {len(body['names'])}, {len(body['dtypes'])}, "
            bad += f"{len(body['shapes'])}"
        if bad is None:
            try:
                from slime.backends.weight_sync import parse_dtype

                for d in body["dtypes"]:
                    parse_dtype(d)
            except ValueError as exc:
                bad = str(exc)
        if bad is not None:
            return answer(False, bad)
        ok, msg = await asyncio.wrap_future(engine.update_weights_from_distributed(body))
        return answer(ok, msg)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        bad = field_error(body, {"serialized_named_tensors": (list,)})
        if bad is None and not (
            body["serialized_named_tensors"] and isinstance(body["serialized_named_tensors"][0], str)
        ):
            bad = "field 'serialized_named_tensors' must be a non-empty list of base64 strings (one per TP rank)"
        if bad is None and body.get("load_format") not in (None, "direct"):
            bad = f"load_format {body['load_format']!r} is not supported here; expected null or 'direct'"
        if bad is not None:
            return answer(False, bad)
        ok, msg = await asyncio.wrap_future(engine.update_weights_from_tensor(body))
        return answer(ok, msg)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        ok, msg = await asyncio.wrap_future(engine.destroy_weights_update_group(str(body.get("group_name"))))
        return answer(ok, msg)

    @app.post("/release_memory_occupation")
    async def release_memory_occupation() -> Response:
        ok, msg = await asyncio.wrap_future(engine.release_memory_occupation())
        return answer(ok, msg)

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation() -> Response:
        ok, msg = await asyncio.wrap_future(engine.resume_memory_occupation())
        return answer(ok, msg)

    def model_info() -> dict[str, Any]:
        return {
            "model_path": engine.model_path,
            "tokenizer_path": engine.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(engine.model.config, "model_type", None),
            "architectures": getattr(engine.model.config, "architectures", None),
            "vocab_size": engine.vocab_size,
            "tokenizer_vocab_size": engine.tokenizer_size,
            "eos_token_ids": engine.eos_token_ids,
            "max_context_length": engine.context_length,
        }

    def server_info() -> dict[str, Any]:
        return {
            "model_path": engine.model_path,
            "tokenizer_path": engine.model_path,
            "served_model_name": engine.model_path,
            "host": args.host,
            "port": args.port,
            "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "max_running_requests": engine.max_running_requests,
            "max_prefill_tokens": engine.max_prefill_tokens,
            "context_length": engine.context_length,
            "random_seed": engine.random_seed,
            "max_new_tokens_cap": args.max_new_tokens_cap,
            "max_body_bytes": args.max_body_bytes,
            "api_key_required": bool(api_key),
            "dp_size": 1,
            "tp_size": 1,
            "weight_version": engine.weight_version,
            "embedded": True,
            "version": "embedded-0.1",
            "torch_version": torch.__version__,
            "uptime_s": time.time() - started,
            "num_requests_served": state["served"],
        }

    app.add_api_route("/get_model_info", model_info, methods=["GET"])
    app.add_api_route("/model_info", model_info, methods=["GET"])
    app.add_api_route("/get_server_info", server_info, methods=["GET"])
    app.add_api_route("/server_info", server_info, methods=["GET"])

    @app.get("/get_load")
    async def get_load() -> list[dict[str, int]]:
        return [
            {"dp_rank": 0, "num_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting, "num_tokens": 0}
        ]

    @app.post("/abort_request")
    async def abort_request() -> Response:
        # Requests run to completion; accepted for API parity with SGLang (the router may call it).
        return Response(status_code=200)

    return app


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF causal-LM directory (safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --api-key)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("SGLANG_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $SGLANG_API_KEY)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-running-requests", type=int, default=64, help="rows decoded together at most")
    p.add_argument("--max-prefill-tokens", type=int, default=16384, help="prompt tokens per prefill batch")
    p.add_argument(
        "--prompt-cache-tokens",
        type=int,
        default=65536,
        help="prompt tokens whose prefill is kept for reuse by later samples of the same prompt (0: off)",
    )
    p.add_argument("--max-new-tokens-cap", type=int, default=32768, help="larger max_new_tokens get 400")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument(
        "--weights-root",
        action="append",
        default=None,
        help="/update_weights_from_disk reads only below this dir; repeatable (default: the model dir's parent)",
    )
    p.add_argument("--random-seed", type=int, default=0, help="seed of per-request sampling seeds")
    p.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--health-timeout", type=float, default=60.0, help="seconds /health_generate waits")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = get_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_bind(args.host, args.api_key)
        for flag in ("max_running_requests", "max_prefill_tokens", "max_new_tokens_cap", "max_body_bytes"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if not Path(args.model_path).is_dir():
            raise ValueError(f"--model-path {args.model_path!r} is not a directory")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.random_seed)
    engine = Engine(
        args.model_path,
        device=args.device,
        dtype=args.dtype,
        max_running_requests=args.max_running_requests,
        max_prefill_tokens=args.max_prefill_tokens,
        random_seed=args.random_seed,
        context_length=args.context_length,
        prompt_cache_tokens=args.prompt_cache_tokens,
    )
    app = create_app(engine, args)
    wrapped = BodyLimitMiddleware(app, args.max_body_bytes)
    # Keep idle connections open longer than clients pool them (the router's HTTP client keeps idle
    # connections ~90 s): with uvicorn's 5 s default, a request sent on a connection the server is just
    # closing fails with "error sending request", and enough of those open the router's circuit.
    uvicorn.run(
        wrapped,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
