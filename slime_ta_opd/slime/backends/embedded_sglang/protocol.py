"""SGLang's native ``/generate`` protocol: request validation and answer construction.

Request (``POST /generate``): ``text`` (str or list) or ``input_ids`` (list[int] or list[list[int]]),
``sampling_params`` (dict, or one dict per prompt), ``return_logprob``, ``logprob_start_len``,
``top_logprobs_num``, ``token_ids_logprob``, ``return_text_in_logprobs``, ``rid``, and the project's
extension ``logprob_temperature`` (see docs/embedded_server.md). Fields that real clients and the
sglang-router add (``model``, ``stream``, ``log_metrics``, ``return_hidden_states``, ``lora_path``,
``bootstrap_*``, ...) are accepted and ignored; malformed values raise ``RequestError`` (HTTP 400).

Answer: one dict per prompt x sample (a list when the request was batched or ``n > 1``, ordered
prompt-major like SGLang), with ``text``, ``output_ids`` and ``meta_info``. Log-prob lists follow
SGLang's layout exactly:

* ``logprob_start_len`` = s (default -1 = no input log-probs): ``input_token_logprobs`` has
  ``len(input_ids) - s`` entries ``[logprob, token_id, text_or_None]`` for ``input_ids[s:]``, the
  first with logprob ``None`` (SGLang drops the first requested position's value even when s > 0);
  entry ``i >= 1`` is ``log p(input_ids[s+i] | input_ids[:s+i])``;
* ``input_top_logprobs`` / ``input_token_ids_logprobs``: same length, entry 0 ``None``;
* ``*_top_logprobs`` keys only when ``top_logprobs_num > 0``; ``*_token_ids_logprobs`` keys only
  when ``token_ids_logprob`` is given (as SGLang's tokenizer manager).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from slime.backends.embedded_sglang.engine import GenRequest, GenResult

# Keys SGLang's SamplingParams accepts. The ones we implement are read below; the others are
# accepted only at their neutral value so that a request never silently means something else.
_NEUTRAL_SAMPLING = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "stop_regex": None,
}
_IGNORED_SAMPLING = {"spaces_between_special_tokens", "stream_interval", "sampling_seed_mode"}
_IMPLEMENTED_SAMPLING = {
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "n",
    "sampling_seed",
}


class RequestError(ValueError):
    """A malformed request (HTTP 400)."""


# Integer fields end up in int64 tensors (seeds, top-k) or token counts: bounded so that nothing overflows later.
MAX_INT32 = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shown(val: Any) -> str:
    """A value for an error message, cut short (a 10,000-digit integer or a long list stays readable)."""
    text = repr(val) if not isinstance(val, int) or abs(val) < 10**30 else f"an integer of {len(str(abs(val)))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _num(params: dict, key: str, default: float, lo: float, hi: float, where: str) -> float:
    val = params.get(key, default)
    if val is None:
        return default
    # an int too large for a float is out of range, not a crash (math.isfinite would raise OverflowError)
    if not isinstance(val, int | float) or isinstance(val, bool) or isinstance(val, float) and not math.isfinite(val):
        raise RequestError(f"{where}.{key} must be a finite number in [{lo}, {hi}], got {_shown(val)}")
    if not lo <= val <= hi:
        raise RequestError(f"{where}.{key}={_shown(val)} is out of range [{lo}, {hi}]")
    return float(val)


def _int(params: dict, key: str, default: int, lo: int, hi: int, where: str) -> int:
    val = params.get(key, default)
    if val is None:
        return default
    if not _is_int(val):
        raise RequestError(f"{where}.{key} must be an integer in [{lo}, {hi}], got {_shown(val)}")
    if not lo <= val <= hi:
        raise RequestError(f"{where}.{key}={_shown(val)} is out of range [{lo}, {hi}]")
    return int(val)


def _bool(params: dict, key: str, default: bool, where: str) -> bool:
    val = params.get(key, default)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise RequestError(f"{where}.{key} must be a boolean, got {_shown(val)}")
    return val


def _id_list(val: Any, vocab: int, what: str) -> list[int]:
    if not isinstance(val, list) or not all(_is_int(i) for i in val):
        raise RequestError(f"{what} must be a list of integers, got {str(val)[:80]!r}")
    bad = [i for i in val if not 0 <= i < vocab]
    if bad:
        raise RequestError(f"{what} has token ids outside the model vocabulary [0, {vocab}): {bad[:5]}")
    return list(val)


def parse_generate(body: Any, engine: Any, max_new_tokens_cap: int) -> tuple[list[GenRequest], bool]:
    """Validate a ``/generate`` body; return the flat request list and whether the answer is a list.

    ``engine`` supplies ``tokenizer``, ``vocab_size``, ``context_length``.
    """
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("exactly one of 'text' and 'input_ids' must be given")
    if body.get("input_embeds") is not None or body.get("image_data") is not None:
        raise RequestError("input_embeds / image_data are not supported by the embedded server")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded server")
    vocab = engine.vocab_size
    if input_ids is not None:
        if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
            prompts = [_id_list(p, vocab, f"input_ids[{i}]") for i, p in enumerate(input_ids)]
            batched = True
        else:
            prompts = [_id_list(input_ids, vocab, "input_ids")]
            batched = False
    else:
        if isinstance(text, str):
            texts, batched = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            texts, batched = text, True
        else:
            raise RequestError(f"text must be a string or a non-empty list of strings, got {_shown(text)}")
        prompts = [list(engine.tokenizer.encode(t)) for t in texts]
    for i, p in enumerate(prompts):
        if not p:
            raise RequestError(f"prompt {i} is empty: at least one input token is required")
        if len(p) >= engine.context_length:
            raise RequestError(
                f"prompt {i}: the input ({len(p)} tokens) is longer than the model's context length "
                f"({engine.context_length} tokens)"
            )

    sp_all = body.get("sampling_params")
    if sp_all is None:
        sp_list = [{}] * len(prompts)
    elif isinstance(sp_all, dict):
        sp_list = [sp_all] * len(prompts)
    elif isinstance(sp_all, list) and batched:
        if len(sp_all) != len(prompts):
            raise RequestError(f"sampling_params has {len(sp_all)} entries for {len(prompts)} prompts")
        sp_list = sp_all
    elif isinstance(sp_all, list):
        raise RequestError(f"sampling_params must be an object for a single prompt, got {_shown(sp_all)}")
    else:
        raise RequestError(
            f"sampling_params must be an object (or, for batched prompts, a list of objects), got {_shown(sp_all)}"
        )

    return_logprob = _bool(body, "return_logprob", False, "request")
    top_k_lp = _int(body, "top_logprobs_num", 0, 0, vocab, "request")
    lp_start = _int(body, "logprob_start_len", -1, -1, MAX_INT32, "request")
    text_lp = _bool(body, "return_text_in_logprobs", False, "request")
    tid_lp = body.get("token_ids_logprob")
    if tid_lp is not None:
        tid_lp = _id_list(tid_lp, vocab, "token_ids_logprob")
    lp_temp = body.get("logprob_temperature")
    labels = body.get("custom_labels")
    if lp_temp is None and isinstance(labels, dict) and "logprob_temperature" in labels:
        # The sglang-router forwards only fields it knows; custom_labels survives it (docs/embedded_server.md).
        try:
            lp_temp = float(labels["logprob_temperature"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise RequestError(f"custom_labels.logprob_temperature must be a number, got {_shown(labels)}") from exc
    if lp_temp is not None:
        lp_temp = _num({"t": lp_temp}, "t", 1.0, 1e-6, 1e6, "request.logprob_temperature")
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str | list):
        raise RequestError(f"rid must be a string or a list of strings, got {_shown(rid)}")

    reqs: list[GenRequest] = []
    for i, (prompt, sp) in enumerate(zip(prompts, sp_list, strict=True)):
        where = f"sampling_params[{i}]" if batched else "sampling_params"
        if not isinstance(sp, dict):
            raise RequestError(f"{where} must be an object, got {_shown(sp)}")
        unknown = set(sp) - _IMPLEMENTED_SAMPLING - _IGNORED_SAMPLING - set(_NEUTRAL_SAMPLING)
        if unknown:
            raise RequestError(f"{where} has unknown keys {sorted(unknown)}")
        for key, neutral in _NEUTRAL_SAMPLING.items():
            if sp.get(key, neutral) not in (neutral, None):
                raise RequestError(f"{where}.{key}={_shown(sp[key])} is not supported by the embedded server")
        max_new = _int(sp, "max_new_tokens", 128, 0, MAX_INT32, where)
        if max_new > max_new_tokens_cap:
            raise RequestError(f"{where}.max_new_tokens={max_new} exceeds the server cap {max_new_tokens_cap}")
        room = engine.context_length - len(prompt) - 1  # SGLang's scheduler keeps one position free
        if sp.get("max_new_tokens") is not None and max_new > 0 and len(prompt) + max_new >= engine.context_length:
            # SGLang's tokenizer manager refuses an explicit budget that does not fit (same wording)
            raise RequestError(
                f"prompt {i}: requested token count exceeds the model's maximum context length of "
                f"{engine.context_length} tokens. You requested a total of {len(prompt) + max_new} tokens: "
                f"{len(prompt)} tokens from the input messages and {max_new} tokens for the completion "
                f"({where}.max_new_tokens); at most {room} new tokens fit after this prompt"
            )
        if max_new > 0 and room < 1:
            raise RequestError(
                f"prompt {i} has {len(prompt)} tokens: no room to generate within the context length "
                f"{engine.context_length} (a prompt of at most {engine.context_length - 2} tokens leaves room for "
                "one new token); send max_new_tokens=0 to score it"
            )
        max_new = min(max_new, room)
        stop = sp.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"{where}.stop must be a string or a list of non-empty strings, got {_shown(stop)}")
        stop_ids = sp.get("stop_token_ids") or []
        stop_ids = _id_list(stop_ids, vocab, f"{where}.stop_token_ids")
        n = _int(sp, "n", 1, 1, 1024, where)
        seed = sp.get("sampling_seed")
        if seed is not None:  # sample j of n uses seed + j, an int64 in the engine
            seed = _int(sp, "sampling_seed", 0, 0, MAX_SEED - (n - 1), where)
        if return_logprob and lp_start > len(prompt):
            raise RequestError(f"logprob_start_len={lp_start} is higher than the number of input tokens {len(prompt)}")
        for j in range(n):
            if isinstance(rid, list):
                if len(rid) != len(prompts) * n:
                    raise RequestError(f"rid has {len(rid)} entries for {len(prompts) * n} outputs")
                this_rid = str(rid[i * n + j])
            elif isinstance(rid, str) and len(prompts) * n == 1:
                this_rid = rid
            else:
                this_rid = uuid.uuid4().hex
            reqs.append(
                GenRequest(
                    rid=this_rid,
                    input_ids=prompt,
                    max_new_tokens=max_new,
                    min_new_tokens=_int(sp, "min_new_tokens", 0, 0, MAX_INT32, where),
                    temperature=_num(sp, "temperature", 1.0, 0.0, 1e6, where),
                    top_p=_num(sp, "top_p", 1.0, 1e-9, 1.0, where),
                    top_k=_int(sp, "top_k", -1, -1, MAX_INT32, where),
                    min_p=_num(sp, "min_p", 0.0, 0.0, 1.0, where),
                    stop_strs=list(stop),
                    stop_token_ids=stop_ids,
                    ignore_eos=_bool(sp, "ignore_eos", False, where),
                    skip_special_tokens=_bool(sp, "skip_special_tokens", True, where),
                    no_stop_trim=_bool(sp, "no_stop_trim", False, where),
                    return_logprob=return_logprob,
                    logprob_start_len=lp_start if return_logprob else -1,
                    top_logprobs_num=top_k_lp if return_logprob else 0,
                    token_ids_logprob=tid_lp if return_logprob else None,
                    return_text_in_logprobs=text_lp,
                    logprob_temperature=lp_temp,
                    seed=None if seed is None else int(seed) + j,
                )
            )
    return reqs, batched or len(reqs) > 1


def _triples(vals: list, ids: list, texts: list[str] | None) -> list[list]:
    if texts is None:
        return [[v, i, None] for v, i in zip(vals, ids, strict=True)]
    return [[v, i, t] for v, i, t in zip(vals, ids, texts, strict=True)]


def _nested(vals: list, ids: list, engine: Any, with_text: bool) -> list:
    out: list = []
    for v, i in zip(vals, ids, strict=True):
        out.append(_triples(v, i, engine.token_texts(i) if with_text else None) if v else None)
    return out


def build_answer(req: GenRequest, res: GenResult, engine: Any) -> dict[str, Any]:
    """One SGLang-shaped answer dict for one request."""
    out_ids = list(res.output_ids)
    reason = res.finish_reason
    decode_ids = out_ids
    if not req.no_stop_trim and reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and out_ids:
        decode_ids = out_ids[:-1]  # SGLang's detokenizer trims the matched stop token from the text
    text = engine.safe_decode(decode_ids, skip_special_tokens=req.skip_special_tokens)
    if not req.no_stop_trim and reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
        pos = text.find(reason["matched"])
        if pos != -1:
            text = text[:pos]
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": reason,
        "prompt_tokens": res.prompt_tokens,
        "weight_version": engine.weight_version,
    }
    if req.return_logprob:
        with_text = req.return_text_in_logprobs
        in_ids = res.input_token_logprobs_idx
        meta["input_token_logprobs"] = _triples(
            res.input_token_logprobs_val, in_ids, engine.token_texts(in_ids) if with_text else None
        )
        n_out = len(res.output_token_logprobs_val)
        meta["output_token_logprobs"] = _triples(
            res.output_token_logprobs_val, out_ids[:n_out], engine.token_texts(out_ids[:n_out]) if with_text else None
        )
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = _nested(
                res.input_top_logprobs_val, res.input_top_logprobs_idx, engine, with_text
            )
            meta["output_top_logprobs"] = _nested(
                res.output_top_logprobs_val, res.output_top_logprobs_idx, engine, with_text
            )
        if req.token_ids_logprob is not None:
            meta["input_token_ids_logprobs"] = _nested(
                res.input_token_ids_logprobs_val, res.input_token_ids_logprobs_idx, engine, with_text
            )
            tid = list(req.token_ids_logprob)
            meta["output_token_ids_logprobs"] = _nested(
                res.output_token_ids_logprobs_val, [tid] * len(res.output_token_ids_logprobs_val), engine, with_text
            )
    meta["completion_tokens"] = len(out_ids)
    meta["cached_tokens"] = res.cached_tokens
    meta["e2e_latency"] = res.e2e_latency
    return {"text": text, "output_ids": out_ids, "meta_info": meta}
