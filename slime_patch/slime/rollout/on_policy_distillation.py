"""On-policy distillation with teachability-aware token selection (TA-OPD) for slime.

Drop-in replacement for upstream slime's ``slime/rollout/on_policy_distillation.py`` and the
module this project's own ``slime.rollout.on_policy_distillation`` re-exports. Wiring (as upstream):

    --use-opd --opd-type sglang --rm-url http://TEACHER:PORT/generate
    --custom-rm-path slime.rollout.on_policy_distillation.reward_func
    --custom-reward-post-process-path slime.rollout.on_policy_distillation.post_process_rewards

``reward_func`` scores one sample with a prefill-only request to the teacher server (SGLang's
native ``/generate`` API) and returns the whole JSON answer, which slime stores in
``sample.reward``. ``post_process_rewards`` runs once per rollout step over all samples: it
stores the teacher's log-probs of the sampled tokens in ``sample.teacher_log_probs`` (the OPD
advantage, docs/method.md §1, is computed from them later by slime), builds one ``ta_opd.TokenBatch``
from both top-K lists, lets ``ta_opd.select_tokens`` choose the supervised tokens under the
global budget (docs/method.md §2-5) and writes the result into each ``sample.loss_mask``. Selection
belongs here because slime collects loss masks and per-rollout mask sums after this hook, so
the loss numerator and denominator see the same mask.

This file is an adapter: Sample → lists/tensors → ``ta_opd`` → Sample. No formula lives here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import Counter
from typing import Any

import aiohttp
import torch

from slime.utils.misc import load_function
from slime.utils.types import Sample
from ta_opd.api import select_tokens
from ta_opd.coalesce import GenerateCoalescer, loads_json
from ta_opd.loss_mask import valid_loss_mask
from ta_opd.retry import RETRYABLE_HTTP_STATUS, RetriesExhausted, RetryPolicy, Transient, log_retry, retry_async
from ta_opd.topk import TokenBatch

from .tip_compat import FULL_MASK, selection_config_from_args, student_topk_required, topk_k

__all__ = [
    "STEP_METRICS_KEY",
    "STUDENT_TOPK_KEY",
    "TeacherScoringError",
    "post_process_rewards",
    "reset_http_stats",
    "reward_func",
]

logger = logging.getLogger(__name__)

STUDENT_TOPK_KEY = "student_top_logprobs"  # sample.metadata key (docs/slime_interfaces.md)
STEP_METRICS_KEY = "opd_step_metrics"  # samples[0].metadata key read by the rollout's metrics

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 5
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 10.0
_TRANSIENT_ERRORS = (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class TeacherScoringError(RuntimeError):
    """The teacher (or student) server gave no usable answer for a sample."""


# Scoring requests since the last step's report: "requests", "retries" (transient failures retried),
# "failures" (requests that raised). post_process_rewards adds them to the step metrics and resets them,
# so a retried teacher answer is visible in the logs and a failed one stops the step (never a silent 0).
_http_stats: Counter[str] = Counter()


def reset_http_stats() -> dict[str, int]:
    """Return the scoring-request counts since the last step's report and zero them (a pre-flight's probes
    must not show up in step 0's metrics)."""
    out = {name: int(_http_stats[name]) for name in ("requests", "retries", "failures")}
    _http_stats.clear()
    return out


# ---------------------------------------------------------------------------------------------
# reward_func: one teacher prefill per sample
# ---------------------------------------------------------------------------------------------


