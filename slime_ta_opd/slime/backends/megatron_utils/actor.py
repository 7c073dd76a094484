"""The Megatron-core trainer: one rank of a TP × DP group training a GPTModel with the OPD loss.

Same method names and the same training step as the torch backend: the backend-neutral
:class:`slime.backends.train_step.TrainStep` (old log-probs, advantages, one optimizer step per global batch,
the ``--loss-type`` registry entry per micro-batch); this backend supplies (docs/method.md §1)

1. the log-probs; with ``--opd-type megatron`` the in-trainer teacher scores the same tokens;
2. the sampled-token log-probs a loss reads (``logp``: policy_loss, sft_loss; the full-vocabulary losses
   run on the torch backend);
3. the data-parallel split: the global batch is split over data-parallel ranks, each rank accumulates its
   micro-batches with the *global* sample/token counts, and gradients are **summed** over DP — so the step
   equals the torch backend's step on the whole batch;
4. Adam after gradient clipping: Megatron's (distributed) optimizer on GPU; ``torch.optim.AdamW`` on
   CPU (Megatron's optimizer is CUDA-only), with a gradient norm over the TP and PP shards. Every rank takes the
   same decision before the step: a NaN/inf loss or gradient anywhere stops the run or skips the step
   (``--nonfinite-policy``); weights are checked for NaN/inf before every checkpoint and every push.

Every forward (log-probs and training) runs through Megatron's schedule
(``megatron.core.pipeline_parallel.get_forward_backward_func()``): a plain loop over micro-batches at PP=1,
1F1B over the pipeline stages at ``--pipeline-model-parallel-size`` > 1. The loss (and the log-probs) are
computed on the last stage; log-probs are then broadcast to the other stages of the pipeline.

Weights start from ``--load`` (resume: the tracker's ``torch_dist`` iteration, or one ``iter_*`` directory; the
rule of slime.utils.run_dirs), else ``--ref-load`` (a
``torch_dist`` dir from tools/convert_hf_to_torch_dist.py), else ``--hf-checkpoint`` (converted on the fly).
TP, PP and DP are supported; context parallelism is not (it raises): Megatron's local attention refuses CP,
and splitting the sequences over CP ranks (Transformer Engine's CP attention) is not implemented here.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slime.backends.train_step import WEIGHTS_SUBDIR, StepContext, TrainStep, adamw, micro_batches, response_batch
from slime.ray.train_actor import TrainRayActor
from slime.utils.lr_schedule import LRSchedule
from slime.utils.nonfinite import NonFiniteError, check_finite_weights, first_nonfinite, step_is_finite

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _resolve_dtype(args: Namespace) -> torch.dtype:
    name = args.train_dtype or ("bfloat16" if args.bf16 else "float32")
    return DTYPES[name]


def _use_te(args: Namespace) -> bool:
    impl = args.transformer_impl
    if impl == "local" or not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if impl == "transformer_engine":
            raise ValueError("--transformer-impl transformer_engine: transformer_engine is not installed") from None
        return False
    return True


class MegatronTrainRayActor(TrainStep, TrainRayActor):
    """Trainer actor of the Megatron-core backend (one rank of the training group)."""

    def init(self, args: Namespace, role: str = "actor", with_ref: bool = False, with_opd_teacher: bool = False):
        """Build the parallel groups and the model(s); returns the rollout id to start from."""
        super().init(args, role, with_ref, with_opd_teacher)
        from slime.backends.megatron_utils import require_megatron

        require_megatron()
        from megatron.core import parallel_state as ps

        from slime.backends.megatron_utils import checkpoint as ckpt
        from slime.backends.megatron_utils.model import initialize_parallel

        tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
        if cp != 1:
            raise NotImplementedError(
                f"--context-parallel-size {cp}: the Megatron trainer supports TP, PP and DP only. CP needs "
                "Transformer Engine attention (Megatron's local attention asserts CP == 1) and the trainer does not "
                "split sequences over CP ranks yet; use --context-parallel-size 1"
            )
        if with_ref:
            raise ValueError("the Megatron backend keeps no reference model (no --kl-coef / --use-kl-loss support)")
        # the losses that read sampled-token log-probs only; the full-vocabulary ones run on --train-backend torch
        self.setup_loss(args, {"logp"}, "Megatron")
        if args.hf_checkpoint is None:
            raise ValueError("the Megatron trainer needs --hf-checkpoint (model config, tokenizer, engine weights)")
        initialize_parallel(tp, pp, cp, seed=args.seed)
        self.on_gpu = torch.cuda.is_available()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.pp_size = pp
        self.params_dtype = _resolve_dtype(args)
        self.use_te = _use_te(args)
        self.load_path = ckpt.checkpoint_to_load(args.load, args.save)  # None: start fresh
        self.model, self.shape = self._build_and_load(args)
        from slime.backends.megatron_utils.config import check_shape_flags

        check_shape_flags(args, self.shape)
        self.model.train()
        self.teacher = None
        if args.use_opd and args.opd_type == "megatron":
            self.teacher = self._build_teacher(args)
        self._build_optimizer(args)
        # the same LR schedule as the torch trainer, set on every param group before each step: Megatron's
        # OptimizerParamScheduler formulas (slime.utils.lr_schedule), a function of global_step alone
        self.lr_schedule = LRSchedule.from_args(args)
        self.global_step, self.weight_version, self.last_rollout_id = 0, 0, -1
        self.skipped_steps = 0
        start_rollout_id = 0
        if self.load_path is not None:
            state = ckpt.load_torch_dist_dir(self.model, self.load_path)
            self._load_optimizer(self.load_path)
            self.global_step = int(state.get("global_step", 0))
            self.weight_version = int(state.get("weight_version", 0))
            self.last_rollout_id = int(state.get("rollout_id", state["iteration"]))
            start_rollout_id = self.last_rollout_id + 1
            logger.info("resumed from %s: next rollout %d", self.load_path, start_rollout_id)
        return start_rollout_id

    # ------------------------------------------------------------------ building
    def _build_and_load(self, args: Namespace):
        from slime.backends.megatron_utils import checkpoint as ckpt
        from slime.backends.megatron_utils.config import shape_from_hf_config
        from slime.backends.megatron_utils.model import build_gpt_model, load_gpt_from_hf, read_hf_config

        kwargs: dict[str, Any] = {"sequence_parallel": bool(args.sequence_parallel)}
        if args.recompute_granularity:
            kwargs["recompute"] = True
        resume = self.load_path is not None
        if resume or args.ref_load is not None:
            shape = shape_from_hf_config(read_hf_config(args.hf_checkpoint))
            model = build_gpt_model(shape, params_dtype=self.params_dtype, use_te=self.use_te, **kwargs)
            model = model.cuda() if self.on_gpu else model
            if not resume:
                ckpt.load_torch_dist(model, args.ref_load)
            return model, shape
        return load_gpt_from_hf(args.hf_checkpoint, params_dtype=self.params_dtype, use_te=self.use_te, **kwargs)

    def _build_teacher(self, args: Namespace):
        """The ``--opd-type megatron`` teacher: a HF dir or a torch_dist dir (same architecture as the student)."""
        from slime.backends.megatron_utils import checkpoint as ckpt
        from slime.backends.megatron_utils.config import shape_from_hf_config
        from slime.backends.megatron_utils.convert_cli import HF_CONFIG_SUBDIR
        from slime.backends.megatron_utils.model import build_gpt_model, load_gpt_from_hf, read_hf_config

        path = Path(args.opd_teacher_load)
        if (path / "config.json").is_file():
            teacher, _ = load_gpt_from_hf(path, params_dtype=self.params_dtype, use_te=self.use_te)
        else:
            config_dir = path / HF_CONFIG_SUBDIR if (path / HF_CONFIG_SUBDIR).is_dir() else Path(args.hf_checkpoint)
            shape = shape_from_hf_config(read_hf_config(config_dir))
            teacher = build_gpt_model(shape, params_dtype=self.params_dtype, use_te=self.use_te)
            teacher = teacher.cuda() if self.on_gpu else teacher
            ckpt.load_torch_dist(teacher, path)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _build_optimizer(self, args: Namespace) -> None:
        if self.on_gpu:  # gpu: Megatron DDP (grads summed over DP) + Megatron's (distributed) Adam
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=bool(args.use_distributed_optimizer),
                calculate_per_token_loss=True,  # gradient scaling 1: our losses are already shares of the step
            )
            self.model = DistributedDataParallel(self.model.config, ddp_config, self.model)
            opt_config = OptimizerConfig(
                optimizer="adam",
                lr=args.lr,
                min_lr=args.min_lr,
                weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1,
                adam_beta2=args.adam_beta2,
                adam_eps=args.adam_eps,
                clip_grad=args.clip_grad or 0.0,
                bf16=self.params_dtype == torch.bfloat16,
                params_dtype=self.params_dtype,
                use_distributed_optimizer=bool(args.use_distributed_optimizer),
            )
            self.optimizer = get_megatron_optimizer(opt_config, [self.model])
            return
        self.optimizer = adamw(self.model, args)

    # ------------------------------------------------------------------ log-probs
    def _batch(self, data: dict[str, Any], idx: list[int]):
        return response_batch(data, idx, pad_id=0, device="cuda" if self.on_gpu else "cpu")

    def _schedule(self, model, data: dict[str, Any], micro_batches: list[list[int]], loss_fn, forward_only):
        """Run ``micro_batches`` through Megatron's schedule; returns the last stage's ``loss_fn`` outputs.

        ``loss_fn(mb, batch, logits)`` runs on the last PP stage and returns ``(loss, kept token count, outputs)``;
        the loss is already the micro-batch's share of the step (``calculate_per_token_loss``: not rescaled).
        Every stage builds the same batches: the first embeds them, the others need their shapes and masks.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from slime.backends.megatron_utils.model import forward_logits

        if not micro_batches:
            return []
        batches = [(mb, self._batch(data, mb)) for mb in micro_batches]

        def forward_step(data_iterator, model):
            mb, batch = next(data_iterator)
            return forward_logits(model, batch.input_ids), functools.partial(loss_fn, mb, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            # each micro-batch keeps its own [T, B]: p2p sends the shape first (variable_seq_lengths)
            seq_length=max(batch.input_ids.shape[1] for _, batch in batches),
            micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only,
        )

    def _from_last_stage(self, values: torch.Tensor | None, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Collective over the PP group: the last stage's flat ``values`` on every stage (CPU)."""
        from megatron.core import parallel_state as ps

        if self.pp_size == 1:
            return values
        dev = "cuda" if self.on_gpu else "cpu"
        buf = values.to(dev) if ps.is_pipeline_last_stage() else torch.empty(numel, dtype=dtype, device=dev)
        dist.broadcast(
            buf, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
        return buf.cpu()

    @torch.no_grad()
    def compute_log_probs(
        self, data: dict[str, Any], model=None, temperature: float | None = None
    ) -> list[torch.Tensor]:
        """Sampled-token log-probs (float64, CPU) of every sample's response; every TP and PP rank gets them all."""
        from megatron.core import parallel_state as ps

        from slime.backends.megatron_utils.model import response_log_probs

        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        temp = self.args.rollout_temperature if temperature is None else temperature
        resp_lens = [int(r) for r in data["response_lengths"]]

        def keep_log_probs(mb, batch, logits):
            logp = response_log_probs(logits, batch, temperature=temp)  # [N] this micro-batch's response tokens
            return logp.new_zeros(()), torch.zeros((), dtype=torch.int), {"logp": logp.double().cpu()}

        mbs = micro_batches(list(range(len(resp_lens))), self.args.micro_batch_size)
        outputs = self._schedule(model, data, mbs, keep_log_probs, forward_only=True)
        flat = None
        if ps.is_pipeline_last_stage():
            flat = torch.cat([o["logp"] for o in outputs]) if outputs else torch.zeros(0, dtype=torch.float64)
        flat = self._from_last_stage(flat, sum(resp_lens), torch.float64)
        model.train(was_training)
        return list(flat.split(resp_lens))

    # ------------------------------------------------------------------ the training step's backend hooks
    def _teacher_log_probs(self, data: dict[str, Any]) -> list[torch.Tensor] | None:
        if self.teacher is None:
            return None
        return self.compute_log_probs(data, self.teacher, temperature=self.args.opd_teacher_temperature)

    def _forward_backward(self, ctx: StepContext) -> tuple[float, float]:
        """This DP rank's share of the step (every dp_size-th sample) through the schedule; (loss, clipped) summed
        over DP and PP before the optimizer step, so that every rank knows whether the step's loss is finite."""
        from megatron.core import parallel_state as ps

        temperature = self.args.rollout_temperature

        def step_loss(mb, batch, logits):
            loss, clipped = self.micro_batch_loss(ctx, mb, _LogitsSource(logits, batch, temperature))
            # a micro-batch with no kept token still runs backward: TP ranks must take part in every collective
            kept = sum(int(ctx.rollout.loss_masks[i].sum()) for i in mb)
            return loss, torch.tensor(kept, dtype=torch.int), {"loss": float(loss.detach()), "clipped": clipped}

        mine = ctx.idx[self.dp_rank :: self.dp_size]
        mbs = micro_batches(mine, self.args.micro_batch_size)
        outputs = self._schedule(self.model, ctx.rollout.data, mbs, step_loss, forward_only=False)
        # the loss lives on the last PP stage of each DP rank: sum over DP and PP (other stages add zeros)
        totals = torch.tensor(
            [sum(o["loss"] for o in outputs), sum(o["clipped"] for o in outputs)], dtype=torch.float64
        )
        if self.dp_size > 1 or self.pp_size > 1:
            totals = totals.to("cuda" if self.on_gpu else "cpu")
            if self.dp_size > 1:
                dist.all_reduce(totals, group=ps.get_data_parallel_group())
            if self.pp_size > 1:
                dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
            totals = totals.cpu()
        return float(totals[0]), float(totals[1])

    def _reduce_loss_metrics(self, sums: dict[str, list[float]]) -> dict[str, list[float]]:
        """The loss metrics' [Σ value·weight, Σ weight] summed over DP and PP (collective; keys may differ)."""
        from megatron.core import parallel_state as ps

        groups = [ps.get_data_parallel_group()] if self.dp_size > 1 else []
        groups += [ps.get_pipeline_model_parallel_group()] if self.pp_size > 1 else []
        for group in groups:
            gathered: list[dict[str, list[float]] | None] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, sums, group=group)
            sums = {}
            for part in gathered:
                for key, (vw, w) in part.items():
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += vw
                    acc[1] += w
        return sums

    def _zero_grad(self) -> None:
        if self.on_gpu:
            self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _nonfinite_anywhere(self, local_bad: bool) -> bool:
        """Collective over every rank: whether any rank saw a non-finite value (all take the same decision)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local_bad
        flag = torch.tensor([1.0 if local_bad else 0.0], device="cuda" if self.on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _optimizer_step(self, loss: float, where: str, lr: float) -> tuple[bool, float]:
        """Reduce, check and apply the step's gradients at ``lr``; returns (applied, gradient norm). A NaN/inf loss
        or gradient on any rank is never applied (``--nonfinite-policy``: raise on every rank, or skip)."""
        policy = self.args.nonfinite_policy
        if self.on_gpu:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])  # DP reduce-scatter/all-reduce, SP layernorm and tied-embedding grads
            # Megatron's bf16/fp32 optimizer steps on NaN grads: look at every rank's (reduced) grad buffers first
            grads = [
                (n, getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad)
                for n, p in self._unwrapped().named_parameters()
                if p.requires_grad
            ]
            finite = [torch.isfinite(g).all() for _, g in grads if g is not None and g.is_floating_point()]
            bad_grad = bool(finite) and not bool(torch.stack(finite).all())  # one device sync, not one per tensor
            bad = self._nonfinite_anywhere(bad_grad or not math.isfinite(loss))
            if not step_is_finite(loss, float("nan") if bad else 0.0, policy, where):
                return False, float("nan")
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            _, grad_norm, _ = self.optimizer.step()
            return True, float(grad_norm or 0.0)
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        model = self._unwrapped()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for _, p in named:  # a rank without samples in this step still joins every all-reduce below
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        params = [p for _, p in named]
        if ps.get_tensor_model_parallel_world_size() > 1:
            # replicated weights applied to TP-sharded activations get partial grads on each TP rank: q/k norms
            # (per-head, each rank sees its heads) and, with sequence parallel, the layer norms (as Megatron's
            # finalize_model_grads does on GPU)
            for name, p in named:
                if "q_layernorm" in name or "k_layernorm" in name or getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        if self.pp_size > 1 and self.shape.tie_word_embeddings and ps.is_rank_in_embedding_group():
            # tied head under PP: the first stage's embedding and the last stage's head copy each hold their own
            # part of the one shared matrix's gradient; both take the sum, so the two copies stay equal
            dist.all_reduce(model.shared_embedding_or_output_weight().grad, group=ps.get_embedding_group())
        if self.dp_size > 1:  # SUM: each rank's loss is already its share of the step's loss
            for p in params:
                dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        # norm over the model-parallel shards: TP-sharded params count on every TP rank, replicated ones once;
        # each PP stage adds its layers; the last stage's tied-head copy (``shared``) is not counted twice
        sq = sum(
            (
                p.grad.double().pow(2).sum()
                for p in params
                if param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)
            ),
            torch.zeros((), dtype=torch.float64),
        )
        if ps.get_model_parallel_group().size() > 1:
            dist.all_reduce(sq, group=ps.get_model_parallel_group())
        grad_norm = float(sq.sqrt())
        # the norm is global (DP-summed grads, all-reduced over the model-parallel shards): every rank decides alike
        if not step_is_finite(loss, grad_norm, policy, where):
            return False, grad_norm
        if self.args.clip_grad and self.args.clip_grad > 0 and grad_norm > self.args.clip_grad:
            scale = self.args.clip_grad / (grad_norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return True, grad_norm

    # ------------------------------------------------------------------ weights and checkpoints
    def _unwrapped(self):
        return getattr(self.model, "module", self.model)

    def save_hf(self, out_dir: str | os.PathLike) -> str | None:
        """Collective: gather the weights and write a HF dir on rank 0 (returns its path there, else None).
        Weights with a NaN/inf are refused (NonFiniteError on rank 0) before anything is written."""
        from slime.backends.megatron_utils.checkpoint import gather_hf_state_dict, save_hf_dir

        hf = gather_hf_state_dict(self._unwrapped(), self.shape)
        if hf is None:
            return None
        check_finite_weights(hf.items(), f"write HF weights to {str(out_dir)!r}")
        return str(save_hf_dir(hf, out_dir, self.args.hf_checkpoint))

    def update_weights(self) -> str | None:
        """Collective: export HF weights; rank 0 sends them to the engines (``--weight-update-mode``): from disk
        (keeps the newest dir), over a process group with the engines (NCCL on GPUs) or as shared tensors
        (CUDA IPC; slime.backends.weight_sync)."""
        from slime.backends.megatron_utils.checkpoint import gather_hf_state_dict
        from slime.backends.weight_sync import load_from_disk, pushes_tensors, weight_sender_for

        self.weight_version += 1
        version = f"weight_v{self.weight_version:06d}"
        if pushes_tensors(self.args):
            hf = gather_hf_state_dict(self._unwrapped(), self.shape)  # the full HF dict on rank 0, else None
            if hf is None:
                return None
            if getattr(self, "_sender", None) is None:
                self._sender = weight_sender_for(self.args, getattr(self, "rollout_manager", None))
            self._sender.push(list(hf.items()), version)  # refuses NaN/inf tensors before sending any
            return version
        # absolute: the engines resolve the pushed path in their own working directory
        path = self.save_hf(Path(self.args.output_dir).resolve() / WEIGHTS_SUBDIR / version)
        if path is None:
            return None
        load_from_disk(getattr(self, "rollout_manager", None), path)
        return path

    def save_model(self, rollout_id: int, force_sync: bool = False) -> str | None:
        """Collective: ``torch_dist`` checkpoint ``--save/iter_{rollout_id}`` (+ optimizer unless --no-save-optim)."""
        from slime.backends.megatron_utils import checkpoint as ckpt

        if self.args.save is None:
            return None
        # every rank checks its own shards and all agree before the collective save: no rank writes NaN weights
        bad = first_nonfinite(self._unwrapped().state_dict().items())
        if self._nonfinite_anywhere(bad is not None):
            raise NonFiniteError(
                f"refusing to save checkpoint {rollout_id} under {self.args.save!r}: "
                f"{'weight ' + repr(bad) if bad else 'a weight on another rank'} holds NaN/inf; the existing "
                "checkpoints are untouched"
            )
        state = {"rollout_id": rollout_id, "global_step": self.global_step, "weight_version": self.weight_version}
        out = ckpt.save_torch_dist(self._unwrapped(), self.args.save, rollout_id, trainer_state=state)
        if not self.args.no_save_optim:
            self._save_optimizer(out)
        keep = self.args.keep_last_n_checkpoints
        if keep and dist.get_rank() == 0:
            iters = sorted(Path(self.args.save).glob("iter_*"))
            for old in iters[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return str(out)

    def _save_optimizer(self, out: Path) -> None:
        # per rank, so any optimizer (torch on CPU, Megatron's distributed one on GPU) round-trips at the same layout
        (out / "optim").mkdir(exist_ok=True)
        torch.save(self.optimizer.state_dict(), out / "optim" / f"rank{dist.get_rank():05d}.pt")
        dist.barrier()

    def _load_optimizer(self, ckpt_dir: Path) -> None:
        path = Path(ckpt_dir) / "optim" / f"rank{dist.get_rank():05d}.pt"
        if self.args.no_load_optim or not path.is_file():
            return
        try:  # weights_only: a tampered optimizer file must never run code while it is read
            state = torch.load(path, weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"optimizer state '{path}' cannot be read as plain tensors and containers ({type(e).__name__}: {e}); "
                "it is refused rather than unpickled with code execution. Resume with --no-load-optim to start the "
                "optimizer fresh from the checkpoint's weights"
            ) from e
        self.optimizer.load_state_dict(state)

    def state_for_test(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().cpu() for k, v in self._unwrapped().state_dict().items() if "extra" not in k}

    def sleep(self, tags=None) -> None:
        """Colocated runs: give cached GPU memory back before the engines wake up (weights stay resident)."""
        self.clear_memory()

    def wake_up(self, tags=None) -> None:
        return None


class _LogitsSource:
    """The loss inputs of one micro-batch from the last stage's ``[B, T, V/TP]`` logits: sampled-token log-probs
    of every response row (the loss mask selects; every TP rank joins the vocabulary-parallel collectives)."""

    select_rows = False
    full_logits = False

    def __init__(self, logits: torch.Tensor, batch, temperature: float):
        self.logits, self.batch, self.temperature, self.device = logits, batch, temperature, logits.device

    def log_probs(self, rows: torch.Tensor | None) -> torch.Tensor:
        from slime.backends.megatron_utils.model import response_log_probs

        return response_log_probs(self.logits, self.batch, select=rows, temperature=self.temperature)  # [N]

    def student(self, rows):
        raise NotImplementedError("the Megatron trainer computes sampled-token log-probs only")

    def teacher(self, rows):
        raise NotImplementedError("the Megatron trainer computes sampled-token log-probs only")
