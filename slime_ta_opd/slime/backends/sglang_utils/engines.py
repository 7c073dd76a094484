# Over 600 lines: the managed SGLang engines and their router are one lifecycle (launch, health, restart, weights).
"""Managed real SGLang engines (extra ``sglang``; GPU only): N ``sglang.launch_server`` processes + the router.

Built from the rollout flags: ``--rollout-num-gpus`` / ``--rollout-num-gpus-per-engine`` give the engine count
and each engine's ``--tp-size``; engine i uses GPUs ``[base + i·tp, base + (i+1)·tp)``. With several engines
the ``sglang_router`` process fronts them (the rollout talks to the router; weight updates go to each engine).

Lifecycle, all by process handle (never by name):
- ``start()``: spawn every engine, wait for ``GET /health``, then the router (stops what started on failure);
- ``check_and_restart()``: an engine whose process died is restarted on the same GPUs and port and reloaded
  with the newest pushed weights (the router keeps its URL and routes to it again once healthy);
- ``engine_alive`` / ``restart_engine`` / ``restart_router_if_dead``: what the RolloutManager's health check
  calls (the embedded ``EngineGroup`` has the same three);
- ``update_weights_from_disk(path)``: ``POST /update_weights_from_disk`` on every engine (after each step);
- ``release_memory_occupation()`` / ``resume_memory_occupation()``: colocated offload/onload (engines are
  started with ``--enable-memory-saver`` when ``--offload``/``--colocate``);
- ``stop()``: terminate the processes this group started.

Placement: without a placement group the engines are processes of the caller (one node). With the rollout
part of the Ray placement group (``placement=(pg, bundle_indices, gpu_ids)``), engine i runs on the node of its
bundles ``i·tp ... i·tp + tp − 1``: a small Ray actor (``EngineHost``) pinned to the first of them starts the
server there, bound to the node's IP, with ``--base-gpu-id`` the first bundle's GPU (the placement group orders
bundles by node and GPU, and the tp bundles of one engine must be consecutive GPUs of one node). A server started
by a host actor dies with it (``PR_SET_PDEATHSIG``), so a lost worker never leaves an engine serving old weights.
The same host actors run the embedded engines on a CPU cluster (``num_engines``, ``embedded_server_command``)
and the teacher server on its node (``RemoteServer``).

A lost node (``lost_engines``: the host actor's node is no longer alive in the cluster, or the actor is gone):
``drop_engine`` takes the engine out of the group and restarts the router, on its port, with the engines that
are left; the caller redoes the step (slime.ray.rollout).

The process factory and the HTTP calls are injectable, so command lines and restart logic are unit-tested
with fakes on a CPU machine; the Ray placement is tested with real actors and embedded servers on CPU; the real
path needs ``pip install -e '.[sglang]'`` and GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Popen = Callable[..., Any]
HttpCall = Callable[[str, str, dict[str, Any] | None, float], Any]  # (method, url, json, timeout) -> json | None


def _default_http(method: str, url: str, payload: dict[str, Any] | None, timeout: float) -> Any:
    import requests

    resp = requests.request(method, url, json=payload, timeout=timeout)
    resp.raise_for_status()
    try:
        return resp.json()
    except ValueError:
        return None


def die_with_parent() -> None:
    """``preexec_fn`` of a server started by a host actor: the kernel kills it when the actor's process exits
    (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    host: str
    port: int
    base_gpu_id: int
    tp_size: int
    api_key: str | None = None
    memory_saver: bool = False
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    """The ``python -m sglang.launch_server`` command line of one engine. With an API key the server runs under
    ``keyed_launch`` and the key travels in its environment (``ManagedEngine.start``), not on this line, which
    every user of the machine can read."""
    from slime.backends.sglang_utils.keyed_launch import __name__ as keyed_launch

    cmd = [
        python, "-m", *([keyed_launch] if spec.api_key else []), "sglang.launch_server",
        "--model-path", spec.model_path,
        "--host", spec.host,
        "--port", str(spec.port),
        "--tp-size", str(spec.tp_size),
        "--base-gpu-id", str(spec.base_gpu_id),
        "--trust-remote-code",
        "--skip-server-warmup",
    ]  # fmt: skip
    if spec.memory_saver:
        cmd += ["--enable-memory-saver"]
    if spec.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    return cmd + list(spec.extra_args)


def embedded_server_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    """The embedded server's command line for ``spec`` (GPU flags dropped): the placement and restart logic of
    this module run with it on a CPU machine (tests)."""
    cmd = [python, "-m", "slime.backends.embedded_sglang.server", "--model-path", spec.model_path,
           "--host", spec.host, "--port", str(spec.port)]  # fmt: skip
    return cmd + list(spec.extra_args)  # the key: $SGLANG_API_KEY, set by ManagedEngine.start


def engine_specs(args: Namespace, host: str, ports: list[int], base_gpu_id: int = 0) -> list[EngineSpec]:
    """One spec per engine from the rollout flags (``--rollout-num-gpus``, ``--rollout-num-gpus-per-engine``)."""
    tp = args.rollout_num_gpus_per_engine
    gpus = args.rollout_num_gpus or tp
    if gpus % tp:
        raise ValueError(f"--rollout-num-gpus-per-engine {tp} must divide --rollout-num-gpus {gpus}")
    n = gpus // tp
    if len(ports) != n:
        raise ValueError(f"{n} engines need {n} ports, got {len(ports)}")
    colocated = bool(getattr(args, "colocate", False) or getattr(args, "offload", False))
    return [
        EngineSpec(
            model_path=args.hf_checkpoint,
            host=host,
            port=ports[i],
            base_gpu_id=base_gpu_id + i * tp,
            tp_size=tp,
            api_key=getattr(args, "api_key", None),
            memory_saver=colocated,
            # colocated: the trainer holds the rest of the GPU while the engines are awake
            mem_fraction_static=0.5 if getattr(args, "colocate", False) else None,
        )
        for i in range(n)
    ]


@dataclass
class ManagedEngine:
    spec: EngineSpec
    popen: Popen = subprocess.Popen
    log_path: str | None = None
    process: Any = None
    restarts: int = 0
    command_fn: Callable[[EngineSpec], list[str]] = server_command

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        if self.log_path:
            os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (owned by the child)
        from slime.backends.embedded_sglang.launch import keyed_env

        env = keyed_env(self.spec.api_key)  # read by keyed_launch (real SGLang)
        env.pop("SGLANG_API_KEY", None)
        if self.spec.api_key:
            env["SGLANG_API_KEY"] = self.spec.api_key  # read by the embedded server
        if env.get("CUDA_VISIBLE_DEVICES") == "":  # a GPU-less Ray actor hides the node's GPUs; --base-gpu-id picks
            env.pop("CUDA_VISIBLE_DEVICES")
        self.process = self.popen(self.command_fn(self.spec), stdout=out, stderr=subprocess.STDOUT, env=env)

    def is_alive(self) -> bool:
        """The process runs (``SGLangEngineGroup.engine_alive`` also asks ``/health``)."""
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


class EngineHost:
    """Runs one ``ManagedEngine`` on the node where Ray placed it (used as a Ray actor by ``RemoteEngine`` and
    ``RemoteServer``); the server dies with this actor's process (``die_with_parent``)."""

    def __init__(self, log_path: str | None = None):
        self.log_path = log_path
        self.engine: ManagedEngine | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (for the engine's spec)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def where(self) -> dict[str, Any]:
        """This actor's node id, node IP and pid, and its server's pid (None before ``start``)."""
        from slime.ray.cluster import where

        return {**where(), "server_pid": None if self.engine is None else self.engine.pid}

    def start(self, spec: EngineSpec, command_fn: Callable[[EngineSpec], list[str]] = server_command) -> int:
        if self.engine is not None:
            self.engine.stop()
        popen = functools.partial(subprocess.Popen, preexec_fn=die_with_parent)
        self.engine = ManagedEngine(spec, popen=popen, log_path=self.log_path, command_fn=command_fn)
        self.engine.start()
        return self.engine.pid

    def exit_code(self) -> int | None:
        return None if self.engine is None else self.engine.exit_code()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


# How long a call to a host actor may take before its node counts as unreachable.
HOST_CALL_TIMEOUT_S = 60.0


def host_lost(host_actor: Any, node_id: str | None) -> bool:
    """Whether a host actor's node left the cluster or the actor itself is gone (its server with it)."""
    import ray

    from slime.ray.cluster import alive_node_ids

    if node_id is not None and node_id not in alive_node_ids():
        return True
    try:
        ray.get(host_actor.exit_code.remote(), timeout=HOST_CALL_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True
    return False


def wait_url_healthy(url: str, http: HttpCall, timeout: float, poll_interval: float, engine: Any = None) -> None:
    """Poll ``GET url/health`` until it answers; raise when ``engine`` (if given) exits first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if engine is not None and not engine.is_alive():
            code = engine.exit_code()
            raise RuntimeError(f"SGLang engine {url} exited with code {code} before becoming healthy")
        try:
            http("GET", f"{url}/health", None, 10.0)
            return
        except Exception as e:  # not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout:.0f}s: {e}") from e
        time.sleep(poll_interval)


@dataclass
class RemoteEngine:
    """An engine started by an ``EngineHost`` actor on another node; the same interface as ``ManagedEngine``."""

    spec: EngineSpec
    host_actor: Any
    command_fn: Callable[[EngineSpec], list[str]] = server_command
    restarts: int = 0
    pid: int | None = None
    node: dict[str, Any] = field(default_factory=dict)  # the host actor's where() at start

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        import ray

        self.pid = ray.get(self.host_actor.start.remote(self.spec, self.command_fn))
        self.node = ray.get(self.host_actor.where.remote())

    def exit_code(self) -> int | None:
        import ray

        return ray.get(self.host_actor.exit_code.remote(), timeout=HOST_CALL_TIMEOUT_S)

    def lost(self) -> bool:
        """The node (or the host actor) is gone: the engine cannot be restarted where it was."""
        return host_lost(self.host_actor, self.node.get("node_id"))

    def is_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            return self.exit_code() is None
        except Exception:  # the host actor or its node is gone
            return False

    def stop(self, timeout: float = 30.0) -> None:
        import ray

        try:
            ray.get(self.host_actor.stop.remote(), timeout=timeout + 10)
        except Exception as e:  # the node may be gone: nothing left to stop there
            logger.warning("stopping the engine at %s failed: %s", self.url, e)

    def placement(self) -> dict[str, Any]:
        return {**self.node, "url": self.url, "server_pid": self.pid}


@dataclass
class RemoteServer:
    """A server (the teacher) started by an ``EngineHost`` actor on a node offering ``resource``; the interface of
    the embedded ``ServerHandle`` the RolloutManager uses (``url``, ``pid``, ``is_alive``, ``restart``, ``stop``).

    ``restart`` on a lost node starts a new host actor, which Ray places on another node offering ``resource``;
    when none does within ``place_timeout_s`` it raises."""

    model_path: str
    resource: str
    api_key: str | None = None
    log_path: str | None = None
    extra_args: tuple[str, ...] = ()
    place_timeout_s: float = 300.0
    http: HttpCall = _default_http
    ready_timeout: float = 600.0
    host_actor: Any = None
    spec: EngineSpec | None = None
    pid: int | None = None
    node: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.spec is not None, "not started"
        return self.spec.url

    def start(self) -> RemoteServer:
        import ray

        if self.host_actor is None:
            host_cls = ray.remote(num_cpus=0, num_gpus=0, resources={self.resource: 1})(EngineHost)
            self.host_actor = host_cls.remote(self.log_path)
        try:
            ip, port = ray.get(self.host_actor.address.remote(), timeout=self.place_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            ray.kill(self.host_actor, no_restart=True)
            self.host_actor = None
            raise RuntimeError(
                f"no live node offers the Ray resource {self.resource!r} for the teacher server (waited "
                f"{self.place_timeout_s:.0f}s); add a node with `ray start --resources '{{\"{self.resource}\": 1}}'`"
            ) from e
        self.spec = EngineSpec(self.model_path, ip, port, 0, 1, self.api_key, extra_args=self.extra_args)
        self.pid = ray.get(self.host_actor.start.remote(self.spec, embedded_server_command))
        self.node = ray.get(self.host_actor.where.remote())
        process = RemoteEngine(self.spec, self.host_actor, pid=self.pid)  # its exit code: a failed start raises
        wait_url_healthy(self.url, self.http, self.ready_timeout, 0.5, process)
        return self

    def is_alive(self) -> bool:
        """The host actor's node is alive, its server runs and answers ``/health``."""
        import ray

        if self.host_actor is None or host_lost(self.host_actor, self.node.get("node_id")):
            return False
        try:
            if ray.get(self.host_actor.exit_code.remote(), timeout=HOST_CALL_TIMEOUT_S) is not None:
                return False
            self.http("GET", f"{self.url}/health", None, 10.0)
            return True
        except Exception:
            return False

    def restart(self) -> RemoteServer:
        """Start the server again: on its node, or (node lost) on another node offering the resource."""
        import ray

        if self.host_actor is not None and host_lost(self.host_actor, self.node.get("node_id")):
            logger.warning("the teacher's node %s is lost: placing the teacher on another node offering %r",
                           self.node.get("node_id"), self.resource)  # fmt: skip
            ray.kill(self.host_actor, no_restart=True)
            self.host_actor = None
        else:
            self.stop()
        return self.start()

    def stop(self) -> None:
        import ray

        if self.host_actor is None:
            return
        try:
            ray.get(self.host_actor.stop.remote(), timeout=HOST_CALL_TIMEOUT_S)
        except Exception as e:  # the node may be gone
            logger.warning("stopping the server at %s failed: %s", self.spec.url if self.spec else "?", e)
        ray.kill(self.host_actor, no_restart=True)
        self.host_actor = None

    def placement(self) -> dict[str, Any]:
        return {**self.node, "url": self.url, "server_pid": self.pid}


def remote_engines(
    args: Namespace,
    placement: tuple[Any, list[int], list[Any]],
    log_dir: str | None = None,
    command_fn: Callable[[EngineSpec], list[str]] = server_command,
    num_engines: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[RemoteEngine]:
    """One ``RemoteEngine`` per engine, each on the node of its placement-group bundles.

    ``placement`` is the rollout part of the placement group: ``(pg, bundle_indices, gpu_ids)``, bundles
    ordered by node and GPU; ``gpu_ids[j]`` is ``(node_ip, gpu)`` or None (CPU bundles: base GPU 0). Engines: the
    rollout flags' count and TP size, or ``num_engines`` single-bundle engines (the embedded engines of a CPU
    cluster) with ``extra_args`` on their command line."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg, indices, gpu_ids = placement
    tp = 1 if num_engines else args.rollout_num_gpus_per_engine
    n = num_engines or (args.rollout_num_gpus or tp) // tp
    if len(indices) < n * tp:
        raise ValueError(f"{n} engines of {tp} GPU(s) need {n * tp} rollout bundles, the placement group has "
                         f"{len(indices)}")  # fmt: skip
    host_cls = ray.remote(num_cpus=0, num_gpus=0)(EngineHost)
    engines = []
    for i in range(n):
        mine = gpu_ids[i * tp : (i + 1) * tp]
        base_gpu = 0
        if mine and mine[0] is not None:
            nodes = {node for node, _ in mine}
            gpus = [gpu for _, gpu in mine]
            if len(nodes) != 1 or gpus != list(range(gpus[0], gpus[0] + tp)):
                raise ValueError(
                    f"engine {i} (--rollout-num-gpus-per-engine {tp}) got GPUs {mine}: an engine's GPUs must be "
                    "consecutive GPUs of one node; make --rollout-num-gpus-per-engine divide the GPUs per node"
                )
            base_gpu = gpus[0]
        actor = host_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=indices[i * tp]
            )
        ).remote(None if log_dir is None else os.path.join(log_dir, f"sglang_{i}.log"))
        ip, port = ray.get(actor.address.remote())
        if num_engines:
            spec = EngineSpec(args.hf_checkpoint, ip, port, 0, 1, getattr(args, "api_key", None),
                              extra_args=tuple(extra_args))  # fmt: skip
        else:
            spec = dataclasses.replace(engine_specs(args, ip, [port] * n)[i], base_gpu_id=base_gpu)
        engines.append(RemoteEngine(spec, actor, command_fn))
    return engines


@dataclass
class SGLangEngineGroup:
    """N managed engines (+ router when N > 1); the handle the RolloutManager keeps."""

    engines: list[Any]  # ManagedEngine (local processes) or RemoteEngine (on their placement-group nodes)
    router_host: str = "127.0.0.1"
    router_port: int | None = None
    popen: Popen = subprocess.Popen
    http: HttpCall = _default_http
    ready_timeout: float = 1800.0
    poll_interval: float = 2.0
    router_process: Any = None
    latest_weights: str | None = None
    sleeping: bool = False
    events: list[str] = field(default_factory=list)
    api_key: str | None = None
    log_dir: str | None = None

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def url(self) -> str:
        """Where rollouts go: the router, or the single engine when there is no router."""
        if self.router_port is None:
            return self.engines[0].url
        return f"http://{self.router_host}:{self.router_port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SGLangEngineGroup:
        """Start every engine, wait until all are healthy, then the router; on failure stop what started."""
        try:
            for engine in self.engines:
                engine.start()
            for engine in self.engines:
                self.wait_healthy(engine)
            if self.router_port is not None:
                self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_url(self, url: str, engine: ManagedEngine | None = None) -> None:
        wait_url_healthy(url, self.http, self.ready_timeout, self.poll_interval, engine)

    def wait_healthy(self, engine: ManagedEngine) -> None:
        self._wait_url(engine.url, engine)

    def engine_alive(self, engine: Any) -> bool:
        """The engine's process runs and ``/health`` answers."""
        if not engine.is_alive():
            return False
        try:
            self.http("GET", f"{engine.url}/health", None, 10.0)
            return True
        except Exception:
            return False

    def restart_engine(self, engine: Any) -> None:
        """Stop and start ``engine`` on the same GPUs and port and wait for it. The router keeps its URL and
        routes to it again once healthy. (Its weights are the initial checkpoint's: the caller reloads the newest.)"""
        engine.stop()
        engine.start()
        engine.restarts += 1
        self.wait_healthy(engine)
        self.events.append(f"restart {engine.url}")

    def lost_engines(self) -> list[Any]:
        """Engines whose node left the cluster (or whose host actor is gone); local engines are never lost."""
        return [e for e in self.engines if isinstance(e, RemoteEngine) and e.lost()]

    def drop_engine(self, engine: Any) -> None:
        """Take a lost engine out of the group and restart the router on its port with the engines left."""
        import ray

        self.engines = [e for e in self.engines if e is not engine]
        if isinstance(engine, RemoteEngine):
            ray.kill(engine.host_actor, no_restart=True)
        self.events.append(f"drop {engine.url}")
        if not self.engines:
            return
        if self.router_process is not None:
            self._stop_router()
            self._start_router()
            logger.warning("router %s now fronts %d engine(s): %s", self.url, len(self.engines), self.engine_urls)

    def placement(self) -> list[dict[str, Any]]:
        """Each engine's ``{node_id, node_ip, pid, url, server_pid}`` (local engines: this process's node)."""
        from slime.ray.cluster import where

        here = where()
        return [e.placement() if isinstance(e, RemoteEngine) else {**here, "url": e.url, "server_pid": e.pid}
                for e in self.engines]  # fmt: skip

    def restart_router_if_dead(self, log_dir: str | None = None) -> bool:
        """Start the router again on its port if its process exited; whether it did."""
        if self.router_process is None or self.router_process.poll() is None:
            return False
        logger.warning("the sglang router (exit %s) is down: restarting it", self.router_process.poll())
        self._start_router()
        return True

    def _start_router(self) -> None:
        from slime.backends.embedded_sglang.launch import router_command

        log = open(os.path.join(self.log_dir, "router.log"), "ab") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        from slime.backends.embedded_sglang.launch import keyed_env

        cmd = router_command(self.engine_urls, self.router_host, self.router_port, api_key=self.api_key)
        self.router_process = self.popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=keyed_env(self.api_key))
        self._wait_url(self.url)

    def check_and_restart(self) -> list[str]:
        """Restart every engine whose process died and reload the newest pushed weights; returns their URLs."""
        restarted = []
        for engine in self.engines:
            if engine.is_alive():
                continue
            logger.warning("SGLang engine %s died (exit %s): restarting", engine.url, engine.exit_code())
            self.restart_engine(engine)
            if self.latest_weights is not None:
                self._post(engine.url, "/update_weights_from_disk", {"model_path": self.latest_weights})
            restarted.append(engine.url)
        return restarted

    def _stop_router(self) -> None:
        if self.router_process is not None and self.router_process.poll() is None:
            self.router_process.terminate()
            try:
                self.router_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.router_process.kill()
                self.router_process.wait(timeout=30)

    def stop(self) -> None:
        self._stop_router()
        for engine in self.engines:
            engine.stop()

    # ------------------------------------------------------------------ weights and memory
    def _post(self, url: str, path: str, payload: dict[str, Any] | None) -> Any:
        answer = self.http("POST", f"{url}{path}", payload, 600.0)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RuntimeError(f"{url}{path} failed: {answer}")
        return answer

    def update_weights_from_disk(self, path: str) -> list[Any]:
        """Every engine loads ``path`` (restarting dead engines first, so none is left on old weights)."""
        self.check_and_restart()
        answers = [self._post(e.url, "/update_weights_from_disk", {"model_path": path}) for e in self.engines]
        self.latest_weights = path
        return answers

    def release_memory_occupation(self) -> None:
        """Colocated: free the engines' weights and KV cache while the trainer runs."""
        for e in self.engines:
            self._post(e.url, "/release_memory_occupation", {})
        self.sleeping = True

    def resume_memory_occupation(self) -> None:
        for e in self.engines:
            self._post(e.url, "/resume_memory_occupation", {})
        self.sleeping = False


def launch_sglang_engine_group(
    args: Namespace,
    host: str = "127.0.0.1",
    base_gpu_id: int = 0,
    log_dir: str | None = None,
    popen: Popen = subprocess.Popen,
    http: HttpCall = _default_http,
    port_fn: Callable[[], int] | None = None,
    start: bool = True,
    placement: tuple[Any, list[int], list[Any]] | None = None,
    command_fn: Callable[[EngineSpec], list[str]] = server_command,
    num_engines: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> SGLangEngineGroup:
    """Engines (and the router when more than one) for the rollout flags; started unless ``start=False``.

    With ``placement`` (the rollout part of the Ray placement group) each engine runs on its bundles' node
    (``remote_engines``; ``num_engines``/``extra_args``: single-bundle embedded engines); without, they are
    processes of this one."""
    from slime.backends.extras import MissingExtraError, extra_available, install_hint

    if start and popen is subprocess.Popen and command_fn is server_command and not extra_available("sglang"):
        raise MissingExtraError(install_hint("sglang"))
    if args.hf_checkpoint is None:
        raise ValueError("managed SGLang engines need --hf-checkpoint (the student)")
    if port_fn is None:
        from slime.ray.train_actor import _free_port

        port_fn = _free_port
    n = num_engines or (args.rollout_num_gpus or args.rollout_num_gpus_per_engine) // args.rollout_num_gpus_per_engine
    engines: list[Any]
    if placement is not None and placement[0] is not None:
        engines = remote_engines(args, placement, log_dir, command_fn, num_engines, extra_args)
    else:
        specs = engine_specs(args, host, [port_fn() for _ in range(n)], base_gpu_id)
        engines = [
            ManagedEngine(
                s, popen=popen, log_path=None if log_dir is None else os.path.join(log_dir, f"sglang_{i}.log"),
                command_fn=command_fn,
            )
            for i, s in enumerate(specs)
        ]  # fmt: skip
    group = SGLangEngineGroup(
        engines, router_host=host, router_port=port_fn() if n > 1 else None, popen=popen, http=http,
        api_key=getattr(args, "api_key", None), log_dir=log_dir,
    )  # fmt: skip
    return group.start() if start else group
