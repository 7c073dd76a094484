"""train.py's loop in real Ray with the real torch trainer group and a stand-in RolloutManager.

Covers the orchestration independently of the servers: generate → train → save → push weights →
eval → log, the weight push from disk after every step, checkpoint/resume continuing at the next
rollout with the trainer's step counter, and the clean shutdown on success and on an exception.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from slime.utils.arguments import parse_args
from slime.utils.logging_utils import read_metrics

HERE = Path(__file__).resolve().parent
TRAIN_PY = HERE.parents[1] / "slime_ta_opd" / "train.py"


def load_train_module():
    spec = importlib.util.spec_from_file_location("slime_train_entry", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_module(monkeypatch):
    from fake_rollout_manager import create_fake_rollout_manager

    module = load_train_module()
    monkeypatch.setattr(module, "create_rollout_manager", create_fake_rollout_manager)
    return module


def _args(student, tmp_path, *extra):
    return parse_args(
        [
            "--hf-checkpoint", str(student), "--rollout-batch-size", "4", "--rollout-max-response-len", "8",
            "--micro-batch-size", "2", "--lr", "1e-3",
            "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate",
            "--skip-preflight",  # the fake rollout manager has no servers to check
            "--output-dir", str(tmp_path / "out"), "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
            "--save-interval", "2", "--keep-last-n-checkpoints", "1",
            *extra,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_loop_trains_pushes_saves_and_resumes(tmp_path, ray_local, train_module, tiny_student_dir):
    from fake_rollout_manager import read_calls

    calls_path = tmp_path / "out" / "fake_rm_calls.jsonl"
    last = train_module.train(_args(tiny_student_dir, tmp_path, "--num-rollout", "3"))
    assert last["rollout_id"] == 2 and last["train/step"] == 3.0
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["rollout_id"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["opd/realised_ratio"] == r["rollout/kept_token_ratio"]
        assert r["train/kept_tokens"] > 0 and "train/teacher_kl_kept" in r and "train/grad_norm" in r
    assert (tmp_path / "out" / "metrics.csv").is_file()

    calls = read_calls(calls_path)
    names = [c["call"] for c in calls]
    assert names.count("generate") == 3 and names[-1] == "shutdown"
    pushes = [c for c in calls if c["call"] == "update_weights_from_disk"]
    assert len(pushes) == 3 and all(p["complete"] for p in pushes)
    assert [p.name for p in (tmp_path / "out" / "weights").iterdir()] == [Path(pushes[-1]["path"]).name]
    # save-interval 2 and the last rollout: saves at 1 and 2, keep-last-1 leaves iter 2; data position saved first
    assert [c["rollout_id"] for c in calls if c["call"] == "save"] == [1, 2]
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["iter_0000002", "latest_checkpointed_iteration.txt", "slime_save.lock"]  # lock: run_dirs

    # resume: continues at rollout 3 with the trainer's step counter, data position and engine weights restored
    calls_path.unlink()
    last = train_module.train(_args(tiny_student_dir, tmp_path, "--num-rollout", "5"))
    assert last["rollout_id"] == 4 and last["train/step"] == 5.0
    calls = read_calls(calls_path)
    assert [c["rollout_id"] for c in calls if c["call"] == "load"] == [2]
    assert [c["rollout_id"] for c in calls if c["call"] == "generate"] == [3, 4]
    first_push = next(i for i, c in enumerate(calls) if c["call"] == "update_weights_from_disk")
    first_generate = next(i for i, c in enumerate(calls) if c["call"] == "generate")
    assert first_push < first_generate  # the engines get the checkpoint's weights before rolling out
    assert [r["rollout_id"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_loop_shuts_servers_down_on_error(tmp_path, ray_local, train_module, tiny_student_dir, monkeypatch):
    from fake_rollout_manager import read_calls

    def broken_training_models(*a, **k):
        raise RuntimeError("trainer failed to start")

    monkeypatch.setattr(train_module, "create_training_models", broken_training_models)
    with pytest.raises(RuntimeError, match="trainer failed to start"):
        train_module.train(_args(tiny_student_dir, tmp_path, "--num-rollout", "1"))
    assert read_calls(tmp_path / "out" / "fake_rm_calls.jsonl")[-1]["call"] == "shutdown"
