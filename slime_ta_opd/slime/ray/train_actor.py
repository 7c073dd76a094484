"""Base class of a training rank (upstream ``slime.ray.train_actor.TrainRayActor``).

A backend subclasses it (``TorchTrainRayActor``; upstream's ``MegatronTrainRayActor``) and
implements ``train``, ``save_model`` and ``update_weights``. The class is plain Python:
``RayTrainGroup`` turns it into a Ray actor with ``ray.remote``, tests may instantiate it directly.
"""

from __future__ import annotations

import abc
import gc
import logging
import os
import socket
from argparse import Namespace
from typing import Any

logger = logging.getLogger(__name__)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrainRayActor(abc.ABC):
    def __init__(self, world_size: int = 1, rank: int = 0, master_addr: str | None = None, master_port=None):
        self._world_size = world_size
        self._rank = rank
        if master_addr:
            self.master_addr, self.master_port = master_addr, int(master_port)
        else:
            self.master_addr, self.master_port = "127.0.0.1", _free_port()
        os.environ["MASTER_ADDR"] = self.master_addr
        os.environ["MASTER_PORT"] = str(self.master_port)
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ["RANK"] = str(rank)
        # Ray hides GPUs (CUDA_VISIBLE_DEVICES="") from an actor whose bundle has none
        import torch

        self.use_gpu = torch.cuda.is_available()
        self.rollout_manager = None

    def get_master_addr_and_port(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def where(self) -> dict[str, Any]:
        """This rank's Ray node id, node IP and pid."""
        from slime.ray.cluster import where

        return where()

    def init(
        self, args: Namespace, role: str = "actor", with_ref: bool = False, with_opd_teacher: bool = False
    ) -> Any:
        self.args = args
        self.role = role
        self.with_ref = with_ref
        self.with_opd_teacher = with_opd_teacher
        return None

    def set_rollout_manager(self, rollout_manager) -> None:
        self.rollout_manager = rollout_manager

    def clear_memory(self) -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    @abc.abstractmethod
    def train(self, rollout_id: int, rollout_data_ref: Any, external_data: Any = None) -> Any: ...

    @abc.abstractmethod
    def save_model(self, rollout_id: int, force_sync: bool = False) -> Any: ...

    @abc.abstractmethod
    def update_weights(self) -> Any: ...
