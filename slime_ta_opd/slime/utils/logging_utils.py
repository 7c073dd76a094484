"""Per-step metrics: JSONL and CSV always (offline), TensorBoard / W&B when asked for and installed.

``<output-dir>/metrics.jsonl`` gets one JSON object per rollout step (appended and flushed, so a
crash loses at most the line being written); ``metrics.csv`` is rewritten atomically from all
records so far, so a metric that appears later simply adds a column.

Reading an existing file (a resumed run, :func:`read_metrics`): a last line that is not a complete JSON
object is the torn tail of an append interrupted by a kill; it is dropped with a warning (and cut off the
file when the logger reopens it for appending). A damaged line anywhere before the last one is not a torn
append, and raises a ValueError naming ``file:line``: the file needs a look, not a silent repair.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from slime.utils.misc import atomic_write_text
from slime.utils.redact import redact_secrets

logger = logging.getLogger(__name__)


def configure_logger(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _prefixed(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Keys without a namespace get ``prefix/``; ``opd/...`` and the like keep theirs."""
    return {k if "/" in k else f"{prefix}/{k}": v for k, v in metrics.items()}


class MetricsLogger:
    """Writes each step's metrics dict to every configured sink."""

    def __init__(self, args: Namespace):
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = Path(getattr(args, "metrics_path", None) or self.output_dir / "metrics.jsonl")
        self.csv_path = self.jsonl_path.with_suffix(".csv")
        self.records: list[dict[str, Any]] = []
        if self.jsonl_path.exists():  # a resumed run keeps the earlier steps' lines
            self.records, good_bytes = _read_jsonl(self.jsonl_path)
            raw = self.jsonl_path.read_bytes()
            intact = raw[:good_bytes]
            if intact and not intact.endswith(b"\n"):
                intact += b"\n"
            if intact != raw:  # a torn last line cut off (atomically): the next append starts on a clean line
                atomic_write_text(self.jsonl_path, intact.decode("utf-8"))
        self._tb = None
        self._wandb = None
        if getattr(args, "use_tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter

                log_dir = args.tb_project_name or str(self.output_dir / "tb")
                if getattr(args, "tb_experiment_name", None):
                    log_dir = os.path.join(log_dir, args.tb_experiment_name)
                self._tb = SummaryWriter(log_dir=log_dir)
            except ImportError as e:
                logger.warning("--use-tensorboard: TensorBoard is not installed (%s); `pip install tensorboard`", e)
        if getattr(args, "use_wandb", False):
            try:
                import wandb

                self._wandb = wandb.init(
                    project=args.wandb_project or "slime-ta-opd",
                    group=args.wandb_group,
                    mode=args.wandb_mode,
                    dir=str(self.output_dir),
                    config={
                        k: v for k, v in redact_secrets(args).items() if isinstance(v, str | int | float | bool | None)
                    },
                )
            except ImportError as e:
                logger.warning("--use-wandb: wandb is not installed (%s); `pip install wandb`", e)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"rollout_id": int(step), **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.records = [r for r in self.records if r.get("rollout_id") != step] + [record]
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()
        numeric = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return record

    def log_step(self, rollout_id: int, rollout_data: dict, train: dict, evaluation: dict | None, **perf) -> dict:
        """One rollout's record: rollout/selection metrics, trainer metrics, eval metrics and ``perf/*`` timings."""
        metrics = {**_prefixed("rollout", rollout_data.get("metrics") or {}), **train}
        metrics.update(_prefixed("eval", (evaluation or {}).get("metrics") or {}))
        metrics.update({f"perf/{k}": v for k, v in perf.items()})
        return self.log(rollout_id, metrics)

    def summary(self, key: str = "train/teacher_kl_all") -> str:
        """One line for the end of a run: steps logged, first and last value of ``key``, where the file is."""
        values = [r[key] for r in self.records if r.get(key) is not None and r.get("rollout_id", -1) >= 0]
        trend = f"{key} {values[0]:.4g} -> {values[-1]:.4g}" if values else f"no {key}"
        return f"{len(self.records)} records; {trend}; metrics in {self.jsonl_path}"

    def _write_csv(self) -> None:
        columns = ["rollout_id"] + sorted({k for r in self.records for k in r} - {"rollout_id"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in self.records:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
        atomic_write_text(self.csv_path, buf.getvalue())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics JSONL file and the byte length of its intact part (the file minus a torn last
    line); rules in the module docstring."""
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict[str, Any]] = []
    offset = 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, expected an object")
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                if i == last:
                    logger.warning(
                        "%s:%d: dropping a torn last line (%d bytes; an append interrupted by a kill?): %s",
                        path, i + 1, len(line), e,
                    )  # fmt: skip
                    return records, offset
                raise ValueError(
                    f"{path}:{i + 1}: not a metrics record ({e}); only a torn last line is dropped automatically: "
                    "fix or remove this line, or move the file aside"
                ) from e
            records.append(rec)
        offset += len(line)
    return records, offset


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSONL records of a run, one dict per line (later lines for a repeated rollout id win); a torn last
    line is dropped with a warning, a damaged earlier line raises ValueError naming file:line."""
    by_id: dict[Any, dict[str, Any]] = {}
    for rec in _read_jsonl(Path(path))[0]:
        by_id[rec.get("rollout_id")] = rec
    return list(by_id.values())
