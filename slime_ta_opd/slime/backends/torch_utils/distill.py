"""LoRA, the trainer-side teacher and the loss inputs of the torch backend (formulas: ``ta_opd``).

Every ``--loss-type`` is an entry of :data:`ta_opd.loss_registry.LOSSES` run by the shared training step
(:mod:`slime.backends.train_step`); :class:`TorchLossSource` computes the inputs an entry declares
(docs/self_distillation.md): sampled-token log-probs through the sparse LM head
(:func:`slime.backends.torch_utils.model.sampled_token_log_probs`), and the full-vocabulary student and teacher.

Rows: the response tokens of a micro-batch. Both models run their backbone over the whole
sequence (attention needs the context) and their final hidden states are gathered at the
requested rows (``[n, H]``, cheap); the LM head runs inside ``ta_opd.chunked`` through
``LMHeadInput`` only on those rows — the kept tokens (the loss mask after token selection),
``[chunk, V]`` at a time. ``--no-sparse-lm-head`` switches to the naive reference (``[n, V]``
logits). PW-OPSD gets every response row so that its position weights follow the response
position (docs/method.md §7: f_t = (i_t − 0.5)/L_b with i_t counted over the valid tokens before
selection); the other losses get the kept rows only.

Teachers (``TrainerTeacher.mode``), built when the loss reads ``teacher``:
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

from slime.backends.torch_utils.model import (
    ResponseBatch,
    build_response_batch,
    last_hidden_states,
    load_hf_model,
    sampled_token_log_probs,
)
from ta_opd.chunked import LMHeadInput
from ta_opd.loss_registry import LossSpec

logger = logging.getLogger(__name__)

TEACHER_PROMPTS_KEY = "sd_teacher_prompt_tokens"  # rollout data key (slime.ray.rollout)


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
        return self.model.get_output_embeddings()


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
    if args.opd_teacher_hf_checkpoint is not None:
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


# ------------------------------------------------------------------------------------------ loss inputs


class Distiller:
    """LoRA and the trainer-side teacher of one torch trainer (the teacher only when the loss reads one)."""

    def __init__(self, args: Namespace, model, spec: LossSpec, dtype: str, device):
        self.args = args
        self.peft_model = None
        if args.lora_rank:
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
        self.teacher = build_teacher(args, model, self.peft_model, dtype, device) if "teacher" in spec.wants else None
        if "teacher" in spec.needs and self.teacher is None:
            raise ValueError(f"--loss-type {spec.name} needs --opd-teacher-hf-checkpoint or --self-distillation")

    def provides(self) -> set[str]:
        """The loss inputs :class:`TorchLossSource` computes for this trainer."""
        return {"logp", "student"} | ({"teacher"} if self.teacher is not None else set())

    def export_model(self):
        """What gets saved / pushed to the engines: the merged model for LoRA, else the model itself."""
        return LoraExport(self.peft_model) if self.peft_model is not None else self.model

    def source(self, data: dict[str, Any], idx: list[int], batch: ResponseBatch, sparse: bool) -> TorchLossSource:
        return TorchLossSource(self, data, idx, batch, sparse)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class TorchLossSource:
    """The loss inputs of one micro-batch (``rows``: response-token indices, None = all; see the module doc)."""

    select_rows = True  # the LM head runs only on the rows a loss reads

    def __init__(self, owner: Distiller, data: dict[str, Any], idx: list[int], batch: ResponseBatch, sparse: bool):
        self.owner, self.data, self.idx, self.batch = owner, data, idx, batch
        self.model, self.sparse, self.full_logits = owner.model, sparse, not sparse
        self.device = next(self.model.parameters()).device

    def _rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(self.batch.num_tokens, device=self.device) if rows is None else rows

    def log_probs(self, rows: torch.Tensor | None) -> torch.Tensor:
        args = self.owner.args
        return sampled_token_log_probs(
            self.model, self.batch, select=self._rows(rows).cpu(), temperature=args.rollout_temperature,
            sparse=self.sparse, chunk_size=args.lm_head_chunk_size,
        )  # fmt: skip

    def student(self, rows: torch.Tensor | None) -> LMHeadInput:
        b, r = self.batch, self._rows(rows)
        hidden = last_hidden_states(self.model, b.input_ids)  # [B, T, H]
        h = hidden[b.row.to(self.device)[r], b.pred_pos.to(self.device)[r]]  # [n, H]
        head = self.model.get_output_embeddings()
        return LMHeadInput(h, head.weight, head.bias)

    def teacher(self, rows: torch.Tensor | None) -> LMHeadInput | None:
        teacher = self.owner.teacher
        if teacher is None:
            return None
        pad_id = int(self.model.config.pad_token_id or 0)
        t_batch = teacher_response_batch(self.data, self.idx, self.batch, pad_id, self.device)
        r = self._rows(rows)
        hidden = teacher.hidden(t_batch.input_ids)
        h = hidden[t_batch.row.to(self.device)[r], t_batch.pred_pos.to(self.device)[r]].detach()  # [n, H]
        head = teacher.head()
        return LMHeadInput(h, head.weight.detach(), _detach(head.bias))
