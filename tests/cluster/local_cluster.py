"""A real multi-node Ray cluster on this machine, started the way a user starts one (``ray start --head``, then
``ray start --address``): separate raylets, each with its own logical CPUs, a small object store, a role resource
and a ``slime-role`` label.

- ``trainer`` (the head): 2 logical CPUs, ``{"trainer": 1}``;
- ``rollout-a``: 1 logical CPU, ``{"rollout": 1}``;
- ``rollout-b``: 1 logical CPU, ``{"rollout": 1, "teacher": 1}``.

Logical CPUs are what Ray schedules by, not the machine's cores. Everything the cluster writes lives under a
fresh short temp dir (``RAY_TMPDIR``: sockets, logs, and the ``ray_current_cluster`` file that a bare
``ray.init()`` would find), and every port is a free one picked here, so it never meets another Ray on the
machine. It is stopped by pid, never with ``ray stop`` (which stops every Ray here): every process whose command
line names the temp dir, and the processes under them.

A loaded machine can start a node's agents slower than the raylet waits for them (Ray gives them 15 s, fixed);
the raylet then dies and ``ray start`` hangs. Each ``ray start`` therefore has a deadline, and the whole cluster
is started again (fresh temp dir) when one is missed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
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
    # no token authentication (Ray turns it on when ~/.ray/auth_token exists): every process is local and ours
    "RAY_AUTH_MODE": "disabled",
    # workers of every node import the test plug-ins (cluster_plugins) from here
    "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
}
# a lost node is declared dead within seconds (real clusters keep Ray's defaults: tens of seconds)
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 5000, "health_check_failure_threshold": 5}
START_DEADLINE_S = 180  # one `ray start`
ATTEMPTS = 5


@dataclass
class LocalCluster:
    address: str  # HEAD_IP:PORT, what RAY_ADDRESS holds
    temp_dir: str
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {"node_id", "raylet_pid"}

    def node_id(self, role: str) -> str:
        return self.nodes[role]["node_id"]

    def raylet_pid(self, role: str) -> int:
        return self.nodes[role]["raylet_pid"]

    def env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster (``RAY_ADDRESS``)."""
        env = dict(os.environ)
        env["RAY_ADDRESS"] = self.address
        return env

    def kill_node(self, role: str) -> list[int]:
        """The node is lost: its raylet is killed by pid, then every process under it (the node's agents, its
        workers and the servers they started), as when the machine goes away. Returns the pids killed."""
        import psutil

        raylet = psutil.Process(self.raylet_pid(role))
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:  # the raylet first
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        return [p.pid for p in victims]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kill_leftovers(temp_dir: str) -> None:
    """Every process whose command line names ``temp_dir`` (this cluster's Ray processes), and their children."""
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # never this process or what runs it
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid not in spared and any(temp_dir in part for part in p.info["cmdline"] or ()):
                found += [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = [p for p in found if p.pid not in spared]
    for p in found:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=30)


def ray_start_command(role: str, spec: dict[str, Any], head_address: str | None, port: int | None) -> list[str]:
    """``ray start`` for one node: the head (``port``) or a worker joining ``head_address``."""
    cmd = ["ray", "start", *(["--head", "--port", str(port)] if head_address is None else ["--address", head_address])]
    cmd += [
        "--num-cpus", str(spec["num_cpus"]), "--resources", json.dumps(spec["resources"]),
        "--labels", f"slime-role={role}", "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--disable-usage-stats",
        # every port a free one: never a clash with another Ray on the machine
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
    ]  # fmt: skip
    if "num_gpus" in spec:
        cmd += ["--num-gpus", str(spec["num_gpus"])]
    if head_address is None:
        cmd += ["--include-dashboard", "false", "--ray-client-server-port", str(_free_port()),
                "--system-config", json.dumps(SYSTEM_CONFIG)]  # fmt: skip
    return cmd


def _raylets(temp_dir: str) -> dict[str, dict[str, Any]]:
    """``{role: {"node_id", "raylet_pid"}}`` of the raylets running under ``temp_dir``, from their command lines."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if not cmd or not cmd[0].endswith("/raylet") or not any(temp_dir in part for part in cmd):
            continue
        line = " ".join(cmd)
        node_id, role = re.search(r"--node_id=(\w+)", line), re.search(r"slime-role\W+([\w-]+)", line)
        if node_id and role:
            found[role.group(1)] = {"node_id": node_id.group(1), "raylet_pid": p.pid}
    return found


def _start(roles: dict[str, dict[str, Any]], gpus: dict[str, str] | None, temp_dir: str) -> LocalCluster:
    port = _free_port()
    address = None
    for role, spec in roles.items():
        env = dict(os.environ)
        if gpus and role in gpus:  # the raylet detects the GPUs it sees
            env["CUDA_VISIBLE_DEVICES"] = gpus[role]
        cmd = ray_start_command(role, spec, address, port)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=START_DEADLINE_S)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd[:4])}` for {role} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
        if address is None:
            address = Path(temp_dir, "ray", "ray_current_cluster").read_text().strip()
    deadline = time.monotonic() + 60
    while len(nodes := _raylets(temp_dir)) < len(roles):
        if time.monotonic() > deadline:
            raise RuntimeError(f"raylets running: {sorted(nodes)}; expected {sorted(roles)}")
        time.sleep(0.5)
    return LocalCluster(address, temp_dir, nodes)


@contextlib.contextmanager
def start_local_cluster(roles: dict[str, dict[str, Any]] = ROLES, gpus: dict[str, str] | None = None):
    """Start one node per ``roles`` entry (the first is the head), each with its ``num_cpus``, ``resources`` (and
    ``num_gpus``); ``gpus``: a role's ``CUDA_VISIBLE_DEVICES``. Yields a :class:`LocalCluster`; always stopped."""
    saved = {k: os.environ.get(k) for k in (*ENV, "RAY_TMPDIR", "RAY_ADDRESS")}
    temp_dirs: list[str] = []
    try:
        for attempt in range(ATTEMPTS):
            temp_dirs.append(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: socket paths must fit 107 bytes
            os.environ.update(ENV, RAY_TMPDIR=temp_dirs[-1])
            os.environ.pop("RAY_ADDRESS", None)
            t0 = time.perf_counter()
            try:
                local = _start(roles, gpus, temp_dirs[-1])
                break
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                _kill_leftovers(temp_dirs[-1])
                if attempt == ATTEMPTS - 1:
                    raise
                print(f"starting the cluster failed ({str(e)[-300:]}); starting it again")
        print(f"{len(roles)}-node Ray cluster up in {time.perf_counter() - t0:.1f}s at {local.address}")
        yield local
    finally:
        for temp_dir in temp_dirs:
            _kill_leftovers(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
