# Over 600 lines: one on-disk format — its writer, both layouts (native, release) and the validating reader.
"""Token bank: every rollout step's per-token statistics written to disk (docs/method.md §2, §6.1).

Native layout: one file per step and rank, ``step{rollout_id:07d}_rank{rank:03d}.{csv,jsonl,parquet}``, each row
one response token: rollout id, sample id, position, sampled id, loss mask, kept flag, the
sampled-token log-probs, every §2 statistic of ``result.stats``, every selector's score of
``result.scores`` (``score_<name>``), the normalised features of ``result.features``
(``feat_<name>``), optional raw top-K lists, and the pair / teacher / student names. When the
caller passes the prompts' token ids, a sidecar ``contexts_step..._rank....jsonl`` holds one line
per sample (the input of ``tools/export_fixed_context_bank.py --from-token-bank``).

Release layout (``layout="release"``, ``--opd-token-bank-layout release``): the original TA-OPD release's
file names and columns, ``rollout_{rollout_id:06d}.{csv,jsonl}`` (``Hs_topk_norm``, ``KLf_union``, ``Cmass``,
``H_norm``, ``D_norm``, ``C_norm``, ``Dlearn``, ``tip_score``, ``ca_softor_score``, ``quadrant``,
``budget_keep``, ... see ``RELEASE_COLUMNS``; our other columns follow under their own names), one
``summary.csv`` row per step and a ``config.json``. ``read_token_bank_file`` reads both layouts back into the
native column names.

One bank directory belongs to one run: a writer given ``owner`` (the run's output directory) records it in
``bank_owner.json`` and refuses a directory that holds bank files of another run, or bank files of an unknown
run; the same run (a resume) may write on.

Writes are atomic (temp file + fsync + rename): a failed write (disk full, ...) raises an
``OSError`` naming the file and leaves no partial file behind. Parquet needs pyarrow, imported
only when that format is used.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ta_opd.atomic_io import atomic_open

TOKEN_BANK_FORMATS = ("csv", "jsonl", "parquet")
TOKEN_BANK_LAYOUTS = ("native", "release")
RAW_TOPK_COLUMNS = ("student_topk_ids", "student_topk_logp", "teacher_topk_ids", "teacher_topk_logp")
OWNER_FILE = "bank_owner.json"
_BANK_FILE = re.compile(r"^(step\d+_rank\d+\.(csv|jsonl|parquet)|rollout_\d+\.(csv|jsonl)|summary\.csv)$")
_RELEASE_FILE = re.compile(r"^rollout_\d+\.(csv|jsonl)$")

# Release column name → native column name (the columns both layouts have; ``budget_keep`` is ``kept``).
RELEASE_COLUMNS: dict[str, str] = {
    "rollout_id": "rollout_id",
    "sample_index": "sample_id",
    "sample_ordinal": "sample_index",
    "tok_pos": "position",
    "pos_norm": "position_norm",
    "resp_len": "response_length",
    "token_id": "sampled_id",
    "student_logp_sampled": "student_logp",
    "teacher_logp_sampled": "teacher_logp",
    "student_top1_id": "student_top1_id",
    "teacher_top1_id": "teacher_top1_id",
    "student_top1_prob": "student_top1_prob",
    "teacher_top1_prob": "teacher_top1_prob",
    "student_topk_mass": "student_topk_mass",
    "teacher_topk_mass": "teacher_topk_mass",
    "Hs_topk_norm": "entropy_norm",
    "KLf_union": "kl_f_union",
    "KLr_union": "kl_r_union",
    "Cmass": "compat_mass",
    "Cmass_topk": "cmass",
    "Cmass_true": "cmass_exact",
    "Cmass_exact": "exact_rows",
    "Coverlap": "overlap",
    "CBC": "bc",
    "reach_t1": "reach_t1",
    "target_student_rank": "student_rank_sampled",
    "target_teacher_rank": "teacher_rank_sampled",
    "loss_mask_original": "loss_mask",
    "H_norm": "feat_h",
    "D_norm": "feat_d",
    "C_norm": "feat_c",
    "DC_norm": "feat_dc",
    "Dlearn": "feat_d_learn",
    "Dincompat": "feat_d_incompat",
    "tip_score": "score_tip",
    "ca_softor_score": "score_ca_softor",
    "split_ca_score": "score_q3",
    "budget_keep": "kept",
    "student_top_ids": "student_topk_ids",
    "student_top_logps": "student_topk_logp",
    "teacher_top_ids": "teacher_topk_ids",
    "teacher_top_logps": "teacher_topk_logp",
    "pair_id": "pair_id",
    "teacher_name": "teacher_name",
    "student_name": "student_name",
}
# Release columns computed from the others (not stored under a native name).
RELEASE_DERIVED = (
    "schema_version", "seed", "sampled_reverse_kl", "sampled_teacher_adv", "target_in_student_topk",
    "target_in_teacher_topk", "quadrant", "budget_method", "budget_ratio", "budget_score",
)  # fmt: skip
RELEASE_TEXT_COLUMNS = ("quadrant", "budget_method")
Q3_LABEL = "Q3_lowH_highD"


def step_file_name(rollout_id: int, rank: int, fmt: str) -> str:
    return f"step{int(rollout_id):07d}_rank{int(rank):03d}.{fmt}"


def release_file_name(rollout_id: int, fmt: str) -> str:
    return f"rollout_{int(rollout_id):06d}.{fmt}"


def bank_owner(path: str | os.PathLike[str]) -> str | None:
    """The run recorded in a bank directory's ``bank_owner.json`` (None when there is none)."""
    marker = Path(path) / OWNER_FILE
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["owner"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise TokenBankError(f"{marker}: unreadable bank owner record ({exc})") from None


def claim_bank_dir(path: str | os.PathLike[str], owner: str | None) -> None:
    """Refuse a bank directory holding another run's files; record ``owner`` in an empty one (see the module doc)."""
    path = Path(path)
    files = sorted(f.name for f in path.iterdir() if _BANK_FILE.match(f.name)) if path.is_dir() else []
    recorded = bank_owner(path)
    if recorded is not None and recorded != owner:
        raise TokenBankError(
            f"token bank directory {str(path)!r} holds the bank of another run ({recorded}); "
            f"this run ({owner}) would overwrite it: give each run its own bank directory (e.g. <run>/token_bank)"
        )
    if recorded is None and files:
        raise TokenBankError(
            f"token bank directory {str(path)!r} already holds bank files of an unknown run ({', '.join(files[:3])}"
            f"{', ...' if len(files) > 3 else ''}); refusing to overwrite them: give each run its own empty bank "
            "directory (e.g. <run>/token_bank)"
        )
    if recorded is None and owner is not None:
        _atomic_write(path / OWNER_FILE, lambda fh: fh.write((json.dumps({"owner": owner}) + "\n").encode()))


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bool:
            value = value.to(torch.int8)
        elif value.is_floating_point():
            value = value.to(torch.float64)
        return value.numpy()
    return np.asarray(value)


def _per_token_fields(obj: Any, n: int, prefix: str) -> dict[str, np.ndarray]:
    """The ``[n]`` tensor fields of a dataclass / dict / namespace (None and other shapes skipped)."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):  # SelectorScores computes each score on access: every one is written
        items = ((name, obj[name]) for name in list(obj))
    elif dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        items = vars(obj).items()
    out = {}
    for name, value in items:
        if isinstance(value, torch.Tensor | np.ndarray) and tuple(value.shape) == (n,):
            out[f"{prefix}{name}"] = _as_numpy(value)
    return out


def _topk_lists(ids: Any, logp: Any) -> tuple[list[list[int]], list[list[float]]]:
    """Rows of a padded top-K pair without padding (id -1 / non-finite log-prob)."""
    ids_np = _as_numpy(ids).astype(np.int64)
    logp_np = _as_numpy(logp).astype(np.float64)
    keep = (ids_np >= 0) & np.isfinite(logp_np)
    return (
        [row[m].tolist() for row, m in zip(ids_np, keep, strict=True)],
        [row[m].tolist() for row, m in zip(logp_np, keep, strict=True)],
    )


class TokenBankWriter:
    """Writes one token-bank file per rollout step and rank (see the module docstring).

    The output directory is created and probed for writability at construction, so a bad
    ``--opd-token-bank-dir`` fails before any training step runs.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        fmt: str = "csv",
        raw_topk: bool = False,
        pair_id: str | None = None,
        teacher_name: str | None = None,
        student_name: str | None = None,
        rank: int = 0,
        layout: str = "native",
        owner: str | None = None,
        budget_method: str | None = None,
        budget_ratio: float | None = None,
        seed: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if fmt not in TOKEN_BANK_FORMATS:
            raise ValueError(f"token bank format {fmt!r} is not one of {TOKEN_BANK_FORMATS}")
        if layout not in TOKEN_BANK_LAYOUTS:
            raise ValueError(f"token bank layout {layout!r} is not one of {TOKEN_BANK_LAYOUTS}")
        if layout == "release" and fmt == "parquet":
            raise ValueError("the release token-bank layout writes csv or jsonl (rollout_%06d.csv|jsonl), not parquet")
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.raw_topk = bool(raw_topk)
        self.pair_id = pair_id
        self.teacher_name = teacher_name
        self.student_name = student_name
        self.rank = int(rank)
        self.layout = layout
        self.owner = owner
        self.budget_method = budget_method
        self.budget_ratio = budget_ratio
        self.seed = seed
        self.config = dict(config or {})
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise ValueError("token bank format 'parquet' needs pyarrow (pip install pyarrow)") from exc
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.out_dir, prefix=".probe-", delete=True):
                pass
        except OSError as exc:
            raise ValueError(f"token bank directory {str(self.out_dir)!r} is not writable: {exc}") from exc
        claim_bank_dir(self.out_dir, owner)

    @classmethod
    def from_args(cls, args: Any, rank: int = 0) -> TokenBankWriter:
        """The writer a training run's flags describe (``--opd-token-bank-*``; the run's ``--output-dir`` owns it)."""
        output_dir = getattr(args, "output_dir", None)
        names = ("opd_topk_metrics_k", "opd_budget_mask", "opd_budget_ratio", "opd_budget_gamma", "opd_compat_proxy",
                 "opd_metric_normalization", "opd_exact_cmass", "opd_exact_cmass_max_union",
                 "opd_exact_cmass_overflow")  # fmt: skip
        return cls(
            args.opd_token_bank_dir,
            fmt=getattr(args, "opd_token_bank_format", "csv"),
            raw_topk=bool(getattr(args, "opd_token_bank_raw_topk", False)),
            pair_id=getattr(args, "opd_token_bank_pair_id", None),
            teacher_name=getattr(args, "opd_teacher_name", None),
            student_name=getattr(args, "opd_student_name", None),
            rank=rank,
            layout=getattr(args, "opd_token_bank_layout", "native"),
            owner=os.path.realpath(output_dir) if output_dir else None,
            budget_method=getattr(args, "opd_budget_mask", None),
            budget_ratio=getattr(args, "opd_budget_ratio", None),
            seed=getattr(args, "seed", None),
            config={"schema_version": 1, **{n: getattr(args, n, None) for n in names}},
        )

    # -- rows -------------------------------------------------------------------------------
    def step_columns(
        self, rollout_id: int, batch: Any, result: Any, sample_ids: Sequence[Any]
    ) -> dict[str, np.ndarray | list[Any]]:
        """The columns of one step's file (name → per-token values), in file order."""
        sampled = _as_numpy(batch.sampled_ids).astype(np.int64)
        n = sampled.shape[0]
        sample_index = _as_numpy(batch.sample_index).astype(np.int64)
        ids = np.asarray(list(sample_ids), dtype=object)
        if n and (sample_index.min() < 0 or sample_index.max() >= len(ids)):
            raise ValueError(
                f"batch.sample_index spans {sample_index.min()}..{sample_index.max()} but {len(ids)} sample ids given"
            )
        kept = _as_numpy(result.mask).reshape(-1)
        if kept.shape[0] != n:
            raise ValueError(f"result.mask has {kept.shape[0]} rows, batch has {n} tokens")
        cols: dict[str, np.ndarray | list[Any]] = {
            "rollout_id": np.full(n, int(rollout_id), dtype=np.int64),
            "rank": np.full(n, self.rank, dtype=np.int64),
            "sample_id": ids[sample_index].tolist() if n else [],
            "sample_index": sample_index,
            "position": _as_numpy(batch.position).astype(np.int64),
            "response_length": _as_numpy(batch.response_length).astype(np.int64),
            "sampled_id": sampled,
            "loss_mask": _as_numpy(batch.loss_mask).astype(np.int64),
            "kept": kept.astype(np.int64),
            "student_logp": _as_numpy(batch.student_logp).astype(np.float64),
            "teacher_logp": _as_numpy(batch.teacher_logp).astype(np.float64),
        }
        for name, value in _per_token_fields(getattr(result, "stats", None), n, "").items():
            cols.setdefault(name, value)
        cols.update(_per_token_fields(getattr(result, "scores", None), n, "score_"))
        features = getattr(result, "features", None)
        cols.update(_per_token_fields(features, n, "feat_"))
        if "feat_h" in cols and "feat_d" in cols and hasattr(features, "h_median"):
            high_h = np.asarray(cols["feat_h"]) >= float(features.h_median)
            high_d = np.asarray(cols["feat_d"]) >= float(features.d_median)
            cols["quadrant"] = np.where(
                high_h, np.where(high_d, "Q1_highH_highD", "Q2_highH_lowD"), np.where(high_d, Q3_LABEL, "Q4_lowH_lowD")
            ).tolist()
        if self.raw_topk:
            s_ids, s_logp = _topk_lists(batch.student_topk_ids, batch.student_topk_logp)
            t_ids, t_logp = _topk_lists(batch.teacher_topk_ids, batch.teacher_topk_logp)
            cols.update(
                student_topk_ids=s_ids, student_topk_logp=s_logp, teacher_topk_ids=t_ids, teacher_topk_logp=t_logp
            )
        for name, value in (("pair_id", self.pair_id), ("teacher_name", self.teacher_name)):
            cols[name] = [value] * n
        cols["student_name"] = [self.student_name] * n
        return cols

    # -- files ------------------------------------------------------------------------------
    def write_step(
        self,
        rollout_id: int,
        batch: Any,
        result: Any,
        sample_ids: Sequence[Any],
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_ids: Sequence[Any] | None = None,
    ) -> Path:
        """Write one step's file (and the contexts sidecar when ``prompt_token_ids`` is given); return its path."""
        cols = self.step_columns(rollout_id, batch, result, sample_ids)
        if self.layout == "release":
            path = self.out_dir / release_file_name(rollout_id, self.fmt)
            rel = release_columns(cols, self.budget_method, self.budget_ratio, self.seed)
            _atomic_write(path, lambda fh: _WRITERS[self.fmt](fh, rel))
            self._write_release_summary(rollout_id, rel)
        else:
            path = self.out_dir / step_file_name(rollout_id, self.rank, self.fmt)
            _atomic_write(path, lambda fh: _WRITERS[self.fmt](fh, cols))
        if prompt_token_ids is not None:
            self._write_contexts(rollout_id, cols, sample_ids, prompt_token_ids, prompt_ids)
        return path

    def _write_release_summary(self, rollout_id: int, rel: dict[str, Any]) -> None:
        """A ``summary.csv`` row per step (rewritten atomically; a resumed step replaces its row); ``config.json``."""
        valid = np.asarray(rel["loss_mask_original"]).astype(bool)
        kept = valid & np.asarray(rel["budget_keep"]).astype(bool)

        def mean(name: str) -> float:
            if name not in rel or not valid.any():
                return math.nan
            return float(np.nanmean(np.asarray(rel[name], dtype=float)[valid]))

        quadrant = np.asarray(rel.get("quadrant", [""] * len(valid)))
        row = {
            "rollout_id": int(rollout_id),
            "num_tokens": len(valid),
            "num_valid_tokens": int(valid.sum()),
            "num_kept_tokens": int(kept.sum()),
            "keep_ratio": float(kept.sum() / max(int(valid.sum()), 1)),
            **{f"mean_{c}": mean(c) for c in ("H_norm", "D_norm", "C_norm", "tip_score", "ca_softor_score")},
            "mean_reach_t1": mean("reach_t1"),
            "q3_tokens": int((quadrant[valid] == Q3_LABEL).sum()),
            "budget_method": self.budget_method,
            "budget_ratio": self.budget_ratio,
        }
        summary = self.out_dir / "summary.csv"
        rows = []
        if summary.is_file():
            with summary.open(newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("rollout_id") != str(row["rollout_id"])]
        rows.append(row)

        def write(fh: Any) -> None:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(rows)
            text.flush()
            text.detach()

        _atomic_write(summary, write)
        config = self.out_dir / "config.json"
        if not config.exists():
            body = {"schema_version": 1, **self.config, "layout": "release"}
            _atomic_write(config, lambda fh: fh.write((json.dumps(body, indent=2, default=str) + "\n").encode()))

    def _write_contexts(
        self,
        rollout_id: int,
        cols: dict[str, Any],
        sample_ids: Sequence[Any],
        prompt_token_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Any] | None,
    ) -> None:
        if len(prompt_token_ids) != len(sample_ids):
            raise ValueError(f"{len(prompt_token_ids)} prompts given for {len(sample_ids)} samples")
        sample_index = np.asarray(cols["sample_index"])
        position = np.asarray(cols["position"])
        sampled = np.asarray(cols["sampled_id"])
        lines = []
        for j, sid in enumerate(sample_ids):
            rows = np.flatnonzero(sample_index == j)
            response = sampled[rows[np.argsort(position[rows], kind="stable")]].tolist()
            record = {
                "rollout_id": int(rollout_id),
                "sample_id": sid,
                "prompt_id": None if prompt_ids is None else prompt_ids[j],
                "prompt_token_ids": [int(t) for t in prompt_token_ids[j]],
                "response_token_ids": response,
                "pair_id": self.pair_id,
            }
            lines.append(json.dumps(record))
        name = "contexts_" + step_file_name(rollout_id, self.rank, "jsonl")
        _atomic_write(self.out_dir / name, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))


