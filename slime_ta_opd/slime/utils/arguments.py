# Over 600 lines: upstream slime's one flat parser, every flag group with its checks in one namespace, as upstream.
"""The one flat argument namespace shared by every component of the stack.

Flag names and defaults follow upstream slime (``slime/utils/arguments.py``) for everything
this stack supports, so launch scripts carry over; TA-OPD flags are generated from
``ta_opd.config.SelectionConfig`` (``slime.utils.opd_config``). Defaults live here only: a
``--config FILE.yaml`` overrides defaults (keys in flag form ``rollout-batch-size`` or dest form
``rollout_batch_size``), and flags on the command line override the YAML. ``validate_args`` rejects contradictory
settings before any actor or server starts.

Usage::

    python -m slime.utils.arguments --dump-markdown > docs/arguments.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from slime.preflight import CHECK_NAMES as PREFLIGHT_CHECKS
from slime.ray.cluster import add_placement_arguments
from slime.utils.compat_flags import add_compat_arguments
from slime.utils.flag_ranges import check_numeric_flags, describe_flag_range
from slime.utils.lr_schedule import LR_DECAY_STYLES, resolve_lr_schedule_args
from slime.utils.opd_config import add_ta_opd_arguments, validate_ta_opd_args
from ta_opd.loss_registry import LOSSES, loss_types_needing
from ta_opd.losses import REDUCTIONS

logger = logging.getLogger(__name__)

DEFAULT_ROLLOUT_FUNCTION = "slime.rollout.sglang_rollout.generate_rollout"
DEFAULT_DATA_SOURCE = "slime.rollout.data_source.RolloutDataSourceWithBuffer"
OPD_REWARD_FUNC = "slime.rollout.on_policy_distillation.reward_func"
OPD_POST_PROCESS = "slime.rollout.on_policy_distillation.post_process_rewards"
# --self-distillation's teacher prefill hook of the OPD reward function (the patch's plug-in point)
SD_TEACHER_PREFILL = "slime.rollout.self_distillation.privileged_prefill"
# the off-policy SFT baseline's generate function: the teacher samples, the student trains with sft_loss
SFT_BASELINE_GENERATE = "slime.rollout.sft_baseline.generate_with_teacher"
ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")
# every --loss-type is an entry of the ta_opd.loss_registry registry; SD_LOSS_TYPES read a teacher model in the trainer
SD_LOSS_TYPES = loss_types_needing("teacher")
LOSS_TYPES = tuple(LOSSES.names())
DEFAULT_SD_TEACHER_PROMPT_TEMPLATE = "Reference solution:\n{label}\n\n{prompt}"


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument("--actor-num-nodes", type=int, default=1, help="Number of nodes for the training actor.")
    g.add_argument("--actor-num-gpus-per-node", type=int, default=8, help="GPUs per node for the training actor.")
    g.add_argument(
        "--rollout-num-gpus",
        type=int,
        default=None,
        help="GPUs for rollout engines; with --colocate defaults to actor_num_nodes * actor_num_gpus_per_node.",
    )
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1, help="GPUs per engine (SGLang tp_size).")
    g.add_argument(
        "--rollout-num-engines",
        type=int,
        default=None,
        help=(
            "Embedded stack: number of engines to start (CPU runs have no GPUs to count). "
            "Default: rollout_num_gpus // rollout_num_gpus_per_engine, at least 1."
        ),
    )
    g.add_argument("--num-gpus-per-node", type=int, default=8, help="GPUs per node for rollout.")
    g.add_argument("--colocate", action="store_true", default=False, help="Train and roll out on the same GPUs.")
    g.add_argument("--offload", action="store_true", default=False, help="Offload train and rollout when idle.")
    g.add_argument(
        "--train-backend",
        type=str,
        default="auto",
        choices=["auto", "torch", "megatron"],
        help="auto: megatron when megatron-core and CUDA are available, else the embedded torch trainer.",
    )
    g.add_argument(
        "--rollout-backend",
        type=str,
        default="auto",
        choices=["auto", "embedded", "sglang"],
        help="auto: the embedded SGLang-API server (embedded) unless --sglang-router-ip/port name a running router.",
    )


def _add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rollout")
    g.add_argument("--hf-checkpoint", type=str, default=None, help="HF checkpoint of the student (tokenizer+engine).")
    g.add_argument(
        "--rollout-function-path",
        type=str,
        default=DEFAULT_ROLLOUT_FUNCTION,
        help="generate_rollout(args, rollout_id, data_source, evaluation=False) -> RolloutFnTrainOutput | samples.",
    )
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="Sampling temperature (> 0).")
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--rollout-max-context-len", type=int, default=None)
    g.add_argument(
        "--rollout-max-prompt-len",
        type=int,
        default=None,
        help="Longest prompt in tokens; longer prompts are an error unless --rollout-filter-long-prompts.",
    )
    g.add_argument(
        "--rollout-filter-long-prompts",
        action="store_true",
        default=False,
        help="Drop (and count) prompts longer than --rollout-max-prompt-len instead of raising, as upstream does.",
    )
    g.add_argument("--rollout-max-response-len", type=int, default=None, help="max_new_tokens of rollout (required).")
    g.add_argument("--rollout-skip-special-tokens", action="store_true", default=False)
    g.add_argument("--rollout-stop", type=str, nargs="+", default=None, help="Stop strings.")
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="+", default=None, help="Stop token ids.")
    g.add_argument("--rollout-shuffle", action="store_true", default=False, help="Shuffle prompts every epoch.")
    g.add_argument("--rollout-seed", type=int, default=42, help="Seed of the prompt shuffle.")
    g.add_argument("--over-sampling-batch-size", type=int, default=None, help="Default: --rollout-batch-size.")
    g.add_argument("--custom-generate-function-path", type=str, default=None, help="async (args, sample, params).")
    g.add_argument(
        "--rollout-data-postprocess-path",
        type=str,
        default=None,
        help="(args, rollout_id, rollout_data) called on the trainer after log-probs are known.",
    )
    g.add_argument("--buffer-filter-path", type=str, default=None, help="(args, rollout_id, buffer, num) -> groups.")
    g.add_argument("--update-weights-interval", type=int, default=1)
    g.add_argument(
        "--weight-update-mode",
        choices=["disk", "distributed", "tensor"],
        default="disk",
        help="How new weights reach the engines: 'disk' (a HF dir + /update_weights_from_disk), 'distributed' "
        "(a process group with the engines + /update_weights_from_distributed: gloo on CPU, NCCL on GPUs) or "
        "'tensor' (engines on the trainer's node map its tensors: /update_weights_from_tensor with CUDA IPC "
        "handles on GPUs, shared memory on CPU; upstream's colocated path).",
    )
    g.add_argument(
        "--update-weight-buffer-size",
        type=int,
        default=512 * 1024**2,
        help="Bytes of weights per request in the distributed and tensor modes.",
    )
    g.add_argument("--sglang-router-ip", type=str, default=None, help="Router IP (set by the RolloutManager).")
    g.add_argument("--sglang-router-port", type=int, default=None, help="Router port (set by the RolloutManager).")
    g.add_argument("--sglang-server-concurrency", type=int, default=512, help="In-flight requests per engine.")
    g.add_argument(
        "--sglang-batch-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Send the per-sample /generate requests in flight together (sampling, teacher scoring, evaluation) "
        "as batched SGLang requests (input_ids as a list; one batch per engine behind the router). The plug-ins "
        "still see one request and one answer per sample; most of a small model's server time is per-request "
        "HTTP work. The launchers turn it on (SGLANG_BATCH_REQUESTS=1).",
    )
    g.add_argument(
        "--sglang-batch-max-size", type=int, default=256, help="Most prompts in one batched /generate request."
    )
    g.add_argument("--api-key", type=str, default=None, help="API key of our own servers (Authorization: Bearer).")
    g.add_argument("--http-timeout", type=float, default=600.0, help="Seconds per HTTP request to a server.")
    g.add_argument("--http-max-retries", type=int, default=5, help="Retries of a transient HTTP failure.")
    g.add_argument(
        "--rollout-step-retries",
        type=int,
        default=1,
        help="Times a rollout step that failed while a server died is redone after restarting it (0: never).",
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--num-rollout", type=int, default=None, help="Number of rollout steps.")
    g.add_argument("--num-epoch", type=int, default=None, help="Epochs (ignored when --num-rollout is set).")
    g.add_argument(
        "--disable-rollout-global-dataset",
        action="store_false",
        dest="rollout_global_dataset",
        help="Do not read --prompt-data into the data source (a custom rollout manages data).",
    )
    g.add_argument("--data-source-path", type=str, default=DEFAULT_DATA_SOURCE, help="Data source class.")
    g.add_argument("--prompt-data", type=str, default=None, help="JSONL prompt file.")
    g.add_argument("--apply-chat-template", action="store_true", default=False)
    g.add_argument("--apply-chat-template-kwargs", type=_json_dict, default={})
    g.add_argument("--input-key", type=str, default="input", help="JSON key of the prompt.")
    g.add_argument("--label-key", type=str, default=None, help="JSON key of the label.")
    g.add_argument("--metadata-key", type=str, default="metadata", help="JSON key of per-prompt metadata.")
    g.add_argument("--tool-key", type=str, default="tools", help="JSON key of tools for the chat template.")
    g.add_argument("--start-rollout-id", type=int, default=None)
    g.add_argument("--rollout-batch-size", type=int, default=None, help="Prompts per rollout step (required).")
    g.add_argument("--n-samples-per-prompt", type=int, default=1, help="Responses per prompt.")
    g.add_argument(
        "--global-batch-size", type=int, default=None, help="Samples per optimizer step; default one step/rollout."
    )
    g.add_argument("--num-steps-per-rollout", type=int, default=None)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--use-dynamic-batch-size", action="store_true", default=False)
    g.add_argument("--max-tokens-per-gpu", type=int, default=None)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-function-path", type=str, default=None, help="Default: --rollout-function-path.")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-prompt-data", type=str, nargs="+", default=None, help="name path [name path ...].")
    g.add_argument("--skip-eval-before-train", action="store_true", default=False)
    g.add_argument("--eval-input-key", type=str, default=None)
    g.add_argument("--eval-label-key", type=str, default=None)
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1)
    g.add_argument("--eval-temperature", type=float, default=None)
    g.add_argument("--eval-top-p", type=float, default=None)
    g.add_argument("--eval-top-k", type=int, default=None)
    g.add_argument("--eval-max-response-len", type=int, default=None)
    g.add_argument("--eval-max-prompt-len", type=int, default=None)
    g.add_argument(
        "--eval-custom-rm-path",
        type=str,
        default=None,
        help="async (args, sample, **kwargs) -> reward for eval (e.g. slime.embedded.task.reward_func).",
    )
    g.add_argument("--eval-rm-type", type=str, default=None, help="Built-in eval reward: exact_match | remote_rm.")


def _add_algo_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--ref-load", type=str, default=None, help="Reference checkpoint (initial weights without --load).")
    g.add_argument("--load", type=str, default=None, help="Checkpoint directory to resume from.")
    g.add_argument("--save", type=str, default=None, help="Checkpoint directory to write.")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last-n-checkpoints", type=int, default=None, help="Delete older checkpoints (default all).")
    g.add_argument("--no-save-optim", action="store_true", default=False)
    g.add_argument(
        "--no-load-optim",
        action="store_true",
        default=False,
        help="Resume from --load without its optimizer state (fresh AdamW; the LR schedule still resumes).",
    )
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0, help="LR at the end of a linear/cosine decay (Megatron).")
    g.add_argument(
        "--lr-warmup-iters",
        type=int,
        default=0,
        help="Optimizer steps of linear warm-up from --lr-warmup-init to --lr (Megatron; slime.utils.lr_schedule).",
    )
    g.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="Warm-up as a fraction of --lr-decay-iters (instead of --lr-warmup-iters, as Megatron).",
    )
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="LR of the first warm-up step (Megatron).")
    g.add_argument(
        "--lr-decay-style",
        type=str,
        default="constant",
        choices=list(LR_DECAY_STYLES),
        help="LR after the warm-up, Megatron's formulas (docs/training.md). Megatron's default is linear; this "
        "stack keeps constant so a run without schedule flags trains at --lr.",
    )
    g.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="Optimizer steps over which linear/cosine decay to --min-lr. Default: the run's optimizer steps, "
        "--num-rollout × rollout_batch_size × n_samples_per_prompt / global_batch_size (Megatron: --train-iters).",
    )
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument(
        "--nonfinite-policy",
        type=str,
        default="stop",
        choices=["stop", "skip"],
        help="A step whose loss or gradient norm is NaN/inf is never applied: stop the run with an error (nothing "
        "saved or pushed), or skip that optimizer step and go on (docs/training.md).",
    )
    g.add_argument("--bf16", action="store_true", default=False)
    g.add_argument("--calculate-per-token-loss", action="store_true", default=False)
    g.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range.")
    g.add_argument(
        "--eps-clip-high",
        type=float,
        default=0.28,
        help="PPO upper clip (docs/method.md §1 default 0.28; upstream's default is --eps-clip).",
    )
    g.add_argument("--eps-clip-c", type=float, default=None, help="Dual-clip lower bound.")
    g.add_argument("--kl-coef", type=float, default=0.0, help="Reward-shaping KL coefficient (to the ref model).")
    g.add_argument("--use-kl-loss", action="store_true", default=False)
    g.add_argument("--kl-loss-coef", type=float, default=0.0)
    g.add_argument("--kl-loss-type", type=str, default="k1", choices=["k1", "k2", "k3", "low_var_kl"])
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--loss-type", type=str, default="policy_loss", choices=list(LOSS_TYPES))
    g.add_argument("--custom-loss-function-path", type=str, default=None, help="With --loss-type custom_loss.")
    g.add_argument("--advantage-estimator", type=str, default="grpo", choices=list(ADVANTAGE_ESTIMATORS))
    g.add_argument("--custom-advantage-function-path", type=str, default=None, help="(args, rollout_data) -> None.")
    g.add_argument("--normalize-advantages", action="store_true", default=False)
    g.add_argument("--disable-grpo-std-normalization", action="store_false", dest="grpo_std_normalization")
    g.add_argument("--disable-rewards-normalization", action="store_false", dest="rewards_normalization")
    # torch trainer backend (slime/backends/torch_utils; docs/training.md)
    g.add_argument(
        "--no-sparse-lm-head",
        action="store_false",
        dest="sparse_lm_head",
        help="Torch trainer: apply the LM head to every position (dense reference path) instead of kept tokens only.",
    )
    g.add_argument(
        "--lm-head-chunk-size",
        type=int,
        default=None,
        help="Torch trainer: rows per LM-head chunk on the sparse path, with and without grad "
        "(default: about 2^24 logits per chunk, 110 rows at V = 151,936).",
    )
    g.add_argument(
        "--train-dtype",
        type=str,
        default=None,
        choices=["float32", "bfloat16", "float64"],
        help="Torch trainer parameter dtype (default float32, bfloat16 with --bf16).",
    )
    g.add_argument("--use-rollout-logprobs", action="store_true", default=False, help="Old log-probs = rollout's.")


def _add_opd_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("on-policy distillation")
    g.add_argument("--use-opd", action="store_true", default=False, help="Enable on-policy distillation.")
    g.add_argument("--opd-type", type=str, default=None, choices=["sglang", "megatron"])
    g.add_argument("--opd-kl-coef", type=float, default=1.0, help="λ of the OPD advantage (docs/method.md §1).")
    g.add_argument("--opd-teacher-load", type=str, default=None, help="Teacher checkpoint for --opd-type megatron.")
    g.add_argument(
        "--opd-teacher-hf-checkpoint",
        type=str,
        default=None,
        help="Embedded stack: start a teacher server from this HF checkpoint when --rm-url is not given.",
    )
    g.add_argument(
        "--opd-teacher-temperature",
        type=float,
        default=None,
        help="Temperature of the teacher's scoring prefill. Default and only accepted value with --use-opd: "
        "--rollout-temperature, the temperature of the student's log-probs it is compared with (docs/training.md).",
    )


def _resolve_teacher_temperature(args: argparse.Namespace) -> None:
    """``--opd-teacher-temperature`` defaults to ``--rollout-temperature``; with ``--use-opd`` no other value.

    The OPD advantage λ·(log p_T(y) − log p_S(y)) (docs/method.md §1), the sampled reverse-KL metrics and the
    selection statistics compare the teacher's log-probs with the student's, and the student's are those of
    the distribution it samples from: ``log_softmax(logits / --rollout-temperature)`` (the engines' and both
    trainers'). Only a teacher scored at the same temperature gives log p_T − log p_S = log of the ratio of the
    two tempered distributions; mixing temperatures adds a token-dependent bias to every advantage.
    """
    if args.opd_teacher_temperature is None:
        args.opd_teacher_temperature = args.rollout_temperature
    elif args.use_opd and args.opd_teacher_temperature != args.rollout_temperature:
        raise ValueError(
            f"--opd-teacher-temperature {args.opd_teacher_temperature} != --rollout-temperature "
            f"{args.rollout_temperature}: the OPD advantage log p_T(y) - log p_S(y) compares the teacher's log-probs "
            "with the student's, which are taken at the rollout temperature; scoring the teacher at another "
            "temperature mixes two distributions. Leave --opd-teacher-temperature unset (it follows "
            "--rollout-temperature) or set it equal"
        )


def _add_self_distillation_arguments(parser: argparse.ArgumentParser) -> None:
    """Knobs of the full-vocabulary losses (``--loss-type opsd|pwopsd|eopd|reopold|topk_rkl|topk_fkl|jsd``,
    docs/method.md §7-8), the trainer-side teacher, the self-distillation teacher and LoRA
    (docs/self_distillation.md)."""
    g = parser.add_argument_group("self-distillation losses")
    g.add_argument(
        "--sd-temperature",
        type=float,
        default=None,
        help="τ_d of the full-vocabulary losses (logits / τ_d); default 1.1 for opsd/pwopsd/eopd/reopold "
        "(docs/method.md §7), 1.0 for topk_rkl/topk_fkl/jsd (§8). With --use-opd --loss-type jsd: "
        "--rollout-temperature, the only value accepted (docs/training.md).",
    )
    g.add_argument("--opsd-clip", type=float, default=0.05, help="OPSD/PW-OPSD per-vocabulary-term clip.")
    g.add_argument("--pwopsd-w-min", type=float, default=0.25, help="PW-OPSD position weight floor w_min.")
    g.add_argument("--pwopsd-tau", type=float, default=0.30, help="PW-OPSD sigmoid centre τ (fraction of L_b).")
    g.add_argument("--pwopsd-s", type=float, default=0.10, help="PW-OPSD sigmoid width s.")
    g.add_argument(
        "--pwopsd-reduction",
        type=str,
        default="per-sample",
        choices=["per-sample", "global"],
        help="per-sample: Σ w ℓ / L_b, mean over samples; global: Σ w ℓ / N_valid.",
    )
    g.add_argument(
        "--sd-reduction",
        type=str,
        default="token-mean",
        choices=list(REDUCTIONS),
        help="Reduction of opsd, eopd, topk_rkl, topk_fkl and jsd (over the step's kept tokens).",
    )
    g.add_argument("--eopd-eps-clip", type=float, default=0.2, help="EOPD PPO clip range.")
    g.add_argument("--eopd-entropy-gate", type=float, default=0.8, help="EOPD: FKL term on when H(p_T) > gate (nats).")
    g.add_argument("--eopd-topk", type=int, default=16, help="EOPD: size of the teacher top-K of the FKL term.")
    g.add_argument("--reopold-lambda", type=float, default=0.1, help="REOPOLD λ: reward floor log(λ/(1−λ)).")
    g.add_argument("--reopold-warmup-steps", type=int, default=50, help="REOPOLD: optimizer steps of the reward mask.")
    g.add_argument(
        "--reopold-entropy-percentile",
        type=float,
        default=0.8,
        help="REOPOLD: after warm-up keep tokens with student entropy ≥ this percentile.",
    )
    g.add_argument(
        "--sd-topk", type=int, default=16, help="K of topk_rkl (student top-K) and topk_fkl (teacher top-K)."
    )
    g.add_argument(
        "--topk-fkl-tail-bucket", action="store_true", default=False, help="topk_fkl: add the tail-mass bucket."
    )
    g.add_argument(
        "--topk-fkl-renormalize-teacher",
        action="store_true",
        default=False,
        help="topk_fkl: renormalise the teacher over its top-K.",
    )
    g.add_argument("--jsd-beta", type=float, default=0.5, help="JSD_β: 0 = forward KL, 1 = reverse KL.")
    g.add_argument(
        "--no-jsd-normalize",
        action="store_false",
        dest="jsd_normalize",
        help="JSD: GKD's unscaled values instead of dividing by β(1−β).",
    )
    g.add_argument(
        "--sd-chunk-size",
        type=int,
        default=None,
        help="Rows per chunk of the full-vocabulary LM head (default 2**23 // V); the dense path "
        "(--no-sparse-lm-head) materialises [N, V] instead.",
    )
    g.add_argument(
        "--self-distillation",
        action="store_true",
        default=False,
        help="Teacher = the student's own base weights on a privileged prompt (problem + reference solution, "
        "--sd-teacher-prompt-template); the student sees only the problem. docs/method.md §7.",
    )
    g.add_argument(
        "--sd-teacher-prompt-template",
        type=str,
        default=DEFAULT_SD_TEACHER_PROMPT_TEMPLATE,
        help="Teacher prompt of --self-distillation; {prompt} is the student's prompt (chat template applied), "
        "{label} the sample's label (--label-key).",
    )
    g.add_argument("--lora-rank", type=int, default=0, help="Train a LoRA adapter of this rank (peft); 0 = off.")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA α (default 2 × rank).")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument(
        "--lora-target-modules",
        type=str,
        default="all-linear",
        help="Comma-separated module names, or all-linear (every linear layer but the LM head).",
    )


def _resolve_opd_jsd_temperature(args: argparse.Namespace) -> None:
    """With ``--use-opd --loss-type jsd``, ``--sd-temperature`` defaults to ``--rollout-temperature``; no other value.

    The rollout samples at the rollout temperature T and the TA-OPD selection compares the teacher's and the
    student's log-probs at T (``_resolve_teacher_temperature``); the full-vocabulary loss of the same run must
    compare the same two distributions, so it scores both models at T too.
    """
    if not (args.use_opd and args.loss_type == "jsd"):
        return
    if args.sd_temperature is None:
        args.sd_temperature = args.rollout_temperature
    elif args.sd_temperature != args.rollout_temperature:
        raise ValueError(
            f"--sd-temperature {args.sd_temperature} != --rollout-temperature {args.rollout_temperature} with "
            "--use-opd --loss-type jsd: the rollout samples and the teacher scores (the token selection) at the "
            "rollout temperature, so the loss must compare the student's and the teacher's distributions at that "
            "temperature too; scoring them at another one trains towards a different target than the one the tokens "
            "were selected for. Leave --sd-temperature unset (it follows --rollout-temperature) or set it equal"
        )


def validate_self_distillation_args(args: argparse.Namespace) -> None:
    """Checks of the self-distillation group (called by ``validate_args``)."""
    _resolve_opd_jsd_temperature(args)
    sd_loss = args.loss_type in SD_LOSS_TYPES
    # value ranges of this group are checked with every numeric flag (slime.utils.flag_ranges)
    if args.self_distillation:
        for key in ("{prompt}", "{label}"):
            if key not in args.sd_teacher_prompt_template:
                raise ValueError(
                    f"--sd-teacher-prompt-template must contain {key}, got {args.sd_teacher_prompt_template!r}"
                )
        if args.label_key is None:
            raise ValueError("--self-distillation needs --label-key (the reference solution of the teacher prompt)")
        if args.custom_teacher_prefill_function_path is None:  # the teacher server reads the privileged prompt
            args.custom_teacher_prefill_function_path = SD_TEACHER_PREFILL
        teacher = args.opd_teacher_hf_checkpoint
        if teacher is not None and os.path.realpath(teacher) != os.path.realpath(args.hf_checkpoint or ""):
            raise ValueError(
                f"--self-distillation: the teacher is the student's own base weights, but --opd-teacher-hf-checkpoint "
                f"{teacher!r} differs from --hf-checkpoint {args.hf_checkpoint!r}"
            )
    if sd_loss:
        if args.train_backend == "megatron":
            raise ValueError(f"--loss-type {args.loss_type} is implemented by the torch trainer only")
        # every SD loss reads the teacher's distribution (full, or its top-K) from a teacher model in the trainer
        if not args.self_distillation and args.opd_teacher_hf_checkpoint is None:
            raise ValueError(
                f"--loss-type {args.loss_type} needs a teacher in the trainer: --opd-teacher-hf-checkpoint DIR "
                "or --self-distillation"
            )


def _add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reward")
    g.add_argument("--rm-type", type=str, default=None)
    g.add_argument("--reward-key", type=str, default=None, help="Key of the reward value in a dict reward.")
    g.add_argument("--eval-reward-key", type=str, default=None)
    g.add_argument("--group-rm", action="store_true", default=False)
    g.add_argument(
        "--rm-url", type=str, default=None, help="Reward/teacher server URL, e.g. http://HOST:PORT/generate."
    )
    g.add_argument("--custom-rm-path", type=str, default=None, help="async (args, sample, **kwargs) -> reward.")
    g.add_argument(
        "--custom-reward-post-process-path",
        type=str,
        default=None,
        help="(args, samples, **kwargs) -> (raw_rewards, rewards); default: GRPO group normalisation.",
    )
    g.add_argument(
        "--custom-teacher-prefill-function-path",
        type=str,
        default=None,
        help="(args, sample, payload) -> payload: rewrites the OPD reward function's teacher prefill request "
        "(--self-distillation sets slime.rollout.self_distillation.privileged_prefill).",
    )
    g.add_argument("--custom-convert-samples-to-train-data-path", type=str, default=None)


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and outputs")
    g.add_argument("--output-dir", type=str, default="outputs/run", help="Metrics, logs and default checkpoints.")
    g.add_argument("--metrics-path", type=str, default=None, help="JSONL metrics (default OUTPUT_DIR/metrics.jsonl).")
    g.add_argument("--use-wandb", action="store_true", default=False)
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--wandb-group", type=str, default=None)
    g.add_argument("--wandb-mode", type=str, default=None, choices=["online", "offline", "disabled"])
    g.add_argument("--use-tensorboard", action="store_true", default=False)
    g.add_argument("--tb-project-name", type=str, default=None, help="TensorBoard log dir (default OUTPUT_DIR/tb).")
    g.add_argument("--tb-experiment-name", type=str, default=None)
    # Pre-flight (docs/preflight.md): on by default for --use-opd --opd-type sglang, before the first rollout.
    g.add_argument(
        "--preflight",
        action="store_true",
        default=None,
        help="Run the OPD pre-flight checks before the first rollout (the default; --skip-preflight turns it off).",
    )
    g.add_argument("--skip-preflight", action="store_true", default=False, help="Do not run the pre-flight checks.")
    g.add_argument(
        "--preflight-only", action="store_true", default=False, help="Run the pre-flight checks, then exit."
    )
    g.add_argument(
        "--preflight-warn",
        action="append",
        default=[],
        choices=PREFLIGHT_CHECKS,
        metavar="CHECK",
        help="Downgrade this pre-flight check's FAIL to a warning (repeatable; docs/preflight.md).",
    )


def _add_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-core backend flags (``--train-backend megatron``); names as upstream slime / Megatron-LM."""
    g = parser.add_argument_group("megatron backend")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Megatron: tensor-parallel size (TP).")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Megatron: pipeline-parallel size.")
    g.add_argument("--context-parallel-size", type=int, default=1, help="Megatron: context-parallel size (CP).")
    g.add_argument(
        "--sequence-parallel", action="store_true", default=False, help="Megatron: sequence parallelism (TP > 1)."
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        default=False,
        help="Megatron: shard optimizer state over data-parallel ranks (GPU only).",
    )
    g.add_argument(
        "--megatron-to-hf-mode",
        type=str,
        default="raw",
        choices=["raw"],
        help="Megatron -> HF weight conversion: raw = this stack's converter (Qwen2/Qwen3/Llama; docs/scaling.md).",
    )
    g.add_argument(
        "--transformer-impl",
        type=str,
        default=None,
        choices=["local", "transformer_engine"],
        help="Megatron layer implementation; default transformer_engine when importable on GPU, else local.",
    )
    g.add_argument("--recompute-granularity", type=str, default=None, choices=["full"], help="Megatron: recompute.")
    g.add_argument("--recompute-method", type=str, default="uniform", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=1)
    # Model shape flags of scripts/models/*.sh (upstream Megatron names). The shape is read from --hf-checkpoint;
    # these are accepted so upstream launch scripts carry over, and the Megatron trainer checks they agree with it.
    for flag, typ in (
        ("--num-layers", int),
        ("--hidden-size", int),
        ("--ffn-hidden-size", int),
        ("--num-attention-heads", int),
        ("--num-query-groups", int),
        ("--kv-channels", int),
        ("--vocab-size", int),
        ("--rotary-base", float),
        ("--norm-epsilon", float),
    ):
        g.add_argument(flag, type=typ, default=None, help="Model shape (checked against --hf-checkpoint's config).")
    g.add_argument("--normalization", type=str, default=None, choices=["RMSNorm"], help="Model shape (checked).")
    for flag in (
        "--swiglu",
        "--group-query-attention",
        "--use-rotary-position-embeddings",
        "--qk-layernorm",
        "--disable-bias-linear",
        "--add-qkv-bias",
        "--untie-embeddings-and-output-weights",
    ):
        g.add_argument(flag, action="store_true", default=False, help="Model shape (checked against the HF config).")


