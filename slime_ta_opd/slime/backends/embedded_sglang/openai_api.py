"""OpenAI-compatible routes of the embedded server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

SGLang serves the same three routes; lm-evaluation-harness drives them through its ``local-completions`` and
``local-chat-completions`` models (docs/evaluation.md). A request is translated into the native ``/generate``
request and validated by ``protocol.parse_generate`` (the same limits: context length, vocabulary, the server's
``--max-new-tokens-cap``), so both APIs behave alike. The server's API-key middleware and body limit cover these
routes too.

``/v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists;
``max_tokens`` (default 16), ``temperature`` (default 1), ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``
(top-k per position, 0..20), ``echo`` (the prompt's tokens and, with ``logprobs``, their log-probs are returned
ahead of the completion: what lm-eval's loglikelihood requests send, with ``max_tokens=1``). As in OpenAI's
API, the first prompt token has log-prob ``null``; log-probs of prompt tokens are of the raw logits.

``/v1/chat/completions``: ``messages`` (role + text content) rendered with the model's chat template
(``add_generation_prompt``; ``chat_template_kwargs`` passed to it), ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs`` (bool) and ``top_logprobs`` (0..20).

Refused with 400 and a message naming the field: wrong types or ranges, ``stream: true``, non-neutral
penalties or ``logit_bias``, ``best_of`` other than ``n``, unknown fields, and everything ``/generate``
refuses.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from slime.backends.embedded_sglang.engine import Engine, EngineRequestError, EngineUnavailable, GenRequest
from slime.backends.embedded_sglang.protocol import RequestError, parse_generate

MAX_LOGPROBS = 20  # OpenAI's bound on `logprobs` / `top_logprobs`
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default

# Fields accepted at their neutral value only (a request never silently means something else).
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "suffix": None, "stream": False}
# Accepted and ignored: they do not change what is generated.
_IGNORED = {"model", "user", "stream_options", "service_tier", "store", "metadata", "parallel_tool_calls"}
# SGLang's extensions of the OpenAI request, passed on to the sampler.
_SAMPLING_EXTENSIONS = {"top_k", "min_p", "min_tokens", "ignore_eos", "skip_special_tokens", "stop_token_ids"}
_COMMON = {"max_tokens", "temperature", "top_p", "n", "stop", "seed", "best_of", "logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo"} | set(_NEUTRAL) | _IGNORED | _SAMPLING_EXTENSIONS
_CHAT_FIELDS = (
    _COMMON
    | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"}
    | set(_NEUTRAL) - {"suffix"}
    | _IGNORED
    | _SAMPLING_EXTENSIONS
)

RunRequests = Callable[[list[GenRequest]], Awaitable[list[dict[str, Any]]]]


def _bad(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    """OpenAI's error body (``error.message`` is also the embedded server's native error shape)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(f"{key} must be an integer in [{lo}, {hi}], got {_shown(value)}")
    return value


def _check_num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or isinstance(value, float)
        and not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise RequestError(f"{key} must be a number in [{lo}, {hi}], got {_shown(value)}")
    return float(value)


def _check_common(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown fields {unknown}; this server accepts {sorted(allowed)}")
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] not in (neutral, None):
            what = "streaming" if key == "stream" else f"{key}={_shown(body[key])}"
            raise RequestError(f"{what} is not supported by the embedded server (send {key}={neutral!r} or omit it)")
    n = _check_int(body, "n", 1, 1, 1024)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError(f"best_of={_shown(best_of)} is not supported: it must equal n ({n}) or be omitted")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(f"stop must be a string or a list of non-empty strings, got {_shown(stop)}")


def _sampling_params(body: dict, max_tokens: int | None) -> dict[str, Any]:
    """The ``sampling_params`` of the equivalent ``/generate`` request."""
    params: dict[str, Any] = {
        "temperature": _check_num(body, "temperature", 1.0, 0.0, 1e6),
        "top_p": _check_num(body, "top_p", 1.0, 1e-9, 1.0),
        "n": _check_int(body, "n", 1, 1, 1024),
    }
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    seed = body.get("seed")
    if seed is not None:  # OpenAI seeds are any integer; the sampler's are in [0, 2^63 - n]
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RequestError(f"seed must be an integer, got {_shown(seed)}")
        params["sampling_seed"] = seed % (1 << 62)
    for key in _SAMPLING_EXTENSIONS:
        if body.get(key) is not None:
            params["min_new_tokens" if key == "min_tokens" else key] = body[key]
    return params


