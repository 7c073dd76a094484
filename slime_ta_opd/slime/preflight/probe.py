"""The HTTP side of the OPD pre-flight: real rollouts, teacher scoring, then the checks of ``slime.preflight``.

``run_checks(args, target)`` loads both tokenizers, asks the student server for a few real rollouts
(T = 1, with log-probs and top-K), scores them through the OPD module itself (its ``reward_func``
request and ``post_process_rewards`` extraction, so what is checked is what trains), and returns a
``PreflightReport``. ``args`` is the run's flag namespace (only read; copies are modified).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from slime.preflight import answer_checks as pf_answers
from slime.preflight import report as pf_report
from slime.preflight import tokenizer_checks as pf_tokenizer
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

# (args, samples) -> per-sample teacher log-probs of the response tokens, as the OPD module computes them.
Extraction = Callable[[Any, list[Sample]], list[list[float]]]


@dataclass
class PreflightTarget:
    """Where the pair lives: base URLs (no ``/generate``) and, when known here, the checkpoint directories."""

    student_url: str
    teacher_urls: list[str]
    student_path: str | None = None
    teacher_path: str | None = None
    api_key: str | None = None


@dataclass
class PreflightOptions:
    num_rollouts: int = 4
    max_new_tokens: int = 32
    repeats: int = 2  # scoring requests per teacher URL (determinism)
    prompts: Sequence[Any] | None = None  # strings or message lists; default: pf_tokenizer.DEFAULT_CONVERSATIONS
    conversations: Sequence[Sequence[dict[str, str]]] = pf_tokenizer.DEFAULT_CONVERSATIONS
    position_tol: float = pf_report.POSITION_TOL
    kl_tol: float = pf_report.SAMPLED_KL_TOL
    determinism_rel_tol: float = pf_report.DETERMINISM_REL_TOL
    determinism_abs_tol: float = pf_report.DETERMINISM_ABS_TOL
    temperature_rel_tol: float = pf_report.TEMPERATURE_REL_TOL
    timeout_s: float = 120.0
    only: Sequence[str] | None = None  # run just these checks (default: all of pf_report.CHECK_NAMES)
    allow_tokenizer_mismatch: bool = False  # only added/special tokens may differ (check_tokenizer)
    extra: dict[str, Any] = field(default_factory=dict)


def _headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def _get_json(url: str, api_key: str | None, timeout: float = 10.0) -> dict[str, Any] | None:
    import requests

    try:
        r = requests.get(url, headers=_headers(api_key), timeout=timeout)
        return r.json() if r.status_code == 200 and isinstance(r.json(), dict) else None
    except (requests.RequestException, ValueError):
        return None


def _load_tokenizer(path: str | None) -> Any:
    if not path or not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _json_file(path: str | None, name: str) -> dict[str, Any] | None:
    if not path:
        return None
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        return None
    with open(full) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _model_rows(info: dict[str, Any] | None, path: str | None) -> int | None:
    """The model's embedding rows: ``/get_model_info`` ``vocab_size`` (embedded server) or ``config.json``."""
    if info and isinstance(info.get("vocab_size"), int):
        return int(info["vocab_size"])
    for where in (path, (info or {}).get("model_path")):
        config = _json_file(where, "config.json")
        if config:
            rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
            if isinstance(rows, int):
                return rows
    return None


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------------
# Rollouts and scoring
# ------------------------------------------------------------------------------------------------


async def _generate(url: str, prompt_ids: list[list[int]], max_new: int, k: int, api_key: str | None, timeout: float):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), headers=_headers(api_key)) as s:

        async def one(ids: list[int]) -> dict[str, Any]:
            payload: dict[str, Any] = {
                "input_ids": ids,
                # T = 1: the rollout log-probs are then plain log_softmax(logits), comparable to a prefill
                "sampling_params": {
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "max_new_tokens": max_new,
                    "skip_special_tokens": False,
                    "no_stop_trim": True,
                },  # fmt: skip
                "return_logprob": True,
            }
            if k > 0:
                payload["top_logprobs_num"] = k
            async with s.post(f"{url}/generate", json=payload) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}/generate answered HTTP {r.status}: {(await r.text())[:300]}")
                return await r.json(content_type=None)

        return await asyncio.gather(*(one(ids) for ids in prompt_ids))