async def reward_func(args: Any, sample: Sample, **kwargs: Any) -> dict[str, Any]:
    """Score ``sample.tokens`` with the teacher at ``args.rm_url``; return SGLang's whole JSON answer.

    The request is prefill-only (``max_new_tokens: 0``) and asks for input log-probs from the last
    prompt token on, so the answer covers every response position. With K = ``--opd-topk-metrics-k``
    > 0 it also asks for the teacher's top-K per position; with ``--opd-exact-cmass`` for the
    log-probs of the union of the sample's student top-K ids (docs/method.md §2, exact C). A failed or
    malformed answer raises ``TeacherScoringError`` naming the sample: never a silent zero.
    """
    if getattr(sample, "multimodal_inputs", None) and sample.multimodal_inputs.get("images"):
        raise NotImplementedError(
            f"sample {sample.index}: the TA-OPD patch scores token ids only; multimodal OPD is not supported"
        )
    if not getattr(args, "rm_url", None):
        raise ValueError("OPD teacher scoring needs --rm-url http://HOST:PORT/generate (the teacher server)")
    response_length = _checked_response_length(sample)
    k = topk_k(args)

    if student_topk_required(args) and _student_topk(sample) is None:
        sample.metadata[STUDENT_TOPK_KEY] = await _student_topk_by_prefill(args, sample, k)

    payload = _prefill_payload(args, sample, top_logprobs_num=k)
    hook_path = getattr(args, "custom_teacher_prefill_function_path", None)
    if hook_path:
        # a plug-in rewrites the teacher's request, e.g. this project's --self-distillation scores the response
        # after a privileged prompt (docs/method.md §7)
        payload = load_function(hook_path)(args, sample, payload)
        if not isinstance(payload, dict):
            raise TypeError(
                f"--custom-teacher-prefill-function-path {hook_path} must return the request payload (a dict), "
                f"got {type(payload).__name__}"
            )
    if getattr(args, "opd_exact_cmass", False) and k > 0:
        ids = _exact_cmass_request_ids(args, sample)
        if ids:
            payload["token_ids_logprob"] = ids
    teacher_temperature = teacher_scoring_temperature(args)
    if teacher_temperature != 1.0:
        # Extension of the project's embedded server (logits / T before the prefill log-softmax).
        # Real SGLang has no such field and scores at T = 1: this project's pre-flight check
        # `teacher_temperature` refuses such a teacher when T != 1 (docs/preflight.md).
        payload["logprob_temperature"] = teacher_temperature
        # sglang-router rebuilds requests and drops unknown top-level fields but keeps custom_labels
        payload["custom_labels"] = {"logprob_temperature": str(teacher_temperature)}

    answer = await _post_json(args, args.rm_url, payload, what="teacher scoring", sample=sample)
    _response_logprob_entries(answer, sample, response_length, source=f"teacher answer ({args.rm_url})")
    if k > 0:
        _response_top_entries(answer, "input_top_logprobs", sample, response_length, source="teacher answer")
    return answer


def teacher_scoring_temperature(args: Any) -> float:
    """The temperature of the teacher's prefill log-probs: ``--opd-teacher-temperature`` if the checkout defines
    and sets it, else ``--rollout-temperature`` (the student's log-probs in the advantage are tempered by it;
    docs/method.md §1 compares the two), else 1."""
    value = getattr(args, "opd_teacher_temperature", None)
    if value is None:
        value = getattr(args, "rollout_temperature", None)
    return 1.0 if value is None else float(value)


def _checked_response_length(sample: Sample) -> int:
    response_length = int(sample.response_length)
    if response_length < 0 or response_length >= len(sample.tokens):
        raise ValueError(
            f"sample {sample.index}: response_length {response_length} must be in [0, len(tokens)) = "
            f"[0, {len(sample.tokens)}): the prompt needs at least one token"
        )
    return response_length


def _prefill_payload(args: Any, sample: Sample, *, top_logprobs_num: int) -> dict[str, Any]:
    prompt_length = len(sample.tokens) - int(sample.response_length)
    payload: dict[str, Any] = {
        "input_ids": [int(t) for t in sample.tokens],
        "sampling_params": {
            "temperature": float(getattr(args, "rollout_temperature", 1.0)),
            "max_new_tokens": 0,
            "skip_special_tokens": False,
        },
        "return_logprob": True,
        # input_token_logprobs[j] is the log-prob of token start + j given the tokens before it; starting
        # at the last prompt token covers every response token (and skips the prompt's lm-head work).
        "logprob_start_len": max(prompt_length - 1, 0),
        "return_text_in_logprobs": False,
    }
    if top_logprobs_num > 0:
        payload["top_logprobs_num"] = int(top_logprobs_num)
    return payload


