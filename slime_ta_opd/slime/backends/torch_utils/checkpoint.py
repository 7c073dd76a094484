"""Atomic, verified checkpoints for the torch trainer.

Layout (the pointer file name is upstream slime's / Megatron's)::

    <save>/latest_checkpointed_iteration.txt     # "<rollout_id>", written last
    <save>/iter_0000007/
        model/               # HF safetensors checkpoint (+ tokenizer files): loadable by from_pretrained
        optimizer.pt         # AdamW state_dict (loaded with weights_only=True)
        rng.pt               # python / numpy / torch (/ cuda) RNG states
        trainer_state.json   # rollout_id, global_step, format version
        args.json            # snapshot of the run's flags
        manifest.json        # every file above with its size and sha256

A checkpoint directory is written under a temp name and renamed into place, then the pointer
is replaced atomically; a crash at any point leaves the previous checkpoint usable. On load the
manifest is checked file by file and a missing, truncated or altered file is refused with an
error naming it. Nothing is unpickled except through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slime.utils.misc import atomic_write_json, atomic_write_text
from ta_opd.atomic_io import atomic_dir

logger = logging.getLogger(__name__)

POINTER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt."""


def iter_dir_name(rollout_id: int) -> str:
    return f"iter_{rollout_id:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _build_manifest(root: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(root))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return {"format_version": FORMAT_VERSION, "files": files}


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file of ``ckpt_dir`` against its manifest; raise :class:`CheckpointError` on any mismatch."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(root)!r} has no {MANIFEST}: it is partial (interrupted write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(root)!r}: unreadable {MANIFEST} ({e})") from e
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r} is missing {rel!r} listed in its manifest")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {str(root)!r}: {rel!r} has {size} bytes, manifest says {meta['size']} (truncated?)"
            )
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {str(root)!r}: {rel!r} does not match its sha256 in the manifest")
    for required in ("model", "rng.pt", "trainer_state.json"):  # optimizer.pt is absent with --no-save-optim
        if not any(rel == required or rel.startswith(required + "/") for rel in files):
            raise CheckpointError(f"checkpoint {str(root)!r} lacks {required!r}")
    return manifest


def get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_hf_weights(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Save ``model`` as a HF safetensors dir, atomically (temp dir + rename); copies tokenizer files if given."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        _write_hf_dir(model, tmp, tokenizer_dir)
    return out


def _write_hf_dir(model, out: Path, tokenizer_dir) -> None:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, out / name)


def save_checkpoint(
    save_dir: str | os.PathLike,
    rollout_id: int,
    model,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    args_snapshot: dict[str, Any],
    tokenizer_dir: str | os.PathLike | None = None,
    keep_last_n: int | None = None,
) -> Path:
    """Write ``<save_dir>/iter_<rollout_id>`` atomically, then point the pointer file at it; rotate old ones."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".iter_*.tmp*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / iter_dir_name(rollout_id)
    with atomic_dir(final) as tmp:  # temp dir ".iter_N.tmp*": the stale sweep above matches it
        _write_hf_dir(model, tmp / "model", tokenizer_dir)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(get_rng_state(), tmp / "rng.pt")
        state = {"format_version": FORMAT_VERSION, "rollout_id": int(rollout_id), **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        (tmp / "args.json").write_text(json.dumps(args_snapshot, indent=2, sort_keys=True, default=str) + "\n")
        manifest = _build_manifest(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    atomic_write_text(root / POINTER, f"{int(rollout_id)}\n")
    if keep_last_n is not None and keep_last_n > 0:
        rotate_checkpoints(root, keep_last_n, protect=final)
    logger.info("saved checkpoint %s", final)
    return final


def rotate_checkpoints(root: Path, keep_last_n: int, protect: Path | None = None) -> list[Path]:
    """Remove all but the ``keep_last_n`` highest ``iter_*`` dirs (never ``protect``); returns the removed."""
    dirs = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    removed = []
    for p in dirs[: max(0, len(dirs) - keep_last_n)]:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def latest_checkpoint(load_dir: str | os.PathLike) -> Path | None:
    """The checkpoint dir the pointer names, or None if ``load_dir`` holds no checkpoint yet.

    A pointer that names a missing or unverifiable dir raises :class:`CheckpointError`.
    """
    root = Path(load_dir)
    pointer = root / POINTER
    if not pointer.is_file():
        if any(root.glob("iter_*")):
            raise CheckpointError(
                f"{str(root)!r} holds iter_* dirs but no {POINTER}: refusing to guess which one is complete"
            )
        return None
    text = pointer.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{str(pointer)!r} should hold a rollout id, got {text!r}")
    ckpt = root / iter_dir_name(int(text))
    verify_checkpoint(ckpt)
    return ckpt


def load_checkpoint(ckpt_dir: str | os.PathLike, model, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Verify ``ckpt_dir``; load weights (safetensors), optimizer and RNG states; returns the trainer state."""
    from safetensors.torch import load_file

    root = Path(ckpt_dir)
    verify_checkpoint(root)
    state_dict = {}
    for shard in sorted((root / "model").glob("*.safetensors")):
        state_dict.update(load_file(shard))
    if not state_dict:
        raise CheckpointError(f"checkpoint {str(root)!r} has no *.safetensors in model/")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # tied embeddings are saved once; anything else missing is a real mismatch
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(root)!r} does not fit the model: missing={missing} unexpected={unexpected}"
        )
    if optimizer is not None:
        if not (root / "optimizer.pt").is_file():
            logger.warning("checkpoint %s has no optimizer state (saved with --no-save-optim): fresh AdamW", root)
        else:
            optimizer.load_state_dict(torch.load(root / "optimizer.pt", weights_only=True, map_location="cpu"))
    set_rng_state(torch.load(root / "rng.pt", weights_only=True))
    return json.loads((root / "trainer_state.json").read_text())


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        names = {n for n, m in model.named_modules() if m is head}
        return {f"{n}.weight" for n in names}
    return set()
