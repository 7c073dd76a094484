"""Which trainer and which rollout engines a run uses (``--train-backend``, ``--rollout-backend``).

``auto`` picks the embedded defaults on a machine without GPUs (the torch trainer, the embedded
SGLang-API server) and the scale-out pieces on a GPU cluster (the Megatron-core trainer, real
SGLang engines) when their extras are installed. A flag forces either side. A forced backend
whose extra is missing raises :class:`MissingExtraError` with the ``pip install`` line to run,
never an ImportError traceback from deep inside an actor.

| flag value | no GPU | GPU, extra installed | GPU, extra missing |
|---|---|---|---|
| train ``auto`` | torch | megatron | torch (warning with the install hint) |
| train ``megatron`` | error (needs CUDA) | megatron | install hint |
| rollout ``auto`` | embedded | sglang (managed engines) | embedded (warning) |
| rollout ``sglang`` | error (needs CUDA) | sglang (managed engines) | install hint |

A running router named by ``--sglang-router-ip/--sglang-router-port`` wins over everything on the
rollout side: the stack then starts no engines (``external``).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from dataclasses import dataclass

from slime.backends.extras import MissingExtraError, extra_available, install_hint

logger = logging.getLogger(__name__)

TRAIN_BACKENDS = ("auto", "torch", "megatron")
ROLLOUT_BACKENDS = ("auto", "embedded", "sglang")


def gpus_available() -> bool:
    """GPUs for the run: the Ray cluster's when Ray is up (the driver may have none), else this process's."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    import torch

    return torch.cuda.is_available()


def _gpu_backend(name: str, has_extra: bool, has_gpu: bool, no_gpu: str) -> str:
    """``name``, a backend asked for by name: its extra (of the same name) installed and a GPU visible, or an error."""
    if not has_extra:
        raise MissingExtraError(install_hint(name))
    if not has_gpu:
        raise ValueError(no_gpu)
    return name


def choose_train_backend(requested: str, has_gpu: bool, has_megatron: bool) -> str:
    """``torch`` or ``megatron`` for ``--train-backend requested`` (pure: the facts are arguments)."""
    if requested not in TRAIN_BACKENDS:
        raise ValueError(f"--train-backend must be one of {list(TRAIN_BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "megatron":
        return _gpu_backend(
            "megatron",
            has_megatron,
            has_gpu,
            "--train-backend megatron needs CUDA GPUs (Megatron's optimizer and kernels are CUDA-only); "
            "none is visible. Use --train-backend torch (or auto) on a CPU machine.",
        )
    if not has_gpu:
        return "torch"
    if not has_megatron:
        logger.warning(
            "GPUs found but megatron-core is missing: using the torch trainer. %s", install_hint("megatron")
        )
        return "torch"
    return "megatron"


def choose_rollout_backend(requested: str, has_gpu: bool, has_sglang: bool, external_router: bool) -> str:
    """``embedded``, ``sglang`` (engines managed by this stack) or ``external`` (a running router)."""
    if requested not in ROLLOUT_BACKENDS:
        raise ValueError(f"--rollout-backend must be one of {list(ROLLOUT_BACKENDS)}, got {requested!r}")
    if external_router and requested != "embedded":
        return "external"
    if requested == "embedded":
        return "embedded"
    if requested == "sglang":
        return _gpu_backend(
            "sglang",
            has_sglang,
            has_gpu,
            "--rollout-backend sglang launches real SGLang engines, which need CUDA GPUs; none is visible. "
            "Pass --sglang-router-ip/--sglang-router-port of a running router, or use the embedded engines.",
        )
    if has_gpu and has_sglang:
        return "sglang"
    if has_gpu:
        logger.warning("GPUs found but sglang is missing: using the embedded engines. %s", install_hint("sglang"))
    return "embedded"


@dataclass(frozen=True)
class BackendChoice:
    train: str  # torch | megatron
    rollout: str  # embedded | sglang | external


def resolve_backends(args: Namespace, has_gpu: bool | None = None) -> BackendChoice:
    """Both choices for a run's flags; ``has_gpu`` defaults to :func:`gpus_available`."""
    gpu = gpus_available() if has_gpu is None else has_gpu
    external = args.sglang_router_ip is not None and args.sglang_router_port
    return BackendChoice(
        train=choose_train_backend(args.train_backend, gpu, extra_available("megatron")),
        rollout=choose_rollout_backend(args.rollout_backend, gpu, extra_available("sglang"), bool(external)),
    )


def train_actor_class(args: Namespace, has_gpu: bool | None = None):
    """The training-rank class for the flags (imported only once chosen)."""
    gpu = gpus_available() if has_gpu is None else has_gpu
    backend = choose_train_backend(args.train_backend, gpu, extra_available("megatron"))
    if backend == "megatron":
        from slime.backends.megatron_utils.actor import MegatronTrainRayActor

        return MegatronTrainRayActor
    from slime.backends.torch_utils.actor import TorchTrainRayActor

    return TorchTrainRayActor