async def _student_topk_by_prefill(args: Any, sample: Sample, k: int) -> list[list[list[Any]]]:
    """The student's per-position top-K from a prefill on the rollout router.

    Upstream's rollout does not request ``top_logprobs_num``; rather than patch the rollout, the
    student engines (same weights as the rollout, updated only between steps) score the finished
    sequence. This project's rollout stores the top-K during sampling, so this path is not taken there.
    """
    ip, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    if ip is None or port is None:
        raise ValueError(
            f"sample {sample.index}: a selector, exact C or the token bank needs the student's top-K in "
            f"sample.metadata[{STUDENT_TOPK_KEY!r}], and no --sglang-router-ip/--sglang-router-port is set "
            "to compute it"
        )
    url = f"http://{ip}:{port}/generate"
    answer = await _post_json(
        args, url, _prefill_payload(args, sample, top_logprobs_num=k), what="student top-K", sample=sample
    )
    entries = _response_top_entries(
        answer, "input_top_logprobs", sample, int(sample.response_length), source=f"student answer ({url})"
    )
    return [list(entry) for entry in entries]


def _exact_cmass_request_ids(args: Any, sample: Sample) -> list[int]:
    """Union of the sample's student top-K ids for ``token_ids_logprob`` (docs/method.md §2, exact C).

    Above ``--opd-exact-cmass-max-union``: ``fallback`` sends none (C stays the lower bound from the
    teacher's top-K), ``truncate`` keeps the ids with the highest student probability at any position,
    ``error`` raises.
    """
    student_top = _student_topk(sample)
    if student_top is None:
        raise ValueError(f"sample {sample.index}: --opd-exact-cmass needs metadata[{STUDENT_TOPK_KEY!r}]")
    best: dict[int, float] = {}
    for entry in itertools.chain.from_iterable(pos or [] for pos in student_top):
        if entry is None or entry[0] is None or entry[1] is None:
            continue
        token_id, logprob = int(entry[1]), float(entry[0])
        if token_id >= 0 and logprob > best.get(token_id, float("-inf")):
            best[token_id] = logprob
    max_union = int(getattr(args, "opd_exact_cmass_max_union", 4096))
    if len(best) <= max_union:
        return sorted(best)
    overflow = getattr(args, "opd_exact_cmass_overflow", "fallback")
    if overflow == "fallback":
        logger.info(
            "sample %s: student top-K union %d > %d; C falls back to the lower bound",
            sample.index,
            len(best),
            max_union,
        )
        return []
    if overflow == "truncate":
        ranked = sorted(best, key=lambda tid: (-best[tid], tid))
        return sorted(ranked[:max_union])
    if overflow == "error":
        raise ValueError(
            f"sample {sample.index}: student top-K id union has {len(best)} ids > --opd-exact-cmass-max-union "
            f"{max_union} (--opd-exact-cmass-overflow error)"
        )
    raise ValueError(f"--opd-exact-cmass-overflow must be fallback, truncate or error, got {overflow!r}")


async def _post_json(args: Any, url: str, payload: dict[str, Any], *, what: str, sample: Sample) -> dict[str, Any]:
    """POST one sample's request with a timeout and bounded retries (connection errors, timeouts, 429/5xx;
    ``ta_opd.retry``), then raise; the answer must be SGLang's dict with ``meta_info``.

    ``--http-timeout`` (seconds per attempt) and ``--http-max-retries`` (retries after the first
    attempt) are read when the checkout defines them; otherwise 600 s and 5 retries. With
    ``--sglang-batch-requests`` (this project's stack; an upstream checkout does not define it, so it is off
    there) the requests in flight together are sent as batched ``/generate`` requests (``ta_opd.coalesce``).
    """
    if getattr(args, "sglang_batch_requests", False):
        answer = await _coalescer(args, what).submit(url, payload)
    else:
        answer = await _post_any(args, url, payload, what=what, where=f"sample {sample.index}")
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        _http_stats["failures"] += 1
        raise TeacherScoringError(
            f"sample {sample.index}: {what} answer from {url} has no 'meta_info' dict "
            f"(got {type(answer).__name__} {str(answer)[:200]})"
        )
    return answer


