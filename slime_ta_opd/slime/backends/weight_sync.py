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

``--weight-update-mode tensor``: SGLang's colocated path, ``POST /update_weights_from_tensor
{serialized_named_tensors, load_format, flush_cache, weight_version}`` per bucket. The tensors are pickled with
torch's multiprocessing reductions and base64-encoded (the form of SGLang's ``MultiprocessingSerializer``), one
string per engine TP rank: CUDA tensors travel as CUDA IPC handles, CPU tensors as shared-memory file names, so
an engine on the same node maps the trainer's copy instead of receiving the bytes over a socket. The trainer
keeps each bucket alive until every engine has answered.

The backend is gloo on CPU (the embedded engines) and NCCL on GPUs (real SGLang). A failed request never
leaves the trainer blocked in a broadcast or a rendezvous: both are polled while the requests are in flight, and
an engine's error answer aborts them with that error. The rendezvous address is the trainer's node IP, so engines
on other nodes of a Ray cluster reach it.

Engines that come and go: the sender re-reads the engines' URLs whenever it makes a group, makes a new group when
the RolloutManager's engine set changed (an engine restarted, or dropped with its lost node), and when a push fails
it asks the RolloutManager to drop the engines of lost nodes and, if it did, pushes once more to the others.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from slime.backends.weight_payload import deserialize_named_tensors, serialize_named_tensors  # noqa: F401 (re-exported)
from slime.utils.nonfinite import check_finite_weights

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 512 * 1024**2
# The embedded engines' weight-update group timeout (per collective): an engine whose broadcast a lost engine broke
# is free for the next push after it. (Real SGLang engines keep their own.)
EMBEDDED_GROUP_TIMEOUT_S = 120.0


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


def _group_master_address(urls: list[str]) -> str:
    """Where the engines reach the trainer's rank 0: loopback when every engine runs on this machine's loopback
    (the embedded servers refuse another master unless told), else the trainer's node IP (engines on other nodes,
    started with ``--allow-remote-weight-update-master``)."""
    from urllib.parse import urlsplit

    if all(urlsplit(u).hostname in ("127.0.0.1", "localhost", "::1") for u in urls):
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


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
        restart_count: Callable[[], int] | None = None,
        engine_urls_fn: Callable[[], list[str]] | None = None,
        drop_lost_engines: Callable[[], int] | None = None,
        engine_timeout_s: float | None = None,
    ):
        """``restart_count``: how many times the engine set changed so far (the RolloutManager's count); when
        it changed since the group was made, the next push first makes a new group (a restarted engine is not a
        member of the old one). ``engine_urls_fn``: the engines' URLs now, read at every new group.
        ``drop_lost_engines``: called when a push fails; a positive answer (engines dropped) retries the push once.
        ``engine_timeout_s``: the engines' own group timeout (``timeout_s`` of the embedded engines' join request):
        an engine left waiting for a broadcast that a lost engine broke gives up after it and takes the next push."""
        if not engine_urls:
            raise ValueError("distributed weight updates need the engines' URLs (this run owns no engines)")
        if buffer_bytes < 1:
            raise ValueError(f"--update-weight-buffer-size must be >= 1 byte, got {buffer_bytes}")
        self.engine_urls = list(engine_urls)
        self.backend, self.tp_size, self.api_key = backend, tp_size, api_key
        self.master_address, self.group_name = master_address, group_name
        self.buffer_bytes, self.timeout_s, self.device = buffer_bytes, timeout_s, torch.device(device)
        self.group: Any = None
        self.base_group_name = group_name
        self.restart_count = restart_count
        self.engine_urls_fn = engine_urls_fn
        self.drop_lost_engines = drop_lost_engines
        self.engine_timeout_s = engine_timeout_s
        self._restarts_seen: int | None = None
        self._connects = 0

    @property
    def world_size(self) -> int:
        return 1 + self.tp_size * len(self.engine_urls)

    def connect(self) -> None:
        """Every engine joins a new group (``/init_weights_update_group``), then rank 0 does. The group name
        gets a suffix from the second group on, so an engine never re-joins a name it holds."""
        if self.restart_count is not None:
            self._restarts_seen = self.restart_count()
        if self.engine_urls_fn is not None:
            urls = list(self.engine_urls_fn())
            if not urls:
                raise RuntimeError("no rollout engine is left to push weights to")
            self.engine_urls = urls
        self._connects += 1
        if self._connects > 1:
            self.group_name = f"{self.base_group_name}_{self._connects}"
        port = free_port(self.master_address)
        payloads = [
            {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": 1 + i * self.tp_size,
                "world_size": self.world_size,
                "group_name": self.group_name,
                "backend": self.backend,
                **({"timeout_s": self.engine_timeout_s} if self.engine_timeout_s else {}),
            }
            for i in range(len(self.engine_urls))
        ]
        calls = _Calls().start(self.engine_urls, "/init_weights_update_group", payloads, self.api_key, self.timeout_s)
        made: list[Any] = []
        failure: list[BaseException] = []

        def rendezvous() -> None:
            try:
                made.append(new_group(self.backend, self.master_address, port, 0, self.world_size, self.timeout_s))
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                failure.append(e)

        # in a thread: an engine that answered with an error (it will never join) ends the wait at once
        worker = threading.Thread(target=rendezvous, daemon=True, name="weight-sync rendezvous")
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if calls.errors and calls.done():
                calls.join("init_weights_update_group")
        if failure:
            calls.join("init_weights_update_group")  # an engine's own error explains more than the timeout
            raise RuntimeError(f"weight-update group rendezvous failed: {failure[0]}") from failure[0]
        self.group = made[0]
        calls.join("init_weights_update_group")
        logger.info(
            "weight-update group %r: %d engine(s), world %d", self.group_name, len(self.engine_urls), self.world_size
        )

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> int:
        """Broadcast every tensor to every engine (bucket by bucket); returns the number of tensors sent. A failed
        push after which the RolloutManager dropped engines of lost nodes is redone once with the others."""
        named = list(named_tensors)
        try:
            return self._push_once(named, weight_version)
        except (RuntimeError, TimeoutError) as e:
            if self.drop_lost_engines is None or self.drop_lost_engines() <= 0:
                raise
            logger.warning("weight push failed (%s) and engines of a lost node were dropped: pushing again", e)
            if self.group is not None:
                self._abandon()
            return self._push_once(named, weight_version)

    def _push_once(self, named_tensors: list[tuple[str, torch.Tensor]], weight_version: str | None) -> int:
        if self.group is not None and self.restart_count is not None and self.restart_count() != self._restarts_seen:
            logger.warning("an engine was restarted since the weight-update group was made: making a new one")
            self._abandon()
        groups = list(buckets(named_tensors, self.buffer_bytes))
        check_finite_weights((nt for bucket in groups for nt in bucket), f"push weights {weight_version}")
        if self.group is None:
            self.connect()
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