def release_columns(
    cols: dict[str, Any], budget_method: str | None, budget_ratio: float | None, seed: int | None
) -> dict[str, Any]:
    """Native step columns → the release's columns (``RELEASE_COLUMNS`` order first, then our other columns)."""
    n = len(cols["sampled_id"])
    native_to_release = {v: k for k, v in RELEASE_COLUMNS.items()}
    s_logp = np.asarray(cols["student_logp"], dtype=float)
    t_logp = np.asarray(cols["teacher_logp"], dtype=float)
    out: dict[str, Any] = {"schema_version": np.ones(n, dtype=np.int64), "seed": [seed] * n}
    for release, native in RELEASE_COLUMNS.items():
        if native in cols:
            out[release] = cols[native]
    out["sampled_reverse_kl"] = s_logp - t_logp
    out["sampled_teacher_adv"] = t_logp - s_logp
    for side in ("student", "teacher"):
        if f"{side}_rank_sampled" in cols:
            out[f"target_in_{side}_topk"] = (np.asarray(cols[f"{side}_rank_sampled"]) >= 0).astype(np.int64)
    if "quadrant" in cols:
        out["quadrant"] = cols["quadrant"]
    out["budget_method"] = [budget_method] * n
    out["budget_ratio"] = np.full(n, math.nan if budget_ratio is None else float(budget_ratio))
    score = cols.get(f"score_{budget_method}")
    out["budget_score"] = np.asarray(score, dtype=float) if score is not None else np.full(n, math.nan)
    for name, value in cols.items():  # ours, under their own names (score_<selector>, feat_is_q3, rank, ...)
        if name not in native_to_release and name != "quadrant":
            out[name] = value
    return out