def _finish_reason(meta: dict[str, Any]) -> str | None:
    kind = (meta.get("finish_reason") or {}).get("type")
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(kind, kind)


def _top_dict(entry: list | None) -> dict[str, float] | None:
    """SGLang's ``[[logprob, id, text], ...]`` as OpenAI's ``{text: logprob}`` (the most likely first wins a tie)."""
    if entry is None:
        return None
    out: dict[str, float] = {}
    for logprob, _, text in entry:
        out.setdefault(text, logprob)
    return out


def _completion_logprobs(answer: dict[str, Any], echo_ids: list[int] | None, engine: Engine, top: int) -> dict:
    """OpenAI's completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    meta = answer["meta_info"]
    entries: list[list] = []
    tops: list[dict[str, float] | None] = []
    if echo_ids is not None:
        entries += meta["input_token_logprobs"]
        tops += [_top_dict(e) for e in meta.get("input_top_logprobs", [None] * len(entries))]
    out = meta["output_token_logprobs"]
    entries += out
    tops += [_top_dict(e) for e in meta.get("output_top_logprobs", [None] * len(out))]
    tokens = [text if text is not None else engine.token_texts([tid])[0] for _, tid, text in entries]
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _, _ in entries],
        "top_logprobs": tops if top > 0 else None,
        "text_offset": offsets,
    }


def _completion_response(
    id_prefix: str, kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> JSONResponse:
    """The OpenAI answer envelope of a (chat) completion: a fresh id, the object kind, model, choices, usage."""
    return JSONResponse(
        {
            "id": f"{id_prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
        }
    )


def _usage(prompt_lengths: list[int], answers: list[dict[str, Any]]) -> dict[str, int]:
    completion = sum(int(a["meta_info"]["completion_tokens"]) for a in answers)
    prompt = sum(prompt_lengths)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompts(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, token lists): exactly one is set; the four forms of OpenAI's ``prompt``."""
    if isinstance(prompt, str):
        return [prompt], None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt), None
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, [list(prompt)]
        if all(isinstance(p, list) and p for p in prompt):
            return None, [list(p) for p in prompt]
    raise RequestError(
        "prompt must be a string, a non-empty list of strings, a list of token ids or a list of non-empty "
        f"token-id lists, got {_shown(prompt)}"
    )


