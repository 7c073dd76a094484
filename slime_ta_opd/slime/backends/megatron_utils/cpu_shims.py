"""Run Megatron-core's GPTModel, its pipeline schedules and ``torch_dist`` checkpoints on a CPU-only machine.

megatron-core 0.16 calls a few CUDA-only functions on paths that are otherwise device-agnostic:
1. ``torch.cuda.current_device()`` — the device of RoPE's ``inv_freq``, of a few status tensors and of the
   pipeline's p2p receive buffers; redirected to ``"cpu"`` (so p2p runs over gloo, which supports
   ``batch_isend_irecv``);
2. the model-parallel RNG tracker's ``fork()`` — attention dropout runs inside it; the tracker holds
   CUDA RNG states only. Redirected to a fork of the CPU RNG (dropout is 0 in every config we build);
3. ``torch.cuda.synchronize()`` — before ``torch_dist`` writes and after batched p2p; a no-op on CPU;
4. the schedules' token counter, ``torch.zeros(..., device="cuda")``: the schedules module sees a ``torch``
   whose ``zeros`` makes a CPU tensor when asked for ``"cuda"``;
5. ``weight.data.cuda()`` on the tied output-layer copy of the last pipeline stage
   (``LanguageModule.setup_embeddings_and_output_layer``, PP > 1): ``Tensor.cuda`` is the identity while
   that method runs.
Also: pass an explicit attention mask (``model.causal_mask``), because the default causal mask is
allocated on ``"cuda"``; Megatron's optimizer needs CUDA, so CPU runs use a torch optimizer.

``install_cpu_shims()`` changes nothing when CUDA is available: GPU runs use Megatron unmodified.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_INSTALLED = False


@contextlib.contextmanager
def _cpu_rng_fork(self, name: str = "model-parallel-rng"):
    with torch.random.fork_rng(devices=[]):
        yield


class _TorchWithCpuZeros:
    """``torch`` for megatron's schedules module: ``zeros(..., device="cuda")`` gives a CPU tensor."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if str(device).startswith("cuda") else device, **kwargs)


def _with_identity_tensor_cuda(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original  # type: ignore[method-assign]

    return wrapper


def install_cpu_shims() -> bool:
    """Install the redirections once (idempotent); returns True when installed (no CUDA here)."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    # on the class: trackers created later (initialize_rng_tracker) get it too
    mp_random.CudaRNGStatesTracker.fork = _cpu_rng_fork  # type: ignore[method-assign]
    schedules.torch = _TorchWithCpuZeros()  # type: ignore[attr-defined]
    LanguageModule.setup_embeddings_and_output_layer = _with_identity_tensor_cuda(  # type: ignore[method-assign]
        LanguageModule.setup_embeddings_and_output_layer
    )
    _INSTALLED = True
    return True
