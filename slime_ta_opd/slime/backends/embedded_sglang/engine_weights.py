"""The embedded engine's weight paths: from disk, over a gloo process group, from shared-memory tensors, and the
colocated release/resume of its memory. Mixed into ``Engine``; every method runs on the engine's worker thread
(``_join_group`` on its own helper thread)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

GROUP_TIMEOUT_MAX_S = 600.0  # the longest a weight-update group rendezvous may wait (and its default)


def _check_shapes(params: dict[str, torch.Tensor], names_shapes: Any) -> str | None:
    """Why a weight update naming these tensors must be refused, or None."""
    for name, shape in names_shapes:
        if name not in params:
            return f"unknown tensor {name!r}: not a parameter of the served model"
        if tuple(shape) != tuple(params[name].shape):
            return f"shape mismatch for {name!r}: {tuple(shape)} vs {tuple(params[name].shape)}"
    return None


class WeightsMixin:
    """Weight updates and memory release of ``Engine`` (see its attributes)."""

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
