"""Joining a Ray cluster, and the flags that place each role on the nodes of one (docs/scaling.md).

``init_ray()``: a run joins the cluster ``RAY_ADDRESS`` names (``auto``, ``HOST:PORT``); without it the run starts a
Ray of its own on this machine (``address="local"``), even when another Ray runs here, so a cluster someone
started with ``ray start`` never receives a run that did not ask for it.

Role placement: a node offers a role's slots as a custom Ray resource (``ray start --resources '{"rollout": 2}'``)
and each role asks for one unit of its resource per bundle or actor:

- ``--actor-ray-resource NAME``: every training rank's placement-group bundle;
- ``--rollout-ray-resource NAME``: every rollout engine's bundle. On a CPU cluster this also moves the embedded
  engines out of the RolloutManager's process: each runs on the node of its bundle;
- ``--teacher-ray-resource NAME``: the teacher server (started by the run) runs on a node with that resource.

The RolloutManager and the sglang-router run on the node of the driver (the process running ``train.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Ray's own resource names: a role asking for them would take the node's CPUs or memory, not a role slot
_RESERVED = {"CPU", "GPU", "memory", "object_store_memory", "TPU", "accelerator_type"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
ROLE_FLAGS = ("actor_ray_resource", "rollout_ray_resource", "teacher_ray_resource")


def ray_resource_name(value: str) -> str:
    """argparse type of the ``--*-ray-resource`` flags: a custom resource name."""
    if not _NAME.match(value) or value in _RESERVED or value.startswith("node:"):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a custom Ray resource name; expected a name such as 'rollout' that the nodes offer "
            "with `ray start --resources '{\"rollout\": N}'` (not CPU, GPU, memory or node:*)"
        )
    return value


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster placement (docs/scaling.md)")
    for role, what in (
        ("actor", "every training rank's placement-group bundle"),
        ("rollout", "every rollout engine's bundle (CPU clusters: the embedded engines run on those nodes)"),
        ("teacher", "the teacher server started by the run (it runs on a node offering it)"),
    ):
        g.add_argument(
            f"--{role}-ray-resource",
            type=ray_resource_name,
            default=None,
            help=f"Custom Ray resource of which {what} asks for one unit. Default: none (any node).",
        )


def ray_address() -> str:
    """What ``init_ray`` connects to: ``$RAY_ADDRESS`` when set, else ``"local"`` (a new Ray on this machine)."""
    return os.environ.get(RAY_ADDRESS_ENV) or "local"


def init_ray(**kwargs) -> bool:
    """Join ``$RAY_ADDRESS`` or start a local Ray; returns whether this call connected (False: already connected).

    ``kwargs`` go to ``ray.init``; the options of a new local Ray (``num_cpus``, ``object_store_memory``) are
    dropped when joining a cluster, which refuses them."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address()
    options = {"include_dashboard": False, "logging_level": logging.WARNING, **kwargs}
    if address != "local":
        for key in ("num_cpus", "num_gpus", "object_store_memory", "resources", "labels"):
            options.pop(key, None)
    ray.init(address=address, **options)
    return True


def where() -> dict[str, object]:
    """The calling process's Ray node id, node IP and pid (what each actor reports for ``placement.json``)."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }


def alive_node_ids() -> set[str]:
    """Ids of the nodes the cluster currently counts as alive."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def missing_resources(needs: dict[str, float]) -> dict[str, tuple[float, float]]:
    """``{name: (needed, offered)}`` for every resource of ``needs`` the cluster offers less of (in total)."""
    import ray

    total = ray.cluster_resources()
    return {name: (n, total.get(name, 0)) for name, n in needs.items() if total.get(name, 0) < n}


def check_role_resources(needs: dict[str, float]) -> None:
    """Raise ValueError naming the resource when the cluster offers less of it than the bundles/actors need."""
    short = missing_resources(needs)
    if short:
        detail = "; ".join(f"{name!r}: needs {n:g}, the cluster offers {have:g}" for name, (n, have) in short.items())
        raise ValueError(
            f"the Ray cluster lacks role resources ({detail}); start the nodes with e.g. "
            "`ray start --address HEAD:PORT --resources '{\"rollout\": 1}'` or change the --*-ray-resource flags"
        )
