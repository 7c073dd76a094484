"""Trainer-side losses of the torch backend other than ``policy_loss``: wiring only (formulas: ``ta_opd``).

``--loss-type`` picks the loss (docs/self_distillation.md):

- ``policy_loss`` (default): sampled-token OPD PPO-clip, METHOD.md §1 (``loss.py``; not handled here);
- a name of ``ta_opd.sd_losses.LOSSES`` (opsd, pwopsd, eopd, reopold, topk_rkl, topk_fkl, jsd;
  METHOD.md §7-8): full-vocabulary losses that need the teacher's distribution, so the teacher
  model lives in the trainer (``TrainerTeacher``);
- ``sft_loss``: −log p_S(y_t) over kept tokens;
- ``custom_loss``: ``--custom-loss-function-path pkg.mod.fn``, called as ``fn(args, inputs)`` with the
  ``SDLossInputs`` below; returns a ``LossOutput`` or a scalar tensor.

Rows: the response tokens of a micro-batch. Both models run their backbone over the whole
sequence (attention needs the context) and their final hidden states are gathered at the
response rows (``[N, H]``, cheap); the LM head runs inside ``ta_opd.chunked`` through
``LMHeadInput`` only on rows whose loss coefficient is non-zero, i.e. the kept tokens (the loss
mask after token selection), ``[chunk, V]`` at a time. ``--no-sparse-lm-head`` switches to the
naive reference (``[N, V]`` logits of the response rows). PW-OPSD gets every response row so
that its position weights follow the response position (METHOD.md §7: f_t = (i_t − 0.5)/L_b with
i_t counted over the valid tokens before selection); the other losses get the kept rows only.

Teachers (``TrainerTeacher.mode``):
- ``hf``: ``--opd-teacher-hf-checkpoint`` loaded frozen next to the student (same vocabulary);
- ``self-lora``: ``--self-distillation --lora-rank R``: the student with its adapter disabled
  (``with peft_model.disable_adapter():``) — the base weights, no second copy;
- ``self-frozen``: ``--self-distillation`` without LoRA: a frozen copy of the initial weights
  (``--hf-checkpoint``), one more set of weights in memory (no gradients or optimizer state:
  about +25 % over the student's float32 weights + gradients + two AdamW moments).
With ``--self-distillation`` the teacher reads the privileged prompt of
``slime.rollout.self_distillation`` (``sd_teacher_prompt_tokens`` in the rollout data).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from typing import Any

import torch

from slime.backends.torch_utils.loss import reduction_mode
from slime.backends.torch_utils.model import (
    ResponseBatch,
    _backbone_and_head,
    build_response_batch,
    last_hidden_states,
    load_hf_model,
    sampled_token_log_probs,
)
from ta_opd.chunked import LMHeadInput, auto_chunk_size, chunked_token_stats, vocab_size
from ta_opd.losses import agg_loss
from ta_opd.sd_kernels import gather_logprobs, teacher_topk
from ta_opd.sd_losses import LOSSES, LossOutput, SDLossConfig, SDLossInputs

logger = logging.getLogger(__name__)

TEACHER_PROMPTS_KEY = "sd_teacher_prompt_tokens"  # rollout data key (slime.ray.rollout)
PER_SAMPLE_POSITION_LOSSES = ("pwopsd",)  # losses that see every response row (position weights)


def sd_loss_config(args: Namespace) -> SDLossConfig:
    """The frozen ``ta_opd`` config from the flags (``_add_self_distillation_arguments``)."""
    return SDLossConfig(
        temperature=args.sd_temperature,
        fkl_clip=args.opsd_clip,
        position_w_min=args.pwopsd_w_min,
        position_tau=args.pwopsd_tau,
        position_s=args.pwopsd_s,
        pwopsd_reduction="seq-mean-token-mean" if args.pwopsd_reduction == "per-sample" else "token-mean",
        reduction=args.sd_reduction,
        eopd_eps_clip=args.eopd_eps_clip,
        eopd_entropy_gate=args.eopd_entropy_gate,
        eopd_topk=args.eopd_topk,
        reopold_lambda=args.reopold_lambda,
        reopold_warmup_steps=args.reopold_warmup_steps,
        reopold_entropy_percentile=args.reopold_entropy_percentile,
        eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high,
        topk_tail_bucket=args.topk_fkl_tail_bucket,
        topk_renormalize_teacher=args.topk_fkl_renormalize_teacher,
        jsd_beta=args.jsd_beta,
        jsd_normalize=args.jsd_normalize,
        chunk_size=args.sd_chunk_size,
    )


# ------------------------------------------------------------------------------------------ LoRA


def apply_lora(model, args: Namespace):
    """Wrap ``model`` in a peft LoRA adapter (``--lora-rank/--lora-alpha/--lora-target-modules``)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise ValueError(f"--lora-target-modules is empty: {args.lora_target_modules!r}")
        head_names = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
        if any(t in head_names or t == "lm_head" for t in targets):
            raise ValueError("--lora-target-modules must not include the LM head (the teacher shares it)")
    config = LoraConfig(
        r=int(args.lora_rank),
        lora_alpha=float(args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank),
        lora_dropout=float(args.lora_dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged_lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The HF state dict of base + scaled B·A, without touching the live weights (no merge/unmerge drift)."""
    from peft.tuners.lora import LoraLayer

    hf = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in hf.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).detach()
                key = f"{name}.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = (value + deltas[clean].to(value.dtype)) if clean in deltas else value
    if getattr(hf.config, "tie_word_embeddings", False):  # saved once, as the input embedding (HF convention)
        head = hf.get_output_embeddings()
        out.pop(next(f"{n}.weight" for n, m in hf.named_modules() if m is head), None)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


class LoraExport:
    """What the checkpoint writer saves for a LoRA student: the merged HF model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged HF weights (what a save or a tensor push sends; checked for NaN/inf before either)."""
        return merged_lora_state_dict(self.peft_model)

    def save_pretrained(self, out, **kwargs):
        kwargs.pop("state_dict", None)
        hf = self.peft_model.get_base_model()
        return hf.save_pretrained(out, state_dict=merged_lora_state_dict(self.peft_model), **kwargs)


# --------------------------------------------------------------------------------------- teacher


class TrainerTeacher:
    """The teacher's final hidden states at response rows and its LM head (no grad)."""

    def __init__(self, mode: str, model, peft_model=None):
        self.mode = mode  # "hf" | "self-lora" | "self-frozen"
        self.model = model  # the HF module whose backbone and head score (the student's, for self-lora)
        self.peft_model = peft_model

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, H] final hidden states of the teacher (eval mode: no dropout)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.mode == "self-lora":
                with self.peft_model.disable_adapter():
                    return last_hidden_states(self.model, input_ids)
            return last_hidden_states(self.model, input_ids)
        finally:
            self.model.train(was_training)

    def head(self):
        return _backbone_and_head(self.model)[1]


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(args: Namespace, student_hf, peft_model, dtype: str, device) -> TrainerTeacher | None:
    """The trainer-side teacher for ``args`` (None when the loss needs none)."""
    if args.self_distillation:
        if peft_model is not None:
            return TrainerTeacher("self-lora", student_hf, peft_model)
        logger.info("self-distillation without LoRA: keeping a frozen copy of %s as the teacher", args.hf_checkpoint)
        return TrainerTeacher("self-frozen", _freeze(load_hf_model(args.hf_checkpoint, dtype=dtype, device=device)))
    if args.opd_teacher_hf_checkpoint is not None and args.loss_type != "policy_loss":
        teacher = _freeze(load_hf_model(args.opd_teacher_hf_checkpoint, dtype=dtype, device=device))
        v_s, v_t = student_hf.config.vocab_size, teacher.config.vocab_size
        if v_s != v_t:
            raise ValueError(f"teacher vocabulary {v_t} != student vocabulary {v_s}: a full-vocabulary loss needs one")
        return TrainerTeacher("hf", teacher)
    return None


def teacher_response_batch(
    data: dict[str, Any], idx: list[int], student_batch: ResponseBatch, pad_id: int, device
) -> ResponseBatch:
    """The teacher's sequences: the privileged prompt + the same response ids (or the student's own batch)."""
    if TEACHER_PROMPTS_KEY not in data:
        return student_batch
    tokens, prompt_lens, resp_lens = [], [], []
    for i in idx:
        prompt = [int(t) for t in data[TEACHER_PROMPTS_KEY][i]]
        n = int(data["response_lengths"][i])
        seq = list(data["tokens"][i])
        tokens.append(prompt + [int(t) for t in seq[len(seq) - n :]])
        prompt_lens.append(len(prompt))
        resp_lens.append(n)
    batch = build_response_batch(tokens, prompt_lens, resp_lens, pad_id=pad_id)
    if not torch.equal(batch.target, student_batch.target):  # alignment by construction; checked anyway
        raise ValueError("teacher and student response tokens differ: the privileged context is misaligned")
    batch.input_ids = batch.input_ids.to(device)
    return batch


# ------------------------------------------------------------------------------------------ loss


class Distiller:
    """LoRA, the trainer-side teacher and the non-``policy_loss`` losses of one trainer."""

    def __init__(self, args: Namespace, model, dtype: str, device):
        self.args = args
        self.peft_model = None
        if getattr(args, "lora_rank", 0):
            if args.load is not None and os.path.isdir(args.load):
                from slime.backends.torch_utils.checkpoint import latest_checkpoint

                if latest_checkpoint(args.load) is not None:
                    raise NotImplementedError(
                        "resuming a --lora-rank run from --load is not supported: the checkpoint holds merged "
                        "weights; start from them with --hf-checkpoint <iter>/model (a new adapter)"
                    )
            self.peft_model = apply_lora(model, args)
            model = self.peft_model.get_base_model()  # the HF module, adapter layers injected and active
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("LoRA r=%d: %d trainable parameters", args.lora_rank, trainable)
        self.model = model
        self.loss_type = getattr(args, "loss_type", "policy_loss")
        self.active = self.loss_type != "policy_loss"
        # sft_loss reads no teacher distribution: no teacher weights in the trainer for it
        wants_teacher = self.loss_type in LOSSES.names() or self.loss_type == "custom_loss"
        self.teacher = build_teacher(args, model, self.peft_model, dtype, device) if wants_teacher else None
        if self.loss_type in LOSSES.names() and self.teacher is None:
            raise ValueError(f"--loss-type {self.loss_type} needs --opd-teacher-hf-checkpoint or --self-distillation")
        self.cfg = sd_loss_config(args) if self.loss_type in LOSSES.names() else None
        self.custom_fn = None
        if self.loss_type == "custom_loss":
            from slime.utils.misc import load_function

            self.custom_fn = load_function(args.custom_loss_function_path)
        self._metrics: dict[str, list[tuple[float, float]]] = {}

    def export_model(self):
        """What gets saved / pushed to the engines: the merged model for LoRA, else the model itself."""
        return LoraExport(self.peft_model) if self.peft_model is not None else self.model

    # ---------------------------------------------------------------- one micro-batch
    def micro_batch_loss(
        self,
        data: dict[str, Any],
        idx: list[int],
        batch: ResponseBatch,
        mask: torch.Tensor,
        *,
        step: int,
        global_tokens: int,
        global_samples: int,
        samples_with_kept: int,
        sparse: bool,
    ) -> torch.Tensor:
        """This micro-batch's share of the step's loss (call ``.backward()``); metrics go to ``step_metrics``."""
        args = self.args
        if self.loss_type == "sft_loss":
            sel = mask.nonzero().squeeze(-1)
            logp = sampled_token_log_probs(
                self.model, batch, select=sel, temperature=args.rollout_temperature, sparse=sparse
            )
            ones = torch.ones(sel.numel(), dtype=torch.bool, device=logp.device)
            loss = agg_loss(
                -logp, ones, reduction_mode(args), sample_index=batch.sample_index[sel].to(logp.device),
                global_token_count=global_tokens, global_sample_count=global_samples,
            )  # fmt: skip
            self._record({"sft_nll": float(-logp.detach().double().mean())}, sel.numel())
            return loss

        hidden = last_hidden_states(self.model, batch.input_ids)  # [B, T, H]
        dev = hidden.device
        h_student = hidden[batch.row.to(dev), batch.pred_pos.to(dev)]  # [N, H]
        head = _backbone_and_head(self.model)[1]
        h_teacher = t_head = None
        if self.teacher is not None:
            pad_id = int(self.model.config.pad_token_id or 0)
            t_batch = teacher_response_batch(data, idx, batch, pad_id, dev)
            t_hidden = self.teacher.hidden(t_batch.input_ids)
            h_teacher = t_hidden[t_batch.row.to(dev), t_batch.pred_pos.to(dev)].detach()  # [N, H]
            t_head = self.teacher.head()

        mask = mask.to(dev)
        rows = None if self.loss_type in PER_SAMPLE_POSITION_LOSSES else mask.nonzero().squeeze(-1)

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or rows is None else x[rows]

        student = LMHeadInput(take(h_student), head.weight, head.bias)
        teacher = None
        if h_teacher is not None:
            teacher = LMHeadInput(take(h_teacher), t_head.weight.detach(), _detach(t_head.bias))
        loss_mask = mask if rows is None else torch.ones(rows.numel(), dtype=torch.bool, device=dev)
        sample_index = take(batch.sample_index.to(dev))
        position = take(batch.position.to(dev))
        inputs = SDLossInputs(
            student=student,
            loss_mask=loss_mask,
            teacher=teacher,
            target_ids=take(batch.target.to(dev)),
            sample_index=sample_index,
            position=position,
            # positions before selection: every response token (no tool tokens in this stack's rollouts)
            valid_mask=torch.ones_like(loss_mask),
            step=step,
            global_token_count=global_tokens,
            global_sample_count=samples_with_kept if self.loss_type in PER_SAMPLE_POSITION_LOSSES else global_samples,
        )
        cfg = self.cfg if self.cfg is not None else sd_loss_config(args)
        if not sparse:
            from dataclasses import replace

            cfg = replace(cfg, chunk_size=0)  # the naive reference: [N, V] logits of the response rows
        n_kept = int(mask.sum())
        scale = 1.0
        if self.loss_type in ("topk_rkl", "topk_fkl"):
            self._add_topk_inputs(inputs, cfg)
        if self.loss_type == "reopold":
            # REOPOLD's mask M and its percentile are per call: normalise by Σ M of this micro-batch, then
            # weight the micro-batch by its share of the step's kept tokens (exact with one micro-batch)
            inputs.global_token_count = None
            scale = n_kept / max(global_tokens, 1)
        if self.loss_type == "custom_loss":
            out = self.custom_fn(args, inputs)
            out = out if isinstance(out, LossOutput) else LossOutput(out, torch.zeros(0), {})
        else:
            out = LOSSES.get(self.loss_type)(inputs, cfg)
        metrics = {k: float(v) for k, v in out.metrics.items()}
        if teacher is not None:
            metrics.update(_teacher_divergence(student, teacher, loss_mask, cfg))
        self._record(metrics, n_kept)
        return out.loss * scale

    def _add_topk_inputs(self, inputs: SDLossInputs, cfg: SDLossConfig) -> None:
        """Top-K tensors of topk_rkl (student's top-K, old = current detached) and topk_fkl (teacher's top-K)."""
        k, temp = int(self.args.sd_topk), cfg.temp(1.0)
        size = cfg.chunk_size or auto_chunk_size(vocab_size(inputs.student))
        if self.loss_type == "topk_rkl":
            s = inputs.student
            detached = LMHeadInput(s.hidden.detach(), s.weight.detach(), _detach(s.bias))
            ids, old = teacher_topk(detached, k, temperature=temp, chunk_size=size)
            inputs.student_topk_ids = ids
            inputs.student_topk_old_logp = old
            inputs.teacher_logp_on_student_topk = gather_logprobs(
                inputs.teacher, ids, temperature=temp, chunk_size=size
            )
        else:
            ids, logp = teacher_topk(inputs.teacher, k, temperature=temp, chunk_size=size)
            inputs.teacher_topk_ids, inputs.teacher_topk_logp = ids, logp

    # ---------------------------------------------------------------- metrics
    def _record(self, metrics: dict[str, float], weight: int) -> None:
        for key, value in metrics.items():
            self._metrics.setdefault(key, []).append((value, float(weight)))

    def step_metrics(self) -> dict[str, float]:
        """Kept-token-weighted means of the micro-batch metrics since the last call, as ``train/sd_*``."""
        out = {}
        for key, pairs in self._metrics.items():
            total = sum(w for _, w in pairs)
            out[f"train/sd_{key}"] = sum(v * w for v, w in pairs) / total if total > 0 else 0.0
        self._metrics = {}
        return out


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _teacher_divergence(
    student: LMHeadInput, teacher: LMHeadInput, loss_mask: torch.Tensor, cfg: SDLossConfig
) -> dict[str, float]:
    """Full-vocabulary KL(p_S‖p_T) and KL(p_T‖p_S) at τ = 1 over the kept rows (pre-step weights; no grad)."""
    rows = loss_mask.nonzero().squeeze(-1)
    if rows.numel() == 0:
        return {}

    def fn(s: torch.Tensor, t: torch.Tensor | None, ex) -> dict[str, torch.Tensor]:
        ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
        return {
            "rkl": (ls.exp() * (ls - lt)).sum(-1),
            "fkl": (lt.exp() * (lt - ls)).sum(-1),
        }

    s = LMHeadInput(student.hidden.detach(), student.weight.detach(), _detach(student.bias))
    size = cfg.chunk_size or auto_chunk_size(vocab_size(s))
    stats = chunked_token_stats(fn, s, teacher, {}, size, rows=rows)
    return {f"teacher_{k}": float(v[rows].mean()) for k, v in stats.items()}
