"""The embedded torch trainer: one process (CPU or one GPU) training a HF causal LM with OPD.

Per rollout (METHOD.md §1):
1. old log-probs of every response token, no grad (or the rollout's with ``--use-rollout-logprobs``);
2. advantages = base estimator + λ·(teacher_logp − old_logp), detached;
3. ``num_steps_per_rollout`` optimizer steps over consecutive global batches; each step accumulates
   gradients over micro-batches whose losses use the step's global sample/token counts, so the
   result does not depend on ``--micro-batch-size``;
4. AdamW step after ``--clip-grad``, applied only when the step's loss and gradient norm are finite
   (``--nonfinite-policy``: stop the run, or skip the step; slime.utils.nonfinite).

Weights are checked for NaN/inf before every checkpoint and every push to the engines.

The class is a plain Python class (unit tests construct it directly); ``RayTrainGroup`` wraps it
with ``ray.remote``. Upstream's Megatron actor has the same method names.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slime.backends.torch_utils import checkpoint as ckpt
from slime.backends.torch_utils.distill import Distiller
from slime.backends.torch_utils.loss import compute_advantages, policy_loss
from slime.backends.torch_utils.model import (
    build_response_batch,
    load_hf_model,
    sampled_token_log_probs,
    sparse_head_matches_dense,
)
from slime.backends.weight_sync import load_from_disk, pushes_tensors, unique_named_tensors, weight_sender_for
from slime.ray.train_actor import TrainRayActor
from slime.utils.arguments import SFT_BASELINE_GENERATE
from slime.utils.lr_schedule import LRSchedule, lr_at
from slime.utils.nonfinite import check_finite_weights, step_is_finite

logger = logging.getLogger(__name__)

WEIGHTS_SUBDIR = "weights"


def _as_rollout_data(ref: Any) -> dict[str, Any]:
    """Accept the data dict itself, a Ray ObjectRef to it, or an upstream-style ``Box(ref)``."""
    import ray

    inner = getattr(ref, "inner", ref)
    if isinstance(inner, ray.ObjectRef):
        inner = ray.get(inner)
    if not isinstance(inner, dict):
        raise TypeError(f"rollout data must be a dict of per-sample lists, got {type(inner).__name__}")
    return inner


def _float_list(values: Any, n: int, name: str, sample: int) -> torch.Tensor:
    t = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.tolist(), dtype=torch.float64)
    if t.numel() != n:
        raise ValueError(f"sample {sample}: {name} has {t.numel()} entries, expected response_length={n}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"sample {sample}: {name} holds non-finite values (NaN/inf from a server?)")
    return t


# The rollout-data plumbing below is shared with the Megatron trainer (megatron_utils/actor.py).


def _per_sample(data: dict[str, Any], key: str, name: str, resp_lens: list[int]) -> list[torch.Tensor]:
    """data[key] as one float64 tensor [response_length] per sample, checked by `_float_list` (error names `name`)."""
    return [_float_list(data[key][i], resp_lens[i], name, i) for i in range(len(data["tokens"]))]


def _scalar_rewards(data: dict[str, Any]) -> list[float]:
    """One float reward per sample (0.0 for dict rewards and when the data holds none)."""
    return [float(r) if not isinstance(r, dict) else 0.0 for r in data.get("rewards", [0.0] * len(data["tokens"]))]


def _global_batches(n: int, global_batch_size: int) -> list[list[int]]:
    """Sample indices of each optimizer step: consecutive global batches (the last may be short), at least one."""
    gbs = global_batch_size
    return [list(range(s * gbs, min(n, (s + 1) * gbs))) for s in range(max(1, math.ceil(n / gbs)))]


def _mean_metrics(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the optimizer steps of one rollout."""
    return {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


class TorchTrainRayActor(TrainRayActor):
    """Trainer actor of the embedded torch backend (one rank)."""

    def init(self, args: Namespace, role: str = "actor", with_ref: bool = False, with_opd_teacher: bool = False):
        """Load the student (``--load`` checkpoint if any, else ``--hf-checkpoint``); returns the start rollout id."""
        super().init(args, role, with_ref, with_opd_teacher)
        if self._world_size != 1:
            raise ValueError(
                f"the torch backend trains on one rank; got world size {self._world_size} "
                "(use --actor-num-nodes 1 --actor-num-gpus-per-node 1, or the megatron backend)"
            )
        if with_ref or with_opd_teacher:
            raise ValueError("the torch backend supports neither a reference model nor --opd-type megatron")
        if args.lm_head_chunk_size is not None and args.lm_head_chunk_size <= 0:
            raise ValueError(f"--lm-head-chunk-size must be > 0, got {args.lm_head_chunk_size}")
        if args.hf_checkpoint is None:
            raise ValueError("the torch trainer needs --hf-checkpoint (the student's HF directory)")
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.use_gpu else "cpu")
        dtype = args.train_dtype or ("bfloat16" if getattr(args, "bf16", False) else "float32")
        self.model = load_hf_model(args.hf_checkpoint, dtype=dtype, device=self.device)
        # LoRA, the trainer-side teacher and the --loss-type losses other than policy_loss (distill.py)
        self.distill = Distiller(args, self.model, dtype=dtype, device=self.device)
        self.model = self.distill.model  # the HF module (LoRA layers injected with --lora-rank)
        self.model.train()
        self.sparse = bool(getattr(args, "sparse_lm_head", True))
        if self.sparse and not sparse_head_matches_dense(self.model, self.model.config.vocab_size):
            logger.warning("logits != lm_head(last_hidden_state) for this model: using the dense LM-head path")
            self.sparse = False
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
        )
        self.lr_schedule = LRSchedule.from_args(args)  # --lr-decay-style & co. (slime.utils.lr_schedule)
        self.global_step = 0
        self.skipped_steps = 0  # optimizer steps dropped for a non-finite loss / grad norm (--nonfinite-policy skip)
        self.weight_version = 0
        self.last_rollout_id = -1
        self.loaded_from: str | None = None
        start_rollout_id = 0
        # the --load rule (slime.utils.run_dirs): a --save dir, one iter_* dir, or a fresh start only for --load ==
        # --save without a checkpoint yet; anything else is refused rather than trained from scratch
        latest = ckpt.checkpoint_to_load(args.load, args.save)
        if latest is not None:
            state = ckpt.load_checkpoint(
                latest, self.model, None if getattr(args, "no_load_optim", False) else self.optimizer
            )
            self.global_step = int(state.get("global_step", 0))
            self.weight_version = int(state.get("weight_version", 0))
            self.last_rollout_id = int(state["rollout_id"])
            start_rollout_id = self.last_rollout_id + 1
            self.loaded_from = str(latest)
            logger.info("resumed from %s: next rollout %d, step %d", latest, start_rollout_id, self.global_step)
        elif args.load is not None:
            logger.info("--load %s holds no checkpoint yet: starting from --hf-checkpoint", args.load)
        return start_rollout_id

    # ------------------------------------------------------------------ log-probs
    def _micro_batches(self, indices: list[int], size: int) -> list[list[int]]:
        return [indices[s : s + size] for s in range(0, len(indices), size)]

    def _batch(self, data: dict[str, Any], idx: list[int]):
        batch = build_response_batch(
            [list(data["tokens"][i]) for i in idx],
            [int(data["prompt_lengths"][i]) for i in idx],
            [int(data["response_lengths"][i]) for i in idx],
            pad_id=int(self.model.config.pad_token_id or 0),
        )
        batch.input_ids = batch.input_ids.to(self.device)
        return batch

    @torch.no_grad()
    def compute_log_probs(self, data: dict[str, Any]) -> list[torch.Tensor]:
        """Sampled-token log-probs of every response token under the current weights (no grad), per sample."""
        was_training = self.model.training
        self.model.eval()
        out: list[torch.Tensor] = []
        for idx in self._micro_batches(list(range(len(data["tokens"]))), self.args.micro_batch_size):
            batch = self._batch(data, idx)
            logp = sampled_token_log_probs(
                self.model,
                batch,
                temperature=self.args.rollout_temperature,
                sparse=self.sparse,
                chunk_size=self.args.lm_head_chunk_size,
            ).cpu()
            out.extend(logp.split([int(data["response_lengths"][i]) for i in idx]))
        self.model.train(was_training)
        return [t.double() for t in out]

    # ------------------------------------------------------------------ training
    def train(self, rollout_id: int, rollout_data_ref: Any, external_data: Any = None) -> dict[str, float]:
        """Train on one rollout; returns the step metrics (floats)."""
        t0 = time.perf_counter()
        data = _as_rollout_data(rollout_data_ref)
        n = len(data["tokens"])
        resp_lens = [int(r) for r in data["response_lengths"]]
        loss_masks = [m.bool() for m in _per_sample(data, "loss_masks", "loss_mask", resp_lens)]
        if self.args.use_rollout_logprobs:
            old = _per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens)
        else:
            old = self.compute_log_probs(data)
        teacher = None
        if data.get("teacher_log_probs") is not None:
            teacher = _per_sample(data, "teacher_log_probs", "teacher_log_probs", resp_lens)
        advantages = compute_advantages(self.args, old, teacher, _scalar_rewards(data), resp_lens)
        t_logp = time.perf_counter()

        batches = _global_batches(n, self.args.global_batch_size)
        step_metrics = [
            self._train_step(data, idx, old, advantages, loss_masks, where=f"rollout {rollout_id} step {s}")
            for s, idx in enumerate(batches)
        ]
        metrics = _mean_metrics(step_metrics)
        from_teacher = self.args.custom_generate_function_path == SFT_BASELINE_GENERATE  # the SFT baseline
        metrics.update(self._rollout_metrics(old, teacher, loss_masks, resp_lens, from_teacher=from_teacher))
        metrics.update(self.distill.step_metrics())
        if from_teacher and teacher is not None and data.get("rollout_log_probs") is not None:
            # the sampling engine's log-probs vs the teacher's prefill of the same tokens: ~0 iff the teacher sampled
            sampled = _per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens)
            gap = torch.cat([(a - b).abs() for a, b in zip(sampled, teacher, strict=True)])
            metrics["train/rollout_teacher_logp_abs_diff"] = float(gap.mean()) if gap.numel() else 0.0
        if not from_teacher and not self.args.use_rollout_logprobs and data.get("rollout_log_probs") is not None:
            # engine vs trainer log-probs of the same tokens under the same weights: ~0 unless the engines
            # run other weights (a failed push) or another numerics path
            engine = torch.cat(
                [t.double() for t in _per_sample(data, "rollout_log_probs", "rollout_log_probs", resp_lens)]
            )
            metrics["train/rollout_logp_abs_diff"] = float((engine - torch.cat(old).double()).abs().mean())
        metrics["train/step"] = float(self.global_step)
        metrics["perf/log_probs_time"] = t_logp - t0
        metrics["perf/train_time"] = time.perf_counter() - t0
        self.last_rollout_id = rollout_id
        return metrics

    def _train_step(self, data, idx, old, advantages, loss_masks, where: str = "step") -> dict[str, float]:
        args = self.args
        kept_total = int(sum(int(loss_masks[i].sum()) for i in idx))
        global_tokens = max(kept_total, 1)
        global_samples = len(idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, clipped = 0.0, 0.0
        for mb in self._micro_batches(idx, args.micro_batch_size):
            if not any(bool(loss_masks[i].any()) for i in mb):
                continue  # no kept token: contributes exactly zero loss and gradient
            batch = self._batch(data, mb)
            mask = torch.cat([loss_masks[i] for i in mb])  # [N] bool
            if self.distill.active:  # --loss-type other than policy_loss
                loss = self.distill.micro_batch_loss(
                    data, mb, batch, mask, step=self.global_step, global_tokens=global_tokens,
                    global_samples=global_samples, samples_with_kept=sum(bool(loss_masks[i].any()) for i in idx),
                    sparse=self.sparse,
                )  # fmt: skip
                loss.backward()
                loss_sum += float(loss.detach())
                continue
            old_mb = torch.cat([old[i] for i in mb])
            adv_mb = torch.cat([advantages[i] for i in mb])
            if self.sparse:
                sel = mask.nonzero().squeeze(-1)  # LM head only at kept positions
                rows_mask = torch.ones(sel.numel(), dtype=torch.bool)
            else:
                sel = torch.arange(mask.numel())
                rows_mask = mask
            logp = sampled_token_log_probs(
                self.model,
                batch,
                select=sel,
                temperature=args.rollout_temperature,
                sparse=self.sparse,
                chunk_size=args.lm_head_chunk_size,
            )
            dev = logp.device
            loss, n_clipped = policy_loss(
                args,
                logp,
                old_mb[sel].to(dev, logp.dtype),
                adv_mb[sel].to(dev, logp.dtype),
                rows_mask.to(dev),
                batch.sample_index[sel].to(dev),
                global_token_count=global_tokens,
                global_sample_count=global_samples,
            )
            loss.backward()
            loss_sum += float(loss.detach())
            clipped += float(n_clipped)
        if args.clip_grad and args.clip_grad > 0:  # a non-finite norm leaves the grads unscaled: never applied
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        else:
            grads = [p.grad.detach().double().norm() for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
        lr = self._lr()
        skipped = 0.0
        if step_is_finite(
            loss_sum, float(grad_norm), args.nonfinite_policy, f"{where} (optimizer step {self.global_step})"
        ):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.global_step += 1
        else:  # --nonfinite-policy skip: drop the gradients, leave weights and AdamW state as they were
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            skipped = 1.0
        return {
            "train/loss": loss_sum,
            "train/grad_norm": float(grad_norm),
            "train/skipped_steps": skipped,
            "train/clipfrac": clipped / global_tokens,
            "train/lr": lr,
            "train/kept_tokens": float(kept_total),
            "train/samples": float(global_samples),
        }

    def _lr(self) -> float:
        """LR of the next optimizer step: a function of the applied steps alone (resume-safe)."""
        return lr_at(self.global_step, self.lr_schedule)

    @staticmethod
    def _rollout_metrics(old, teacher, loss_masks, resp_lens, from_teacher: bool = False) -> dict[str, float]:
        out = {
            "train/response_length_mean": float(np.mean(resp_lens)) if resp_lens else 0.0,
            "train/response_tokens": float(sum(resp_lens)),
        }
        if from_teacher and teacher is not None and sum(resp_lens) > 0:
            # the SFT baseline's responses are the teacher's samples: log p_T(y) − log p_S(y) averages to the
            # forward KL(p_T‖p_S), not the reverse KL that teacher_kl_* estimates on the student's samples
            diff = torch.cat([t - o for o, t in zip(old, teacher, strict=True)])
            out["train/teacher_fkl_sampled"] = float(diff.mean())
        elif teacher is not None and resp_lens and sum(resp_lens) > 0:
            # sampled-token reverse KL estimate, log p_S(y) − log p_T(y), under the pre-step weights
            diff = torch.cat([o - t for o, t in zip(old, teacher, strict=True)])
            kept = torch.cat(loss_masks)
            out["train/teacher_kl_all"] = float(diff.mean())
            out["train/teacher_kl_kept"] = float(diff[kept].mean()) if bool(kept.any()) else 0.0
        return out

    # ------------------------------------------------------------------ weights and checkpoints
    def _output_dir(self) -> Path:
        # absolute: the engines resolve the pushed path in their own working directory
        return Path(self.args.output_dir).resolve()

    def save_hf(self, out_dir: str | os.PathLike) -> str:
        """Write the current weights as a HF safetensors dir (atomic)."""
        return str(ckpt.save_hf_weights(self.distill.export_model(), out_dir, tokenizer_dir=self.args.hf_checkpoint))

    def update_weights(self) -> str | None:
        """Push the current weights to the rollout engines (``--weight-update-mode``): from disk (keeps only the
        newest pushed dir), over a process group with the engines or as shared tensors (slime.backends.weight_sync)."""
        if self._rank != 0:
            return None
        version = f"weight_v{self.weight_version + 1:06d}"
        state = self.distill.export_model().state_dict()  # merged weights for a LoRA student
        check_finite_weights(state.items(), f"push weights {version} to the engines")  # nothing sent or written
        self.weight_version += 1
        if pushes_tensors(self.args):
            self._weight_sender().push(unique_named_tensors(state), version)
            return version
        path = self.save_hf(self._output_dir() / WEIGHTS_SUBDIR / version)
        load_from_disk(getattr(self, "rollout_manager", None), path)
        return path

    def _weight_sender(self):
        if getattr(self, "_sender", None) is None:
            self._sender = weight_sender_for(self.args, getattr(self, "rollout_manager", None))
        return self._sender

    def save_model(self, rollout_id: int, force_sync: bool = False) -> str | None:
        """Atomic checkpoint of model + optimizer + RNG + counters under ``--save``."""
        if self._rank != 0 or self.args.save is None:
            return None
        path = ckpt.save_checkpoint(
            self.args.save,
            rollout_id,
            self.distill.export_model(),  # merged weights for a LoRA student
            None if getattr(self.args, "no_save_optim", False) else self.optimizer,
            trainer_state={"global_step": self.global_step, "weight_version": self.weight_version},
            args_snapshot=vars(self.args),  # secrets redacted by save_checkpoint
            tokenizer_dir=self.args.hf_checkpoint,
            keep_last_n=self.args.keep_last_n_checkpoints,
        )
        return str(path)

    def state_for_test(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters (tests compare runs with it)."""
        return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}

    def reset(self, args: Namespace) -> int:
        """Start another run on this rank (slime.suite: runs sharing the servers): exactly ``init(args)`` — the
        student's weights from ``--hf-checkpoint`` (or the ``--load`` checkpoint), a fresh optimizer, counters
        and RNGs seeded from ``args`` — keeping the rollout manager. Returns the start rollout id."""
        self.model = self.optimizer = self.distill = None  # the previous run's tensors go before the new ones load
        self.clear_memory()
        return self.init(args, self.role, self.with_ref, self.with_opd_teacher)

    def sleep(self, tags=None) -> None:  # the embedded backend keeps weights resident
        return None

    def wake_up(self, tags=None) -> None:
        return None