def _rollout_samples(prompt_ids: list[list[int]], answers: list[dict[str, Any]], k: int) -> list[Sample]:
    samples = []
    for i, (ids, ans) in enumerate(zip(prompt_ids, answers, strict=True)):
        meta = ans["meta_info"]
        out = meta.get("output_token_logprobs") or []
        sample = Sample(
            index=i,
            group_index=i,
            tokens=list(ids) + [int(e[1]) for e in out],
            response_length=len(out),
            rollout_log_probs=[float(e[0]) for e in out],
            loss_mask=[1] * len(out),
            status=Sample.Status.COMPLETED,
        )
        if k > 0:
            sample.metadata["student_top_logprobs"] = [
                list(map(list, e)) for e in meta.get("output_top_logprobs") or []
            ]
        samples.append(sample)
    return samples


async def _score_all(args: Any, samples: list[Sample]) -> list[dict[str, Any]]:
    from slime.rollout.on_policy_distillation import reward_func

    if getattr(args, "self_distillation", False):
        # the probes check the scoring path itself (alignment, determinism, top-K): score them on the plain
        # prompt; the privileged self-distillation prompt needs a label the probes do not have
        args = copy.copy(args)
        args.self_distillation = False
    return list(await asyncio.gather(*(reward_func(args, copy.deepcopy(s)) for s in samples)))


def opd_teacher_logprobs(args: Any, samples: list[Sample]) -> list[list[float]]:
    """The project's teacher log-probs: the OPD module's ``reward_func`` request, then its ``post_process_rewards``."""
    from slime.rollout.on_policy_distillation import post_process_rewards

    samples = copy.deepcopy(samples)
    for s, answer in zip(samples, _run(_score_all(args, samples)), strict=True):
        s.reward = answer
    opd_logger = logging.getLogger(post_process_rewards.__module__)
    level = opd_logger.level
    opd_logger.setLevel(max(level, logging.WARNING))  # its per-step metrics line is not a training step here
    try:
        post_process_rewards(args, samples, rollout_id=0)
    finally:
        opd_logger.setLevel(level)
    return [
        [
            float(v)
            for v in (s.teacher_log_probs.tolist() if hasattr(s.teacher_log_probs, "tolist") else s.teacher_log_probs)
        ]
        for s in samples
    ]


def _response_tail(answer: dict[str, Any], key: str, n: int) -> list[Any]:
    entries = answer["meta_info"].get(key) or []
    return list(entries[len(entries) - n :]) if n else []


def _scoring_args(args: Any, rm_url: str, **overrides: Any) -> Any:
    run = copy.copy(args)
    run.rm_url = f"{rm_url.rstrip('/')}/generate"
    run.opd_token_bank_dir = None  # never write pre-flight rows into the run's token bank
    run.http_max_retries = min(int(getattr(args, "http_max_retries", 1) or 0), 1)
    for name, value in overrides.items():
        setattr(run, name, value)
    return run


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _prompt_ids(tok: Any, prompts: Sequence[Any], n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=False)
        elif getattr(tok, "chat_template", None):
            ids = pf_tokenizer.render_chat(tok, p)
        else:
            ids = tok.encode("\n".join(m["content"] for m in p), add_special_tokens=False)
        out.append(list(ids))
    return out


def _missing(name: str, why: str) -> pf_report.CheckResult:
    return pf_report.CheckResult(name, pf_report.FAIL, why)


def _tail_logprobs(answers: list[dict[str, Any]], samples: list[Sample]) -> list[list[float]]:
    return [
        [float(e[0]) for e in _response_tail(a, "input_token_logprobs", s.response_length)]
        for a, s in zip(answers, samples, strict=True)
    ]


def _tail_top(answers: list[dict[str, Any]], samples: list[Sample]) -> list[list[Any]]:
    return [_response_tail(a, "input_top_logprobs", s.response_length) for a, s in zip(answers, samples, strict=True)]


def _sampled(samples: list[Sample], logprobs: list[list[float]]) -> list[list[tuple[int, float]]]:
    return [
        list(zip(s.tokens[len(s.tokens) - s.response_length :], lp, strict=True))
        for s, lp in zip(samples, logprobs, strict=True)
    ]


TOKENIZER_CHECKS = frozenset({"tokenizer", "eos_pad", "padded_vocab", "chat_template"})


@dataclass
class _Pair:
    """What run_checks learns about the pair before the server checks."""

    student_url: str
    teacher_urls: list[str]
    s_tok: Any
    t_tok: Any
    s_rows: int | None
    t_rows: int | None


