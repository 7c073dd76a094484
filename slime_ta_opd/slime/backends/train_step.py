"""The backend-neutral training step shared by the torch and the Megatron trainers.

Per rollout (docs/method.md §1), :meth:`TrainStep.train`:

1. old log-probs of every response token, no grad (or the rollout's with ``--use-rollout-logprobs``); the
   teacher's sampled-token log-probs from the rollout data (or the backend's in-trainer teacher);
2. advantages = base estimator + λ·(teacher_logp − old_logp), detached;
3. one optimizer step per consecutive global batch; the step's loss is the sum of its micro-batches' losses,
   each computed with the step's global sample/token counts, so it does not depend on ``--micro-batch-size``
   (nor on the data-parallel split);
4. the update is applied only when the step's loss and gradient norm are finite (``--nonfinite-policy``: stop
   the run, or skip the step; slime.utils.nonfinite), at the LR of slime.utils.lr_schedule.

The loss of a micro-batch comes from the ``--loss-type`` entry of :data:`ta_opd.loss_registry.LOSSES`: the step
asks the entry which inputs it reads, takes them from the backend's :class:`LossSource` (sampled-token
log-probs, full-vocabulary student and teacher) and the rollout (old log-probs, advantages), and calls it.

A backend supplies: ``compute_log_probs(data)``, ``_forward_backward(ctx)`` (its micro-batches through
:meth:`TrainStep.micro_batch_loss`, backward, sums over its ranks), ``_optimizer_step(loss, where, lr)``,
``_zero_grad()``, and optionally ``_teacher_log_probs(data)`` and ``_reduce_loss_metrics(sums)``.
"""

from __future__ import annotations

import math
import time
from argparse import Namespace
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from slime.backends.torch_utils.model import ResponseBatch, build_response_batch
from slime.utils.arguments import SFT_BASELINE_GENERATE
from slime.utils.lr_schedule import lr_at
from ta_opd.chunked import LogitSource
from ta_opd.loss_registry import INPUTS, LOSSES, LossConfig, LossInputs, LossSpec
from ta_opd.losses import opd_advantages, sampled_reverse_kl
from ta_opd.sd_losses import teacher_divergence

WEIGHTS_SUBDIR = "weights"  # pushed weights live under --output-dir/weights/weight_v*
ROLLOUT_INPUTS = frozenset({"old_logp", "advantages"})  # loss inputs every trainer takes from the rollout
PER_SAMPLE_MEAN, GLOBAL_TOKEN_MEAN = "seq-mean-token-mean", "token-mean"
# Estimators whose advantage is the sample's scalar reward broadcast over its response tokens:
# the group normalisation already happened in the rollout's reward post-process, as upstream.
REWARD_BROADCAST_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")


# ------------------------------------------------------------------------------------------ rollout data


def as_rollout_data(ref: Any) -> dict[str, Any]:
    """Accept the data dict itself, a Ray ObjectRef to it, or an upstream-style ``Box(ref)``."""
    import ray

    inner = getattr(ref, "inner", ref)
    if isinstance(inner, ray.ObjectRef):
        inner = ray.get(inner)
    if not isinstance(inner, dict):
        raise TypeError(f"rollout data must be a dict of per-sample lists, got {type(inner).__name__}")
    return inner


def float_tensor(values: Any, n: int, name: str, sample: int) -> torch.Tensor:
    """One sample's ``values`` as float64 ``[n]``; an error naming the sample and ``name`` otherwise."""
    t = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.tolist(), dtype=torch.float64)
    if t.numel() != n:
        raise ValueError(f"sample {sample}: {name} has {t.numel()} entries, expected response_length={n}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"sample {sample}: {name} holds non-finite values (NaN/inf from a server?)")
    return t


def per_sample(data: dict[str, Any], key: str, name: str, resp_lens: list[int]) -> list[torch.Tensor]:
    """data[key] as one float64 tensor [response_length] per sample, checked by `float_tensor` (error names `name`)."""
    return [float_tensor(data[key][i], resp_lens[i], name, i) for i in range(len(data["tokens"]))]


def scalar_rewards(data: dict[str, Any]) -> list[float]:
    """One float reward per sample (0.0 for dict rewards and when the data holds none)."""
    return [float(r) if not isinstance(r, dict) else 0.0 for r in data.get("rewards", [0.0] * len(data["tokens"]))]


def global_batches(n: int, global_batch_size: int) -> list[list[int]]:
    """Sample indices of each optimizer step: consecutive global batches (the last may be short), at least one."""
    gbs = global_batch_size
    return [list(range(s * gbs, min(n, (s + 1) * gbs))) for s in range(max(1, math.ceil(n / gbs)))]


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[s : s + size] for s in range(0, len(indices), size)]


