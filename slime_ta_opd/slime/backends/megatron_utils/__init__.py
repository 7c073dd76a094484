"""Megatron-core trainer backend (``--train-backend megatron``; extra ``megatron``).

- ``cpu_shims.py``: five CUDA-only calls redirected so GPTModel and ``torch_dist`` checkpoints run on CPU over gloo
  (tests only; a GPU run never installs them);
- ``config.py``: HF config (Qwen2 / Qwen3 / Llama) → :class:`ModelShape` → Megatron ``TransformerConfig``;
- ``convert.py``: HF ↔ Megatron state dicts with TP sharding and PP stage selection (our own documented converter);
- ``model.py``: parallel state, GPTModel from a HF config, sampled-token log-probs (vocab-parallel);
- ``checkpoint.py``: ``torch_dist`` save/load (Megatron-LM directory layout) and HF export;
- ``actor.py``: ``MegatronTrainRayActor``, the training rank, running the training step shared with the torch
  backend (:mod:`slime.backends.train_step`, losses from :mod:`ta_opd.loss_registry`) and the in-trainer teacher
  of ``--opd-type megatron``.

Nothing here imports megatron at package import time: :func:`require_megatron` raises the install hint.
"""

from __future__ import annotations


def require_megatron() -> None:
    """Raise :class:`slime.backends.extras.MissingExtraError` (with the pip line) when megatron-core is absent."""
    from slime.backends.extras import require_extra

    require_extra("megatron")
