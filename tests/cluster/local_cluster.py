"""A real multi-node Ray cluster on this machine: separate raylets, each with its own logical CPUs, a small
object store and a role resource, like the nodes of a real cluster (``ray.cluster_utils.Cluster``).

- ``trainer`` (the head): 2 logical CPUs, ``{"trainer": 1}``;
- ``rollout-a``: 1 logical CPU, ``{"rollout": 1}``;
- ``rollout-b``: 1 logical CPU, ``{"rollout": 1, "teacher": 1}``.

Logical CPUs are what Ray schedules by, not the machine's cores. Everything the cluster writes lives under a
fresh short temp dir (``RAY_TMPDIR``: sockets, logs, and the ``ray_current_cluster`` file that a bare
``ray.init()`` would find), all ports are picked free by Ray, and the cluster is torn down after the module
whatever happened: the Cluster's own shutdown, then any process still holding the temp dir in its command line,
and the processes under them, are killed by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OBJECT_STORE_BYTES = 80 * 1024**2
ROLES = {
    "trainer": {"num_cpus": 2, "resources": {"trainer": 1}},
    "rollout-a": {"num_cpus": 1, "resources": {"rollout": 1}},
    "rollout-b": {"num_cpus": 1, "resources": {"rollout": 1, "teacher": 1}},
}
ENV = {
    # a loaded 2-core machine starts agents slowly: the raylet must wait for them rather than abort
    "RAY_agent_register_timeout_ms": "300000",
    "RAY_raylet_start_wait_time_s": "300",
    # workers of every node import the test plug-ins (cluster_plugins) from here
    "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
}
# a lost node is declared dead within seconds (real clusters keep Ray's defaults: tens of seconds)
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 5000, "health_check_failure_threshold": 5}


@dataclass
class LocalCluster:
    cluster: Any
    temp_dir: str
    nodes: dict[str, Any] = field(default_factory=dict)  # role -> ray._private.node.Node

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_id(self, role: str) -> str:
        return self.nodes[role].node_id

    def env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster (``RAY_ADDRESS``)."""
        env = dict(os.environ)
        env["RAY_ADDRESS"] = self.address
        return env

    def raylet_pid(self, role: str) -> int:
        return self.nodes[role].all_processes["raylet"][0].process.pid

    def kill_node(self, role: str) -> list[int]:
        """The node is lost: its raylet is killed by pid, then every process under it (the node's workers and the
        servers they started) and the node's other Ray processes, as when the machine goes away."""
        import psutil

        node = self.nodes[role]
        raylet = psutil.Process(self.raylet_pid(role))
        victims = [raylet, *raylet.children(recursive=True)]
        for infos in node.all_processes.values():
            for info in infos:
                if info.process.pid != raylet.pid and psutil.pid_exists(info.process.pid):
                    victims.append(psutil.Process(info.process.pid))
        raylet.send_signal(signal.SIGKILL)
        for p in victims[1:]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        return [p.pid for p in victims]


def _kill_leftovers(temp_dir: str) -> None:
    """Every process whose command line names ``temp_dir`` (this cluster's Ray processes), and their children."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or ()):
                found += [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in found:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=30)


@contextlib.contextmanager
def start_local_cluster(roles: dict[str, dict[str, Any]] = ROLES, gpus: dict[str, str] | None = None):
    """Start one node per ``roles`` entry (the first is the head), each with its ``num_cpus``, ``resources`` (and
    ``num_gpus``); ``gpus``: a role's ``CUDA_VISIBLE_DEVICES``. Yields a :class:`LocalCluster`; always torn down."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    saved = {k: os.environ.get(k) for k in (*ENV, "RAY_TMPDIR", "RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(ENV, RAY_TMPDIR=temp_dir)
    os.environ.pop("RAY_ADDRESS", None)
    cluster = None
    t0 = time.perf_counter()
    try:
        local = None
        for role, spec in roles.items():
            if gpus and role in gpus:  # the raylet detects the GPUs it sees
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[role]
            args = {"object_store_memory": OBJECT_STORE_BYTES, **spec, "labels": {"slime-role": role}}
            if cluster is None:
                args.update(include_dashboard=False, _system_config=SYSTEM_CONFIG)
                cluster = Cluster(initialize_head=True, head_node_args=args)
                local = LocalCluster(cluster, temp_dir, {role: cluster.head_node})
            else:
                local.nodes[role] = cluster.add_node(**args)
        print(f"{len(roles)}-node Ray cluster up in {time.perf_counter() - t0:.1f}s at {cluster.address}")
        yield local
    finally:
        try:
            if cluster is not None:
                cluster.shutdown()
        finally:
            _kill_leftovers(temp_dir)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(temp_dir, ignore_errors=True)
