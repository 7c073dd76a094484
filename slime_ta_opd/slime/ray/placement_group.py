"""Placement groups and the creation of the RolloutManager and the training group (upstream's layout).

GPU cluster: one placement group of ``{"GPU": 1, "CPU": 1}`` bundles, ordered by node IP and GPU id (a probe
actor in each bundle reports them) — the actor's ``actor_num_nodes × actor_num_gpus_per_node`` first, then
``--rollout-num-gpus`` for the engines; with ``--colocate`` both share ``max(actor, rollout)`` bundles.
The embedded torch backend trains on one rank, so it reserves one actor bundle whatever the flags say.

CPU-only machine (no GPU registered with Ray): the training ranks get ``{"CPU": 1}`` bundles; the rollout side
gets none (the embedded engines run as processes of the RolloutManager) unless ``--rollout-ray-resource`` is set:
then one ``{"CPU": 1, NAME: 1}`` bundle per engine, and each embedded engine runs on its bundle's node.

Role resources (``--actor-ray-resource``, ``--rollout-ray-resource``; slime.ray.cluster): each bundle of that role
also asks for one unit of the named custom resource, so the role lands on the nodes that offer it. Bundles are
then ordered by node and GPU within each role.
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


def embedded_engines_on_nodes(args: Namespace, use_gpu: bool) -> bool:
    """CPU cluster with ``--rollout-ray-resource``: each embedded engine gets a bundle and runs on its node."""
    return not use_gpu and args.rollout_ray_resource is not None


def placement_layout(args: Namespace, use_gpu: bool) -> tuple[int, int]:
    """``(bundles, rollout_offset)``: total bundles, and where the rollout engines' bundles start."""
    actor = actor_world_size(args)
    if not use_gpu:
        if embedded_engines_on_nodes(args, use_gpu):
            return actor + max(1, int(args.rollout_num_engines or 1)), actor
        return actor, actor
    rollout = args.rollout_num_gpus or 0
    if args.colocate:
        return max(actor, rollout), 0
    return actor + rollout, actor


def bundle_specs(args: Namespace, use_gpu: bool) -> list[dict[str, float]]:
    """The placement group's bundles in layout order: the base bundle plus each role's resource (both roles' for a
    bundle they share under ``--colocate``)."""
    num_bundles, rollout_offset = placement_layout(args, use_gpu)
    actor_n = actor_world_size(args)
    specs = []
    for i in range(num_bundles):
        spec: dict[str, float] = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        if args.actor_ray_resource and i < actor_n:
            spec[args.actor_ray_resource] = spec.get(args.actor_ray_resource, 0) + 1
        if args.rollout_ray_resource and i >= rollout_offset:
            spec[args.rollout_ray_resource] = spec.get(args.rollout_ray_resource, 0) + 1
        specs.append(spec)
    return specs


def run_resource_needs(args: Namespace, use_gpu: bool) -> dict[str, float]:
    """The Ray resources one run holds: its placement group's bundles, and one unit of ``--teacher-ray-resource``
    for a teacher server it starts there."""
    needs: dict[str, float] = {}
    for spec in bundle_specs(args, use_gpu):
        for name, n in spec.items():
            needs[name] = needs.get(name, 0) + n
    starts_teacher = args.use_opd and args.opd_type == "sglang" and args.rm_url is None
    if starts_teacher and args.teacher_ray_resource:
        needs[args.teacher_ray_resource] = needs.get(args.teacher_ray_resource, 0) + 1
    return needs


def _create_placement_group(specs: list[dict[str, float]], use_gpu: bool, role_slices: list[slice]):
    """Reserve ``specs``; returns ``(pg, bundle_indices, gpu_ids)`` with the indices ordered by node and GPU within
    each of ``role_slices`` (GPU) or in layout order (CPU)."""
    if not specs:
        return None, [], []
    from slime.ray.cluster import check_role_resources

    kind = "GPU" if use_gpu else "CPU"
    available = ray.cluster_resources().get(kind, 0)
    if available < len(specs):
        raise ValueError(
            f"the placement group needs {len(specs)} {kind}s (actor + rollout flags) but the Ray cluster has "
            f"{available:g}; lower --actor-num-gpus-per-node/--rollout-num-gpus or add nodes"
        )
    needs: dict[str, float] = {}
    for spec in specs:
        for name, n in spec.items():
            if name not in ("CPU", "GPU"):
                needs[name] = needs.get(name, 0) + n
    check_role_resources(needs)
    pg = placement_group([dict(spec) for spec in specs], strategy="PACK")
    ray.get(pg.ready())
    if not use_gpu:
        return pg, list(range(len(specs))), [None] * len(specs)
    where = probe_bundles(pg, len(specs))
    indices, gpu_ids = [], []
    for part in role_slices:  # one slice (all bundles alike) or one per role
        order = list(range(len(specs)))[part]
        sub_order, sub_ids = order_bundles([where[i] for i in order])
        indices += [order[j] for j in sub_order]
        gpu_ids += sub_ids
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
    remote = [f"--{n}-ray-resource" for n in ("teacher",) if args.teacher_ray_resource]
    if embedded_engines_on_nodes(args, use_gpu):
        remote.insert(0, "--rollout-ray-resource")
    if remote and not args.api_key:
        raise ValueError(
            f"{' and '.join(remote)} start(s) servers on other nodes, bound to the node's IP where anyone on the "
            "network could reach them: pass --api-key KEY (the engines, the router and the teacher then check it)"
        )
    num_bundles, rollout_offset = placement_layout(args, use_gpu)
    actor_n = actor_world_size(args)
    specs = bundle_specs(args, use_gpu)
    roles_differ = bool(args.actor_ray_resource or args.rollout_ray_resource) and not args.colocate
    slices = [slice(0, rollout_offset), slice(rollout_offset, None)] if roles_differ else [slice(None)]
    logger.info("placement group: %d %s bundles %s", num_bundles, "GPU" if use_gpu else "CPU", specs)
    pg, indices, gpu_ids = _create_placement_group(specs, use_gpu, slices)
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
    """The actor training group, initialised; returns it and the rollout id to start from. Where every role runs
    goes to ``<output-dir>/placement.json`` (:func:`write_placement`)."""
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
    write_placement(args, placement_report(group, rollout_manager))
    return group, start_ids[0]


def placement_report(group: RayTrainGroup, rollout_manager) -> dict[str, Any]:
    """Where each role runs, as the actors themselves report it: ``{"driver", "trainer": [per rank], and the
    RolloutManager's :meth:`~slime.ray.rollout.RolloutManager.placement` keys}``, each ``{node_id, node_ip, pid}``
    (engines and teacher also ``url``)."""
    from slime.ray.cluster import where

    report: dict[str, Any] = {"driver": where(), "trainer": group.where()}
    if rollout_manager is not None and hasattr(rollout_manager, "placement"):  # a stand-in manager may lack it
        report.update(ray.get(rollout_manager.placement.remote()))
    return report


def write_placement(args: Namespace, report: dict[str, Any]) -> None:
    """``<output-dir>/placement.json`` (atomic); nothing without ``--output-dir``."""
    import json
    import os

    if not args.output_dir:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "placement.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    nodes = {r["node_id"][:8] for r in report.get("trainer", []) + report.get("engines", [])}
    logger.info("placement: %d trainer rank(s), %d engine(s) on %d node(s): %s", len(report.get("trainer", [])),
                len(report.get("engines", [])), len(nodes), path)  # fmt: skip
