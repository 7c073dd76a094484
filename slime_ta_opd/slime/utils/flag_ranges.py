"""Valid ranges of the numeric flags, and the one start-up check over every numeric option of a parser.

``check_numeric_flags(parser, args)`` walks the parser's actions, not a list of names: every
option whose ``type`` is ``float`` must hold a finite number (NaN and ±inf are refused unless its
``Range`` says ``finite=False``), every ``int`` option must fit a signed 64-bit integer, and a flag
listed in ``FLAG_RANGES`` must also lie in its range. A new float flag (ours, a TA-OPD flag, or one
added by an ``extra_args_providers`` plug-in) is therefore covered without being listed here.
The ranges of the TA-OPD selection flags are the ``SelectionConfig`` fields' (``ta_opd.config``, one
definition), copied into ``FLAG_RANGES`` so that they are checked and documented with the others.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

from ta_opd.config import SEED, UNIT, Range, options

__all__ = ["FLAG_RANGES", "INT64", "SEED", "Range", "check_numeric_flags", "describe_flag_range"]


def _at_least(low: float) -> Range:
    return Range(low=low)


def _above(low: float) -> Range:
    return Range(low=low, low_inclusive=False)


POSITIVE = _above(0)
NON_NEGATIVE = _at_least(0)
UNIT_OPEN_LOW = Range(0, 1, low_inclusive=False)  # (0, 1]
# Any int flag not listed: it must fit the int64 the tensors and the engines hold.
INT64 = Range(-(2**63), 2**63, high_inclusive=False, text="in [-2^63, 2^63)", note="a 64-bit integer")

# dest -> valid range. Floats not listed only have to be finite; ints not listed only have to fit INT64.
FLAG_RANGES: dict[str, Range] = {
    # cluster
    "actor_num_nodes": POSITIVE,
    "actor_num_gpus_per_node": POSITIVE,
    "rollout_num_gpus": NON_NEGATIVE,
    "rollout_num_gpus_per_engine": POSITIVE,
    "rollout_num_engines": POSITIVE,
    "num_gpus_per_node": NON_NEGATIVE,
    # rollout
    "rollout_temperature": Range(low=0, low_inclusive=False, note="0 is greedy decoding"),
    "rollout_top_p": UNIT_OPEN_LOW,
    "rollout_top_k": Range(low=-1, note="-1 disables top-k"),
    "rollout_max_context_len": POSITIVE,
    "rollout_max_prompt_len": POSITIVE,
    "rollout_max_response_len": POSITIVE,
    "rollout_stop_token_ids": NON_NEGATIVE,
    "rollout_seed": SEED,
    "over_sampling_batch_size": POSITIVE,
    "update_weights_interval": POSITIVE,
    "update_weight_buffer_size": _at_least(1),
    "sglang_router_port": Range(1, 65535),
    "sglang_server_concurrency": POSITIVE,
    "sglang_batch_max_size": POSITIVE,
    "http_timeout": POSITIVE,
    "http_max_retries": NON_NEGATIVE,
    "rollout_step_retries": NON_NEGATIVE,
    # data
    "num_rollout": NON_NEGATIVE,
    "num_epoch": POSITIVE,
    "start_rollout_id": NON_NEGATIVE,
    "rollout_batch_size": POSITIVE,
    "n_samples_per_prompt": POSITIVE,
    "global_batch_size": POSITIVE,
    "num_steps_per_rollout": POSITIVE,
    "micro_batch_size": POSITIVE,
    "max_tokens_per_gpu": POSITIVE,
    # evaluation
    "eval_interval": POSITIVE,
    "n_samples_per_eval_prompt": POSITIVE,
    "eval_temperature": NON_NEGATIVE,
    "eval_top_p": UNIT_OPEN_LOW,
    "eval_top_k": Range(low=-1, note="-1 disables top-k"),
    "eval_max_response_len": POSITIVE,
    "eval_max_prompt_len": POSITIVE,
    # training
    "save_interval": POSITIVE,
    "keep_last_n_checkpoints": POSITIVE,
    "seed": SEED,
    "lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "lr_warmup_iters": NON_NEGATIVE,
    "lr_warmup_fraction": Range(0, 1, high_inclusive=False, note="a fraction of --lr-decay-iters"),
    "lr_warmup_init": NON_NEGATIVE,
    "lr_decay_iters": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(0, 1, high_inclusive=False),
    "adam_beta2": Range(0, 1, high_inclusive=False),
    "adam_eps": POSITIVE,
    "clip_grad": Range(low=0, note="0 turns clipping off"),
    "eps_clip": NON_NEGATIVE,
    "eps_clip_high": NON_NEGATIVE,
    "eps_clip_c": Range(low=1, low_inclusive=False, note="the dual-clip bound is a ratio above 1"),
    "kl_coef": NON_NEGATIVE,
    "kl_loss_coef": NON_NEGATIVE,
    "lm_head_chunk_size": POSITIVE,
    # on-policy distillation
    "opd_kl_coef": NON_NEGATIVE,
    "opd_teacher_temperature": POSITIVE,
    # self-distillation losses
    "sd_temperature": POSITIVE,
    "opsd_clip": NON_NEGATIVE,
    "pwopsd_w_min": UNIT,
    "pwopsd_tau": UNIT,
    "pwopsd_s": POSITIVE,
    "eopd_eps_clip": NON_NEGATIVE,
    "eopd_entropy_gate": NON_NEGATIVE,
    "eopd_topk": POSITIVE,
    "reopold_lambda": Range(0, 1, low_inclusive=False, high_inclusive=False),
    "reopold_warmup_steps": NON_NEGATIVE,
    "reopold_entropy_percentile": UNIT,
    "sd_topk": POSITIVE,
    "jsd_beta": UNIT,
    "sd_chunk_size": POSITIVE,
    "lora_rank": NON_NEGATIVE,
    "lora_alpha": POSITIVE,
    "lora_dropout": Range(0, 1, high_inclusive=False),
    # megatron backend
    "tensor_model_parallel_size": POSITIVE,
    "pipeline_model_parallel_size": POSITIVE,
    "context_parallel_size": POSITIVE,
    "recompute_num_layers": POSITIVE,
    "num_layers": POSITIVE,
    "hidden_size": POSITIVE,
    "ffn_hidden_size": POSITIVE,
    "num_attention_heads": POSITIVE,
    "num_query_groups": POSITIVE,
    "kv_channels": POSITIVE,
    "vocab_size": POSITIVE,
    "rotary_base": POSITIVE,
    "norm_epsilon": POSITIVE,
    # TA-OPD selection: the SelectionConfig fields' ranges
    **{opt.flag.lstrip("-").replace("-", "_"): opt.range for _, opt in options() if opt.flag and opt.range},
}


def _numeric_actions(parser: argparse.ArgumentParser) -> Iterable[argparse.Action]:
    return (a for a in parser._actions if a.option_strings and a.type in (int, float))


def flag_range(action: argparse.Action) -> Range:
    """The range a numeric option must lie in: its ``FLAG_RANGES`` entry, else finite (float) or int64 (int)."""
    if action.dest in FLAG_RANGES:
        return FLAG_RANGES[action.dest]
    return INT64 if action.type is int else Range()


def describe_flag_range(action: argparse.Action) -> str:
    """The documented range of a numeric option ("" for other options), for --help and docs/arguments.md."""
    if action.type not in (int, float):
        return ""
    rng = flag_range(action)
    words = ("finite, " if action.type is float and rng.finite else "") + rng.describe()
    return words.rstrip(", ")


def check_numeric_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a numeric flag that is non-finite or out of its range (ValueError naming the flag and value)."""
    for action in _numeric_actions(parser):
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        rng = flag_range(action)
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{flag} must be a number, got {v!r}")
            note = f" ({rng.note})" if rng.note else ""
            if isinstance(v, float) and not math.isfinite(v):
                if not rng.finite:
                    continue
                spec = f" {rng.describe()}" if rng.describe() else ""
                raise ValueError(f"{flag} must be a finite number{spec}{note}, got {v}")
            if not rng.contains(v):
                raise ValueError(f"{flag} must be {rng.describe()}{note}, got {v}")
            if isinstance(v, int) and not INT64.contains(v):  # a listed range may leave a side open
                raise ValueError(f"{flag} must be {INT64.describe()} ({INT64.note}), got {v}")
