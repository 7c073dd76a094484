"""Start embedded SGLang servers (and a real sglang-router in front) as subprocesses.

Usage::

    from slime.backends.embedded_sglang.launch import launch_server, launch_engine_group

    srv = launch_server("/ckpt/student", api_key="k")          # waits for /health
    requests.post(srv.url + "/generate", json=..., headers=srv.headers)
    srv.stop()

    group = launch_engine_group("/ckpt/student", num_engines=2)  # N engines + sglang-router
    group.url            # the router: what rollout clients talk to
    group.engine_urls    # the engines: weight updates go to each of them
    group.stop()         # stops only the processes it started, by pid

Works from inside a Ray actor (plain ``subprocess`` + HTTP polling, no signals installed).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

logger = logging.getLogger(__name__)

_SERVER_MODULE = "slime.backends.embedded_sglang.server"
_API_KEY_ENV = "SGLANG_API_KEY"  # what the embedded server reads (server.API_KEY_ENV)


_RECENT_PORTS: list[int] = []  # ports handed out by this process, not yet bound by their server


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back).

    The OS readily hands the same just-released port out twice, so ports this process returned
    recently (e.g. a router's port and its metrics port, picked back to back) are never repeated.
    """
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            del _RECENT_PORTS[:-256]
            return port
    raise RuntimeError(f"could not find a free TCP port on {host} that this process has not handed out already")


def _stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _wait_http_ok(
    url: str, proc: subprocess.Popen, timeout: float, headers: dict[str, str] | None, log_path: str | None
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            if log_path and os.path.exists(log_path):
                tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"process for {url} exited with code {proc.returncode} before it was healthy\n{tail}")
        try:
            r = requests.get(url, timeout=2, headers=headers)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s (last: {last}); log: {log_path}")


@dataclass
class ServerHandle:
    """A running embedded server subprocess."""

    model_path: str
    host: str
    port: int
    api_key: str | None
    extra_args: tuple[str, ...] = ()
    log_file: str | None = None
    env: dict[str, str] | None = None
    startup_timeout: float = 180.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _log: IO[Any] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            _SERVER_MODULE,
            "--model-path",
            str(self.model_path),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        return cmd + list(self.extra_args)  # the key travels in the environment (``start``), never on the cmdline

    def start(self) -> ServerHandle:
        env = dict(os.environ)
        env.update(self.env or {})
        env.pop(_API_KEY_ENV, None)  # this handle's key, not one inherited from the caller's environment
        if self.api_key:
            env[_API_KEY_ENV] = self.api_key
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            _wait_http_ok(self.url + "/health", self.proc, self.startup_timeout, None, self.log_file)
        except Exception:
            self.stop()
            raise
        return self

    def is_alive(self) -> bool:
        """The process runs and answers /health."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop this server (only its own pid)."""
        if self.proc is not None:
            _stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> ServerHandle:
        """Stop and start again on the same port (a new pid)."""
        self.stop()
        return self.start()


