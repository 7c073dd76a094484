"""The default rollout: sample responses from the student engines through the router, then reward them.

Same entry points as upstream slime: ``generate_rollout(args, rollout_id, data_source,
evaluation=False)`` (the ``--rollout-function-path`` default) and ``async generate(args,
sample, sampling_params)`` (replaceable by ``--custom-generate-function-path``).

Per sample: POST ``/generate`` to ``http://{--sglang-router-ip}:{--sglang-router-port}`` with
the prompt ids and ``return_logprob``; with OPD (``--use-opd`` and ``--opd-topk-metrics-k`` K > 0)
also ``top_logprobs_num = K``, and the student's per-position top-K goes to
``sample.metadata["student_top_logprobs"]`` (one ``[[logprob, id, text], ...]`` list per
response position). Then the reward plug-in (``--custom-rm-path``; for OPD the teacher prefill
of docs/method.md §1) runs right after each generation, concurrently across samples.

The reward *post-process* (``--custom-reward-post-process-path``; for TA-OPD the token
selection of docs/method.md §2-5) is not called here: as upstream, the RolloutManager calls it on
the whole step's samples, so it also runs after a custom rollout function.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
from argparse import Namespace
from typing import Any

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.utils.async_utils import run
from slime.utils.http_utils import post, post_generate, reset_retry_stats
from slime.utils.misc import load_function
from slime.utils.opd_config import needs_student_topk
from slime.utils.types import Sample

__all__ = ["generate_rollout", "generate", "generate_and_rm", "get_model_url", "build_sampling_params"]

logger = logging.getLogger(__name__)


def get_model_url(args: Namespace, model_name: str | None = None, endpoint: str = "/generate") -> str:
    """The router URL (upstream's helper; named models are not supported here, so all go to one router)."""
    if args.sglang_router_ip is None or args.sglang_router_port is None:
        raise ValueError("--sglang-router-ip/--sglang-router-port are not set; start the RolloutManager first")
    return f"http://{args.sglang_router_ip}:{args.sglang_router_port}{endpoint}"


def build_sampling_params(args: Namespace, evaluation: bool = False) -> dict[str, Any]:
    """SGLang ``sampling_params`` from the rollout flags (eval flags override them in evaluation)."""

    def pick(eval_name: str, name: str):
        value = getattr(args, eval_name, None) if evaluation else None
        return getattr(args, name) if value is None else value

    return {
        "temperature": pick("eval_temperature", "rollout_temperature"),
        "top_p": pick("eval_top_p", "rollout_top_p"),
        "top_k": pick("eval_top_k", "rollout_top_k"),
        "max_new_tokens": pick("eval_max_response_len", "rollout_max_response_len"),
        "stop": args.rollout_stop,
        "stop_token_ids": args.rollout_stop_token_ids,
        "skip_special_tokens": args.rollout_skip_special_tokens,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }


class _GenerateState:
    """Per-args state: the tokenizer and the concurrency limits (created on the rollout loop)."""

    def __init__(self, args: Namespace):
        from slime.rollout.data_source import load_tokenizer

        if args.hf_checkpoint is None:
            raise ValueError("--hf-checkpoint is required to tokenize prompts")
        self.tokenizer = load_tokenizer(args.hf_checkpoint)
        engines = max(1, int(getattr(args, "rollout_num_engines", None) or 1))
        self.semaphore = asyncio.Semaphore(args.sglang_server_concurrency * engines)
        self.rm_semaphore = asyncio.Semaphore(args.sglang_server_concurrency)


_STATES: dict[int, tuple[Namespace, _GenerateState]] = {}


def _state(args: Namespace) -> _GenerateState:
    entry = _STATES.get(id(args))
    if entry is None or entry[0] is not args:
        entry = (args, _GenerateState(args))
        _STATES[id(args)] = entry
    return entry[1]


def _prompt_ids(sample: Sample, tokenizer) -> list[int]:
    if sample.tokens:
        return list(sample.tokens)
    if not isinstance(sample.prompt, str):
        raise TypeError(f"sample {sample.index}: prompt is a {type(sample.prompt).__name__}; apply the chat template")
    ids = tokenizer.encode(sample.prompt, add_special_tokens=False)
    if not ids:
        raise ValueError(f"sample {sample.index}: prompt {sample.prompt!r} encodes to no tokens")
    return ids


async def generate(
    args: Namespace, sample: Sample, sampling_params: dict[str, Any], *, url: str | None = None, student: bool = True
) -> Sample:
    """One student generation through the router; fills tokens, response, log-probs, status, top-K.

    ``url`` sends the request elsewhere; ``student=False`` (another model answers, e.g. the teacher of
    ``slime.rollout.sft_baseline``) asks for no top-K, which would be stored as the student's.
    """
    state = _state(args)
    url = url or get_model_url(args)
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(f"sample {sample.index}: cannot generate from status {sample.status}")
    prompt_ids = _prompt_ids(sample, state.tokenizer)
    sampling_params = dict(sampling_params)
    sampling_params["max_new_tokens"] -= sample.response_length
    if sampling_params["max_new_tokens"] < 0:
        raise ValueError(f"sample {sample.index}: response already longer than max_new_tokens")
    if sampling_params["max_new_tokens"] == 0:
        sample.status = Sample.Status.TRUNCATED
        return sample

    payload: dict[str, Any] = {"input_ids": prompt_ids, "sampling_params": sampling_params, "return_logprob": True}
    topk = int(args.opd_topk_metrics_k) if student and needs_student_topk(args) else 0
    if topk:
        payload["top_logprobs_num"] = topk
        payload["return_text_in_logprobs"] = False
    if not sample.tokens:
        sample.tokens = list(prompt_ids)

    # the router spreads batched requests round-robin: one batch per engine keeps every engine busy
    chunks = max(1, int(args.rollout_num_engines or 1)) if url == get_model_url(args) else 1
    output = await post_generate(url, payload, chunks=chunks)
    meta = output.get("meta_info") if isinstance(output, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"sample {sample.index}: answer from {url} has no meta_info: {str(output)[:300]}")
    finish = meta.get("finish_reason") or {}
    finish_type = finish.get("type") if isinstance(finish, dict) else finish
    token_logprobs = meta.get("output_token_logprobs")
    if token_logprobs is None:
        if finish_type != "abort":
            raise ValueError(f"sample {sample.index}: answer lacks meta_info.output_token_logprobs (return_logprob)")
        token_logprobs = []
    new_tokens = [int(item[1]) for item in token_logprobs]
    new_log_probs = [float(item[0]) for item in token_logprobs]

    if topk:
        top = meta.get("output_top_logprobs")
        if top is None or len(top) != len(new_tokens):
            raise ValueError(
                f"sample {sample.index}: asked for top_logprobs_num={topk} but output_top_logprobs has "
                f"{None if top is None else len(top)} entries for {len(new_tokens)} generated tokens"
            )
        previous = sample.metadata.get("student_top_logprobs")
        if previous is None:
            if sample.response_length:
                raise ValueError(f"sample {sample.index}: has a response but no student_top_logprobs to extend")
            previous = []
        sample.metadata["student_top_logprobs"] = list(previous) + [
            None if entry is None else [list(item) for item in entry] for entry in top
        ]

    sample.append_response_tokens(
        args,
        tokens=new_tokens,
        log_probs=new_log_probs,
        trainable=True,
        meta_info=meta,
        text=output.get("text", ""),
    )
    return sample


async def _builtin_rm(args: Namespace, sample: Sample, rm_type: str) -> Any:
    if rm_type == "exact_match":
        return 1.0 if str(sample.response).strip() == str(sample.label).strip() else 0.0
    if rm_type == "remote_rm":
        if args.rm_url is None:
            raise ValueError("--rm-type remote_rm needs --rm-url")
        return await post(args.rm_url, {"prompt": sample.prompt, "response": sample.response, "label": sample.label})
    raise ValueError(f"unknown --rm-type {rm_type!r}; built-ins: exact_match, remote_rm (or set --custom-rm-path)")


async def async_rm(args: Namespace, sample: Sample, evaluation: bool = False, **kwargs) -> Any:
    """The reward of one sample: per-sample ``custom_rm_path``, else the flags' plug-in, else a built-in."""
    if sample.custom_rm_path:
        return await load_function(sample.custom_rm_path)(args, sample, **kwargs)
    if evaluation and (args.eval_custom_rm_path or args.eval_rm_type):
        if args.eval_custom_rm_path:
            return await load_function(args.eval_custom_rm_path)(args, sample, **kwargs)
        return await _builtin_rm(args, sample, args.eval_rm_type)
    if args.custom_rm_path:
        return await load_function(args.custom_rm_path)(args, sample, **kwargs)
    if args.rm_type:
        return await _builtin_rm(args, sample, args.rm_type)
    raise ValueError("no reward function: set --custom-rm-path or --rm-type (for OPD, --use-opd sets it)")


def _eval_needs_rm(args: Namespace) -> bool:
    # The OPD reward is the teacher's scoring prefill, not an accuracy: evaluation only
    # calls a reward when an eval reward is configured, or when the run is not OPD.
    return bool(args.eval_custom_rm_path or args.eval_rm_type) or not args.use_opd


async def generate_and_rm(
    args: Namespace, sample: Sample, sampling_params: dict[str, Any], evaluation: bool = False
) -> Sample:
    """Generate (default or custom generate function) then reward one sample."""
    if sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and sample.response_length:
        if sample.reward is None and not args.group_rm and (not evaluation or _eval_needs_rm(args)):
            sample.reward = await async_rm(args, sample, evaluation=evaluation)
        return sample
    state = _state(args)
    async with state.semaphore:
        path = sample.generate_function_path or args.custom_generate_function_path
        if path is not None:
            fn = load_function(path)
            if "evaluation" in inspect.signature(fn).parameters:
                sample = await fn(args, sample, sampling_params, evaluation=evaluation)
            else:
                sample = await fn(args, sample, sampling_params)
        else:
            sample = await generate(args, sample, sampling_params)
    if not isinstance(sample, Sample):
        raise TypeError(f"the generate function returned {type(sample).__name__}, expected a Sample")
    if args.group_rm or sample.status == Sample.Status.ABORTED or sample.reward is not None:
        return sample
    if evaluation and not _eval_needs_rm(args):
        return sample
    async with state.rm_semaphore:
        sample.reward = await async_rm(args, sample, evaluation=evaluation)
    return sample


async def generate_and_rm_group(
    args: Namespace, group: list[Sample], sampling_params: dict[str, Any], evaluation: bool = False
) -> list[Sample]:
    """All samples of one prompt concurrently; a group reward model (``--group-rm``) sees the whole group."""
    group = list(await asyncio.gather(*(generate_and_rm(args, s, dict(sampling_params), evaluation) for s in group)))
    if args.group_rm:
        if not args.custom_rm_path:
            raise ValueError("--group-rm needs --custom-rm-path taking a list of samples")
        rewards = await load_function(args.custom_rm_path)(args, group)
        if len(rewards) != len(group):
            raise ValueError(f"group reward model returned {len(rewards)} rewards for {len(group)} samples")
        for sample, reward in zip(group, rewards, strict=True):
            sample.reward = reward
    return group


def _rollout_metrics(samples: list[Sample], prefix: str) -> dict[str, float]:
    lengths = [s.response_length for s in samples]
    out = {
        f"{prefix}/num_samples": float(len(samples)),
        f"{prefix}/response_len_mean": sum(lengths) / max(len(lengths), 1),
        f"{prefix}/response_len_max": float(max(lengths, default=0)),
        f"{prefix}/truncated_ratio": sum(s.status == Sample.Status.TRUNCATED for s in samples) / max(len(samples), 1),
    }
    return out


async def generate_rollout_async(args: Namespace, rollout_id: int, data_source) -> RolloutFnTrainOutput:
    """``rollout_batch_size`` groups of ``n_samples_per_prompt`` generated and rewarded samples."""
    start = time.perf_counter()
    reset_retry_stats()
    groups = data_source.get_samples(args.rollout_batch_size)
    if len(groups) != args.rollout_batch_size:
        raise ValueError(f"data source returned {len(groups)} groups, expected {args.rollout_batch_size}")
    params = build_sampling_params(args)
    for group in groups:
        for sample in group:
            sample.rollout_id = sample.rollout_id if sample.rollout_id is not None else sample.index
    results = await asyncio.gather(*(generate_and_rm_group(args, g, params) for g in groups))
    results = sorted(results, key=lambda g: g[0].index)
    flat = [s for g in results for s in g]
    bad = [s.index for s in flat if s.status in (Sample.Status.ABORTED, Sample.Status.PENDING)]
    if bad:
        raise RuntimeError(f"rollout {rollout_id}: samples {bad[:10]} were aborted or never generated")
    first = flat[0]
    logger.info("rollout %d first sample: %r -> %r (label %r)", rollout_id, first.prompt, first.response, first.label)
    metrics = _rollout_metrics(flat, "rollout")
    metrics.update({f"rollout/http_{k}": float(v) for k, v in reset_retry_stats().items()})
    metrics["rollout/generate_time_s"] = time.perf_counter() - start
    return RolloutFnTrainOutput(samples=results, metrics=metrics)


async def eval_rollout(args: Namespace, rollout_id: int) -> RolloutFnEvalOutput:
    """Generate on every ``--eval-prompt-data`` dataset; rewards via the eval reward (see ``async_rm``)."""
    from slime.rollout.data_source import eval_datasets

    data: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    params = build_sampling_params(args, evaluation=True)
    reward_key = args.eval_reward_key or args.reward_key
    for name, dataset in eval_datasets(args).items():
        samples = []
        for prompt in dataset.samples:
            for _ in range(args.n_samples_per_eval_prompt):
                sample = copy.deepcopy(prompt)
                sample.index = len(samples)
                samples.append(sample)
        samples = list(await asyncio.gather(*(generate_and_rm(args, s, dict(params), True) for s in samples)))
        samples.sort(key=lambda s: s.index)
        rewards = [s.reward if not reward_key or s.reward is None else s.reward[reward_key] for s in samples]
        entry: dict[str, Any] = {
            "rewards": rewards,
            "truncated": [s.status == Sample.Status.TRUNCATED for s in samples],
            "samples": samples,
        }
        data[name] = entry
        metrics.update(_rollout_metrics(samples, f"eval/{name}"))
        numeric = [float(r) for r in rewards if isinstance(r, int | float)]
        if numeric and len(numeric) == len(rewards):
            metrics[f"eval/{name}/reward_mean"] = sum(numeric) / len(numeric)
    return RolloutFnEvalOutput(data=data, metrics=metrics)


def generate_rollout(
    args: Namespace, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """The ``--rollout-function-path`` default (runs the async rollout on the background loop)."""
    if evaluation:
        return run(eval_rollout(args, rollout_id))
    return run(generate_rollout_async(args, rollout_id, data_source))
