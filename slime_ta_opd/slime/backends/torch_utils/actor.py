"""The embedded torch trainer: one process (CPU or one GPU) training a HF causal LM with OPD.

The training step is the backend-neutral :class:`slime.backends.train_step.TrainStep` (old log-probs,
advantages, one optimizer step per global batch, the ``--loss-type`` registry entry per micro-batch,
``--nonfinite-policy``); this backend supplies the HF model and its loss inputs (:mod:`.distill`: sparse LM
head, LoRA, the trainer-side teacher), gradient accumulation over micro-batches, and the AdamW step after
``--clip-grad``, applied only when the step's loss and gradient norm are finite.

Weights are checked for NaN/inf before every checkpoint and every push to the engines.

The class is a plain Python class (unit tests construct it directly); ``RayTrainGroup`` wraps it
with ``ray.remote``. Upstream's Megatron actor has the same method names.
"""

from __future__ import annotations

import logging
import os
import random
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slime.backends.torch_utils import checkpoint as ckpt
from slime.backends.torch_utils.distill import Distiller
from slime.backends.torch_utils.model import (
    attach_head_grad_buffer,
    load_hf_model,
    sampled_token_log_probs,
    sparse_head_matches_dense,
)
from slime.backends.train_step import WEIGHTS_SUBDIR, StepContext, TrainStep, adamw, micro_batches, response_batch
from slime.backends.weight_sync import load_from_disk, pushes_tensors, unique_named_tensors, weight_sender_for
from slime.ray.train_actor import TrainRayActor
from slime.utils.lr_schedule import LRSchedule
from slime.utils.nonfinite import check_finite_weights, step_is_finite
from ta_opd.loss_registry import LOSSES

logger = logging.getLogger(__name__)


class TorchTrainRayActor(TrainStep, TrainRayActor):
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
        dtype = args.train_dtype or ("bfloat16" if args.bf16 else "float32")
        self.model = load_hf_model(args.hf_checkpoint, dtype=dtype, device=self.device)
        # LoRA and the trainer-side teacher (distill.py); the --loss-type entry says whether it needs a teacher
        self.distill = Distiller(args, self.model, LOSSES.get(args.loss_type), dtype=dtype, device=self.device)
        self.model = self.distill.model  # the HF module (LoRA layers injected with --lora-rank)
        self.model.train()
        self.setup_loss(args, self.distill.provides(), "torch")
        self.sparse = bool(args.sparse_lm_head)
        if self.sparse and not sparse_head_matches_dense(self.model, self.model.config.vocab_size):
            logger.warning("logits != lm_head(last_hidden_state) for this model: using the dense LM-head path")
            self.sparse = False
        self.optimizer = adamw(self.model, args)
        # the sparse head writes the LM-head weight gradient straight into this persistent buffer (model.py), so a
        # step allocates no [V, H] gradient; zeroing with set_to_none keeps it (the next backward overwrites it)
        wants_logp = self.sparse and "logp" in self.loss_spec.wants
        self.head_grad_buffer = attach_head_grad_buffer(self.model) if wants_logp else None
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
            state = ckpt.load_checkpoint(latest, self.model, None if args.no_load_optim else self.optimizer)
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
    def _batch(self, data: dict[str, Any], idx: list[int]):
        return response_batch(data, idx, pad_id=int(self.model.config.pad_token_id or 0), device=self.device)

    @torch.no_grad()
    def compute_log_probs(self, data: dict[str, Any]) -> list[torch.Tensor]:
        """Sampled-token log-probs of every response token under the current weights (no grad), per sample."""
        was_training = self.model.training
        self.model.eval()
        out: list[torch.Tensor] = []
        for idx in micro_batches(list(range(len(data["tokens"]))), self.args.micro_batch_size):
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

    # ------------------------------------------------------------------ the training step's backend hooks
    def _forward_backward(self, ctx: StepContext) -> tuple[float, float]:
        """Gradient accumulation over the step's micro-batches (one rank: the sums are this rank's)."""
        loss_sum, clipped = 0.0, 0.0
        masks, data = ctx.rollout.loss_masks, ctx.rollout.data
        for mb in micro_batches(ctx.idx, self.args.micro_batch_size):
            if not any(bool(masks[i].any()) for i in mb):
                continue  # no kept token: contributes exactly zero loss and gradient
            source = self.distill.source(data, mb, self._batch(data, mb), sparse=self.sparse)
            loss, n_clipped = self.micro_batch_loss(ctx, mb, source)
            loss.backward()
            loss_sum += float(loss.detach())
            clipped += n_clipped
        return loss_sum, clipped

    def _optimizer_step(self, loss: float, where: str, lr: float) -> tuple[bool, float]:
        args = self.args
        if args.clip_grad and args.clip_grad > 0:  # a non-finite norm leaves the grads unscaled: never applied
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        else:
            grads = [p.grad.detach().double().norm() for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
        if not step_is_finite(loss, float(grad_norm), args.nonfinite_policy, where):
            return False, float(grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return True, float(grad_norm)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

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
            None if self.args.no_save_optim else self.optimizer,
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