def _tokenizer_checks(pair: _Pair, s_path: str | None, t_path: str | None, opts: PreflightOptions):
    if pair.s_tok is None or pair.t_tok is None:
        side, path = ("student", s_path) if pair.s_tok is None else ("teacher", t_path)
        why = f"the {side} tokenizer is not available on this machine (path {path!r}); pass the {side} checkpoint"
        return [_missing(n, why) for n in pf_report.CHECK_NAMES if n in TOKENIZER_CHECKS]
    s_gen = _json_file(s_path, "generation_config.json") or {}
    t_gen = _json_file(t_path, "generation_config.json") or {}
    return [
        pf_tokenizer.check_tokenizer(pair.s_tok, pair.t_tok, opts.allow_tokenizer_mismatch),
        pf_tokenizer.check_eos_pad(
            pair.s_tok, pair.t_tok, _ids(s_gen.get("eos_token_id")), _ids(t_gen.get("eos_token_id"))
        ),
        pf_tokenizer.check_padded_vocab(
            pair.s_tok, pair.t_tok, pair.s_rows, pair.t_rows, opts.allow_tokenizer_mismatch
        ),
        pf_tokenizer.check_chat_template(pair.s_tok, pair.t_tok, opts.conversations),
    ]


def _student_rollouts(args: Any, pair: _Pair, opts: PreflightOptions, k: int, api_key: str | None) -> list[Sample]:
    if pair.s_tok is None:
        raise ValueError("no student tokenizer to build prompts with")
    limit = getattr(args, "rollout_max_response_len", None) or opts.max_new_tokens
    prompt_ids = _prompt_ids(pair.s_tok, opts.prompts or pf_tokenizer.DEFAULT_CONVERSATIONS, opts.num_rollouts)
    answers = _run(
        _generate(pair.student_url, prompt_ids, min(opts.max_new_tokens, limit), k, api_key, opts.timeout_s)
    )
    return _rollout_samples(prompt_ids, answers, k)


def _teacher_checks(args: Any, pair: _Pair, samples: list[Sample], opts: PreflightOptions, k: int):
    """determinism (every teacher URL, ``opts.repeats`` times) and topk (teacher and student lists)."""
    runs: dict[str, list[list[float]]] = {}
    first: list[dict[str, Any]] = []
    for url in pair.teacher_urls:
        for rep in range(max(1, opts.repeats)):
            answers = _run(_score_all(_scoring_args(args, url), samples))
            runs[f"{url} #{rep + 1}"] = _tail_logprobs(answers, samples)
            first = first or answers
    ref = next(iter(runs.values()))
    rollout_lp = [list(s.rollout_log_probs or []) for s in samples]
    diffs = [abs(a - b) for ra, rb in zip(ref, rollout_lp, strict=True) for a, b in zip(ra, rb, strict=True)]
    signal = sum(diffs) / len(diffs) if diffs else math.nan  # the typical |log p_T - log p_S| of this pair
    out = [pf_answers.check_determinism(runs, signal, opts.determinism_rel_tol, opts.determinism_abs_tol)]
    if k <= 0:
        return out + [
            pf_report.CheckResult("topk", pf_report.SKIP, "--opd-topk-metrics-k 0: top-K lists are not used")
        ]
    t_rows = pair.t_rows or len(pair.t_tok or pair.s_tok)
    s_rows = pair.s_rows or len(pair.s_tok)
    teacher = pf_answers.check_topk(_tail_top(first, samples), k, t_rows, _sampled(samples, ref), source="teacher")
    student_lists = [s.metadata.get("student_top_logprobs") or [] for s in samples]
    student = pf_answers.check_topk(student_lists, k, s_rows, _sampled(samples, rollout_lp), source="student")
    worst, other = (
        (student, teacher)
        if student.status == pf_report.FAIL and teacher.status != pf_report.FAIL
        else (teacher, student)
    )
    values = {f"teacher_{n}": v for n, v in teacher.values.items()}
    values.update({f"student_{n}": v for n, v in student.values.items()})
    detail = "\n".join(d for d in (worst.detail, other.detail) if d)
    return out + [pf_report.CheckResult("topk", worst.status, f"{worst.measured}; {other.measured}", detail, values)]


def _temperature_check(args: Any, pair: _Pair, samples: list[Sample], opts: PreflightOptions, k: int):
    """Score the same rollouts with the run's teacher temperature and with T = 1, through the OPD module."""
    k_t = max(k, 4)  # top-K gaps measure the applied temperature
    url = pair.teacher_urls[0]
    base = _run(_score_all(_scoring_args(args, url, opd_teacher_temperature=1.0, opd_topk_metrics_k=k_t), samples))
    scaled = _run(_score_all(_scoring_args(args, url, opd_topk_metrics_k=k_t), samples))
    return pf_answers.check_teacher_temperature(
        float(args.opd_teacher_temperature),
        float(getattr(args, "rollout_temperature", 1.0) or 1.0),
        _tail_logprobs(base, samples),
        _tail_logprobs(scaled, samples),
        _tail_top(base, samples),
        _tail_top(scaled, samples),
        opts.temperature_rel_tol,
    )


