"""Run Megatron-core's GPTModel and ``torch_dist`` checkpoints on a CPU-only machine (tests over gloo).

megatron-core 0.16 calls three CUDA-only functions on paths that are otherwise device-agnostic:
1. ``torch.cuda.current_device()`` — the device of RoPE's ``inv_freq`` and of a few status tensors;
   redirected to ``"cpu"``;
2. the model-parallel RNG tracker's ``fork()`` — attention dropout runs inside it; the tracker holds
   CUDA RNG states only. Redirected to a fork of the CPU RNG (dropout is 0 in every config we build);
3. ``torch.cuda.synchronize()`` — before ``torch_dist`` writes; a no-op on CPU.
Also: pass an explicit attention mask (``model.causal_mask``), because the default causal mask is
allocated on ``"cuda"``; Megatron's optimizer needs CUDA, so CPU runs use a torch optimizer.

``install_cpu_shims()`` changes nothing when CUDA is available: GPU runs use Megatron unmodified.
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


@contextlib.contextmanager
def _cpu_rng_fork(self, name: str = "model-parallel-rng"):
    with torch.random.fork_rng(devices=[]):
        yield


def install_cpu_shims() -> bool:
    """Install the redirections once (idempotent); returns True when installed (no CUDA here)."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    # on the class: trackers created later (initialize_rng_tracker) get it too
    mp_random.CudaRNGStatesTracker.fork = _cpu_rng_fork  # type: ignore[method-assign]
    _INSTALLED = True
    return True
