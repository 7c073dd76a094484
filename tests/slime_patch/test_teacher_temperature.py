"""With --rollout-temperature ≠ 1 the teacher's and the student's log-probs compared by the OPD loss are both
tempered by it (docs/training.md): the teacher's from the embedded teacher server, the student's from the trainer."""

from __future__ import annotations

import asyncio

import pytest
import torch

from slime.backends.torch_utils.actor import TorchTrainRayActor
from slime.backends.torch_utils.model import load_hf_model
from slime.rollout import on_policy_distillation as opd
from slime.utils.arguments import parse_args
from slime.utils.types import Sample

TOKENS, PROMPT_LEN = [5, 6, 7, 11, 12, 13], 3


def test_teacher_temperature_defaults_to_rollout_and_mismatch_is_refused(tmp_path):
    base = ["--rollout-batch-size", "1", "--rollout-max-response-len", "4", "--rollout-temperature", "0.7",
            "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate"]  # fmt: skip
    assert parse_args(base).opd_teacher_temperature == 0.7
    assert parse_args([*base, "--opd-teacher-temperature", "0.7"]).opd_teacher_temperature == 0.7
    with pytest.raises(ValueError, match="--opd-teacher-temperature 1.0 != --rollout-temperature 0.7"):
        parse_args([*base, "--opd-teacher-temperature", "1.0"])


def tempered_logp(model_dir, temperature: float) -> list[float]:
    """Hand-computed log_softmax(logits / T) of each response token."""
    model = load_hf_model(model_dir, dtype="float64").eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].double()
    logp = torch.log_softmax(logits / temperature, -1)
    return [float(logp[PROMPT_LEN - 1 + j, TOKENS[PROMPT_LEN + j]]) for j in range(len(TOKENS) - PROMPT_LEN)]


@pytest.mark.slow
def test_teacher_and_student_logprobs_at_the_rollout_temperature(tiny_student_dir, tiny_teacher_dir, tmp_path):
    from slime.backends.embedded_sglang.launch import launch_server

    srv = launch_server(str(tiny_teacher_dir))
    try:
        args = parse_args([
            "--hf-checkpoint", str(tiny_student_dir), "--rollout-batch-size", "1", "--rollout-max-response-len", "4",
            "--rollout-temperature", "0.7", "--use-opd", "--opd-type", "sglang", "--rm-url", srv.url + "/generate",
            "--opd-topk-metrics-k", "4", "--train-dtype", "float64", "--output-dir", str(tmp_path / "out"),
        ])  # fmt: skip
        n = len(TOKENS) - PROMPT_LEN
        sample = Sample(index=0, prompt="p", tokens=list(TOKENS), response_length=n, loss_mask=[1] * n)
        sample.reward = asyncio.run(opd.reward_func(args, sample))
        opd.post_process_rewards(args, [sample], rollout_id=0)
    finally:
        srv.stop()
    teacher = [float(x) for x in sample.teacher_log_probs]
    # the server computes in float32: agreement to float32 precision
    assert teacher == pytest.approx(tempered_logp(tiny_teacher_dir, 0.7), abs=1e-5)
    assert teacher != pytest.approx(tempered_logp(tiny_teacher_dir, 1.0), abs=1e-3)  # not the untempered one

    trainer = TorchTrainRayActor(1, 0)
    trainer.init(args)
    data = {"tokens": [TOKENS], "prompt_lengths": [PROMPT_LEN], "response_lengths": [n]}
    student = trainer.compute_log_probs(data)[0].tolist()
    assert student == pytest.approx(tempered_logp(tiny_student_dir, 0.7), abs=1e-10)