def run_checks(
    args: Any,
    target: PreflightTarget,
    *,
    warn: Sequence[str] = (),
    options: PreflightOptions | None = None,
    extract: Extraction | None = None,
) -> pf_report.PreflightReport:
    """All checks (or ``options.only``) on a live pair; a check that cannot run is a FAIL saying why."""
    t0 = time.perf_counter()
    opts = options or PreflightOptions()
    warn = pf_report.validate_check_names(warn)
    wanted = set(pf_report.validate_check_names(opts.only) if opts.only else pf_report.CHECK_NAMES)
    extract = extract or opd_teacher_logprobs
    teacher_urls = [u.rstrip("/").removesuffix("/generate") for u in target.teacher_urls]
    if not teacher_urls:
        raise ValueError("pre-flight needs at least one teacher URL")
    student_url = target.student_url.rstrip("/")
    s_info = _get_json(f"{student_url}/get_model_info", target.api_key)
    t_info = _get_json(f"{teacher_urls[0]}/get_model_info", target.api_key)
    s_path = target.student_path or (s_info or {}).get("tokenizer_path")
    t_path = target.teacher_path or (t_info or {}).get("tokenizer_path")
    pair = _Pair(
        student_url,
        teacher_urls,
        _load_tokenizer(s_path),
        _load_tokenizer(t_path),
        _model_rows(s_info, s_path),
        _model_rows(t_info, t_path),
    )
    results: list[pf_report.CheckResult] = []
    if wanted & TOKENIZER_CHECKS:
        results += _tokenizer_checks(pair, s_path, t_path, opts)

    if wanted - TOKENIZER_CHECKS:
        k = int(getattr(args, "opd_topk_metrics_k", 0) or 0)
        samples: list[Sample] = []
        error = None
        try:  # a few real rollouts from the student, sampled at T = 1
            samples = _student_rollouts(args, pair, opts, k, target.api_key)
        except Exception as e:  # every server check then FAILs with the reason
            error = f"student rollouts from {student_url} failed: {type(e).__name__}: {e}"

        def guarded(names: Sequence[str], fn: Callable[[], Any]) -> None:
            names = [n for n in names if n in wanted]
            if not names:
                return
            if error:
                results.extend(_missing(n, error) for n in names)
                return
            try:
                out = fn()
                results.extend(out if isinstance(out, list) else [out])
            except Exception as e:
                results.extend(_missing(n, f"{type(e).__name__}: {e}") for n in names)

        def position() -> pf_report.CheckResult:
            # the OPD scoring path with the student itself as the teacher: the copy must reproduce the rollout
            copy_args = _scoring_args(args, student_url, opd_teacher_temperature=1.0, opd_budget_mask="full")
            rollout_lp = [list(s.rollout_log_probs or []) for s in samples]
            return pf_answers.check_position_alignment(
                rollout_lp, extract(copy_args, samples), opts.position_tol, opts.kl_tol
            )

        guarded(["position_alignment"], position)
        guarded(["determinism", "topk"], lambda: _teacher_checks(args, pair, samples, opts, k))
        temperature = float(getattr(args, "opd_teacher_temperature", 1.0) or 1.0)
        if temperature == 1.0 and "teacher_temperature" in wanted:
            results.append(
                pf_answers.check_teacher_temperature(1.0, float(getattr(args, "rollout_temperature", 1.0) or 1.0))
            )
        else:
            guarded(["teacher_temperature"], lambda: _temperature_check(args, pair, samples, opts, k))

    _reset_opd_http_stats()
    order = {n: i for i, n in enumerate(pf_report.CHECK_NAMES)}
    results = sorted((r for r in results if r.name in wanted), key=lambda r: order[r.name])
    return pf_report.PreflightReport(pf_report.apply_downgrades(results, warn), elapsed_s=time.perf_counter() - t0)


def _reset_opd_http_stats() -> None:
    """The OPD module counts teacher requests per step; the pre-flight's must not show up in step 0's metrics."""
    from slime.rollout.on_policy_distillation import reset_http_stats

    reset_http_stats()