def launch_server(
    model_path: str | os.PathLike,
    port: int | None = None,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    log_file: str | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> ServerHandle:
    """Start ``python -m slime.backends.embedded_sglang.server`` and wait until /health answers 200."""
    handle = ServerHandle(
        str(model_path), host, port or find_free_port(host), api_key, tuple(extra_args), log_file, env, startup_timeout
    )
    return handle.start()


@dataclass
class EngineGroup:
    """N embedded engines, optionally behind a real sglang-router."""

    engines: list[ServerHandle]
    router_proc: subprocess.Popen | None
    router_host: str
    router_port: int | None
    api_key: str | None

    @property
    def url(self) -> str:
        """What clients use: the router when there is one, else the single engine."""
        if self.router_proc is not None:
            return f"http://{self.router_host}:{self.router_port}"
        return self.engines[0].url

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def pids(self) -> list[int]:
        pids = [e.pid for e in self.engines if e.pid is not None]
        return pids + ([self.router_proc.pid] if self.router_proc is not None else [])

    def engine_alive(self, engine: ServerHandle) -> bool:
        return engine.is_alive()

    def restart_engine(self, engine: ServerHandle) -> None:
        """Same port, so the router's worker URL stays valid (weights: the initial checkpoint's)."""
        engine.restart()

    def restart_router_if_dead(self, log_dir: str | None = None) -> bool:
        """Start the router again on its port if its process exited; whether it did."""
        if self.router_proc is None or self.router_proc.poll() is None:
            return False
        logger.warning("the sglang-router (pid %s) exited: restarting it", self.router_proc.pid)
        self.router_proc, _ = launch_router(
            self.engine_urls,
            port=self.router_port,
            host=self.router_host,
            api_key=self.api_key,
            log_file=None if log_dir is None else os.path.join(log_dir, "router.log"),
        )
        return True

    def stop(self) -> None:
        """Stop the router and the engines this group started (by pid)."""
        if self.router_proc is not None:
            _stop_process(self.router_proc)
        for e in self.engines:
            e.stop()


def router_command(
    worker_urls: Sequence[str],
    host: str,
    port: int,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The ``sglang_router.launch_router`` command line fronting ``worker_urls`` (embedded and real engines).

    With ``api_key`` the router runs under ``keyed_launch``: the key must be in the child's environment as
    ``router_env(api_key)`` gives it, never on this command line."""
    from slime.backends.sglang_utils.keyed_launch import __name__ as keyed_launch

    cmd = [
        python, "-m", *([keyed_launch] if api_key else []), "sglang_router.launch_router",
        "--host", host, "--port", str(port),
        "--policy", "round_robin",
        "--log-level", "warn",
        # a request failure must not take an engine out of rotation for a minute: the RolloutManager's own
        # health checks restart dead engines (same URL, so no re-registration), and clients retry with backoff
        "--disable-circuit-breaker",
    ]  # fmt: skip
    if "--prometheus-port" not in extra_args:
        # the router's metrics endpoint defaults to a fixed port: two routers on one machine would collide
        cmd += ["--prometheus-host", host, "--prometheus-port", str(find_free_port(host))]
    return [*cmd, *extra_args, "--worker-urls", *worker_urls]


def keyed_env(api_key: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child started by ``router_command`` / ``engines.server_command``: the key (if any)
    in ``keyed_launch``'s variable, any inherited one removed."""
    from slime.backends.sglang_utils.keyed_launch import KEY_ENV

    env = dict(os.environ if base is None else base)
    env.pop(KEY_ENV, None)
    if api_key:
        env[KEY_ENV] = api_key
    return env


def launch_router(
    worker_urls: Sequence[str],
    port: int | None = None,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    log_file: str | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120.0,
) -> tuple[subprocess.Popen, int]:
    """Start ``python -m sglang_router.launch_router`` in front of ``worker_urls``; wait until it routes.

    The router binds 0.0.0.0 by default; we always pass ``--host`` (loopback unless told otherwise).
    """
    port = port or find_free_port(host)
    cmd = router_command(worker_urls, host, port, api_key, extra_args)
    env = keyed_env(api_key)
    env.setdefault("HF_HUB_OFFLINE", "1")
    out: Any = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        # /readiness answers 200 once at least one worker is registered and healthy.
        _wait_http_ok(f"http://{host}:{port}/readiness", proc, startup_timeout, headers, log_file)
    except Exception:
        _stop_process(proc)
        raise
    return proc, port


def launch_engine_group(
    model_path: str | os.PathLike,
    num_engines: int,
    api_key: str | None = None,
    router: bool = True,
    host: str = "127.0.0.1",
    router_port: int | None = None,
    extra_args: Sequence[str] = (),
    log_dir: str | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> EngineGroup:
    """Start ``num_engines`` embedded engines and (``router=True``) a sglang-router in front of them."""
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    engines: list[ServerHandle] = []
    try:
        for i in range(num_engines):
            log = os.path.join(log_dir, f"engine_{i}.log") if log_dir else None
            engines.append(
                launch_server(
                    model_path,
                    host=host,
                    api_key=api_key,
                    extra_args=extra_args,
                    log_file=log,
                    env=env,
                    startup_timeout=startup_timeout,
                )
            )
        proc = None
        port = None
        if router:
            log = os.path.join(log_dir, "router.log") if log_dir else None
            proc, port = launch_router(
                [e.url for e in engines], port=router_port, host=host, api_key=api_key, log_file=log
            )
        return EngineGroup(engines, proc, host, port, api_key)
    except Exception:
        for e in engines:
            e.stop()
        raise
