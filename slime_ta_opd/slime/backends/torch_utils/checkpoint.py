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
is replaced atomically; a crash at any point leaves the previous checkpoint usable (the temp dirs of
a crashed save are swept by the next run once it holds the ``--save`` lock: slime.utils.run_dirs).
Weights with a NaN/inf are never saved. ``args.json`` holds the flags with secrets redacted.

On load the manifest is the whole truth: it must have the shape above, every file it lists must be
there with its size and sha256, and a file it does not list is refused, so exactly the verified files
are read. Every failure is a :class:`CheckpointError` naming the checkpoint and the file. Nothing is
unpickled except through ``torch.load(weights_only=True)``.
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
from slime.utils.nonfinite import check_finite_weights
from slime.utils.redact import redact_secrets
from slime.utils.run_dirs import resolve_load
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


def _read_manifest(root: Path) -> dict[str, Any]:
    """``root/manifest.json``, checked for shape: ``{"format_version": int, "files": {relpath: {"size": int,
    "sha256": 64 hex}}}`` with relative paths inside ``root``; :class:`CheckpointError` naming the file otherwise."""
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(root)!r} has no {MANIFEST}: it is partial (interrupted write?)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{str(path)!r}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{str(path)!r}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{str(path)!r}: 'files' must be a non-empty object of relpath -> {{size, sha256}}")
    for rel, meta in files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            raise CheckpointError(f"{str(path)!r}: entry {rel!r} is not a relative path inside the checkpoint")
        if not (
            isinstance(meta, dict)
            and type(meta.get("size")) is int
            and meta["size"] >= 0
            and isinstance(meta.get("sha256"), str)
            and len(meta["sha256"]) == 64
        ):
            raise CheckpointError(
                f"{str(path)!r}: entry {rel!r} must be an object with 'size' (int >= 0) and 'sha256' (64 hex "
                f"chars), got {meta!r}"
            )
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Check ``ckpt_dir`` against its manifest: every listed file present with its size and sha256, no file
    that it does not list; raise :class:`CheckpointError` naming the file on any mismatch."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    manifest = _read_manifest(root)
    files = manifest["files"]
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() and p.name != MANIFEST}
    unlisted = sorted(on_disk - set(files))
    if unlisted:
        raise CheckpointError(
            f"checkpoint {str(root)!r} holds {unlisted[:5]} not listed in its {MANIFEST}: refusing to load files "
            "that were not verified (remove them, or restore the checkpoint as it was saved)"
        )
    for rel, meta in files.items():
        p = root / rel
        if p.is_symlink() or not p.is_file():
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
    final = root / iter_dir_name(rollout_id)
    check_finite_weights(model.state_dict().items(), f"save checkpoint {str(final)!r}")  # before touching disk
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:  # temp dir ".iter_N.tmp*": run_dirs.sweep_stale_temps matches it
        _write_hf_dir(model, tmp / "model", tokenizer_dir)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(get_rng_state(), tmp / "rng.pt")
        state = {"format_version": FORMAT_VERSION, "rollout_id": int(rollout_id), **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        snapshot = redact_secrets(args_snapshot)
        (tmp / "args.json").write_text(json.dumps(snapshot, indent=2, sort_keys=True, default=str) + "\n")
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
    text = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{str(pointer)!r} should hold a rollout id, got {text!r}")
    ckpt = root / iter_dir_name(int(text))
    verify_checkpoint(ckpt)
    return ckpt


def checkpoint_to_load(load: str | os.PathLike | None, save: str | os.PathLike | None) -> Path | None:
    """The verified checkpoint dir ``--load`` names (rule in slime.utils.run_dirs), or None to start fresh."""
    target = resolve_load(load, save)
    if target is None:
        return None
    if target.kind == "checkpoint":
        verify_checkpoint(target.path)
        return target.path
    return latest_checkpoint(target.path)


def load_checkpoint(ckpt_dir: str | os.PathLike, model, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Verify ``ckpt_dir``; load exactly the files its manifest lists: weights (safetensors), optimizer and RNG
    states; returns the trainer state."""
    from safetensors.torch import load_file

    root = Path(ckpt_dir)
    listed = set(verify_checkpoint(root)["files"])
    state_dict = {}
    for rel in sorted(r for r in listed if r.startswith("model/") and r.endswith(".safetensors")):
        state_dict.update(load_file(root / rel))
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
        if "optimizer.pt" not in listed:
            logger.warning("checkpoint %s has no optimizer state (saved with --no-save-optim): fresh AdamW", root)
        else:
            optimizer.load_state_dict(torch.load(root / "optimizer.pt", weights_only=True, map_location="cpu"))
    set_rng_state(torch.load(root / "rng.pt", weights_only=True))
    return _trainer_state(root / "trainer_state.json")


def _trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r}: unreadable trainer state ({e})") from e
    ok = isinstance(state, dict) and all(
        type(state.get(k, 0)) is int and state.get(k, 0) >= 0 for k in ("rollout_id", "global_step", "weight_version")
    )
    if not ok or "rollout_id" not in state:
        raise CheckpointError(
            f"{str(path)!r}: expected an object with integers rollout_id, global_step, weight_version >= 0, "
            f"got {state!r}"
        )
    return state


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        names = {n for n, m in model.named_modules() if m is head}
        return {f"{n}.weight" for n in names}
    return set()
