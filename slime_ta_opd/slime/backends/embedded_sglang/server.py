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
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from slime.backends.embedded_sglang.engine import (
    GROUP_TIMEOUT_MAX_S,
    Engine,
    EngineRequestError,
    EngineUnavailable,
    GenRequest,
)
from slime.backends.embedded_sglang.protocol import RequestError, build_answer, parse_generate
from slime.backends.embedded_sglang.server_guards import (  # noqa: F401  (importable from here, as before)
    API_KEY_ENV,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    check_bind,
    is_loopback,
    resolve_api_key,
    resolve_weights_path,
)
from slime.backends.embedded_sglang.weights_io import read_safetensors_dir

logger = logging.getLogger("slime.embedded_sglang")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32  # SGLang requests nest a few levels; deeper bodies are refused before anything walks them
SHUTDOWN_GRACE_S = 3  # SIGTERM: seconds in-flight requests get before the server exits anyway
_OPEN_PATHS = ("/health", "/metrics")  # SGLang leaves health probes open even with an API key


KEEP_ALIVE_S = 120


def _error(status: int, message: str) -> JSONResponse:
    """SGLang's error body: ``{"error": {"message": ...}}``."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of a parsed JSON value, counted without recursion and up to ``limit + 1``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def read_json(request: Request) -> Any:
    """The request body as JSON; ``RequestError`` (HTTP 400) naming the problem when it is not acceptable."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(f"request body nests JSON too deeply to parse (limit {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise RequestError(f"request body is not acceptable JSON: {exc}") from None
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestError(f"request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    return body


def check_group_spec(body: dict[str, Any], allow_remote: bool) -> str | None:
    """Why an ``/init_weights_update_group`` body must be refused, or None (types, ranges, master address)."""
    for name, types in {"master_address": (str,), "master_port": (int,), "rank_offset": (int,),
                        "world_size": (int,), "group_name": (str,), "backend": (str,)}.items():  # fmt: skip
        value = body.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            got = type(value).__name__ if name in body else "nothing"
            return f"field {name!r} must be {' or '.join(t.__name__ for t in types)}, got {got}"
    if not 1 <= body["master_port"] <= 65535:
        return f"master_port {body['master_port']} is out of range [1, 65535]"
    if not 2 <= body["world_size"] <= 65536:
        return f"world_size {body['world_size']} is out of range [2, 65536]"
    if not 0 < body["rank_offset"] < body["world_size"]:
        return f"rank_offset {body['rank_offset']} must be in [1, world_size={body['world_size']})"
    timeout = body.get("timeout_s")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= GROUP_TIMEOUT_MAX_S
    ):
        return f"timeout_s {timeout!r} must be a number in (0, {GROUP_TIMEOUT_MAX_S:g}] seconds"
    if not allow_remote and not is_loopback(body["master_address"]):
        return (
            f"master_address {body['master_address']!r} is not a loopback address: this server joins weight-update "
            "groups on this machine only (start it with --allow-remote-weight-update-master to allow other hosts)"
        )
    return None


def create_app(engine: Engine, args: argparse.Namespace) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    app = FastAPI(title="slime embedded SGLang server", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = args.api_key
    weights_root = (
        [Path(r) for r in args.weights_root] if args.weights_root else [Path(args.model_path).resolve().parent]
    )
    started = time.time()
    state = {"served": 0}

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, open_paths=_OPEN_PATHS)

    async def run_requests(reqs: list[GenRequest]) -> list[dict]:
        futs = [asyncio.wrap_future(f) for f in engine.submit_many(reqs)]
        # every future is awaited to its end (none is left unobserved), then the first failure is raised
        results = await asyncio.gather(*futs, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return [build_answer(r, res, engine) for r, res in zip(reqs, results, strict=True)]

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            reqs, as_list = parse_generate(await read_json(request), engine, args.max_new_tokens_cap)
        except RequestError as exc:
            return _error(400, str(exc))
        refusal = engine.weights_state_error()
        if refusal is not None:
            return _error(503, refusal)
        try:
            answers = await run_requests(reqs)
        except EngineUnavailable as exc:  # memory released, weights undefined, shutting down: the client is told why
            return _error(503, str(exc))
        except EngineRequestError as exc:  # the engine failed on this request (others go on being served)
            return _error(500, str(exc))
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
            body = await read_json(request)
        except RequestError as exc:
            return None, JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        if not isinstance(body, dict):
            return None, JSONResponse({"success": False, "message": "body must be a JSON object"}, status_code=400)
        return body, None

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        if engine.released:  # before reading anything: the weights have nowhere to go
            message = (
                f"cannot load {body.get('model_path')!r}: the engine's memory is released "
                "(/release_memory_occupation); call /resume_memory_occupation first"
            )
            return JSONResponse({"success": False, "message": message}, status_code=400)

        def read() -> tuple[Path, dict[str, torch.Tensor]]:  # on a worker thread: files never block the loop
            path = resolve_weights_path(body.get("model_path"), weights_root)
            return path, read_safetensors_dir(path, weights_root)

        try:
            path, tensors = await asyncio.to_thread(read)
        except ValueError as exc:
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        ok, msg = await asyncio.wrap_future(engine.update_weights_from_disk(str(path), tensors))
        if ok and isinstance(body.get("weight_version"), str):
            engine.weight_version = body["weight_version"]
        return JSONResponse({"success": ok, "message": msg, "num_paused_requests": 0}, status_code=200 if ok else 400)

    def answer(ok: bool, msg: str) -> Response:
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    async def settle(future) -> Response:
        """The answer of an engine call that resolves to ``(ok, message)``."""
        ok, msg = await asyncio.wrap_future(future)
        return answer(ok, msg)

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
        bad = check_group_spec(body, args.allow_remote_weight_update_master)
        if bad is not None:
            return answer(False, bad)
        return await settle(engine.init_weights_update_group(body))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        bad = field_error(body, {"names": (list,), "dtypes": (list,), "shapes": (list,), "group_name": (str,)})
        if bad is None and not all(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                            for d in shape)
            for shape in body["shapes"]
        ):  # fmt: skip
            bad = "field 'shapes' must be a list of lists of non-negative integers (one shape per tensor)"
        if bad is None and not all(isinstance(n, str) for n in body["names"]):
            bad = "field 'names' must be a list of strings"
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
        return await settle(engine.update_weights_from_distributed(body))

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        bad = field_error(body, {"serialized_named_tensors": (list,)})
        if bad is None and not (
            body["serialized_named_tensors"] and all(isinstance(p, str) for p in body["serialized_named_tensors"])
        ):
            bad = "field 'serialized_named_tensors' must be a non-empty list of base64 strings (one per TP rank)"
        if bad is None and body.get("load_format") not in (None, "direct"):
            bad = f"load_format {body['load_format']!r} is not supported here; expected null or 'direct'"
        if bad is None:  # the pickle is checked as a program before anything of it runs (weight_payload)
            from slime.backends.weight_payload import decode_payload

            try:
                for payload in body["serialized_named_tensors"]:
                    await asyncio.to_thread(decode_payload, payload)
            except ValueError as exc:
                bad = str(exc)
        if bad is not None:
            return answer(False, bad)
        return await settle(engine.update_weights_from_tensor(body))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Response:
        body, error = await json_object(request)
        if error is not None:
            return error
        return await settle(engine.destroy_weights_update_group(str(body.get("group_name"))))

    @app.post("/release_memory_occupation")
    async def release_memory_occupation() -> Response:
        return await settle(engine.release_memory_occupation())

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation() -> Response:
        return await settle(engine.resume_memory_occupation())

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

    @app.get("/v1/loads")
    async def v1_loads(include: str | None = None, dp_rank: int | None = None) -> Response:
        # SGLang's load report (the shape its /v1/loads answers; upstream slime polls it after a rollout and
        # sums num_running_reqs + num_waiting_reqs per rank). One rank here; token counts are not tracked.
        sections = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        asked = {s.strip() for s in include.split(",") if s.strip()} if include else {"all"}
        if asked - sections:
            bad = sorted(asked - sections)
            return _error(400, f"Invalid include sections: {bad}. Valid options: {sorted(sections)}")
        if dp_rank not in (None, 0):
            return _error(400, f"dp_rank {dp_rank} does not exist: this server has one data-parallel rank (0)")
        running, waiting = engine.num_running, engine.num_waiting
        load: dict[str, Any] = {
            "dp_rank": 0, "timestamp": time.time(), "num_running_reqs": running, "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting, "num_used_tokens": 0, "num_total_tokens": 0,
            "max_total_num_tokens": 0, "token_usage": 0.0, "gen_throughput": 0.0, "cache_hit_rate": 0.0,
            "utilization": running / engine.max_running_requests, "max_running_requests": engine.max_running_requests,
        }  # fmt: skip
        if asked & {"all", "queues"}:
            load["queues"] = {"waiting": waiting, "grammar": 0, "paused": 0, "retracted": 0}
        return JSONResponse({
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "version": "embedded-0.1",
            "dp_rank_count": 1,
            "loads": [load],
            "aggregate": {
                "total_running_reqs": running, "total_waiting_reqs": waiting, "total_reqs": running + waiting,
                "total_used_tokens": 0, "total_tokens": 0, "avg_token_usage": 0.0, "avg_throughput": 0.0,
                "avg_utilization": load["utilization"],
            },
        })  # fmt: skip

    @app.post("/abort_request")
    async def abort_request() -> Response:
        # Requests run to completion; accepted for API parity with SGLang (the router may call it).
        return Response(status_code=200)

    from slime.backends.embedded_sglang.openai_api import add_openai_routes  # /v1/completions, /v1/chat/...

    add_openai_routes(app, engine, args, run_requests, read_json)
    return app


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF causal-LM directory (safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --api-key)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, or --api-key-file). Visible to every "
        f"user in /proc/PID/cmdline: prefer ${API_KEY_ENV} or --api-key-file",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
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
    p.add_argument(
        "--disable-scoring-prefix-reuse",
        action="store_true",
        help="prefill every scoring request (max_new_tokens 0) whole, not from its prefix's cached KV",
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
    p.add_argument(
        "--allow-remote-weight-update-master",
        action="store_true",
        help="let /init_weights_update_group join a group whose master_address is not loopback (a multi-node "
        "trainer); without it only 127.0.0.0/8, ::1 and localhost are accepted",
    )
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = get_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.api_key = resolve_api_key(args)
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
        scoring_prefix_reuse=not args.disable_scoring_prefix_reuse,
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
        # SIGTERM: requests still running after this are cut off, so a stuck request never keeps the server up
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    engine.shutdown(timeout=SHUTDOWN_GRACE_S)


if __name__ == "__main__":
    main()
