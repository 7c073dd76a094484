"""Every --loss-type is one entry of ta_opd.loss_registry, run by the shared training step with the inputs it
declares; the trainers hold no branch per loss."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slime.backends.torch_utils.actor import TorchTrainRayActor
from slime.backends.train_step import check_loss_supported
from slime.utils.arguments import get_parser, parse_args
from ta_opd.chunked import materialize_logits
from ta_opd.loss_registry import INPUTS, LOSSES, LossInputs
from tests.backends.test_torch_trainer import make_rollout

BACKENDS = Path(__file__).resolve().parents[2] / "slime_ta_opd" / "slime" / "backends"
TRAINER_FILES = ("train_step.py", "torch_utils/actor.py", "torch_utils/distill.py", "megatron_utils/actor.py")
CUSTOM = "tests.backends.test_train_step.nll_custom_loss"


def nll_custom_loss(args, x: LossInputs) -> torch.Tensor:
    """A --custom-loss-function-path loss: −log p_S(y) from the full-vocabulary student, per-sample mean."""
    logp = torch.log_softmax(materialize_logits(x.student).double(), -1).gather(-1, x.target_ids[:, None])
    return x.reduction("seq-mean-token-mean")(-logp.squeeze(-1), x.loss_mask)


def loss_type_choices() -> list[str]:
    return list(next(a for a in get_parser()._actions if a.dest == "loss_type").choices)


def test_every_loss_type_choice_is_a_registry_entry():
    assert loss_type_choices() == LOSSES.names()
    for name in LOSSES.names():
        spec = LOSSES.get(name)
        assert spec.name == name and spec.needs and spec.wants <= INPUTS.keys()


def test_trainers_have_no_per_loss_branch():
    """No loss name in the trainers' code, and ``args.loss_type`` is read only to look the entry up."""
    names = set(LOSSES.names())
    for rel in TRAINER_FILES:
        tree = ast.parse((BACKENDS / rel).read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names:
                pytest.fail(f"{rel}:{node.lineno}: the loss name {node.value!r} in a trainer")
            if isinstance(node, ast.Attribute) and node.attr == "loss_type":
                call = parents.get(node)
                lookup = isinstance(call, ast.Call) and ast.unparse(call.func) == "LOSSES.get"
                assert lookup, f"{rel}:{node.lineno}: args.loss_type read outside LOSSES.get(...)"


def test_a_backend_without_an_input_refuses_the_loss_before_work():
    check_loss_supported(LOSSES.get("sft_loss"), {"logp"}, "Megatron")
    check_loss_supported(LOSSES.get("policy_loss"), {"logp"}, "Megatron")  # old_logp, advantages: the rollout's
    for name in ("opsd", "custom_loss"):
        with pytest.raises(ValueError, match=rf"--loss-type {name} needs student: full-vocabulary student"):
            check_loss_supported(LOSSES.get(name), {"logp"}, "Megatron")


def make_args(loss_type: str, student, teacher, tmp_path):
    spec = LOSSES.get(loss_type)
    argv = [
        "--hf-checkpoint", str(student), "--rollout-batch-size", "4", "--rollout-max-response-len", "8",
        "--micro-batch-size", "2", "--train-dtype", "float64", "--lr", "1e-2", "--clip-grad", "0",
        "--output-dir", str(tmp_path / "out"), "--loss-type", loss_type,
    ]  # fmt: skip
    if "teacher" in spec.needs:
        argv += ["--opd-teacher-hf-checkpoint", str(teacher), "--sd-topk", "4"]
    if "advantages" in spec.needs:
        argv += ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate"]
    if loss_type == "custom_loss":
        argv += ["--custom-loss-function-path", CUSTOM]
    return parse_args(argv)


@pytest.mark.parametrize("loss_type", LOSSES.names())
def test_each_loss_type_runs_through_the_shared_step(loss_type, tiny_student_dir, tiny_teacher_dir, tmp_path):
    """One rollout per entry: the entry is called once per micro-batch with a kept token, with exactly the
    inputs it declares (optional ones when the trainer has them), and the step updates the weights."""
    trainer = TorchTrainRayActor(1, 0)
    trainer.init(make_args(loss_type, tiny_student_dir, tiny_teacher_dir, tmp_path))
    spec = trainer.loss_spec
    assert spec is LOSSES.get(loss_type)
    seen: list[LossInputs] = []

    def spy(x, cfg):
        seen.append(x)
        return spec.fn(x, cfg)

    trainer.loss_spec = replace(spec, fn=spy)
    before = trainer.state_for_test()
    data = make_rollout(0, keep=0.6)  # sample 1 has no kept token: its micro-batch (samples 0, 1) still has some
    metrics = trainer.train(0, data)
    assert len(seen) == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    available = {"old_logp", "advantages"} | trainer.distill.provides()
    for x in seen:
        for name in INPUTS:
            expected = name in spec.needs or (name in spec.optional and name in available)
            assert (getattr(x, name) is not None) == expected, name
    after = trainer.state_for_test()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_custom_loss_equals_sft_loss_by_the_same_formula(tiny_student_dir, tmp_path):
    """The custom function gets the full-vocabulary student and the public reduction helper; written as the
    per-sample mean NLL it gives sft_loss's value (rollout temperature 1)."""
    data = make_rollout(3, keep=0.6)
    losses = {}
    for loss_type in ("sft_loss", "custom_loss"):
        trainer = TorchTrainRayActor(1, 0)
        trainer.init(make_args(loss_type, tiny_student_dir, None, tmp_path / loss_type))
        losses[loss_type] = trainer.train(0, data)["train/loss"]
    assert losses["custom_loss"] == pytest.approx(losses["sft_loss"], abs=1e-12)