def response_batch(data: dict[str, Any], idx: list[int], pad_id: int, device: torch.device | str) -> ResponseBatch:
    """The samples ``idx`` of the rollout data as one right-padded :class:`ResponseBatch`, ids on ``device``."""
    batch = build_response_batch(
        [list(data["tokens"][i]) for i in idx],
        [int(data["prompt_lengths"][i]) for i in idx],
        [int(data["response_lengths"][i]) for i in idx],
        pad_id=pad_id,
    )
    batch.input_ids = batch.input_ids.to(device)
    return batch


def mean_metrics(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the optimizer steps of one rollout."""
    return {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


def adamw(model: torch.nn.Module, args: Namespace) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the trainable parameters, ``--weight-decay`` on matrices only (not on biases and
    norms), ``--lr``, ``--adam-beta1/2``, ``--adam-eps``: the torch trainer's optimizer and the Megatron trainer's
    on CPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
    )


# ------------------------------------------------------------------------------------------ advantages


def base_advantages(args: Namespace, rewards: torch.Tensor, response_lengths: list[int]) -> list[torch.Tensor]:
    """Per-token base advantages of ``--advantage-estimator``, one tensor per sample.

    Pure distillation (every reward 0) gives 0 under any estimator. GRPO-family estimators
    broadcast the (already group-normalised) reward; estimators that need a critic or
    discounted returns are refused for non-zero rewards rather than silently dropped.
    """
    if not bool((rewards != 0).any()):
        return [torch.zeros(n, dtype=rewards.dtype) for n in response_lengths]
    if args.advantage_estimator not in REWARD_BROADCAST_ESTIMATORS:
        raise NotImplementedError(
            f"the trainers support --advantage-estimator {'/'.join(REWARD_BROADCAST_ESTIMATORS)} with task "
            f"rewards (or any estimator for pure distillation with rewards 0), got {args.advantage_estimator!r}"
        )
    return [torch.full((n,), float(r), dtype=rewards.dtype) for r, n in zip(rewards, response_lengths, strict=True)]


def compute_advantages(
    args: Namespace,
    old_log_probs: list[torch.Tensor],
    teacher_log_probs: list[torch.Tensor] | None,
    rewards: list[float],
    response_lengths: list[int],
) -> list[torch.Tensor]:
    """Per-sample advantage tensors (detached): base estimator + OPD term when ``--use-opd``."""
    dtype = old_log_probs[0].dtype if old_log_probs else torch.float32
    base = base_advantages(args, torch.as_tensor(rewards, dtype=dtype), response_lengths)
    if not args.use_opd:
        return base
    if teacher_log_probs is None:
        raise ValueError("--use-opd needs teacher_log_probs in the rollout data, got none")
    return [
        opd_advantages(t.to(o.dtype), o, kl_coef=args.opd_kl_coef, base=b).detach()
        for t, o, b in zip(teacher_log_probs, old_log_probs, base, strict=True)
    ]


# ------------------------------------------------------------------------------------------ loss wiring


def loss_config(args: Namespace) -> LossConfig:
    """The frozen ``ta_opd`` loss config from the flags (``--custom-loss-function-path fn`` is called as
    ``fn(args, inputs)``)."""
    custom = None
    if args.custom_loss_function_path:
        from slime.utils.misc import load_function

        custom = partial(load_function(args.custom_loss_function_path), args)
    return LossConfig(
        temperature=args.sd_temperature,
        fkl_clip=args.opsd_clip,
        position_w_min=args.pwopsd_w_min,
        position_tau=args.pwopsd_tau,
        position_s=args.pwopsd_s,
        pwopsd_reduction=PER_SAMPLE_MEAN if args.pwopsd_reduction == "per-sample" else GLOBAL_TOKEN_MEAN,
        reduction=args.sd_reduction,
        policy_reduction=GLOBAL_TOKEN_MEAN if args.calculate_per_token_loss else PER_SAMPLE_MEAN,
        eopd_eps_clip=args.eopd_eps_clip,
        eopd_entropy_gate=args.eopd_entropy_gate,
        eopd_topk=args.eopd_topk,
        reopold_lambda=args.reopold_lambda,
        reopold_warmup_steps=args.reopold_warmup_steps,
        reopold_entropy_percentile=args.reopold_entropy_percentile,
        eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high,
        topk=args.sd_topk,
        topk_tail_bucket=args.topk_fkl_tail_bucket,
        topk_renormalize_teacher=args.topk_fkl_renormalize_teacher,
        jsd_beta=args.jsd_beta,
        jsd_normalize=args.jsd_normalize,
        chunk_size=args.sd_chunk_size,
        custom_fn=custom,
    )


def check_loss_supported(spec: LossSpec, provides: set[str] | frozenset[str], backend: str) -> None:
    """Refuse, before any work, a ``--loss-type`` that needs an input the backend cannot compute."""
    missing = sorted(spec.needs - ROLLOUT_INPUTS - set(provides))
    if missing:
        what = "; ".join(f"{m}: {INPUTS[m]}" for m in missing)
        raise ValueError(f"--loss-type {spec.name} needs {what}, which the {backend} trainer does not provide")


class LossSource(Protocol):
    """What a backend computes for one micro-batch (rows: response-token indices, None = every response row)."""

    batch: ResponseBatch
    device: torch.device
    select_rows: bool  # True: a loss over the kept rows gets only those; False: every row with the loss mask
    full_logits: bool  # True: full-vocabulary losses take the naive [N, V] path (chunk_size 0)

    def log_probs(self, rows: torch.Tensor | None) -> torch.Tensor: ...  # [n] with grad

    def student(self, rows: torch.Tensor | None) -> LogitSource: ...

    def teacher(self, rows: torch.Tensor | None) -> LogitSource | None: ...


@dataclass
class RolloutTensors:
    data: dict[str, Any]
    loss_masks: list[torch.Tensor]  # [response_length] bool per sample
    old: list[torch.Tensor]
    advantages: list[torch.Tensor]


@dataclass
class StepContext:
    """One optimizer step: its samples and the counts every micro-batch's loss is normalised by."""

    rollout: RolloutTensors
    idx: list[int]
    step: int
    global_tokens: int
    global_samples: int
    samples_with_kept: int


class LossMetrics:
    """Kept-token-weighted means of the loss's metrics over the micro-batches of a rollout, as ``train/sd_*``."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}  # key -> [Σ value·weight, Σ weight]

    def add(self, metrics: dict[str, float], weight: int) -> None:
        for key, value in metrics.items():
            acc = self.sums.setdefault(key, [0.0, 0.0])
            acc[0] += value * weight
            acc[1] += float(weight)

    def pop(self, sums: dict[str, list[float]] | None = None) -> dict[str, float]:
        sums = self.sums if sums is None else sums
        self.sums = {}
        return {f"train/sd_{k}": (vw / w if w > 0 else 0.0) for k, (vw, w) in sums.items()}


def rollout_metrics(old, teacher, loss_masks, resp_lens, from_teacher: bool = False) -> dict[str, float]:
    """Response lengths and the sampled-token teacher KL of the rollout (the one place ``train/teacher_*kl*``
    is computed), from the per-sample old and teacher log-probs."""
    out = {
        "train/response_length_mean": float(np.mean(resp_lens)) if resp_lens else 0.0,
        "train/response_tokens": float(sum(resp_lens)),
    }
    if teacher is None or sum(resp_lens) == 0:
        return out
    student, teach = torch.cat(old), torch.cat(teacher)
    if from_teacher:
        # the SFT baseline's responses are the teacher's samples: log p_T(y) − log p_S(y) averages to the
        # forward KL(p_T‖p_S), not the reverse KL that teacher_kl_* estimates on the student's samples
        out["train/teacher_fkl_sampled"] = -sampled_reverse_kl(student, teach)
    else:  # sampled-token reverse KL estimate, log p_S(y) − log p_T(y), under the pre-step weights
        out["train/teacher_kl_all"] = sampled_reverse_kl(student, teach)
        out["train/teacher_kl_kept"] = sampled_reverse_kl(student, teach, torch.cat(loss_masks))
    return out


# ------------------------------------------------------------------------------------------ the step


class TrainStep:
    """Mixin of the trainer actors: ``train()`` and the loss of a micro-batch (see the module doc)."""

    def setup_loss(self, args: Namespace, provides: set[str] | frozenset[str], backend: str) -> LossSpec:
        """The ``--loss-type`` entry and its config; refuses one whose inputs ``provides`` lacks."""
        spec = LOSSES.get(args.loss_type)
        check_loss_supported(spec, provides, backend)
        self.loss_spec, self.loss_cfg = spec, loss_config(args)
        self.loss_metrics = LossMetrics()
        return spec

    # ---------------------------------------------------------------- backend hooks
    def compute_log_probs(self, data: dict[str, Any]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _teacher_log_probs(self, data: dict[str, Any]) -> list[torch.Tensor] | None:
        """Teacher log-probs computed by the trainer itself (None: take the rollout's)."""
        return None

    def _forward_backward(self, ctx: StepContext) -> tuple[float, float]:
        """This step's micro-batches through :meth:`micro_batch_loss` and backward; (loss, clipped tokens), each
        summed over the micro-batches of every rank of the step."""
        raise NotImplementedError

    def _optimizer_step(self, loss: float, where: str, lr: float) -> tuple[bool, float]:
        """Check and apply the step's gradients at ``lr``; (applied, gradient norm)."""
        raise NotImplementedError

    def _zero_grad(self) -> None:
        raise NotImplementedError

    def _reduce_loss_metrics(self, sums: dict[str, list[float]]) -> dict[str, list[float]]:
        """The loss metrics' sums over the ranks of a rollout (one rank: as they are)."""
        return sums

    # ---------------------------------------------------------------- one rollout
    def train(self, rollout_id: int, rollout_data_ref: Any, external_data: Any = None) -> dict[str, float]:
        """Train on one rollout; returns the step metrics (floats)."""
        t0 = time.perf_counter()
        args = self.args
        data = as_rollout_data(rollout_data_ref)
        resp_lens = [int(r) for r in data["response_lengths"]]
        loss_masks = [m.bool() for m in per_sample(data, "loss_masks", "loss_mask", resp_lens)]
        if args.use_rollout_logprobs:
            old = per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens)
        else:
            old = self.compute_log_probs(data)
        teacher = self._teacher_log_probs(data)
        if teacher is None and data.get("teacher_log_probs") is not None:
            teacher = per_sample(data, "teacher_log_probs", "teacher_log_probs", resp_lens)
        advantages = compute_advantages(args, old, teacher, scalar_rewards(data), resp_lens)
        t_logp = time.perf_counter()

        rollout = RolloutTensors(data, loss_masks, old, advantages)
        step_metrics = [
            self._train_step(rollout, idx, where=f"rollout {rollout_id} step {s}")
            for s, idx in enumerate(global_batches(len(data["tokens"]), args.global_batch_size))
        ]
        metrics = mean_metrics(step_metrics)
        from_teacher = args.custom_generate_function_path == SFT_BASELINE_GENERATE  # the SFT baseline
        metrics.update(rollout_metrics(old, teacher, loss_masks, resp_lens, from_teacher=from_teacher))
        metrics.update(self.loss_metrics.pop(self._reduce_loss_metrics(self.loss_metrics.sums)))
        engine = data.get("rollout_log_probs") is not None
        if engine and from_teacher and teacher is not None:
            # the sampling engine's log-probs vs the teacher's prefill of the same tokens: ~0 iff the teacher sampled
            gap = torch.cat(per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens)) - torch.cat(teacher)
            metrics["train/rollout_teacher_logp_abs_diff"] = float(gap.abs().mean()) if gap.numel() else 0.0
        if engine and not from_teacher and not args.use_rollout_logprobs:
            # engine vs trainer log-probs of the same tokens under the same weights: ~0 unless the engines
            # run other weights (a failed push) or another numerics path
            sampled = torch.cat(per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens))
            metrics["train/rollout_logp_abs_diff"] = float((sampled - torch.cat(old).double()).abs().mean())
        metrics["train/step"] = float(self.global_step)
        metrics["perf/log_probs_time"] = t_logp - t0
        metrics["perf/train_time"] = time.perf_counter() - t0
        self.last_rollout_id = rollout_id
        return metrics

    def _train_step(self, rollout: RolloutTensors, idx: list[int], where: str = "step") -> dict[str, float]:
        """One optimizer step on the global batch ``idx``."""
        masks = rollout.loss_masks
        kept_total = int(sum(int(masks[i].sum()) for i in idx))
        ctx = StepContext(
            rollout, idx, step=self.global_step, global_tokens=max(kept_total, 1), global_samples=len(idx),
            samples_with_kept=sum(bool(masks[i].any()) for i in idx),
        )  # fmt: skip
        self._zero_grad()
        loss, clipped = self._forward_backward(ctx)
        lr = self._lr()  # the LR this step applies (before global_step moves on)
        applied, grad_norm = self._optimizer_step(loss, f"{where} (optimizer step {self.global_step})", lr)
        if applied:
            self.global_step += 1
        else:  # --nonfinite-policy skip: drop the gradients, leave weights and optimizer state as they were
            self._zero_grad()
            self.skipped_steps += 1
        return {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm),
            "train/skipped_steps": 0.0 if applied else 1.0,
            "train/clipfrac": clipped / ctx.global_tokens,
            "train/lr": lr,
            "train/kept_tokens": float(kept_total),
            "train/samples": float(ctx.global_samples),
        }

    def _lr(self) -> float:
        """LR of the next optimizer step (slime.utils.lr_schedule): a function of the applied steps alone."""
        return lr_at(self.global_step, self.lr_schedule)

    # ---------------------------------------------------------------- one micro-batch
    def micro_batch_loss(self, ctx: StepContext, mb: list[int], source: LossSource) -> tuple[torch.Tensor, float]:
        """This micro-batch's share of the step's loss (call ``.backward()``) and its clipped-token count; the
        loss's metrics go to ``self.loss_metrics``."""
        spec = self.loss_spec
        cfg = replace(self.loss_cfg, chunk_size=0) if source.full_logits else self.loss_cfg
        dev, batch = source.device, source.batch
        mask = torch.cat([ctx.rollout.loss_masks[i] for i in mb]).to(dev)  # [N] bool
        rows = mask.nonzero().squeeze(-1) if spec.rows == "kept" and source.select_rows else None

        def take(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dev)
            return t if rows is None else t[rows]

        loss_mask = mask if rows is None else torch.ones(rows.numel(), dtype=torch.bool, device=dev)
        x = LossInputs(
            loss_mask=loss_mask, target_ids=take(batch.target), sample_index=take(batch.sample_index),
            position=take(batch.position),
            # positions before selection: every response token (no tool tokens in this stack's rollouts)
            valid_mask=torch.ones_like(loss_mask), step=ctx.step, global_token_count=ctx.global_tokens,
            global_sample_count=ctx.global_samples, samples_with_kept=ctx.samples_with_kept,
        )  # fmt: skip
        wants = spec.wants
        if "logp" in wants:
            x.logp = source.log_probs(rows)
        dtype = x.logp.dtype if x.logp is not None else torch.float64
        if "old_logp" in wants:
            x.old_logp = take(torch.cat([ctx.rollout.old[i] for i in mb])).to(dtype)
        if "advantages" in wants:
            x.advantages = take(torch.cat([ctx.rollout.advantages[i] for i in mb])).to(dtype)
        if "student" in wants:
            x.student = source.student(rows)
        if "teacher" in wants:
            x.teacher = source.teacher(rows)
        out = spec.fn(x, cfg)
        metrics = {k: float(v) for k, v in out.metrics.items()}
        if x.student is not None and x.teacher is not None:
            divergence = teacher_divergence(x.student, x.teacher, loss_mask, cfg.chunk_size)
            metrics.update({k: float(v) for k, v in divergence.items()})
        self.loss_metrics.add(metrics, int(mask.sum()))
        return out.loss, 0.0 if out.clipped_tokens is None else float(out.clipped_tokens)