# ---------------------------------------------------------------------------------------------- tensor (colocated)
# The payload format and its checked reader (the engine's side reads pickles from HTTP) are in weight_payload.


def _patch_cuda_reductions() -> None:
    """With SGLang installed, its patch makes CUDA IPC handles carry the GPU's UUID instead of a device index, so
    the engine opens them on the right GPU whatever its ``CUDA_VISIBLE_DEVICES``. (Its receiver expects it.)"""
    try:
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        logger.warning("sglang is not importable here: CUDA IPC handles carry device indices, not GPU UUIDs")
        return
    monkey_patch_torch_reductions()


class TensorWeightSender:
    """The colocated sender: tensors shared with the engines on this node (CUDA IPC on GPUs, shared memory on CPU).

    Each bucket of at most ``buffer_bytes`` becomes one ``/update_weights_from_tensor`` request per engine, with the
    same payload for each of the engine's ``tp_size`` ranks (every rank loads the full HF tensors and keeps its
    shard, as with a disk update)."""

    def __init__(
        self,
        engine_urls: list[str],
        tp_size: int = 1,
        api_key: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        timeout_s: float = 600.0,
    ):
        if not engine_urls:
            raise ValueError("tensor weight updates need the engines' URLs (this run owns no engines)")
        if buffer_bytes < 1:
            raise ValueError(f"--update-weight-buffer-size must be >= 1 byte, got {buffer_bytes}")
        self.engine_urls, self.tp_size, self.api_key = list(engine_urls), int(tp_size), api_key
        self.buffer_bytes, self.timeout_s = buffer_bytes, timeout_s
        self._patched = False

    def _shareable(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.is_cuda:
            if not self._patched:
                _patch_cuda_reductions()
                self._patched = True
            return tensor.contiguous()
        # a private copy in shared memory: the trainer's own storage is never moved
        return tensor.clone(memory_format=torch.contiguous_format).share_memory_()

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> int:
        """Send every tensor to every engine, bucket by bucket; returns the number of tensors sent."""
        import torch.multiprocessing as mp

        groups = list(buckets(named_tensors, self.buffer_bytes))
        check_finite_weights((nt for bucket in groups for nt in bucket), f"push weights {weight_version}")
        strategy = mp.get_sharing_strategy()
        mp.set_sharing_strategy("file_system")  # shm names open in any process; fds would need a socket
        sent = 0
        try:
            for b, bucket in enumerate(groups):
                shared = [(name, self._shareable(t)) for name, t in bucket]
                payload: dict[str, Any] = {
                    "serialized_named_tensors": [serialize_named_tensors(shared)] * self.tp_size,
                    "load_format": None,
                    "flush_cache": b == len(groups) - 1,
                }
                if weight_version is not None:
                    payload["weight_version"] = weight_version
                n = len(self.engine_urls)
                calls = _Calls().start(self.engine_urls, "/update_weights_from_tensor", [payload] * n,
                                       self.api_key, self.timeout_s)  # fmt: skip
                calls.join("update_weights_from_tensor")  # `shared` stays alive until every engine has answered
                sent += len(bucket)
                del shared
        finally:
            mp.set_sharing_strategy(strategy)
        return sent

    def close(self) -> None:
        return None


def pushes_tensors(args: Any) -> bool:
    """Whether ``--weight-update-mode`` sends tensors (``distributed``, ``tensor``) rather than a HF dir."""
    return getattr(args, "weight_update_mode", "disk") != "disk"


def load_from_disk(rollout_manager: Any, path: str) -> None:
    """The disk mode's second half: the engines load the HF dir ``path``, then the older ``weight_v*`` dirs
    beside it are removed (only the newest pushed dir is kept)."""
    import shutil
    from pathlib import Path

    if rollout_manager is not None:
        import ray

        ray.get(rollout_manager.update_weights_from_disk.remote(path))
    for old in Path(path).parent.glob("weight_v*"):
        if old.name != Path(path).name and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def weight_sender_for(args: Any, rollout_manager: Any) -> DistributedWeightSender | TensorWeightSender:
    """The sender of a trainer's rank 0 for the engines of ``rollout_manager`` (a Ray actor handle), by
    ``--weight-update-mode``: ``distributed`` (gloo for CPU engines, NCCL with tensors on the trainer's GPU for
    real SGLang) or ``tensor`` (shared with engines on this node)."""
    mode = getattr(args, "weight_update_mode", "disk")
    if mode not in ("distributed", "tensor"):
        raise ValueError(f"--weight-update-mode {mode!r} pushes no tensors; expected 'distributed' or 'tensor'")
    if rollout_manager is None:
        raise ValueError(f"--weight-update-mode {mode} needs the RolloutManager's engines (none connected)")
    import ray

    urls = ray.get(rollout_manager.engine_urls.remote())
    if not urls:
        raise ValueError(
            f"--weight-update-mode {mode} needs engines started by this run; with an external router "
            "(--sglang-router-ip) use --weight-update-mode disk"
        )
    on_gpu = torch.cuda.is_available() and getattr(args, "rollout_backend", "auto") != "embedded"
    tp_size = int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1) if on_gpu else 1
    buffer_bytes = int(getattr(args, "update_weight_buffer_size", DEFAULT_BUFFER_BYTES))
    api_key = getattr(args, "api_key", None)
    if mode == "tensor":
        return TensorWeightSender(urls, tp_size=tp_size, api_key=api_key, buffer_bytes=buffer_bytes)
    return DistributedWeightSender(
        urls,
        restart_count=lambda: ray.get(rollout_manager.engine_restart_count.remote()),
        engine_urls_fn=lambda: ray.get(rollout_manager.engine_urls.remote()),
        drop_lost_engines=lambda: ray.get(rollout_manager.drop_lost_engines.remote()),
        master_address=_group_master_address(urls),
        engine_timeout_s=None if on_gpu else EMBEDDED_GROUP_TIMEOUT_S,
        backend="nccl" if on_gpu else "gloo",
        tp_size=tp_size,
        api_key=api_key,
        buffer_bytes=buffer_bytes,
        device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu",
    )
