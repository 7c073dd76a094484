"""Token bank: every rollout step's per-token statistics written to disk (METHOD.md §2, §6.1).

One file per step and rank, ``step{rollout_id:07d}_rank{rank:03d}.{csv,jsonl,parquet}``, each row
one response token: rollout id, sample id, position, sampled id, loss mask, kept flag, the
sampled-token log-probs, every §2 statistic of ``result.stats``, every selector's score of
``result.scores`` (``score_<name>``), the normalised features of ``result.features``
(``feat_<name>``), optional raw top-K lists, and the pair / teacher / student names. When the
caller passes the prompts' token ids, a sidecar ``contexts_step..._rank....jsonl`` holds one line
per sample (the input of ``tools/export_fixed_context_bank.py --from-token-bank``).

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
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ta_opd.atomic_io import atomic_open

TOKEN_BANK_FORMATS = ("csv", "jsonl", "parquet")
RAW_TOPK_COLUMNS = ("student_topk_ids", "student_topk_logp", "teacher_topk_ids", "teacher_topk_logp")


def step_file_name(rollout_id: int, rank: int, fmt: str) -> str:
    return f"step{int(rollout_id):07d}_rank{int(rank):03d}.{fmt}"


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
    if isinstance(obj, dict):
        items = obj.items()
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
    ) -> None:
        if fmt not in TOKEN_BANK_FORMATS:
            raise ValueError(f"token bank format {fmt!r} is not one of {TOKEN_BANK_FORMATS}")
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.raw_topk = bool(raw_topk)
        self.pair_id = pair_id
        self.teacher_name = teacher_name
        self.student_name = student_name
        self.rank = int(rank)
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
        cols.update(_per_token_fields(getattr(result, "features", None), n, "feat_"))
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
        path = self.out_dir / step_file_name(rollout_id, self.rank, self.fmt)
        _atomic_write(path, lambda fh: _WRITERS[self.fmt](fh, cols))
        if prompt_token_ids is not None:
            self._write_contexts(rollout_id, cols, sample_ids, prompt_token_ids, prompt_ids)
        return path

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
    if name in BANK_TEXT_COLUMNS:
        return value
    if name in RAW_TOPK_COLUMNS:
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
    UTF-8) raises ``TokenBankError`` naming the file and the line (CSV / JSONL) or the column.
    """
    path = Path(path)
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
            rows.append((lineno, record))
        names = list(rows[0][1]) if rows else []
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
        return cols
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
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
    return cols
