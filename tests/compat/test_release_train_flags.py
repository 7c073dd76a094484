"""train.py flags of the original release / upstream slime (slime.utils.compat_flags): accepted, ignored with one
warning line, or implemented (debug rollout save / load, rollout-only runs)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch

from slime.utils import compat_flags
from slime.utils.arguments import parse_args
from slime.utils.types import Sample

TRAIN_PY = Path(__file__).resolve().parents[2] / "slime_ta_opd" / "train.py"
BASE = ["--rollout-batch-size", "2", "--rollout-max-response-len", "4"]


@pytest.mark.parametrize("flag", sorted(compat_flags.IGNORED_FLAGS))
def test_ignored_flag_is_accepted_with_one_warning(flag, caplog):
    kind, why = compat_flags.IGNORED_FLAGS[flag]
    argv = [flag] if kind == "switch" else [flag, "x"]
    with caplog.at_level(logging.WARNING, logger="slime.utils.compat_flags"):
        args = parse_args([*BASE, *argv], validate=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "slime.utils.compat_flags"]
    assert warnings == [f"{flag} is accepted for compatibility and ignored here: {why}"]
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == (True if kind == "switch" else "x")


def test_release_command_line_parses():
    """The train.py flags of the release's run-qwen3-1.7B-sampled-opd-sglang.sh that upstream slime has."""
    args = parse_args([
        *BASE, "--optimizer", "adam", "--sglang-mem-fraction-static", "0.45", "--sglang-cuda-graph-max-bs", "8",
        "--sglang-enable-metrics", "--balance-data", "--qkv-format", "bshd", "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32",
        "--attention-backend", "flash", "--no-rope-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
        "--save-debug-rollout-data", "/runs/x/debug_rollout_data/{rollout_id}.pt", "--debug-rollout-only",
    ], validate=False)  # fmt: skip
    assert args.debug_rollout_only and args.save_debug_rollout_data.endswith("{rollout_id}.pt")
    assert args.opd_token_bank_layout == "native" and not args.allow_tokenizer_mismatch


def _samples():
    out = []
    for i in range(3):
        s = Sample(index=i, group_index=i // 2, prompt=f"{i}+1=", tokens=[1, 2, 3 + i, 7], response_length=2)
        s.rollout_log_probs = [-0.5, -0.25]
        s.reward = {"meta_info": {"input_token_logprobs": [[-1.0, 3 + i, None], [-2.0, 7, None]]}}
        s.status = Sample.Status.COMPLETED
        out.append(s)
    return out


def test_debug_rollout_round_trip(tmp_path):
    template = str(tmp_path / "dbg" / "{rollout_id}.pt")
    ns = type("A", (), {"save_debug_rollout_data": template, "load_debug_rollout_data": template})()
    samples = _samples()
    path = compat_flags.save_debug_rollout(ns, 4, samples)
    assert path == tmp_path / "dbg" / "4.pt" and sorted(p.name for p in path.parent.iterdir()) == ["4.pt"]
    back = compat_flags.load_debug_rollout(ns, 4)
    assert [s.to_dict() for s in back] == [s.to_dict() for s in samples]
    with pytest.raises(FileNotFoundError, match="step 5"):
        compat_flags.load_debug_rollout(ns, 5)
    with pytest.raises(ValueError, match="only \\{rollout_id\\}"):
        compat_flags.debug_rollout_path(str(tmp_path / "{step}.pt"), 0)
    off = type("A", (), {"save_debug_rollout_data": None, "load_debug_rollout_data": None})()
    assert compat_flags.save_debug_rollout(off, 0, samples) is None and compat_flags.load_debug_rollout(off, 0) is None


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_saved_rollout_holding_code_is_refused(tmp_path):
    torch.save({"samples": [_Payload()]}, tmp_path / "0.pt")
    ns = type("A", (), {"load_debug_rollout_data": str(tmp_path / "{rollout_id}.pt")})()
    with pytest.raises(ValueError, match="is not a saved rollout"):
        compat_flags.load_debug_rollout(ns, 0)


@pytest.mark.slow
def test_rollout_only_run_then_training_from_the_saved_rollouts(tmp_path, ray_local):
    from slime.embedded.models import build_tiny_checkpoint
    from slime.embedded.task import write_splits
    from slime.utils.logging_utils import read_metrics

    student = build_tiny_checkpoint(tmp_path / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(tmp_path / "teacher", size="nano", seed=1)
    train_jsonl, _ = write_splits(tmp_path / "data", num_train=16, num_eval=4, seed=0)
    spec = importlib.util.spec_from_file_location("slime_train_entry", TRAIN_PY)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    dbg = str(tmp_path / "dbg" / "{rollout_id}.pt")

    def argv(out: str, *extra: str) -> list[str]:
        return [
            "--hf-checkpoint", str(student), "--prompt-data", str(train_jsonl), "--input-key", "prompt",
            "--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2", "--n-samples-per-prompt",
            "2", "--rollout-max-response-len", "6", "--num-rollout", "2", "--use-opd", "--opd-type", "sglang",
            "--opd-teacher-hf-checkpoint", str(teacher), "--opd-budget-mask", "dlearn_high", "--opd-budget-ratio",
            "0.5", "--opd-topk-metrics-k", "4", "--micro-batch-size", "4", "--lr", "1e-3", "--skip-preflight",
            "--output-dir", str(tmp_path / out), *extra,
        ]  # fmt: skip

    train.train(parse_args(argv("rollouts", "--debug-rollout-only", "--save-debug-rollout-data", dbg)))
    first = read_metrics(tmp_path / "rollouts" / "metrics.jsonl")
    assert [r["rollout_id"] for r in first] == [0, 1]
    assert not any(k.startswith("train/") for r in first for k in r)  # no training step
    assert sorted(p.name for p in (tmp_path / "dbg").iterdir()) == ["0.pt", "1.pt"]

    train.train(parse_args(argv("trained", "--load-debug-rollout-data", dbg)))
    second = read_metrics(tmp_path / "trained" / "metrics.jsonl")
    assert [r["rollout_id"] for r in second] == [0, 1]
    for a, b in zip(first, second, strict=True):  # the same samples: the same selection on them
        assert b["rollout/response_tokens"] == a["rollout/response_tokens"]
        assert b["opd/n_kept_tokens"] == a["opd/n_kept_tokens"]
        assert "train/loss" in b
