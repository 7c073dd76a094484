"""Managed real SGLang engines (extra ``sglang``; GPU only): N ``sglang.launch_server`` processes + the router.

Built from the rollout flags: ``--rollout-num-gpus`` / ``--rollout-num-gpus-per-engine`` give the engine count
and each engine's ``--tp-size``; engine i uses GPUs ``[base + i·tp, base + (i+1)·tp)``. With several engines
the ``sglang_router`` process fronts them (the rollout talks to the router; weight updates go to each engine).

Lifecycle, all by process handle (never by name):
- ``start()``: spawn every engine, wait for ``GET /health``, then the router;
- ``check_and_restart()``: an engine whose process died is restarted on the same GPUs and port, reloaded
  with the newest pushed weights, and re-registered with the router;
- ``update_weights_from_disk(path)``: ``POST /update_weights_from_disk`` on every engine (after each step);
- ``release_memory_occupation()`` / ``resume_memory_occupation()``: colocated offload/onload (engines are
  started with ``--enable-memory-saver`` when ``--offload``/``--colocate``);
- ``stop()``: terminate the processes this group started.

The process factory and the HTTP calls are injectable, so command lines and restart logic are unit-tested
with fakes on a CPU machine; the real path needs ``pip install -e '.[sglang]'`` and GPUs.
"""

from __future__ import annotations

import logging
import os
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
    """The ``python -m sglang.launch_server`` command line of one engine."""
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", spec.model_path,
        "--host", spec.host,
        "--port", str(spec.port),
        "--tp-size", str(spec.tp_size),
        "--base-gpu-id", str(spec.base_gpu_id),
        "--trust-remote-code",
        "--skip-server-warmup",
    ]  # fmt: skip
    if spec.api_key:
        cmd += ["--api-key", spec.api_key]
    if spec.memory_saver:
        cmd += ["--enable-memory-saver"]
    if spec.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    return cmd + list(spec.extra_args)


def router_command(worker_urls: list[str], host: str, port: int, python: str = sys.executable) -> list[str]:
    """The ``sglang_router.launch_router`` command line fronting ``worker_urls``."""
    return [
        python,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
    ]


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

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (owned by the child)
        env = os.environ.copy()
        if env.get("CUDA_VISIBLE_DEVICES") == "":  # a GPU-less Ray actor hides the node's GPUs; --base-gpu-id picks
            env.pop("CUDA_VISIBLE_DEVICES")
        self.process = self.popen(server_command(self.spec), stdout=out, stderr=subprocess.STDOUT, env=env)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


@dataclass
class SGLangEngineGroup:
    """N managed engines (+ router when N > 1); the handle the RolloutManager keeps."""

    engines: list[ManagedEngine]
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
        for engine in self.engines:
            engine.start()
        for engine in self.engines:
            self.wait_healthy(engine)
        if self.router_port is not None:
            self.router_process = self.popen(router_command(self.engine_urls, self.router_host, self.router_port))
            self._wait_url(self.url)
        return self

    def _wait_url(self, url: str, engine: ManagedEngine | None = None) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if engine is not None and not engine.is_alive():
                code = engine.process.poll() if engine.process is not None else None
                raise RuntimeError(f"SGLang engine {url} exited with code {code} before becoming healthy")
            try:
                self.http("GET", f"{url}/health", None, 10.0)
                return
            except Exception as e:  # not up yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not healthy after {self.ready_timeout:.0f}s: {e}") from e
            time.sleep(self.poll_interval)

    def wait_healthy(self, engine: ManagedEngine) -> None:
        self._wait_url(engine.url, engine)

    def check_and_restart(self) -> list[str]:
        """Restart every engine whose process died; returns the restarted URLs."""
        restarted = []
        for engine in self.engines:
            if engine.is_alive():
                continue
            code = engine.process.poll() if engine.process is not None else None
            logger.warning("SGLang engine %s died (exit %s): restarting", engine.url, code)
            engine.stop()
            engine.start()
            engine.restarts += 1
            self.wait_healthy(engine)
            if self.latest_weights is not None:
                self._post(engine.url, "/update_weights_from_disk", {"model_path": self.latest_weights})
            if self.router_port is not None:
                self.http("POST", f"{self.url}/add_worker?url={engine.url}", None, 30.0)
            self.events.append(f"restart {engine.url}")
            restarted.append(engine.url)
        return restarted

    def stop(self) -> None:
        if self.router_process is not None and self.router_process.poll() is None:
            self.router_process.terminate()
            try:
                self.router_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.router_process.kill()
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
) -> SGLangEngineGroup:
    """Engines (and the router when more than one) for the rollout flags; started unless ``start=False``."""
    from slime.backends.select import MissingExtraError, extra_available, install_hint

    if start and popen is subprocess.Popen and not extra_available("sglang"):
        raise MissingExtraError(install_hint("sglang"))
    if args.hf_checkpoint is None:
        raise ValueError("managed SGLang engines need --hf-checkpoint (the student)")
    if port_fn is None:
        from slime.ray.train_actor import _free_port

        port_fn = _free_port
    n = (args.rollout_num_gpus or args.rollout_num_gpus_per_engine) // args.rollout_num_gpus_per_engine
    specs = engine_specs(args, host, [port_fn() for _ in range(n)], base_gpu_id)
    engines = [
        ManagedEngine(s, popen=popen, log_path=None if log_dir is None else os.path.join(log_dir, f"sglang_{i}.log"))
        for i, s in enumerate(specs)
    ]
    group = SGLangEngineGroup(
        engines, router_host=host, router_port=port_fn() if n > 1 else None, popen=popen, http=http
    )
    return group.start() if start else group
