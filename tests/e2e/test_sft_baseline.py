"""The off-policy SFT baseline end to end: train.py with every real component, the teacher server sampling the
training responses (slime.rollout.sft_baseline.generate_with_teacher) and --loss-type sft_loss, with an LR
warm-up + linear decay; the held-out eval generates with the student."""

from __future__ import annotations

import math

import pytest

from slime.utils.arguments import parse_args
from slime.utils.logging_utils import read_metrics
from tests.e2e.test_opd_end_to_end import load_train_module
from tests.e2e.tiny_runs import opd_argv, tiny_pair


def test_sft_baseline_flags_are_checked_at_start(tmp_path):
    base = ["--rollout-batch-size", "1", "--rollout-max-response-len", "4",
            "--custom-generate-function-path", "slime.rollout.sft_baseline.generate_with_teacher"]  # fmt: skip
    with pytest.raises(ValueError, match="needs --loss-type sft_loss, got policy_loss"):
        parse_args([*base, "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate"])
    with pytest.raises(ValueError, match="samples from the teacher server"):
        parse_args([*base, "--loss-type", "sft_loss"])


@pytest.mark.slow
def test_sft_on_teacher_samples_trains_the_student(tmp_path, ray_local):
    student, teacher, train_jsonl, eval_jsonl = tiny_pair(tmp_path, num_train=64)
    out = tmp_path / "out"
    argv = opd_argv(student, teacher, train_jsonl, out, batch=4, n=2, max_len=12, num_rollout=4, extra=[
        "--rollout-temperature", "0.8", "--rollout-num-engines", "1",
        "--opd-budget-mask", "full", "--opd-topk-metrics-k", "0",
        "--custom-generate-function-path", "slime.rollout.sft_baseline.generate_with_teacher",
        "--loss-type", "sft_loss",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "linear",
        "--micro-batch-size", "4", "--skip-preflight",
        "--eval-prompt-data", "heldout", str(eval_jsonl), "--eval-interval", "2",
        "--eval-custom-rm-path", "slime.embedded.task.reward_func", "--eval-max-response-len", "12",
    ])  # fmt: skip
    load_train_module().train(parse_args(argv))
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["rollout_id"] >= 0]
    assert [r["rollout_id"] for r in records] == [0, 1, 2, 3]
    for r in records:
        # the trained tokens are the teacher's samples: the sampling engine's log-probs are the teacher's
        # prefill of the same tokens (both at T = 0.8; float32 decode vs prefill)
        assert r["train/rollout_teacher_logp_abs_diff"] < 1e-3, r["train/rollout_teacher_logp_abs_diff"]
        assert math.isfinite(r["train/loss"]) and r["train/loss"] > 0
        assert math.isfinite(r["train/teacher_fkl_sampled"])
        assert "train/teacher_kl_all" not in r  # the reverse-KL estimate needs the student's own samples
    # LR: warm-up 1 step from 0, then linear to 1e-4 over D = 4 steps (one optimizer step per rollout)
    # n = 2: r = (2 − 1)/(4 − 1) = 1/3 → 1e-4 + (2/3)·9e-4 = 7e-4; n = 3: r = 2/3 → 4e-4
    assert [r["train/lr"] for r in records] == pytest.approx([0.0, 1e-3, 7e-4, 4e-4])
    assert records[-1]["train/sd_sft_nll"] < records[1]["train/sd_sft_nll"]  # SFT on the teacher's answers learns
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/heldout/reward_mean" in r]
    assert len(evals) >= 2  # held-out accuracy of the student, before and during training
