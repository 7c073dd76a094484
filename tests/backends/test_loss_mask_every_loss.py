"""The kept-token mask (the loss mask after TA-OPD selection) restricts every --loss-type.

policy_loss and the ta_opd.sd_losses family are covered token by token in test_torch_trainer.py
(test_unkept_tokens_contribute_no_gradient) and test_torch_sd_losses.py (test_each_loss_type_one_step);
here: sft_loss, and the full-vocabulary reverse KL at sampled positions (--loss-type jsd --jsd-beta 1)
against a naive reference over the kept positions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slime.backends.torch_utils.actor import TorchTrainRayActor
from slime.backends.torch_utils.model import load_hf_model
from slime.utils.arguments import parse_args


def make_args(student_dir, tmp_path, *extra: str):
    return parse_args(
        [
            "--hf-checkpoint", str(student_dir), "--rollout-batch-size", "2", "--rollout-max-response-len", "8",
            "--micro-batch-size", "1", "--train-dtype", "float64", "--lr", "0", "--clip-grad", "0",
            "--output-dir", str(tmp_path / "out"), *extra,
        ]
    )  # fmt: skip


def tiny_batch(last_kept: bool) -> dict:
    """Two hand-made samples (prompt 3 tokens, response 4); the last response token of sample 0 kept or not."""
    mask0 = [1, 0, 1, int(last_kept)]
    return {
        "tokens": [[5, 6, 7, 11, 12, 13, 14], [8, 9, 10, 21, 22, 23, 24]],
        "prompt_lengths": [3, 3],
        "response_lengths": [4, 4],
        "loss_masks": [mask0, [0, 1, 0, 0]],
        "rewards": [0.0, 0.0],
        "metrics": {},
    }


def step_grads(args, data) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = TorchTrainRayActor(1, 0)
    trainer.init(args)
    loss = trainer.train(0, data)["train/loss"]
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse", [True, False])
def test_sft_loss_token_outside_the_mask_has_no_gradient(tiny_student_dir, tmp_path, sparse):
    """Changing the (last, hence context-free) unkept response token leaves loss and gradients bit-identical;
    the same change to a kept token changes them."""
    args = make_args(
        tiny_student_dir, tmp_path, "--loss-type", "sft_loss", *(() if sparse else ("--no-sparse-lm-head",))
    )
    for last_kept, expect_same in ((False, True), (True, False)):
        data = tiny_batch(last_kept)
        changed = copy.deepcopy(data)
        changed["tokens"][0][-1] = 40
        (la, ga), (lb, gb) = step_grads(args, data), step_grads(args, changed)
        same = la == lb and all(torch.equal(ga[n], gb[n]) for n in ga)
        assert same == expect_same, (last_kept, la, lb)


def naive_reverse_kl(student_dir, teacher_dir, data) -> float:
    """Σ over kept positions of KL(p_S ‖ p_T) over the full vocabulary, divided by the number of kept tokens."""
    s_model = load_hf_model(student_dir, dtype="float64").eval()
    t_model = load_hf_model(teacher_dir, dtype="float64").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, p, mask in zip(data["tokens"], data["prompt_lengths"], data["loss_masks"], strict=True):
            x = torch.tensor([ids])
            ls = torch.log_softmax(s_model(x).logits[0].double(), -1)  # [T, V]
            lt = torch.log_softmax(t_model(x).logits[0].double(), -1)
            for j, keep in enumerate(mask):
                if keep:  # response token j is predicted at position p − 1 + j
                    pos = p - 1 + j
                    total += float((ls[pos].exp() * (ls[pos] - lt[pos])).sum())
                    count += 1
    return total / count


@pytest.mark.parametrize("sparse", [True, False])
def test_full_vocab_reverse_kl_at_kept_positions_equals_naive(tiny_student_dir, tiny_teacher_dir, tmp_path, sparse):
    args = make_args(
        tiny_student_dir, tmp_path, "--loss-type", "jsd", "--jsd-beta", "1", "--sd-temperature", "1",
        "--opd-teacher-hf-checkpoint", str(tiny_teacher_dir), *(() if sparse else ("--no-sparse-lm-head",)),
    )  # fmt: skip
    data = tiny_batch(last_kept=True)
    loss, grads = step_grads(args, data)
    assert loss == pytest.approx(naive_reverse_kl(tiny_student_dir, tiny_teacher_dir, data), rel=1e-10, abs=1e-12)
    # a token outside the mask: the last response token of sample 1 is unkept; unmasking it changes the loss
    more = copy.deepcopy(data)
    more["loss_masks"][1][-1] = 1
    assert step_grads(args, more)[0] == pytest.approx(naive_reverse_kl(tiny_student_dir, tiny_teacher_dir, more))
    assert grads
