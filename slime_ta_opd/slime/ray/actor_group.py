"""A group of training ranks as Ray actors (upstream ``slime.ray.actor_group.RayTrainGroup``).

Methods named ``async_*`` return a list of Ray object refs (one per rank); the others block.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


def resolve_actor_cls(args: Namespace):
    """The training-rank class for ``--train-backend`` (rules in :mod:`slime.backends.select`)."""
    from slime.backends.select import train_actor_class

    return train_actor_class(args)


class RayTrainGroup:
    """``world_size`` ranks of ``actor_cls``, each pinned to one bundle of the placement group ``pg``.

    ``pg`` is ``(placement_group, bundle_indices, gpu_ids)`` as built by ``create_placement_groups``;
    ``num_gpus_per_actor`` 0 places CPU ranks (no GPU on the machine).
    """

    def __init__(
        self,
        args: Namespace,
        num_nodes: int,
        num_gpus_per_node: int,
        pg: tuple[Any, list[int], list[Any]],
        num_gpus_per_actor: float = 1,
        num_cpus_per_actor: float = 1,
        role: str = "actor",
        actor_cls=None,
    ) -> None:
        self.args = args
        self.role = role
        self._num_nodes = num_nodes
        self._num_gpus_per_node = num_gpus_per_node
        self._pg = pg
        self._num_gpus_per_actor = num_gpus_per_actor
        self._num_cpus_per_actor = num_cpus_per_actor
        self._actor_cls = actor_cls or resolve_actor_cls(args)
        self._actor_handlers: list[Any] = []
        self._rollout_manager = None

    @property
    def world_size(self) -> int:
        return len(self._pg[1])

    def _allocate(self) -> None:
        pg, bundle_indices, _ = self._pg
        remote_cls = ray.remote(self._actor_cls)
        master_addr, master_port = None, None
        for rank, bundle in enumerate(bundle_indices):
            actor = remote_cls.options(
                num_cpus=self._num_cpus_per_actor,
                num_gpus=self._num_gpus_per_actor,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle
                ),
            ).remote(len(bundle_indices), rank, master_addr, master_port)
            if rank == 0:
                master_addr, master_port = ray.get(actor.get_master_addr_and_port.remote())
            self._actor_handlers.append(actor)

    def async_init(self, rollout_manager=None) -> list[ray.ObjectRef]:
        """Start the ranks and load the model on each; refs resolve to each rank's start rollout id."""
        if not self._actor_handlers:
            self._allocate()
        self._rollout_manager = rollout_manager
        refs = [actor.init.remote(self.args, self.role) for actor in self._actor_handlers]
        if rollout_manager is not None:
            refs += [actor.set_rollout_manager.remote(rollout_manager) for actor in self._actor_handlers]
        return refs

    def create(self, rollout_manager=None) -> list[int]:
        """Blocking ``async_init``; returns the start rollout id of every rank (upstream's name)."""
        results = ray.get(self.async_init(rollout_manager))
        return results[: len(self._actor_handlers)]

    def reset(self, args: Namespace) -> int:
        """Start another run on the same ranks (slime.suite): each rank's ``reset(args)`` (weights from the student
        checkpoint or ``--load``, fresh optimizer); returns the rollout id to start from."""
        if not hasattr(self._actor_cls, "reset"):
            raise ValueError(
                f"{self._actor_cls.__name__} cannot start another run in place (no reset); "
                "run one process per entry (SHARED_SERVERS=0)"
            )
        self.args = args
        start_ids = ray.get([actor.reset.remote(args) for actor in self._actor_handlers])
        if len(set(start_ids)) != 1:
            raise RuntimeError(f"training ranks disagree on the rollout id to resume from: {start_ids}")
        return start_ids[0]

    def async_train(self, rollout_id: int, rollout_data_ref: Any) -> list[ray.ObjectRef]:
        """One rollout of training on every rank; refs resolve to each rank's metrics dict."""
        return [actor.train.remote(rollout_id, rollout_data_ref) for actor in self._actor_handlers]

    def where(self) -> list[dict[str, Any]]:
        """Each rank's ``{node_id, node_ip, pid}``, as the rank reports it."""
        return ray.get([actor.where.remote() for actor in self._actor_handlers])

    def save_model(self, rollout_id: int, force_sync: bool = False) -> list[Any]:
        return ray.get([actor.save_model.remote(rollout_id, force_sync=force_sync) for actor in self._actor_handlers])

    def update_weights(self) -> list[Any]:
        """Every rank takes part; rank 0 writes the weights and tells the rollout engines to reload them."""
        return ray.get([actor.update_weights.remote() for actor in self._actor_handlers])

    def set_rollout_manager(self, rollout_manager) -> list[Any]:
        self._rollout_manager = rollout_manager
        return ray.get([actor.set_rollout_manager.remote(rollout_manager) for actor in self._actor_handlers])

    def sleep(self, tags: Any = None) -> list[Any]:
        """Colocated runs: every rank frees what it can before the engines take the GPUs back."""
        return ray.get([actor.sleep.remote(tags) for actor in self._actor_handlers])

    def wake_up(self, tags: Any = None) -> list[Any]:
        return ray.get([actor.wake_up.remote(tags) for actor in self._actor_handlers])

    def clear_memory(self) -> list[Any]:
        return ray.get([actor.clear_memory.remote() for actor in self._actor_handlers])

    def shutdown(self) -> None:
        actors, self._actor_handlers = self._actor_handlers, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
