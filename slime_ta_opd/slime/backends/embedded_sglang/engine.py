"""The embedded inference engine: a HF causal LM behind a batching scheduler with a KV cache.

One worker thread owns the model. Requests arrive on a queue (from the HTTP server or from
Python) and are served by *continuous batching*:

* **prefill**: newly admitted requests are prefilled together (right-padded, one forward over the
  decoder); requests that share the same input ids are prefilled once and their KV cache rows
  are expanded, so the ``n`` samples of one prompt pay for one prefill (prefix reuse);
  prefill-only scoring (``max_new_tokens == 0``) ends here;
* **decode**: every running row advances by one token per forward, reading the KV cache
  (``DynamicCache``). Rows have different lengths, so the cache has gaps that a 2-D attention
  mask hides and explicit ``position_ids`` keep RoPE right; new rows are merged into the
  running batch between steps, finished rows are dropped.

Log-prob conventions follow SGLang (see ``sampling`` and ``protocol``). Weight updates run on
the worker thread when no request is running, like SGLang's writer lock: in-flight requests
finish on the old weights, waiting ones start on the new weights.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slime.backends.embedded_sglang.sampling import SamplingTensors, sample_next, scaled_logprobs, topk_rows

logger = logging.getLogger(__name__)

_LOGPROB_CHUNK = 1024  # prompt positions per lm-head chunk when computing input log-probs
GROUP_TIMEOUT_MAX_S = 600.0  # the longest a weight-update group rendezvous may wait (and its default)


class EngineUnavailable(RuntimeError):
    """The engine cannot serve generation now (memory released, weights undefined, shutting down): HTTP 503."""


class EngineRequestError(RuntimeError):
    """The engine failed while serving these requests (the others are unaffected): HTTP 500 naming the error."""


@dataclass
class GenRequest:
    """One validated generation request (one prompt, one sample). Built by ``protocol.parse_generate``."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_strs: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # user ids; EOS added unless ignore_eos
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1  # resolved by the engine: -1 -> no input log-probs
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    logprob_temperature: float | None = None  # extension: divide logits by T before the prefill log-softmax
    seed: int | None = None  # per-request sampling seed; None -> derived from --random-seed and arrival order


@dataclass
class GenResult:
    """Raw engine output of one request; ``protocol.build_answer`` turns it into SGLang's JSON."""

    output_ids: list[int]
    finish_reason: dict[str, Any]
    prompt_tokens: int
    # Input side, already in SGLang's layout: entry 0 is None; ids are input_ids[logprob_start_len:].
    input_token_logprobs_val: list[float | None] = field(default_factory=list)
    input_token_logprobs_idx: list[int] = field(default_factory=list)
    input_top_logprobs_val: list[list[float] | None] = field(default_factory=list)
    input_top_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    input_token_ids_logprobs_val: list[list[float] | None] = field(default_factory=list)
    input_token_ids_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    output_token_logprobs_val: list[float] = field(default_factory=list)
    output_top_logprobs_val: list[list[float]] = field(default_factory=list)
    output_top_logprobs_idx: list[list[int]] = field(default_factory=list)
    output_token_ids_logprobs_val: list[list[float]] = field(default_factory=list)
    cached_tokens: int = 0
    e2e_latency: float = 0.0


@dataclass
class _Prefilled:
    """A prompt's prefill: KV per layer (``[1, H_kv, L, D]``) or None, hidden ``[L, H]``, last logits ``[V]``."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    hidden: torch.Tensor
    last_logits: torch.Tensor


@dataclass
class _Row:
    """A running generation row."""

    req: GenRequest
    future: Future
    start: float
    cached_tokens: int
    result: GenResult
    stop_ids: list[int]
    max_stop_chars: int


class _Running:
    """Decode-batch state: KV cache + per-row tensors, kept aligned with ``rows``."""

    def __init__(
        self,
        rows: list[_Row],
        cache: Any,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        last_tokens: torch.Tensor,
        device: torch.device,
    ):
        self.rows = rows
        self.cache = cache  # DynamicCache; per layer keys/values [B, H_kv, C, D]
        self.mask = mask  # [B, C] long: 1 where the cache column holds a real token of that row
        self.next_pos = next_pos  # [B] position id of the next input token
        self.last_tokens = last_tokens  # [B] the token to feed next
        self.device = device

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: list[int]) -> None:
        """Keep only rows ``idx`` (in that order)."""
        index = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in idx]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)

    def merge(self, other: _Running) -> None:
        """Append ``other``'s rows; the shorter cache is zero-padded on the right (masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], 0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], 0)
        self.rows += other.rows
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA; else the named dtype."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in table:
        raise ValueError(f"--dtype {name!r} is not supported; expected auto or one of {sorted(table)}")
    return table[name]


