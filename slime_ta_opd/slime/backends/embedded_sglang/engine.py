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

This module holds the scheduler (queue, worker loop, controls, public API); by responsibility the rest lives in
``engine_prefill`` (admission, prefill, prompt cache, input log-probs), ``engine_decode`` (the decode step),
``engine_weights`` (the weight paths and memory release) and ``engine_types`` (requests, results, batch state).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import torch

from slime.backends.embedded_sglang.engine_decode import DecodeMixin
from slime.backends.embedded_sglang.engine_prefill import PrefillMixin
from slime.backends.embedded_sglang.engine_types import (  # noqa: F401  (re-exported: the engine's public types)
    EngineRequestError,
    EngineUnavailable,
    GenRequest,
    GenResult,
    _Prefilled,
    _Row,
    _Running,
    resolve_dtype,
)
from slime.backends.embedded_sglang.engine_weights import GROUP_TIMEOUT_MAX_S, WeightsMixin  # noqa: F401

logger = logging.getLogger(__name__)


class Engine(PrefillMixin, DecodeMixin, WeightsMixin):
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
        scoring_prefix_reuse: bool = True,
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
        self.scoring_prefix_reuse = bool(scoring_prefix_reuse)  # engine_prefill: shared prompts of scoring requests
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