_COALESCERS: dict[tuple[int, str], tuple[Any, GenerateCoalescer]] = {}


def _coalescer(args: Any, what: str) -> GenerateCoalescer:
    """This event loop's coalescer for ``what`` requests (one batch = one HTTP request of ``_post_any``)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), what)
    entry = _COALESCERS.get(key)
    if entry is None or entry[0] is not loop:

        async def send(url: str, body: dict[str, Any]) -> Any:
            n = (
                len(body["input_ids"])
                if isinstance(body.get("input_ids"), list)
                and body["input_ids"]
                and (isinstance(body["input_ids"][0], list))
                else 1
            )
            return await _post_any(args, url, body, what=what, where=f"a batch of {n} sample(s)")

        entry = (loop, GenerateCoalescer(send, max_batch=int(getattr(args, "sglang_batch_max_size", None) or 256)))
        _COALESCERS[key] = entry
    return entry[1]


async def _post_any(args: Any, url: str, payload: dict[str, Any], *, what: str, where: str) -> Any:
    """POST ``payload`` with the timeout and retries of :func:`_post_json`; the decoded JSON answer."""
    timeout = aiohttp.ClientTimeout(total=float(getattr(args, "http_timeout", None) or DEFAULT_TIMEOUT_S))
    retries = getattr(args, "http_max_retries", None)
    policy = RetryPolicy(
        max_retries=max(0, int(DEFAULT_MAX_RETRIES if retries is None else retries)),
        backoff_base_s=_BACKOFF_BASE_S,
        backoff_max_s=_BACKOFF_MAX_S,
    )
    api_key = getattr(args, "api_key", None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    def failed(message: str) -> TeacherScoringError:
        _http_stats["failures"] += 1
        return TeacherScoringError(f"{where}: {what} {message}")

    async def attempt_once(attempt: int) -> Any:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json=payload, headers=headers) as resp:
                if resp.status in RETRYABLE_HTTP_STATUS:
                    raise Transient(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                if resp.status >= 400:
                    raise failed(f"request to {url} failed with HTTP {resp.status}: {(await resp.text())[:500]}")
                try:
                    return loads_json(await resp.read())
                except ValueError as e:
                    raise failed(f"answer from {url} is not JSON: {e}") from e

    on_retry = log_retry(logger, f"{where}: {what} to {url}", policy, counts=_http_stats)
    _http_stats["requests"] += 1
    try:
        return await retry_async(attempt_once, policy, transient=_TRANSIENT_ERRORS, on_retry=on_retry)
    except RetriesExhausted as e:
        raise failed(f"request to {url} {e}") from e.last_error


# ---------------------------------------------------------------------------------------------
# Answer parsing: the last response_length input positions are the response tokens
# ---------------------------------------------------------------------------------------------


def _meta(answer: Any, sample: Sample, source: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise ValueError(
            f"sample {sample.index}: {source} must be SGLang's /generate answer with a 'meta_info' dict, "
            f"got {type(answer).__name__}"
        )
    return answer["meta_info"]


def _response_logprob_entries(answer: Any, sample: Sample, response_length: int, source: str) -> list[list[Any]]:
    """The ``input_token_logprobs`` entries of the response tokens, checked against the sampled ids.

    ``input_token_logprobs[j]`` is ``[log p(token_j | tokens_<j), token_j, text]`` counted from
    ``logprob_start_len`` (entry 0 of a full-prompt request is ``None``), so the response tokens are
    the last ``response_length`` entries whatever start the server used.
    """
    entries = _meta(answer, sample, source).get("input_token_logprobs")
    if not isinstance(entries, list) or len(entries) < response_length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(
            f"sample {sample.index}: {source} has input_token_logprobs of length {got}, need at least the "
            f"response length {response_length} (was return_logprob/logprob_start_len sent?)"
        )
    tail = entries[len(entries) - response_length :]
    response_ids = sample.tokens[len(sample.tokens) - response_length :]
    for j, (entry, token_id) in enumerate(zip(tail, response_ids, strict=True)):
        if not isinstance(entry, list | tuple) or len(entry) < 2 or entry[0] is None:
            raise ValueError(f"sample {sample.index}: {source} has no log-prob for response position {j}: {entry!r}")
        if entry[1] is not None and int(entry[1]) != int(token_id):
            raise ValueError(
                f"sample {sample.index}: {source} is misaligned at response position {j}: token id {entry[1]} "
                f"!= sampled token {token_id} (the answer must be for sample.tokens)"
            )
    return tail


def _response_top_entries(
    answer: Any, key: str, sample: Sample, response_length: int, source: str
) -> list[list[list[Any]]]:
    """The last ``response_length`` entries of a per-position list (``input_top_logprobs`` and kin)."""
    entries = _meta(answer, sample, source).get(key)
    if not isinstance(entries, list) or len(entries) < response_length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(
            f"sample {sample.index}: {source} has {key} of length {got}, need the response length {response_length}"
        )
    tail = entries[len(entries) - response_length :]
    for j, entry in enumerate(tail):
        if not isinstance(entry, list | tuple):
            raise ValueError(f"sample {sample.index}: {source} has no {key} at response position {j}: {entry!r}")
    return tail


def _student_topk(sample: Sample) -> list[Any] | None:
    metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
    return metadata.get(STUDENT_TOPK_KEY)


def _teacher_answer(args: Any, sample: Sample) -> dict[str, Any]:
    reward = sample.reward
    if isinstance(reward, dict) and "meta_info" in reward:
        return reward
    value = sample.get_reward_value(args)  # e.g. --reward-key pointing at the teacher answer
    if isinstance(value, dict) and "meta_info" in value:
        return value
    raise ValueError(
        f"sample {sample.index}: sample.reward must hold the teacher's /generate answer (set by reward_func via "
        f"--custom-rm-path slime.rollout.on_policy_distillation.reward_func), got {type(reward).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# post_process_rewards: teacher log-probs, token selection, metrics, token bank
# ---------------------------------------------------------------------------------------------

_step_counter: dict[str, int] = {}
_bank_writers: dict[tuple[Any, ...], Any] = {}


def post_process_rewards(args: Any, samples: list[Sample], **kwargs: Any) -> tuple[list[float], list[float]]:
    """Per rollout step: set ``teacher_log_probs``, select tokens into ``loss_mask``; return OPD rewards.

    Returns ``(raw_rewards, rewards)``, both 0.0 per sample as upstream's OPD post-process: the
    learning signal is the OPD advantage from ``teacher_log_probs`` (docs/method.md §1). Samples keep
    their order and every field except ``teacher_log_probs``, ``loss_mask`` and, on the first
    sample, ``metadata["opd_step_metrics"]`` (a dict of floats, docs/method.md §9). ``rollout_id`` may be
    passed as a keyword (the random selector's seed adds it); otherwise steps are counted from
    ``args.start_rollout_id``.
    """
    samples = list(samples)
    if any(isinstance(s, list) for s in samples):
        raise TypeError("post_process_rewards expects a flat list of Samples (slime flattens groups before it)")
    if not samples:
        return [], []
    cfg = selection_config_from_args(args)
    rollout_index = _rollout_index(args, kwargs.get("rollout_id"))

    answers = [_teacher_answer(args, s) for s in samples]
    lengths = [_checked_response_length(s) for s in samples]
    teacher_logp: list[list[float]] = []
    for sample, answer, length in zip(samples, answers, lengths, strict=True):
        entries = _response_logprob_entries(answer, sample, length, source="teacher answer in sample.reward")
        teacher_logp.append([float(e[0]) for e in entries])
        sample.teacher_log_probs = torch.tensor(teacher_logp[-1], dtype=torch.float32)

    # None → all ones, a removed sample → all zeros (slime's rule, ta_opd.loss_mask); selection below narrows it
    for sample, length in zip(samples, lengths, strict=True):
        sample.loss_mask = valid_loss_mask(
            sample.loss_mask, length, removed=bool(sample.remove_sample), sample_index=sample.index
        )
    valid_masks = [list(s.loss_mask) for s in samples]
    metrics: dict[str, float] = {}
    tops = _topk_lists(samples, answers, lengths, cfg)  # None only for `full` without top-K lists
    if tops is not None:
        student_top, teacher_top, teacher_ids = tops
        batch = TokenBatch.from_sample_lists(
            student_top,
            teacher_top,
            [s.tokens[len(s.tokens) - n :] for s, n in zip(samples, lengths, strict=True)],
            [_rollout_log_probs(s, n) for s, n in zip(samples, lengths, strict=True)],
            teacher_logp,
            valid_masks,
            cfg.topk_k,
            teacher_ids_logprobs_per_sample=teacher_ids,
        )
        result = select_tokens(batch, cfg, rollout_index)
        kept = torch.as_tensor(result.mask, dtype=torch.bool).reshape(-1)
        if kept.numel() != sum(lengths):
            raise ValueError(f"ta_opd returned a mask of {kept.numel()} rows for {sum(lengths)} response tokens")
        for sample, sample_mask in zip(samples, torch.split(kept, lengths), strict=True):
            sample.loss_mask = [int(v) for v in sample_mask.tolist()]
        metrics = {str(name): float(value) for name, value in result.metrics.items()}
        _write_token_bank(args, rollout_index, batch, result, samples)
    elif cfg.nonfinite_policy == "error":
        # without top-K lists ta_opd.select_tokens (which applies the policy) is not called: check here
        _check_finite_teacher_logprobs(samples, teacher_logp, valid_masks)

    for name in ("requests", "retries", "failures"):
        metrics[f"opd/teacher_http_{name}"] = float(_http_stats[name])
    _http_stats.clear()
    samples[0].metadata[STEP_METRICS_KEY] = metrics
    if metrics:
        logger.info("rollout %d TA-OPD (%s): %s", rollout_index, cfg.mask, metrics)
    return [0.0] * len(samples), [0.0] * len(samples)


def _check_finite_teacher_logprobs(
    samples: list[Sample], teacher_logp: list[list[float]], valid_masks: list[list[int]]
) -> None:
    """A NaN/inf teacher log-prob of a supervised token is a server fault: raise naming sample and position."""
    bad = [
        (sample.index, j, value)
        for sample, values, mask in zip(samples, teacher_logp, valid_masks, strict=True)
        for j, (value, keep) in enumerate(zip(values, mask, strict=True))
        if keep and not math.isfinite(value)
    ]
    if bad:
        where = ", ".join(f"sample {i} position {j} (teacher {v})" for i, j, v in bad[:5])
        raise ValueError(
            f"{len(bad)} valid token(s) have a non-finite teacher log-prob: {where}. "
            "The teacher server returned NaN/inf; fix the server before training on its answers."
        )


def _rollout_index(args: Any, rollout_id: Any) -> int:
    if rollout_id is not None:
        return int(rollout_id)
    key = "steps"
    start = int(getattr(args, "start_rollout_id", None) or 0)
    index = _step_counter.get(key, start)
    _step_counter[key] = index + 1
    return index


def _rollout_log_probs(sample: Sample, response_length: int) -> list[float] | None:
    values = sample.rollout_log_probs
    if values is None:
        return None
    values = values.tolist() if torch.is_tensor(values) else list(values)
    if len(values) != response_length:
        raise ValueError(
            f"sample {sample.index}: rollout_log_probs length {len(values)} != response_length {response_length}"
        )
    return [float(v) for v in values]


def _topk_lists(
    samples: list[Sample], answers: list[dict[str, Any]], lengths: list[int], cfg: Any
) -> tuple[list[Any], list[Any], list[Any] | None] | None:
    """Student and teacher top-K per sample (and exact-C id log-probs), or None when ``full`` has none.

    A selector needs both lists at every response position of every sample (docs/method.md §2): a
    missing or short list is an error naming the sample.
    """
    selecting = cfg.mask != FULL_MASK
    if cfg.topk_k <= 0:
        if selecting:
            raise ValueError(f"--opd-budget-mask {cfg.mask} needs --opd-topk-metrics-k >= 1, got {cfg.topk_k}")
        return None
    student_top: list[Any] = []
    teacher_top: list[Any] = []
    for sample, answer, length in zip(samples, answers, lengths, strict=True):
        student = _student_topk(sample)
        teacher = _meta(answer, sample, "teacher answer").get("input_top_logprobs")
        missing = []
        if not isinstance(student, list) or len(student) < length:
            missing.append(f"metadata[{STUDENT_TOPK_KEY!r}] (student top-K, one entry per response token)")
        if not isinstance(teacher, list) or len(teacher) < length:
            missing.append("input_top_logprobs in the teacher answer (request top_logprobs_num = K)")
        if missing:
            if not selecting:
                return None  # full OPD without top-K: teacher log-probs only, as upstream
            raise ValueError(
                f"sample {sample.index}: --opd-budget-mask {cfg.mask} needs "
                + " and ".join(missing)
                + f" covering all {length} response positions"
            )
        if len(student) != length:
            raise ValueError(
                f"sample {sample.index}: metadata[{STUDENT_TOPK_KEY!r}] has {len(student)} entries, "
                f"expected one per response token ({length})"
            )
        student_top.append(student)  # pack_topk reads the lists as they are (None = an empty row)
        teacher_top.append(_response_top_entries(answer, "input_top_logprobs", sample, length, "teacher answer"))
    teacher_ids: list[Any] | None = None
    if getattr(cfg, "exact_cmass", False):
        teacher_ids = []
        for sample, answer, length in zip(samples, answers, lengths, strict=True):
            ids_logprobs = _meta(answer, sample, "teacher answer").get("input_token_ids_logprobs")
            if isinstance(ids_logprobs, list) and len(ids_logprobs) >= length:
                teacher_ids.append(
                    _response_top_entries(answer, "input_token_ids_logprobs", sample, length, "teacher answer")
                )
            else:
                teacher_ids.append(None)  # union overflow (fallback) or no ids sent: C is the lower bound
    return student_top, teacher_top, teacher_ids


def _write_token_bank(args: Any, rollout_index: int, batch: Any, result: Any, samples: list[Sample]) -> None:
    out_dir = getattr(args, "opd_token_bank_dir", None)
    if not out_dir:
        return
    from ta_opd.token_bank import TokenBankWriter

    key = (
        str(out_dir),
        getattr(args, "opd_token_bank_format", "csv"),
        bool(getattr(args, "opd_token_bank_raw_topk", False)),
        getattr(args, "opd_token_bank_pair_id", None),
        getattr(args, "opd_teacher_name", None),
        getattr(args, "opd_student_name", None),
        getattr(args, "opd_token_bank_layout", "native"),
        getattr(args, "output_dir", None),
    )
    writer = _bank_writers.get(key)
    if writer is None:
        writer = TokenBankWriter.from_args(args, rank=0)  # the run's --output-dir owns the directory
        _bank_writers[key] = writer
    writer.write_step(
        rollout_index,
        batch,
        result,
        [s.index for s in samples],
        # the contexts sidecar (prompt ids per sample) feeds the fixed-context diagnostic, docs/method.md §6
        prompt_token_ids=[list(s.tokens[: len(s.tokens) - int(s.response_length)]) for s in samples],
        prompt_ids=[s.group_index for s in samples],
    )
