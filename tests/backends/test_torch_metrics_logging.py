"""Per-step metrics sinks: JSONL and CSV always, optional sinks degrade with a message."""

from __future__ import annotations

import csv
import json
import logging
from argparse import Namespace

from slime.utils.logging_utils import MetricsLogger, read_metrics


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), metrics_path=None, use_tensorboard=False, use_wandb=False)
    base.update(kw)
    return Namespace(**base)


def test_jsonl_and_csv_with_columns_appearing_later(tmp_path):
    log = MetricsLogger(_args(tmp_path))
    log.log(0, {"train/loss": 1.5, "rollout/kept_token_ratio": 0.1})
    log.log(1, {"train/loss": 1.25, "rollout/kept_token_ratio": 0.12, "eval/score": 0.5, "x": float("nan")})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in lines] == [0, 1]
    assert lines[1]["x"] is None  # NaN is not valid JSON
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["train/loss"] for r in rows] == ["1.5", "1.25"]
    assert rows[0]["eval/score"] == "" and rows[1]["eval/score"] == "0.5"


def test_resumed_run_appends_and_later_line_wins(tmp_path):
    MetricsLogger(_args(tmp_path)).log(0, {"a": 1.0})
    log = MetricsLogger(_args(tmp_path))
    log.log(0, {"a": 2.0})  # the step re-run after a resume
    log.log(1, {"a": 3.0})
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.0, 3.0]
    with open(tmp_path / "metrics.csv") as f:
        assert [r["a"] for r in csv.DictReader(f)] == ["2.0", "3.0"]


def test_missing_optional_sinks_warn_and_continue(tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *a, **k):
        if name in ("wandb", "torch.utils.tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    args = _args(tmp_path, use_tensorboard=True, use_wandb=True, tb_project_name=None, tb_experiment_name=None)
    args.wandb_project = args.wandb_group = args.wandb_mode = None
    with caplog.at_level(logging.WARNING):
        log = MetricsLogger(args)
    assert "TensorBoard is not installed" in caplog.text and "wandb is not installed" in caplog.text
    log.log(0, {"a": 1.0})
    assert (tmp_path / "metrics.jsonl").is_file()


def test_log_step_prefixes_and_summary(tmp_path):
    log = MetricsLogger(_args(tmp_path))
    rollout = {"metrics": {"opd/realised_ratio": 0.12, "time_s": 1.0}}
    rec = log.log_step(0, rollout, {"train/teacher_kl_all": 0.5}, {"metrics": {"acc": 0.25}}, step_time=2.0)
    assert rec["opd/realised_ratio"] == 0.12 and rec["rollout/time_s"] == 1.0
    assert rec["eval/acc"] == 0.25 and rec["perf/step_time"] == 2.0
    log.log_step(1, {}, {"train/teacher_kl_all": 0.125}, None)
    assert "train/teacher_kl_all 0.5 -> 0.125" in log.summary()