def _from_release(path: Path, cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A release-layout file's columns under the native names, with the native columns it lacks filled in."""
    out: dict[str, list[Any]] = {}
    for name, values in cols.items():
        out[RELEASE_COLUMNS.get(name, name)] = values
    n = len(next(iter(cols.values()), []))
    release_name = {v: k for k, v in RELEASE_COLUMNS.items()}
    for name in ("sample_id", "position", "sampled_id", "student_logp", "teacher_logp", "response_length"):
        if name not in out:
            raise TokenBankError(f"{path}: release-layout bank lacks the column {release_name[name]!r}")
    out.setdefault("rank", [0] * n)
    out.setdefault("sample_index", list(out["sample_id"]))
    out.setdefault("loss_mask", [1] * n)
    out.setdefault("kept", list(out["loss_mask"]))
    for name in BANK_TEXT_COLUMNS:
        out.setdefault(name, [None] * n)
    if "quadrant" in out and "feat_is_q3" not in out:
        out["feat_is_q3"] = [str(q).startswith("Q3") for q in out["quadrant"]]
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(fh: io.BufferedWriter, cols: dict[str, Any]) -> None:
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(list(cols))
    listed = [
        [json.dumps(v) for v in col] if name in RAW_TOPK_COLUMNS else (col.tolist() if hasattr(col, "tolist") else col)
        for name, col in cols.items()
    ]
    writer.writerows(zip(*listed, strict=True))
    text.flush()
    text.detach()


def _write_jsonl(fh: io.BufferedWriter, cols: dict[str, Any]) -> None:
    names = list(cols)
    listed = [col.tolist() if hasattr(col, "tolist") else col for col in cols.values()]
    for row in zip(*listed, strict=True):
        record = {name: _json_value(v) for name, v in zip(names, row, strict=True)}
        fh.write((json.dumps(record) + "\n").encode())


def _write_parquet(fh: io.BufferedWriter, cols: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: pa.array(col.tolist() if hasattr(col, "tolist") else list(col)) for name, col in cols.items()}
    pq.write_table(pa.table(arrays), fh)


_WRITERS = {"csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet}


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` via ``ta_opd.atomic_io`` (temp file, fsync, rename); never leave a partial file."""
    try:
        with atomic_open(path) as fh:
            write(fh)
    except OSError as exc:
        raise OSError(exc.errno, f"token bank: could not write {path} ({exc}); no partial file was left") from exc


# Columns every bank file has (``TokenBankWriter.step_columns``): integer-valued, free text, and the rest numbers.
BANK_INT_COLUMNS = (
    "rollout_id", "rank", "sample_index", "position", "response_length", "sampled_id", "loss_mask", "kept",
)  # fmt: skip
BANK_TEXT_COLUMNS = ("sample_id", "pair_id", "teacher_name", "student_name")
BANK_REQUIRED_COLUMNS = (*BANK_INT_COLUMNS, "student_logp", "teacher_logp", *BANK_TEXT_COLUMNS)


class TokenBankError(ValueError):
    """A damaged token-bank file: the message names the file and, where there is one, the line."""


def _check_columns(path: Path, names: Sequence[str]) -> None:
    if not names:
        raise TokenBankError(f"{path}: empty token bank file (no header / no rows)")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise TokenBankError(f"{path}: duplicate column(s) {duplicates}")
    missing = [n for n in BANK_REQUIRED_COLUMNS if n not in names]
    if missing:
        raise TokenBankError(
            f"{path}: token bank lacks column(s) {missing}; a bank file has {list(BANK_REQUIRED_COLUMNS)} and "
            "the statistics columns (was it written by TokenBankWriter?)"
        )


def _cell(where: str, name: str, value: Any) -> Any:
    """One cell as the writer meant it: an int, a float (NaN allowed), a top-K list, or text (unchanged)."""
    if name in BANK_TEXT_COLUMNS or name in RELEASE_TEXT_COLUMNS:
        return value
    if name in RAW_TOPK_COLUMNS:
        if value == "" or value is None:  # the release writes "" when raw top-K lists are off
            return []
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TokenBankError(f"{where}: column {name!r}: not a JSON list ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
            raise TokenBankError(f"{where}: column {name!r}: expected a list of numbers, got {value!r:.80}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in ("True", "False"):  # a numpy bool column
            value = text == "True"
        elif text == "" and name not in BANK_INT_COLUMNS:  # the release leaves unknown values empty
            value = None
        else:
            try:
                value = int(text) if name in BANK_INT_COLUMNS else float(text)
            except ValueError:
                kind = "an integer" if name in BANK_INT_COLUMNS else "a number"
                raise TokenBankError(f"{where}: column {name!r}: {value!r:.80} is not {kind}") from None
    if value is None and name not in BANK_INT_COLUMNS:
        return math.nan  # JSON lines store non-finite statistics as null
    if isinstance(value, bool):
        value = int(value)
    if name in BANK_INT_COLUMNS and not isinstance(value, int):
        raise TokenBankError(f"{where}: column {name!r}: {value!r:.80} is not an integer")
    if not isinstance(value, int | float):
        raise TokenBankError(f"{where}: column {name!r}: {value!r:.80} is not a number")
    return value


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TokenBankError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None


def read_token_bank_file(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Read one token-bank file back into columns (typed cells; raw top-K columns decoded to lists).

    A damaged file (missing columns, a non-numeric cell, a truncated row or line, bytes that are not
    UTF-8) raises ``TokenBankError`` naming the file and the line (CSV / JSONL) or the column. A release-layout
    file (``rollout_%06d.csv|jsonl``) comes back under the native column names (``RELEASE_COLUMNS``).
    """
    path = Path(path)
    release = bool(_RELEASE_FILE.match(path.name))
    suffix = path.suffix.lstrip(".")
    if suffix not in TOKEN_BANK_FORMATS:
        raise ValueError(f"{path}: unknown token bank file type {suffix!r}; expected one of {TOKEN_BANK_FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token bank file")
    if suffix == "parquet":
        import pyarrow.parquet as pq

        try:
            cols = pq.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow's errors do not name the file
            raise TokenBankError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
        _check_columns(path, list(cols))
        for name in BANK_INT_COLUMNS:
            bad = next((i for i, v in enumerate(cols[name]) if not isinstance(v, int) or isinstance(v, bool)), None)
            if bad is not None:
                raise TokenBankError(f"{path}: row {bad}: column {name!r}: {cols[name][bad]!r} is not an integer")
        return cols
    text = _decode(path, path.read_bytes())
    if suffix == "jsonl":
        rows: list[tuple[int, dict]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokenBankError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise TokenBankError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if release:
                record = {RELEASE_COLUMNS.get(k, k): v for k, v in record.items()}
            rows.append((lineno, record))
        names = list(rows[0][1]) if rows else []
        if not release:
            _check_columns(path, names)
        cols: dict[str, list[Any]] = {name: [] for name in names}
        for lineno, record in rows:
            if set(record) != set(names):
                raise TokenBankError(
                    f"{path}:{lineno}: keys differ from line {rows[0][0]}: lacks {sorted(set(names) - set(record))}, "
                    f"extra {sorted(set(record) - set(names))}"
                )
            for name in names:
                cols[name].append(_cell(f"{path}:{lineno}", name, record[name]))
        return _checked_release(path, cols) if release else cols
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        if release:
            header = [RELEASE_COLUMNS.get(h, h) for h in header]
        else:
            _check_columns(path, header)
        cols = {name: [] for name in header}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                raise TokenBankError(
                    f"{where}: row has {len(row)} cells, the header has {len(header)} (truncated or damaged row)"
                )
            for name, value in zip(header, row, strict=True):
                cols[name].append(_cell(where, name, value))
    except csv.Error as exc:
        raise TokenBankError(f"{path}:{reader.line_num}: damaged CSV ({exc})") from None
    return _checked_release(path, cols) if release else cols


def _checked_release(path: Path, cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if not cols:
        raise TokenBankError(f"{path}: empty token bank file (no header / no rows)")
    cols = _from_release(path, cols)
    _check_columns(path, list(cols))
    return cols
