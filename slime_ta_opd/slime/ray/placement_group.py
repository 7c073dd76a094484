"""Placement groups and the creation of the RolloutManager and the training group (upstream's layout).

GPU cluster: one placement group of ``{"GPU": 1, "CPU": 1}`` bundles, ordered by node IP and GPU id (a probe
actor in each bundle reports them) — the actor's ``actor_num_nodes × actor_num_gpus_per_node`` first, then
``--rollout-num-gpus`` for the engines; with ``--colocate`` both share ``max(actor, rollout)`` bundles.
The embedded torch backend trains on one rank, so it reserves one actor bundle whatever the flags say.

CPU-only machine (no GPU registered with Ray): the training ranks get ``{"CPU": 1}`` bundles and
the rollout side gets none (embedded engines run as processes of the RolloutManager).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

import ray
from ray.util.placement_group import placement_group

from slime.ray.actor_group import RayTrainGroup, resolve_actor_cls

logger = logging.getLogger(__name__)

PlacementGroupInfo = tuple[Any, list[int], list[Any]]


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_world_size(args: Namespace) -> int:
    """Ranks of the training group: the flags' GPU count, or 1 for the single-rank torch backend."""
    from slime.backends.torch_utils.actor import TorchTrainRayActor

    requested = args.actor_num_nodes * args.actor_num_gpus_per_node
    if resolve_actor_cls(args) is TorchTrainRayActor:
        if requested > 1:
            logger.info("torch backend: one training rank (flags ask for %d GPUs)", requested)
        return 1
    return requested


def placement_layout(args: Namespace, use_gpu: bool) -> tuple[int, int]:
    """``(bundles, rollout_offset)``: total bundles, and where the rollout engines' bundles start."""
    actor = actor_world_size(args)
    if not use_gpu:
        return actor, actor
    rollout = args.rollout_num_gpus or 0
    if args.colocate:
        return max(actor, rollout), 0
    return actor + rollout, actor


def _create_placement_group(num_bundles: int, use_gpu: bool) -> PlacementGroupInfo:
    if num_bundles == 0:
        return None, [], []
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    available = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0)
    if available < num_bundles:
        kind = "GPUs" if use_gpu else "CPUs"
        raise ValueError(
            f"the placement group needs {num_bundles} {kind} (actor + rollout flags) but the Ray cluster has "
            f"{available:g}; lower --actor-num-gpus-per-node/--rollout-num-gpus or add nodes"
        )
    pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy="PACK")
    ray.get(pg.ready())
    if not use_gpu:
        return pg, list(range(num_bundles)), [None] * num_bundles
    indices, gpu_ids = order_bundles(probe_bundles(pg, num_bundles))
    return pg, indices, gpu_ids


def probe_bundles(pg: Any, num_bundles: int) -> list[tuple[str, int]]:
    """``(node_ip, gpu_id)`` of every bundle, by a tiny actor in each (a sliver of the bundle's GPU)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0.01)
    class _Probe:
        def where(self) -> tuple[str, int]:
            return ray.util.get_node_ip_address(), int(ray.get_gpu_ids()[0])

    probes = [
        _Probe.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(num_bundles)
    ]
    try:
        return ray.get([p.where.remote() for p in probes])
    finally:
        for p in probes:
            ray.kill(p)


def order_bundles(where: list[tuple[str, int]]) -> tuple[list[int], list[tuple[str, int]]]:
    """Bundle indices sorted by node, then GPU (so consecutive ranks and an engine's TP GPUs share a node), and
    each one's ``(node_ip, gpu_id)`` in that order."""
    order = sorted(range(len(where)), key=lambda i: (where[i][0], where[i][1]))
    return order, [where[i] for i in order]


def create_placement_groups(args: Namespace) -> dict[str, PlacementGroupInfo]:
    """``{"actor": (pg, bundle_indices, gpu_ids), "rollout": (...)}`` sized from the flags."""
    use_gpu = cluster_has_gpus()
    num_bundles, rollout_offset = placement_layout(args, use_gpu)
    logger.info("placement group: %d %s bundles", num_bundles, "GPU" if use_gpu else "CPU")
    pg, indices, gpu_ids = _create_placement_group(num_bundles, use_gpu)
    actor_n = actor_world_size(args)
    return {
        "actor": (pg, indices[:actor_n], gpu_ids[:actor_n]),
        "rollout": (pg, indices[rollout_offset:], gpu_ids[rollout_offset:]),
        "use_gpu": use_gpu,  # type: ignore[dict-item]
    }


def remove_placement_groups(pgs: dict[str, Any]) -> None:
    """Release the reserved bundles (a second run in the same Ray session needs them back)."""
    from ray.util.placement_group import remove_placement_group

    seen = set()
    for info in pgs.values():
        pg = info[0] if isinstance(info, tuple) else None
        if pg is not None and pg.id not in seen:
            seen.add(pg.id)
            remove_placement_group(pg)


def create_rollout_manager(args: Namespace, pg: PlacementGroupInfo):
    """Start the RolloutManager actor (it owns the engines, the router and the teacher server)."""
    from slime.ray.rollout import create_rollout_manager as start_rollout_manager

    return start_rollout_manager(args, pg)


def create_training_models(args: Namespace, pgs: dict[str, Any], rollout_manager) -> tuple[RayTrainGroup, int]:
    """The actor training group, initialised; returns it and the rollout id to start from."""
    use_gpu = pgs.get("use_gpu", False)
    group = RayTrainGroup(
        args,
        num_nodes=args.actor_num_nodes,
        num_gpus_per_node=args.actor_num_gpus_per_node,
        pg=pgs["actor"],
        num_gpus_per_actor=0.4 if use_gpu else 0,  # as upstream: leaves room for colocated engines
        num_cpus_per_actor=1,
    )
    start_ids = group.create(rollout_manager=rollout_manager)
    if len(set(start_ids)) != 1:
        raise RuntimeError(f"training ranks disagree on the rollout id to resume from: {start_ids}")
    return group, start_ids[0]