def validate_megatron_args(args: argparse.Namespace) -> None:
    """Parallel sizes (positive: slime.utils.flag_ranges) must divide the training GPUs (whatever the backend)."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if args.train_backend == "megatron" and (args.actor_num_nodes * args.actor_num_gpus_per_node) % model_parallel:
        raise ValueError(
            f"TP·PP·CP = {model_parallel} must divide actor_num_nodes * actor_num_gpus_per_node = "
            f"{args.actor_num_nodes * args.actor_num_gpus_per_node}"
        )
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


ArgsProvider = Callable[[argparse.ArgumentParser], Any]


def get_parser(extra_args_providers: Iterable[ArgsProvider] = ()) -> argparse.ArgumentParser:
    """The flat parser. ``extra_args_providers`` add project- or user-specific flags (as upstream)."""
    parser = argparse.ArgumentParser(
        prog="slime", description="slime-compatible OPD / TA-OPD training stack", allow_abbrev=False
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file overriding defaults.")
    for add in (
        _add_cluster_arguments,
        _add_rollout_arguments,
        _add_data_arguments,
        _add_eval_arguments,
        _add_algo_arguments,
        _add_opd_arguments,
        _add_reward_arguments,
        _add_logging_arguments,
        _add_self_distillation_arguments,
        _add_megatron_arguments,
        add_ta_opd_arguments,
        add_placement_arguments,
    ):
        add(parser)
    for provider in extra_args_providers:
        provider(parser)
    add_compat_arguments(parser)  # release / upstream-slime flags the parser lacks (docs/arguments.md)
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag: value, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    by_flag = {opt.lstrip("-"): a for a in actions.values() for opt in a.option_strings}
    out: dict[str, Any] = {}
    for key, value in data.items():
        key_s = str(key).lstrip("-")
        action = by_flag.get(key_s) or actions.get(key_s) or actions.get(key_s.replace("-", "_"))
        if action is None:
            raise ValueError(f"--config {path!r}: unknown key {key!r} (not a flag of this parser)")
        flag_form = key_s in by_flag
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path!r}: {key} is a switch and needs true/false, got {value!r}")
            if isinstance(action, argparse._StoreFalseAction) and flag_form:
                value = not value  # "disable-x: true" means dest x = False
        elif value is not None and action.type is not None:
            try:
                if isinstance(value, list):
                    value = [action.type(v) if isinstance(v, str | int | float) else v for v in value]
                elif isinstance(value, str | int | float):
                    value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise ValueError(f"--config {path!r}: bad value for {key}: {value!r} ({e})") from e
        if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
            value = [value]
        if action.choices is not None and value is not None:
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if v not in action.choices]
            if bad:
                raise ValueError(f"--config {path!r}: {key}={value!r} not in {list(action.choices)}")
        out[action.dest] = value
    return out


def parse_args(
    argv: Sequence[str] | None = None,
    validate: bool = True,
    extra_args_providers: Iterable[ArgsProvider] = (),
) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); YAML from ``--config`` overrides defaults, flags override YAML."""
    parser = get_parser(extra_args_providers)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    args = parser.parse_args(argv)
    if validate:
        validate_args(args, parser)
    return args


