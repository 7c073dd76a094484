"""Acceptance: TA-OPD end to end at tiny size with every real component.

Tiny Qwen3 student and teacher from a config, the offline tokenizer, real Ray, the embedded
SGLang-API student engine behind a real sglang-router plus an embedded teacher server on
127.0.0.1, the RolloutManager, the torch trainer group and ``train.py``'s loop: 3 rollouts with
``--opd-budget-mask dlearn_high --opd-budget-ratio 0.1`` complete, the realised keep ratio is
logged, checkpoints are written, and a second run with ``--load`` continues from the checkpoint.
(That the loss touches only kept tokens is tested by gradients in tests/backends/test_torch_trainer.py.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from slime.embedded.models import build_tiny_checkpoint
from slime.embedded.task import write_splits
from slime.utils.arguments import parse_args
from slime.utils.logging_utils import read_metrics

TRAIN_PY = Path(__file__).resolve().parents[2] / "slime_ta_opd" / "train.py"


def load_train_module():
    spec = importlib.util.spec_from_file_location("slime_train_entry", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ta_opd_three_steps_then_resume(tmp_path, ray_local):
    # models in the run's directory: the engines accept weight pushes below the model's parent dir
    student = build_tiny_checkpoint(tmp_path / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(tmp_path / "teacher", size="nano", seed=1)
    train_jsonl, _ = write_splits(tmp_path / "data", num_train=64, num_eval=4, seed=0)
    out, save = tmp_path / "out", tmp_path / "ckpt"

    def argv(num_rollout: int) -> list[str]:
        return [
            "--hf-checkpoint", str(student), "--prompt-data", str(train_jsonl),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
            "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "12",
            "--rollout-num-engines", "1", "--num-rollout", str(num_rollout),
            "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(teacher),
            "--opd-budget-mask", "dlearn_high", "--opd-budget-ratio", "0.1", "--opd-topk-metrics-k", "4",
            "--micro-batch-size", "4", "--lr", "1e-3",
            "--output-dir", str(out), "--save", str(save), "--load", str(save), "--save-interval", "1",
            "--keep-last-n-checkpoints", "2",
        ]  # fmt: skip

    train = load_train_module()
    last = train.train(parse_args(argv(3)))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["rollout_id"] for r in records] == [0, 1, 2]
    for r in records:
        realised = r["opd/realised_ratio"]
        assert r["opd/nominal_ratio"] == 0.1 and realised == pytest.approx(r["rollout/kept_token_ratio"])
        # the global budget keeps ceil(0.1·N) tokens, then min-keep-per-sample tops up (docs/method.md §5)
        assert 0.1 <= realised < 1.0, realised
        assert r["train/kept_tokens"] == r["rollout/loss_mask_tokens"]
        assert r["train/kept_tokens"] < r["rollout/response_tokens"]
        assert r["train/kept_tokens"] >= 8  # at least one kept token per sample
        for key in (
            "train/loss",
            "train/grad_norm",
            "train/clipfrac",
            "train/teacher_kl_all",
            "train/teacher_kl_kept",
        ):
            assert key in r and r[key] is not None, key
    assert last["train/step"] == 3.0
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000001", "iter_0000002"]
    assert (save / "rollout" / "global_dataset_state_dict_2.json").is_file()  # data position, saved with it
    assert len(list((out / "weights").iterdir())) == 1  # only the latest pushed weights are kept

    last = train.train(parse_args(argv(4)))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["rollout_id"] for r in records] == [0, 1, 2, 3]
    assert last["rollout_id"] == 3 and last["train/step"] == 4.0  # continued from the checkpoint's optimizer step
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