def add_openai_routes(
    app: FastAPI, engine: Engine, args: Any, run_requests: RunRequests, read_body: Callable[[Request], Awaitable[Any]]
) -> None:
    """Register ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` on the embedded server's app.

    ``run_requests`` runs validated requests on the engine and returns SGLang-shaped answers (the server's own);
    ``read_body`` is the server's JSON reader (its size, depth and syntax limits).
    """

    async def run(native: dict[str, Any]) -> tuple[list[GenRequest], list[dict[str, Any]]] | JSONResponse:
        """The native request parsed and run: ``(requests, answers)``, or the error response."""
        try:
            reqs, _ = parse_generate(native, engine, args.max_new_tokens_cap)
        except RequestError as exc:
            return _bad(str(exc))
        refusal = engine.weights_state_error()
        if refusal is not None:
            return _bad(refusal, status=503)
        try:
            return reqs, await run_requests(reqs)
        except EngineUnavailable as exc:
            return _bad(str(exc), status=503)
        except EngineRequestError as exc:
            return _bad(str(exc), status=500)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": engine.model_path,
            "object": "model",
            "created": 0,
            "owned_by": "slime-embedded",
            "root": engine.model_path,
            "max_model_len": engine.context_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await read_body(request)
            _check_common(body, _COMPLETION_FIELDS)
            if "prompt" not in body:
                raise RequestError("field 'prompt' is required")
            texts, token_lists = _prompts(body["prompt"])
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise RequestError(f"echo must be a boolean, got {_shown(echo)}")
            top = _check_int(body, "logprobs", None, 0, MAX_LOGPROBS)
            max_tokens = _check_int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, 1 << 31)
            native: dict[str, Any] = {"sampling_params": _sampling_params(body, max_tokens)}
            if texts is not None:
                native["text"] = texts
            else:
                native["input_ids"] = token_lists
            if top is not None:
                native |= {"return_logprob": True, "top_logprobs_num": top, "return_text_in_logprobs": True}
                native["logprob_start_len"] = 0 if echo else -1
        except RequestError as exc:
            return _bad(str(exc))
        ran = await run(native)
        if isinstance(ran, JSONResponse):
            return ran
        reqs, answers = ran
        n = len(reqs) // len(texts if texts is not None else token_lists)  # samples per prompt, prompt-major
        choices = []
        for index, (req, answer) in enumerate(zip(reqs, answers, strict=True)):
            text = answer["text"]
            if echo:
                prompt_text = texts[index // n] if texts is not None else engine.safe_decode(req.input_ids, False)
                text = prompt_text + text
            choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
            if top is not None:
                choice["logprobs"] = _completion_logprobs(answer, req.input_ids if echo else None, engine, top)
            choice["finish_reason"] = _finish_reason(answer["meta_info"])
            choices.append(choice)
        usage = _usage([len(r.input_ids) for r in reqs[::n]], answers)
        return _completion_response("cmpl", "text_completion", body.get("model") or engine.model_path, choices, usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await read_body(request)
            _check_common(body, _CHAT_FIELDS)
            prompt_ids = _render_chat(engine, body.get("messages"), body.get("chat_template_kwargs"))
            want_logprobs = body.get("logprobs") or False
            if not isinstance(want_logprobs, bool):
                raise RequestError(f"logprobs must be a boolean for chat completions, got {_shown(want_logprobs)}")
            top = _check_int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
            if top and not want_logprobs:
                raise RequestError("top_logprobs needs logprobs=true")
            max_tokens = _check_int(body, "max_completion_tokens", None, 0, 1 << 31)
            if max_tokens is None:
                max_tokens = _check_int(body, "max_tokens", None, 0, 1 << 31)
            native: dict[str, Any] = {"input_ids": prompt_ids, "sampling_params": _sampling_params(body, max_tokens)}
            if want_logprobs:
                native |= {"return_logprob": True, "top_logprobs_num": top, "return_text_in_logprobs": True}
        except RequestError as exc:
            return _bad(str(exc))
        ran = await run(native)
        if isinstance(ran, JSONResponse):
            return ran
        answers = ran[1]
        choices = []
        for index, answer in enumerate(answers):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": answer["text"]},
                "logprobs": _chat_logprobs(answer, engine, top) if want_logprobs else None,
                "finish_reason": _finish_reason(answer["meta_info"]),
            }
            choices.append(choice)
        usage = _usage([len(prompt_ids)], answers)
        return _completion_response(
            "chatcmpl", "chat.completion", body.get("model") or engine.model_path, choices, usage
        )


def _render_chat(engine: Engine, messages: Any, template_kwargs: Any) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, ending with the generation prompt."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{role, content}} objects, got {_shown(messages)}")
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role', got {_shown(message)}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise RequestError(f"messages[{i}].content: only parts of type 'text' are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts: {_shown(content)}")
        flat.append({"role": message["role"], "content": content})
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise RequestError(f"chat_template_kwargs must be an object, got {_shown(template_kwargs)}")
    if not getattr(engine.tokenizer, "chat_template", None):
        raise RequestError(f"the model at {engine.model_path!r} has no chat template: use /v1/completions")
    try:
        text = engine.tokenizer.apply_chat_template(
            flat, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
    except Exception as exc:  # a template that raises on these messages (e.g. a role it does not know)
        raise RequestError(f"the chat template failed on these messages: {exc}") from None
    ids = [int(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)]
    if not ids:
        raise RequestError("the chat template renders these messages to no tokens")
    return ids


def _chat_logprobs(answer: dict[str, Any], engine: Engine, top: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs.content``: one entry per generated token, with its top alternatives."""
    meta = answer["meta_info"]
    tops = meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"])
    content = []
    for (logprob, tid, text), alternatives in zip(meta["output_token_logprobs"], tops, strict=True):
        token = text if text is not None else engine.token_texts([tid])[0]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for lp, _, t in (alternatives or [])[:top]
                ],
            }
        )
    return {"content": content}