def _resolve_eval_datasets(args: argparse.Namespace) -> list[dict[str, str]]:
    values = list(args.eval_prompt_data or [])
    if len(values) == 1:
        values = ["eval", values[0]]
    if len(values) % 2:
        raise ValueError(f"--eval-prompt-data takes name/path pairs, got {values}")
    datasets = [{"name": values[i], "path": values[i + 1]} for i in range(0, len(values), 2)]
    for d in datasets:
        if not os.path.isfile(d["path"]):
            raise FileNotFoundError(f"--eval-prompt-data {d['name']}: file {d['path']!r} does not exist")
    return datasets


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fill derived values and reject contradictory flags (ValueError / FileNotFoundError), in place.

    Every numeric flag of ``parser`` (default: this module's parser) is checked first: finite and in
    its documented range (``slime.utils.flag_ranges``).
    """
    if args.rollout_batch_size is None:
        raise ValueError("--rollout-batch-size is required")
    if args.rollout_max_response_len is None:
        raise ValueError("--rollout-max-response-len is required (max_new_tokens of each rollout)")
    check_numeric_flags(parser or get_parser(), args)

    # batch sizes: global batch counts samples, one optimizer step per global batch
    samples_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt
    if args.num_steps_per_rollout is not None:
        if samples_per_rollout % args.num_steps_per_rollout:
            raise ValueError(
                f"--num-steps-per-rollout {args.num_steps_per_rollout} does not divide rollout_batch_size * "
                f"n_samples_per_prompt = {samples_per_rollout}"
            )
        gbs = samples_per_rollout // args.num_steps_per_rollout
        if args.global_batch_size is not None and args.global_batch_size != gbs:
            raise ValueError(
                f"--global-batch-size {args.global_batch_size} contradicts --num-steps-per-rollout "
                f"{args.num_steps_per_rollout} (which gives {gbs})"
            )
        args.global_batch_size = gbs
    if args.global_batch_size is None:
        args.global_batch_size = samples_per_rollout
    if samples_per_rollout % args.global_batch_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must divide rollout_batch_size * n_samples_per_prompt = "
            f"{args.rollout_batch_size} * {args.n_samples_per_prompt} = {samples_per_rollout}"
        )
    if args.global_batch_size % args.micro_batch_size:
        raise ValueError(
            f"--micro-batch-size {args.micro_batch_size} must divide --global-batch-size {args.global_batch_size}"
        )
    resolve_lr_schedule_args(args)  # default --lr-decay-iters from --num-rollout and the steps per rollout
    if args.over_sampling_batch_size is None:
        args.over_sampling_batch_size = args.rollout_batch_size
    if args.over_sampling_batch_size < args.rollout_batch_size:
        raise ValueError(
            f"--over-sampling-batch-size {args.over_sampling_batch_size} < "
            f"--rollout-batch-size {args.rollout_batch_size}"
        )

    # placement
    actor_gpus = args.actor_num_nodes * args.actor_num_gpus_per_node
    if args.colocate:
        if args.rollout_num_gpus is None:
            args.rollout_num_gpus = actor_gpus
        elif args.rollout_num_gpus > actor_gpus:
            raise ValueError(
                f"--colocate puts rollout on the training GPUs, but --rollout-num-gpus {args.rollout_num_gpus} > "
                f"actor_num_nodes * actor_num_gpus_per_node = {actor_gpus}"
            )
        args.offload = True
    if args.rollout_num_gpus is not None and args.rollout_num_gpus % args.rollout_num_gpus_per_engine:
        raise ValueError(
            f"--rollout-num-gpus-per-engine {args.rollout_num_gpus_per_engine} must divide "
            f"--rollout-num-gpus {args.rollout_num_gpus}"
        )
    if args.rollout_num_engines is None:
        gpus = args.rollout_num_gpus or 0
        args.rollout_num_engines = max(1, gpus // args.rollout_num_gpus_per_engine)
    if (args.sglang_router_ip is None) != (args.sglang_router_port is None):
        raise ValueError("--sglang-router-ip and --sglang-router-port must be given together")

    # plug-ins
    if args.loss_type == "custom_loss" and not args.custom_loss_function_path:
        raise ValueError("--loss-type custom_loss needs --custom-loss-function-path")
    if args.custom_loss_function_path and args.loss_type != "custom_loss":
        raise ValueError("--custom-loss-function-path is only used with --loss-type custom_loss")
    if args.eval_function_path is None:
        args.eval_function_path = args.rollout_function_path
    if args.custom_generate_function_path == SFT_BASELINE_GENERATE:
        if args.loss_type != "sft_loss":
            raise ValueError(
                f"--custom-generate-function-path {SFT_BASELINE_GENERATE} trains on the teacher's samples: it needs "
                f"--loss-type sft_loss, got {args.loss_type} (OPD losses need the student's own samples)"
            )
        if not (args.use_opd and args.opd_type == "sglang"):
            raise ValueError(
                f"--custom-generate-function-path {SFT_BASELINE_GENERATE} samples from the teacher server: it needs "
                "--use-opd --opd-type sglang with --opd-teacher-hf-checkpoint DIR or --rm-url URL"
            )

    # OPD (same rules as upstream)
    if args.use_opd:
        if args.opd_type is None:
            raise ValueError("--use-opd needs --opd-type sglang|megatron")
        if args.opd_type == "megatron":
            if args.opd_teacher_load is None:
                raise ValueError("--opd-type megatron needs --opd-teacher-load DIR")
            if not os.path.exists(args.opd_teacher_load):
                raise FileNotFoundError(f"--opd-teacher-load {args.opd_teacher_load!r} does not exist")
        else:
            if args.opd_teacher_load is not None:
                raise ValueError("--opd-teacher-load is for --opd-type megatron; with sglang the teacher is a server")
            if args.rm_url is None and args.opd_teacher_hf_checkpoint is None:
                raise ValueError("--opd-type sglang needs --rm-url (a teacher server) or --opd-teacher-hf-checkpoint")
            if args.custom_rm_path is None:
                args.custom_rm_path = OPD_REWARD_FUNC
            if args.custom_reward_post_process_path is None:
                args.custom_reward_post_process_path = OPD_POST_PROCESS
    else:
        if args.opd_type is not None:
            raise ValueError(f"--opd-type {args.opd_type} is set but --use-opd is not")
        if args.opd_teacher_load is not None:
            raise ValueError("--opd-teacher-load is set but --use-opd is not")
        if args.opd_teacher_hf_checkpoint is not None and args.loss_type not in SD_LOSS_TYPES:
            raise ValueError(
                "--opd-teacher-hf-checkpoint is set but --use-opd is not (nor a trainer-side --loss-type)"
            )
    if args.opd_teacher_hf_checkpoint is not None and not os.path.isdir(args.opd_teacher_hf_checkpoint):
        raise FileNotFoundError(f"--opd-teacher-hf-checkpoint {args.opd_teacher_hf_checkpoint!r} is not a directory")
    _resolve_teacher_temperature(args)
    validate_ta_opd_args(args)
    validate_megatron_args(args)
    validate_self_distillation_args(args)

    # files
    if args.hf_checkpoint is not None and os.path.isabs(args.hf_checkpoint) and not os.path.exists(args.hf_checkpoint):
        raise FileNotFoundError(f"--hf-checkpoint {args.hf_checkpoint!r} does not exist")
    if args.rollout_global_dataset and args.prompt_data is not None and not os.path.isfile(args.prompt_data):
        raise FileNotFoundError(f"--prompt-data {args.prompt_data!r} does not exist")
    if args.load is not None and not os.path.exists(args.load):
        # resuming with --load == --save on a first run starts fresh, as upstream does
        if args.save is None or os.path.abspath(args.save) != os.path.abspath(args.load):
            raise FileNotFoundError(f"--load {args.load!r} does not exist")
        logger.info("--load %s does not exist yet (same as --save): starting from scratch", args.load)
    if args.ref_load is not None and not os.path.exists(args.ref_load):
        raise FileNotFoundError(f"--ref-load {args.ref_load!r} does not exist")
    args.eval_datasets = _resolve_eval_datasets(args)
    if args.eval_interval is not None and not args.eval_datasets:
        raise ValueError("--eval-interval needs --eval-prompt-data name path")
    if args.metrics_path is None:
        args.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if args.skip_preflight and (args.preflight or args.preflight_only):
        raise ValueError("--preflight/--preflight-only and --skip-preflight contradict each other")
    args.preflight = not args.skip_preflight
    return args


def dump_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """A Markdown flag reference generated from the parser (docs/arguments.md)."""
    parser = parser or get_parser()
    lines = [
        "# Flags",
        "",
        "Generated by `python -m slime.utils.arguments --dump-markdown`; do not edit by hand.",
        "Defaults live in the parser; `--config FILE.yaml` overrides them and command-line flags override the YAML.",
        "",
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | choices | help |", "|---|---|---|---|"]
        for a in actions:
            flags = ", ".join(f"`{o}`" for o in a.option_strings)
            default = "" if a.default is None or a.default == argparse.SUPPRESS else f"`{a.default}`"
            choices = ", ".join(str(c) for c in a.choices) if a.choices else ""
            valid = describe_flag_range(a)
            text = ((a.help or "") + (f" Valid: {valid}." if valid else "")).strip().replace("|", "\\|")
            lines.append(f"| {flags} | {default} | {choices} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dump-markdown" in argv:
        sys.stdout.write(dump_markdown())
        return 0
    from slime.utils.redact import redact_secrets

    args = parse_args(argv)
    for key, value in sorted(redact_secrets(args).items()):  # never echo an API key to a terminal or log
        print(f"{key} = {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