def _check_shapes(params: dict[str, torch.Tensor], names_shapes: Any) -> str | None:
    """Why a weight update naming these tensors must be refused, or None."""
    for name, shape in names_shapes:
        if name not in params:
            return f"unknown tensor {name!r}: not a parameter of the served model"
        if tuple(shape) != tuple(params[name].shape):
            return f"shape mismatch for {name!r}: {tuple(shape)} vs {tuple(params[name].shape)}"
    return None


class Engine:
    """A HF causal LM served by a batching worker thread.

    ``submit(req) -> Future[GenResult]`` is thread-safe; ``update_weights_from_disk(path)`` and
    ``flush_cache()`` are serialised with generation on the worker thread.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "auto",
        max_running_requests: int = 64,
        max_prefill_tokens: int = 16384,
        random_seed: int = 0,
        context_length: int | None = None,
        prompt_cache_tokens: int = 65536,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {max_running_requests}")
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.random_seed = int(random_seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, local_files_only=True, dtype=self.dtype, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        self.vocab_size = int(self.lm_head.weight.shape[0])  # the model's (possibly padded) vocabulary
        self.tokenizer_size = len(self.tokenizer)
        cfg = self.model.config
        self.context_length = int(context_length or getattr(cfg, "max_position_embeddings", 0) or 32768)
        self.eos_token_ids = self._eos_ids()
        self.weight_version = "default"
        self._groups: dict[str, Any] = {}  # weight-update process groups by name
        self._released = False  # colocated offload: weights freed until resume
        # after a resume the weights are zeros until every parameter was written again: storage pointers still due
        self._undefined: set[int] = set()
        self._groups_lock = threading.Lock()
        self._pending_groups: set[str] = set()  # group names whose rendezvous runs on a helper thread
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.prompt_cache_tokens = int(prompt_cache_tokens)
        self._prompt_cache: OrderedDict[tuple[int, ...], _Prefilled] = OrderedDict()
        self._prompt_cache_size = 0
        self._queue: queue.Queue = queue.Queue()
        self._controls: list[tuple[str, Any, Future]] = []
        self._controls_lock = threading.Lock()
        self._waiting: list[tuple[GenRequest, Future]] = []
        self._running: _Running | None = None
        self._serial = 0
        self._serial_lock = threading.Lock()
        self._stop = threading.Event()
        self.num_running = 0
        self.num_waiting = 0
        self._thread = threading.Thread(target=self._loop, name="embedded-sglang-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def next_seed(self) -> int:
        """A per-request seed from ``--random-seed`` and the arrival counter."""
        from slime.backends.embedded_sglang.sampling import hash_seed

        with self._serial_lock:
            self._serial += 1
            return hash_seed(self.random_seed, self._serial)

    def submit(self, req: GenRequest) -> Future:
        """Queue one request; the future resolves to a ``GenResult``."""
        return self.submit_many([req])[0]

    def submit_many(self, reqs: list[GenRequest]) -> list[Future]:
        """Queue requests atomically (they reach the scheduler together, so they can share one prefill)."""
        futs: list[Future] = []
        for req in reqs:
            if req.seed is None:
                req.seed = self.next_seed()
            futs.append(Future())
        self._queue.put(list(zip(reqs, futs, strict=True)))
        return futs

    def generate(self, reqs: list[GenRequest], timeout: float | None = None) -> list[GenResult]:
        """Blocking helper: submit all and wait."""
        futs = self.submit_many(reqs)
        return [f.result(timeout) for f in futs]

    def update_weights_from_disk(self, path: str, tensors: dict[str, torch.Tensor] | None = None) -> Future:
        """Load the ``*.safetensors`` of ``path`` into the model once no request is running.

        ``tensors``: the files' tensors, already read by the caller (the server reads them on a worker thread,
        with ``--weights-root`` containment); without them the engine reads ``path`` itself."""
        return self._control("update_weights", (path, tensors))

    @property
    def released(self) -> bool:
        """The weights are freed (``/release_memory_occupation``) until ``/resume_memory_occupation``."""
        return self._released

    def weights_state_error(self) -> str | None:
        """Why generation must not run now, or None."""
        if self._released:
            return "the engine released its memory (/release_memory_occupation): call /resume_memory_occupation first"
        if self._undefined:
            total = sum(1 for _ in self.model.parameters())
            return (
                "the weights are undefined after /resume_memory_occupation: load weights "
                "(/update_weights_from_disk, /update_weights_from_tensor or /update_weights_from_distributed) "
                f"before generating; {total - len(self._undefined)} of {total} parameters loaded so far"
            )
        return None

    def flush_cache(self) -> Future:
        """Empty the prompt cache (runs when no request is running, as SGLang's flush_cache)."""
        return self._control("flush_cache", None)

    def init_weights_update_group(self, spec: dict[str, Any]) -> Future:
        """Join a trainer's weight-update process group (slime.backends.weight_sync) as ``rank_offset``.

        The rendezvous waits for the other ranks (up to ``timeout_s``, at most ``GROUP_TIMEOUT_MAX_S``) on a
        helper thread, so generation goes on meanwhile; the group is usable once the future resolves."""
        fut: Future = Future()
        name = spec["group_name"]
        with self._groups_lock:
            if name in self._pending_groups:
                fut.set_result((False, f"weight-update group {name!r} is already being joined; wait for that call"))
                return fut
            self._pending_groups.add(name)
        threading.Thread(target=self._join_group, args=(spec, fut), name=f"join-group-{name}", daemon=True).start()
        return fut

    def update_weights_from_distributed(self, spec: dict[str, Any]) -> Future:
        """Receive the named tensors by broadcast from rank 0 of the group and load them."""
        return self._control("update_distributed", spec)

    def destroy_weights_update_group(self, group_name: str) -> Future:
        return self._control("destroy_group", group_name)

    def update_weights_from_tensor(self, spec: dict[str, Any]) -> Future:
        """Load the tensors of a ``/update_weights_from_tensor`` payload (shared memory on the same node)."""
        return self._control("update_tensor", spec)

    def release_memory_occupation(self) -> Future:
        """Free the weights and the prompt cache (colocated runs); generation waits for a resume."""
        return self._control("release", None)

    def resume_memory_occupation(self) -> Future:
        """Re-allocate the weights (their values are undefined until the next weight update, as in SGLang)."""
        return self._control("resume", None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker; every request still queued or running is answered with ``EngineUnavailable``."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        gone = EngineUnavailable("the server is shutting down")
        self._drain_queue(block=False)
        self._drain_waiting(gone)
        with self._controls_lock:
            controls, self._controls = self._controls, []
        for _, _, fut in controls:
            if not fut.done():
                fut.set_result((False, "the server is shutting down"))
        running = self._running
        for row in running.rows if running is not None else []:
            if not row.future.done():
                row.future.set_exception(gone)

    def safe_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids, skipping ids the tokenizer does not know (padded-vocabulary rows)."""
        known = [i for i in ids if 0 <= i < self.tokenizer_size]
        return self.tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: list[int]) -> list[str]:
        """One text per id (``""`` for ids beyond the tokenizer), as SGLang's batch_decode per token."""
        return [self.tokenizer.decode([i]) if 0 <= i < self.tokenizer_size else "" for i in ids]

    # ------------------------------------------------------------------ internals
    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def _control(self, kind: str, arg: Any) -> Future:
        fut: Future = Future()
        with self._controls_lock:
            self._controls.append((kind, arg, fut))
        self._queue.put(("wake", None))
        return fut

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._drain_queue(block=self._running is None and not self._waiting and not self._controls)
                    if self._stop.is_set():
                        break
                    with self._controls_lock:
                        controls = list(self._controls)
                    if controls and self._running is None:
                        with self._controls_lock:
                            self._controls = self._controls[len(controls) :]
                        for kind, arg, fut in controls:
                            self._run_control(kind, arg, fut)
                        continue
                    refusal = self.weights_state_error()
                    if not controls and refusal is not None:  # no weights to run on: refuse, do not hang
                        self._drain_waiting(EngineUnavailable(refusal))
                    elif not controls:
                        self._admit()
                    if self._running is not None:
                        self._decode_step()
                    self.num_running = len(self._running) if self._running is not None else 0
                    self.num_waiting = len(self._waiting)
                except Exception as exc:  # a bug must not hang clients: fail the requests the failed step touched
                    logger.exception("engine step failed")
                    self._fail_running(exc)

    def _drain_queue(self, block: bool) -> None:
        try:
            item = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, list):
                self._waiting.extend(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _drain_waiting(self, exc: Exception) -> None:
        for _, fut in self._waiting:
            if not fut.done():
                fut.set_exception(exc)
        self._waiting = []

    def _fail_running(self, exc: Exception) -> None:
        """A decode step failed: its rows (the requests it touched) get the error; waiting requests stay queued."""
        rows = self._running.rows if self._running is not None else []
        err = EngineRequestError(f"the engine failed while decoding this request: {type(exc).__name__}: {exc}")
        for row in rows:
            if not row.future.done():
                row.future.set_exception(err)
        self._running = None

    def _run_control(self, kind: str, arg: Any, fut: Future) -> None:
        try:
            self._prompt_cache.clear()  # stale after new weights; emptied on flush_cache
            self._prompt_cache_size = 0
            if kind == "update_weights":
                fut.set_result(self._load_weights(*arg))
            elif kind == "update_distributed":
                fut.set_result(self._receive_weights(arg))
            elif kind == "update_tensor":
                fut.set_result(self._load_tensors(arg))
            elif kind == "destroy_group":
                with self._groups_lock:
                    self._groups.pop(arg, None)
                fut.set_result((True, f"weight-update group {arg!r} destroyed"))
            elif kind == "release":
                fut.set_result(self._release())
            elif kind == "resume":
                fut.set_result(self._resume())
            else:
                fut.set_result((True, "Cache flushed."))
        except Exception as exc:  # reported to the caller as success=False
            shown = arg[0] if kind == "update_weights" else arg if kind in ("destroy_group", "flush_cache") else ""
            fut.set_result((False, f"{kind} failed{f' ({shown!r})' if shown else ''}: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ weights over a process group
    def _join_group(self, spec: dict[str, Any], fut: Future) -> None:
        """The rendezvous of ``init_weights_update_group``, on its own thread (bounded by the group timeout)."""
        from slime.backends.weight_sync import new_group

        name = spec["group_name"]
        try:
            if spec["backend"] != "gloo":
                fut.set_result(
                    (False, f"backend {spec['backend']!r}: the embedded engine runs on CPU and joins gloo groups only")
                )
                return
            timeout_s = min(float(spec.get("timeout_s") or GROUP_TIMEOUT_MAX_S), GROUP_TIMEOUT_MAX_S)
            group = new_group(
                "gloo", spec["master_address"], int(spec["master_port"]), int(spec["rank_offset"]),
                int(spec["world_size"]), timeout_s,
            )  # fmt: skip
            with self._groups_lock:
                self._groups[name] = group
            fut.set_result((True, f"joined weight-update group {name!r} as rank {spec['rank_offset']}"))
        except Exception as exc:  # reported to the caller as success=False
            fut.set_result((False, f"init_weights_update_group {name!r} failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._groups_lock:
                self._pending_groups.discard(name)

    def _receive_weights(self, spec: dict[str, Any]) -> tuple[bool, str]:
        from slime.backends.weight_sync import parse_dtype

        with self._groups_lock:
            group = self._groups.get(spec["group_name"])
        if group is None:
            return False, f"no weight-update group {spec['group_name']!r}: call /init_weights_update_group first"
        if self._released:
            return False, "weights are released: call /resume_memory_occupation first"
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        names, dtypes, shapes = spec["names"], [parse_dtype(d) for d in spec["dtypes"]], spec["shapes"]
        # everything is checked before anything is received: a refusal must come before the broadcast
        refusal = _check_shapes(params, zip(names, shapes, strict=True))
        if refusal is not None:
            return False, refusal
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            buf = torch.empty(tuple(shape), dtype=dtype)
            group.broadcast([buf], opts).wait()
            received.append((name, buf))
        self._assign(params, received, spec.get("weight_version"), "distributed")
        return True, f"Succeeded to update {len(received)} tensors from the group."

    def _load_tensors(self, spec: dict[str, Any]) -> tuple[bool, str]:
        from slime.backends.weight_sync import deserialize_named_tensors

        if self._released:
            return False, "weights are released: call /resume_memory_occupation first"
        try:
            named = deserialize_named_tensors(spec["serialized_named_tensors"][0])  # this engine's one TP rank
        except ValueError as e:
            return False, str(e)
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        refusal = _check_shapes(params, ((name, t.shape) for name, t in named))
        if refusal is not None:
            return False, refusal
        self._assign(params, named, spec.get("weight_version"), "tensor")
        return True, f"Succeeded to update {len(named)} tensors."

    def _assign(self, params: dict[str, torch.Tensor], named: list, weight_version: Any, how: str) -> None:
        for name, tensor in named:
            params[name].data.copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
            self._undefined.discard(params[name].data_ptr())
        self.weight_version = weight_version if isinstance(weight_version, str) else f"{how}@{time.time():.0f}"

    # ------------------------------------------------------------------ colocated offload
    def _release(self) -> tuple[bool, str]:
        if self._released:
            return True, "already released"
        self._shapes = {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # the storage is freed
        self._released = True
        return True, "memory released"

    def _resume(self) -> tuple[bool, str]:
        if not self._released:
            return True, "not released"
        for name, p in self.model.named_parameters():
            shape, dtype = self._shapes[name]
            p.data = torch.zeros(shape, dtype=dtype, device=self.device)
        self.model.tie_weights()  # tied embeddings share storage again
        self._released = False
        self._undefined = {p.data_ptr() for p in self.model.parameters()}
        return True, "memory resumed (weights are undefined until the next update; /generate answers 503 until then)"

    def _load_weights(self, path: str, loaded: dict[str, torch.Tensor] | None) -> tuple[bool, str]:
        if self._released:
            return False, (
                f"cannot load {path!r}: the engine's memory is released (/release_memory_occupation); "
                "call /resume_memory_occupation first"
            )
        if loaded is None:
            from slime.backends.embedded_sglang.weights_io import read_safetensors_dir

            loaded = read_safetensors_dir(Path(path), [Path(path)])
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        unknown = sorted(set(loaded) - set(params))
        if unknown:
            return False, f"weights in {path!r} do not match the model: unknown tensors {unknown[:5]}"
        for name, tensor in loaded.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                return False, f"shape mismatch for {name!r}: {tuple(tensor.shape)} vs {tuple(params[name].shape)}"
        loaded_ptrs = {params[n].data_ptr() for n in loaded}
        missing = [n for n, p in self.model.named_parameters() if n not in loaded and p.data_ptr() not in loaded_ptrs]
        if missing:
            return False, f"weights in {path!r} lack tensors {missing[:5]}"
        self._assign(params, list(loaded.items()), None, Path(path).name)
        self._undefined.clear()  # every parameter was loaded (checked above)
        return True, "Succeeded to update model weights."

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        if not self._waiting:
            return
        free = self.max_running_requests - (len(self._running) if self._running is not None else 0)
        batch: list[tuple[GenRequest, Future]] = []
        rest: list[tuple[GenRequest, Future]] = []
        tokens = 0
        seen: set[tuple[int, ...]] = set()
        for req, fut in self._waiting:
            key = tuple(req.input_ids)
            cost = 0 if (key in seen or key in self._prompt_cache) else len(req.input_ids)
            generating = req.max_new_tokens > 0
            fits_tokens = not batch or tokens + cost <= self.max_prefill_tokens
            if fits_tokens and (free > 0 or not generating):
                batch.append((req, fut))
                tokens += cost
                seen.add(key)
                free -= int(generating)
            else:
                rest.append((req, fut))
        self._waiting = rest
        if batch:
            self._prefill_isolated(batch)

    def _prefill_isolated(self, batch: list[tuple[GenRequest, Future]]) -> None:
        """Prefill ``batch``; when that fails, prefill its requests one by one, so that exactly the requests that
        fail get the error and the others of the batch are served."""
        try:
            self._prefill(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._fail_prefill(batch, exc)
                return
            logger.warning("a prefill batch of %d failed (%r): prefilling its requests one by one", len(batch), exc)
        for item in batch:
            if item[1].done():  # answered before the failure (prefill-only scoring)
                continue
            try:
                self._prefill([item])
            except Exception as exc:
                self._fail_prefill([item], exc)

    def _fail_prefill(self, batch: list[tuple[GenRequest, Future]], exc: Exception) -> None:
        logger.error("prefill failed for %s: %r", [req.rid for req, _ in batch], exc)
        err = EngineRequestError(f"the engine failed while prefilling this request: {type(exc).__name__}: {exc}")
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    def _prefill(self, batch: list[tuple[GenRequest, Future]]) -> None:
        start = time.time()
        prompts: dict[tuple[int, ...], _Prefilled | None] = {}
        for req, _ in batch:
            key = tuple(req.input_ids)
            if key not in prompts:
                prompts[key] = self._prompt_cache.get(key)
                if prompts[key] is not None:
                    self._prompt_cache.move_to_end(key)
        misses = [k for k, v in prompts.items() if v is None]
        fresh: set[tuple[int, ...]] = set(misses)
        if misses:
            need_cache = any(req.max_new_tokens > 0 for req, _ in batch)
            for key, pre in zip(misses, self._forward_prompts(misses, need_cache), strict=True):
                prompts[key] = pre
        cache_keys = {tuple(req.input_ids) for req, _ in batch if req.max_new_tokens > 0}
        for key in cache_keys & fresh:
            self._remember(key, prompts[key])

        gen_rows: list[_Row] = []
        gen_keys: list[tuple[int, ...]] = []
        reused: set[tuple[int, ...]] = set()
        for req, fut in batch:
            key = tuple(req.input_ids)
            pre = prompts[key]
            assert pre is not None
            result = GenResult(output_ids=[], finish_reason={}, prompt_tokens=len(req.input_ids))
            self._input_logprobs(req, pre.hidden, result)
            if req.max_new_tokens == 0:
                result.finish_reason = {"type": "length", "length": 0}
                result.e2e_latency = time.time() - start
                fut.set_result(result)
                continue
            stop_ids = sorted(set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.eos_token_ids)))
            # A prompt prefilled earlier (prompt cache) or by an earlier row of this batch counts as cached,
            # as SGLang's radix cache reports it.
            cached = len(req.input_ids) if (key not in fresh or key in reused) else 0
            reused.add(key)
            row = _Row(req, fut, start, cached, result, stop_ids, max((len(s) for s in req.stop_strs), default=0))
            gen_rows.append(row)
            gen_keys.append(key)
        if not gen_rows:
            return
        new = self._rows_from_prompts(gen_rows, [prompts[k] for k in gen_keys])
        last_logits = torch.stack([prompts[k].last_logits for k in gen_keys])  # type: ignore[union-attr]
        finished = self._sample_and_record(new, last_logits)
        self._drop_finished(new, finished)
        if len(new) == 0:
            return
        if self._running is None or len(self._running) == 0:
            self._running = new
        else:
            self._running.merge(new)

    def _forward_prompts(self, prompts: list[tuple[int, ...]], need_cache: bool) -> list[_Prefilled]:
        """One right-padded forward over distinct prompts; per prompt its KV rows, hidden states, last logits."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lens.max())
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()  # [U, W]
        pos = torch.arange(width, device=self.device)[None, :].expand(len(prompts), width)
        # Right padding: a real token never attends to a pad (causal), so no row is fully masked.
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=need_cache)
        hidden = out.last_hidden_state  # [U, W, H]
        last_logits = self.lm_head(hidden[torch.arange(len(prompts), device=self.device), lens - 1]).float()  # [U, V]
        result = []
        for u, p in enumerate(prompts):
            n = len(p)
            kv = None
            if need_cache:
                kv = [
                    (layer.keys[u : u + 1, :, :n], layer.values[u : u + 1, :, :n])
                    for layer in out.past_key_values.layers
                ]
            result.append(_Prefilled(kv, hidden[u, :n], last_logits[u]))
        return result

    def _remember(self, key: tuple[int, ...], pre: _Prefilled | None) -> None:
        """Keep a generated prompt's prefill for later requests with the same prompt (n samples)."""
        if pre is None or pre.kv is None or self.prompt_cache_tokens <= 0:
            return
        kv = [(k.clone(), v.clone()) for k, v in pre.kv]  # detach from the batch tensors so they can be freed
        self._prompt_cache[key] = _Prefilled(kv, pre.hidden.clone(), pre.last_logits.clone())
        self._prompt_cache_size += len(key)
        while self._prompt_cache_size > self.prompt_cache_tokens and self._prompt_cache:
            old, _ = self._prompt_cache.popitem(last=False)
            self._prompt_cache_size -= len(old)

    def _rows_from_prompts(self, rows: list[_Row], pres: list[_Prefilled | None]) -> _Running:
        """A running batch whose row ``b`` starts from the prefill ``pres[b]`` (shared prompts share tensors)."""
        from transformers import DynamicCache

        width = max(len(r.req.input_ids) for r in rows)
        layers = []
        for li in range(len(pres[0].kv)):  # type: ignore[union-attr, arg-type]
            ks, vs = [], []
            for pre in pres:
                k, v = pre.kv[li]  # type: ignore[union-attr, index]
                extra = width - k.shape[2]
                if extra:
                    k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])], 2)
                    v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])], 2)
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
        lens = torch.tensor([len(r.req.input_ids) for r in rows], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()
        last = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        return _Running(rows, DynamicCache(ddp_cache_data=layers), mask, lens, last, self.device)

    def _input_logprobs(self, req: GenRequest, hidden: torch.Tensor, result: GenResult) -> None:
        """Fill SGLang-layout input log-probs of one request from its prompt's hidden states ``[W, H]``."""
        n = len(req.input_ids)
        start = n if (not req.return_logprob or req.logprob_start_len < 0) else req.logprob_start_len
        if start >= n:
            return
        ids = req.input_ids
        result.input_token_logprobs_idx = list(ids[start:])
        result.input_token_logprobs_val = [None]
        want_top = req.top_logprobs_num > 0
        want_ids = req.token_ids_logprob is not None
        if want_top:
            result.input_top_logprobs_val, result.input_top_logprobs_idx = [None], [None]
        if want_ids:
            result.input_token_ids_logprobs_val, result.input_token_ids_logprobs_idx = [None], [None]
        temp = req.logprob_temperature or 1.0
        # Position j predicts token j+1: positions start .. n-2 give the log-probs of tokens start+1 .. n-1.
        for lo in range(start, n - 1, _LOGPROB_CHUNK):
            hi = min(lo + _LOGPROB_CHUNK, n - 1)
            logp = torch.log_softmax(self.lm_head(hidden[lo:hi]).float() / temp, dim=-1)  # [C, V]
            nxt = torch.tensor(ids[lo + 1 : hi + 1], dtype=torch.long, device=logp.device)
            result.input_token_logprobs_val += logp.gather(1, nxt[:, None])[:, 0].tolist()
            if want_top:
                vals, tids = topk_rows(logp, req.top_logprobs_num)
                result.input_top_logprobs_val += vals.tolist()
                result.input_top_logprobs_idx += tids.tolist()
            if want_ids:
                req_ids = torch.tensor(req.token_ids_logprob, dtype=torch.long, device=logp.device)
                result.input_token_ids_logprobs_val += logp.index_select(1, req_ids).tolist()
                result.input_token_ids_logprobs_idx += [list(req.token_ids_logprob)] * (hi - lo)

    def _decode_step(self) -> None:
        run = self._running
        assert run is not None
        mask = torch.cat([run.mask, torch.ones(len(run), 1, dtype=run.mask.dtype, device=self.device)], 1)
        out = self.decoder(
            input_ids=run.last_tokens[:, None],
            attention_mask=mask,
            position_ids=run.next_pos[:, None],
            past_key_values=run.cache,
            use_cache=True,
        )
        run.mask = mask
        run.next_pos = run.next_pos + 1
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()  # [B, V]
        finished = self._sample_and_record(run, logits)
        self._drop_finished(run, finished)
        if len(run) == 0:
            self._running = None

    def _sample_and_record(self, run: _Running, logits: torch.Tensor) -> list[int]:
        """Sample one token for every row of ``run``, record it and its log-probs; return finished row indices."""
        rows = run.rows
        dev = self.device
        steps = torch.tensor([len(r.result.output_ids) for r in rows], dtype=torch.long, device=dev)
        min_new = torch.tensor([r.req.min_new_tokens for r in rows], dtype=torch.long, device=dev)
        width = max(1, max(len(r.stop_ids) for r in rows))
        stop_ids = torch.full((len(rows), width), -1, dtype=torch.long, device=dev)  # [B, S], -1 padded
        for i, r in enumerate(rows):
            if r.stop_ids:
                stop_ids[i, : len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.long, device=dev)
        # min_new_tokens: stop tokens cannot be sampled yet (SGLang's min-new-tokens penalizer).
        block = (steps < min_new)[:, None] & (stop_ids >= 0)
        if bool(block.any()):
            rows_i, cols_i = block.nonzero(as_tuple=True)
            logits = logits.index_put((rows_i, stop_ids[rows_i, cols_i]), torch.tensor(float("-inf"), device=dev))
        params = SamplingTensors(
            temperature=torch.tensor([r.req.temperature for r in rows], dtype=torch.float32, device=dev),
            top_k=torch.tensor([r.req.top_k for r in rows], dtype=torch.long, device=dev),
            top_p=torch.tensor([r.req.top_p for r in rows], dtype=torch.float32, device=dev),
            min_p=torch.tensor([r.req.min_p for r in rows], dtype=torch.float32, device=dev),
            seeds=torch.tensor([r.req.seed or 0 for r in rows], dtype=torch.long, device=dev),
            steps=steps,
        )
        logprobs = scaled_logprobs(logits, params.temperature)  # [B, V]
        nxt = sample_next(logprobs, params)  # [B]
        chosen = logprobs.gather(1, nxt[:, None])[:, 0]
        k_max = max(r.req.top_logprobs_num if r.req.return_logprob else 0 for r in rows)
        top_vals = top_ids = None
        if k_max > 0:
            v, i = topk_rows(logprobs, k_max)
            top_vals, top_ids = v.tolist(), i.tolist()
        nxt_l, chosen_l = nxt.tolist(), chosen.tolist()
        stop_hit = ((nxt[:, None] == stop_ids) & (stop_ids >= 0)).any(1).tolist()
        finished: list[int] = []
        for b, row in enumerate(rows):
            req, res = row.req, row.result
            res.output_ids.append(nxt_l[b])
            if req.return_logprob:
                res.output_token_logprobs_val.append(chosen_l[b])
                if req.top_logprobs_num > 0 and top_vals is not None and top_ids is not None:
                    res.output_top_logprobs_val.append(top_vals[b][: req.top_logprobs_num])
                    res.output_top_logprobs_idx.append(top_ids[b][: req.top_logprobs_num])
                if req.token_ids_logprob is not None:
                    res.output_token_ids_logprobs_val.append(logprobs[b, req.token_ids_logprob].tolist())
            reason = self._finish_reason(row, stop_hit[b])
            if reason is not None:
                res.finish_reason = reason
                finished.append(b)
        run.last_tokens = nxt
        return finished

    def _finish_reason(self, row: _Row, stop_token_hit: bool) -> dict[str, Any] | None:
        """SGLang's order: length first, then a stop token, then a stop string."""
        out = row.result.output_ids
        if len(out) >= row.req.max_new_tokens:
            return {"type": "length", "length": row.req.max_new_tokens}
        if len(out) < row.req.min_new_tokens:
            return None
        if stop_token_hit:
            return {"type": "stop", "matched": out[-1]}
        if row.req.stop_strs:
            tail = self.safe_decode(out[-(row.max_stop_chars + 1) :], skip_special_tokens=False)
            for s in row.req.stop_strs:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None

    def _drop_finished(self, run: _Running, finished: list[int]) -> None:
        if not finished:
            return
        done = set(finished)
        now = time.time()
        for b in finished:
            row = run.rows[b]
            row.result.cached_tokens = row.cached_tokens
            row.result.e2e_latency = now - row.start
            if not row.future.done():
                row.future.set_result(row.result)
        keep = [b for b in range(len(run)) if b not in done]
        run.select(keep)


def engine_from_env() -> dict[str, str]:
    """Environment knobs that affect numerics (reported by /get_server_info)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "CUDA_VISIBLE"))}
