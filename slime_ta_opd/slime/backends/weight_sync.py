"""Pushing the trainer's weights to the rollout engines without going through disk.

``--weight-update-mode disk`` (default): the trainer writes a HF dir and every engine loads it
(``POST /update_weights_from_disk``). ``--weight-update-mode distributed``: SGLang's native collective path:

1. once, ``POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name,
   backend}`` to every engine: the trainer is rank 0 of a process group of its own (not the training group),
   engine i's TP ranks are ``1 + i·tp ... 1 + i·tp + tp − 1``;
2. per update, in buckets of ``--update-weight-buffer-size`` bytes: ``POST /update_weights_from_distributed
   {names, dtypes, shapes, group_name, flush_cache, weight_version}`` to every engine while rank 0 broadcasts
   the tensors in that order; the request returns once the engine has received and loaded them;
3. ``POST /destroy_weights_update_group {group_name}`` at shutdown.

The backend is gloo on CPU (the embedded engines) and NCCL on GPUs (real SGLang). A failed request never
leaves the trainer blocked in a broadcast: the broadcast is polled while the requests are in flight, and an
engine's error answer aborts it with that error.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

WEIGHT_UPDATE_MODES = ("disk", "distributed")
DEFAULT_BUFFER_BYTES = 512 * 1024**2


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the form SGLang's request carries)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; expected a torch dtype name such as 'float32' or 'bfloat16'")
    return dtype


def unique_named_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The state dict without tensors that share storage with an earlier one (tied embeddings), in order."""
    seen: set[int] = set()
    out = []
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if ptr in seen:
            continue
        seen.add(ptr)
        out.append((name, tensor))
    return out


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_group(
    backend: str, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float
) -> Any:
    """A process group of its own (the default group, if any, is untouched): a TCPStore rendezvous + backend.

    Rank 0 hosts the store. Construction returns once every rank has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"backend {backend!r}: expected 'gloo' (CPU) or 'nccl' (GPU)")


def _post(url: str, payload: dict[str, Any], api_key: str | None, timeout: float) -> dict[str, Any]:
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = requests.post(url, json=payload, headers=headers, timeout=timeout)
    try:
        body = resp.json()
    except ValueError:
        body = {"success": False, "message": resp.text[:500]}
    if resp.status_code >= 400 or not (isinstance(body, dict) and body.get("success", True)):
        message = body.get("message") if isinstance(body, dict) else body
        raise RuntimeError(f"{url} answered {resp.status_code}: {message}")
    return body


@dataclass
class _Calls:
    """HTTP requests to every engine in threads, so that rank 0 can broadcast while they wait."""

    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def start(self, urls: list[str], path: str, payloads: list[dict[str, Any]], api_key: str | None, timeout: float):
        def call(url: str, payload: dict[str, Any]) -> None:
            try:
                _post(f"{url}{path}", payload, api_key, timeout)
            except Exception as e:  # collected: the caller raises with every engine's error
                self.errors.append(str(e))

        for url, payload in zip(urls, payloads, strict=True):
            t = threading.Thread(target=call, args=(url, payload), daemon=True, name=f"weight-sync {url}")
            t.start()
            self.threads.append(t)
        return self

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def join(self, what: str) -> None:
        for t in self.threads:
            t.join()
        if self.errors:
            raise RuntimeError(f"{what} failed: {'; '.join(self.errors)}")


class DistributedWeightSender:
    """Rank 0 of a weight-update group with the engines at ``engine_urls`` (each with ``tp_size`` ranks)."""

    def __init__(
        self,
        engine_urls: list[str],
        backend: str = "gloo",
        tp_size: int = 1,
        api_key: str | None = None,
        master_address: str = "127.0.0.1",
        group_name: str = "slime_weight_update",
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        timeout_s: float = 600.0,
        device: str | torch.device = "cpu",
    ):
        if not engine_urls:
            raise ValueError("distributed weight updates need the engines' URLs (this run owns no engines)")
        if buffer_bytes < 1:
            raise ValueError(f"--update-weight-buffer-size must be >= 1 byte, got {buffer_bytes}")
        self.engine_urls = list(engine_urls)
        self.backend, self.tp_size, self.api_key = backend, tp_size, api_key
        self.master_address, self.group_name = master_address, group_name
        self.buffer_bytes, self.timeout_s, self.device = buffer_bytes, timeout_s, torch.device(device)
        self.group: Any = None

    @property
    def world_size(self) -> int:
        return 1 + self.tp_size * len(self.engine_urls)

    def connect(self) -> None:
        """Every engine joins the group (``/init_weights_update_group``), then rank 0 does."""
        port = free_port(self.master_address)
        payloads = [
            {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": 1 + i * self.tp_size,
                "world_size": self.world_size,
                "group_name": self.group_name,
                "backend": self.backend,
            }
            for i in range(len(self.engine_urls))
        ]
        calls = _Calls().start(self.engine_urls, "/init_weights_update_group", payloads, self.api_key, self.timeout_s)
        try:
            self.group = new_group(self.backend, self.master_address, port, 0, self.world_size, self.timeout_s)
        except Exception as e:
            calls.join("init_weights_update_group")  # an engine's own error explains more than the timeout
            raise RuntimeError(f"weight-update group rendezvous failed: {e}") from e
        calls.join("init_weights_update_group")
        logger.info(
            "weight-update group %r: %d engine(s), world %d", self.group_name, len(self.engine_urls), self.world_size
        )

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> int:
        """Broadcast every tensor to every engine (bucket by bucket); returns the number of tensors sent."""
        if self.group is None:
            self.connect()
        groups = list(buckets(named_tensors, self.buffer_bytes))
        sent = 0
        for b, bucket in enumerate(groups):
            payload = {
                "names": [n for n, _ in bucket],
                "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.group_name,
                "flush_cache": b == len(groups) - 1,
            }
            if weight_version is not None:
                payload["weight_version"] = weight_version
            calls = _Calls().start(
                self.engine_urls, "/update_weights_from_distributed", [payload] * len(self.engine_urls),
                self.api_key, self.timeout_s,
            )  # fmt: skip
            for _, tensor in bucket:
                work = self.group.broadcast([tensor.detach().to(self.device).contiguous()], self._root())
                self._wait(work, calls)
            calls.join("update_weights_from_distributed")
            sent += len(bucket)
        return sent

    def _root(self) -> Any:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return opts

    def _wait(self, work: Any, calls: _Calls) -> None:
        """Wait for a broadcast; an engine that answered with an error (and so will not receive) aborts it.

        ``work.wait()`` runs in a thread of its own: gloo's ``is_completed()`` can block while the send is
        stuck, so the main thread only watches that thread and the engines' answers."""
        finished = threading.Event()
        failure: list[BaseException] = []

        def wait() -> None:
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                failure.append(e)
            finished.set()

        threading.Thread(target=wait, daemon=True, name="weight-sync broadcast").start()
        deadline = time.monotonic() + self.timeout_s
        while not finished.wait(0.005):
            if calls.errors and calls.done():
                self._abandon()  # out of step now: the next push reconnects
                calls.join("update_weights_from_distributed")
            if time.monotonic() > deadline:
                self._abandon()
                raise TimeoutError(f"weight broadcast not received within {self.timeout_s:.0f}s")
        if failure:
            self._abandon()
            raise RuntimeError(f"weight broadcast failed: {failure[0]}") from failure[0]

    def _abandon(self) -> None:
        """Drop a group that is out of step. Its destructor waits for the stuck send to time out, so the last
        reference goes away in a daemon thread, not here."""
        holder = [self.group]  # the only reference once self.group is cleared; the thread empties it
        self.group = None
        threading.Thread(target=holder.clear, daemon=True, name="weight-sync drop").start()

    def close(self) -> None:
        if self.group is None:
            return
        calls = _Calls().start(
            self.engine_urls, "/destroy_weights_update_group",
            [{"group_name": self.group_name}] * len(self.engine_urls), self.api_key, 60.0,
        )  # fmt: skip
        try:
            calls.join("destroy_weights_update_group")
        except RuntimeError as e:  # shutting down: log, do not raise
            logger.warning("%s", e)
        self.group = None


def weight_sender_for(args: Any, rollout_manager: Any) -> DistributedWeightSender:
    """The sender of a trainer's rank 0 for the engines of ``rollout_manager`` (a Ray actor handle):
    gloo for CPU engines, NCCL (tensors on the trainer's GPU) when the engines are real SGLang on GPUs."""
    if rollout_manager is None:
        raise ValueError("--weight-update-mode distributed needs the RolloutManager's engines (none connected)")
    import ray

    urls = ray.get(rollout_manager.engine_urls.remote())
    if not urls:
        raise ValueError(
            "--weight-update-mode distributed needs engines started by this run; with an external router "
            "(--sglang-router-ip) use --weight-update-mode disk"
        )
    on_gpu = torch.cuda.is_available() and getattr(args, "rollout_backend", "auto") != "embedded"
    return DistributedWeightSender(
        urls,
        backend="nccl" if on_gpu else "gloo",
        tp_size=int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1) if on_gpu else 1,
        api_key=getattr(args, "api_key", None),
        buffer_bytes=int(getattr(args, "update_weight_buffer_size", DEFAULT_BUFFER_BYTES)),
        device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu",
    )
