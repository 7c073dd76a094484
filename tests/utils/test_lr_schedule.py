"""slime.utils.lr_schedule: Megatron's schedule by hand, the flags, and the trainer's per-step LR."""

from __future__ import annotations

import math

import pytest

from slime.utils.arguments import parse_args
from slime.utils.lr_schedule import LRSchedule, lr_at

BASE = ["--rollout-batch-size", "4", "--rollout-max-response-len", "8"]


def test_warmup_from_init_then_constant():
    s = LRSchedule(lr=1.0, warmup_steps=4, warmup_init=0.2)
    # init + (lr − init)·n/W: 0.2, 0.4, 0.6, 0.8, 1.0, then constant
    assert [lr_at(n, s) for n in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0], abs=1e-15)


def test_constant_without_flags_is_lr():
    s = LRSchedule(lr=3e-4)
    assert {lr_at(n, s) for n in (0, 1, 10**6)} == {3e-4}


def test_linear_decay_to_min_lr():
    # W = 2, D = 10, lr 1.0, min 0.1: n = 2 → 1.0; n = 6 → r = 0.5 → 0.55; n = 10 → 0.1; past D → 0.1
    s = LRSchedule(lr=1.0, min_lr=0.1, decay_style="linear", warmup_steps=2, decay_steps=10)
    assert lr_at(0, s) == 0.0 and lr_at(1, s) == 0.5
    assert lr_at(2, s) == pytest.approx(1.0) and lr_at(6, s) == pytest.approx(0.55)
    assert lr_at(10, s) == pytest.approx(0.1) and lr_at(11, s) == 0.1 and lr_at(500, s) == 0.1


def test_cosine_midpoint_and_ends():
    s = LRSchedule(lr=2.0, min_lr=0.0, decay_style="cosine", warmup_steps=0, decay_steps=8)
    assert lr_at(0, s) == pytest.approx(2.0)
    assert lr_at(4, s) == pytest.approx(1.0)  # ½(1 + cos π/2) = ½
    assert lr_at(2, s) == pytest.approx(1.0 + math.cos(math.pi / 4))  # 2·½(1 + cos π/4)
    assert lr_at(8, s) == pytest.approx(0.0, abs=1e-15)


def test_inverse_square_root():
    s = LRSchedule(lr=1.0, min_lr=0.1, decay_style="inverse-square-root", warmup_steps=4, decay_steps=1000)
    assert lr_at(4, s) == 1.0 and lr_at(16, s) == pytest.approx(0.5) and lr_at(10**5, s) == 0.1


def test_schedule_errors_name_the_values():
    with pytest.raises(ValueError, match="min_lr=2.0, lr=1.0"):
        LRSchedule(lr=1.0, min_lr=2.0)
    with pytest.raises(ValueError, match="warm-up steps 10 must be < decay steps 10"):
        LRSchedule(lr=1.0, decay_style="linear", warmup_steps=10, decay_steps=10)
    with pytest.raises(ValueError, match="needs decay steps"):
        LRSchedule(lr=1.0, decay_style="cosine")


def test_flags_default_decay_iters_to_the_runs_optimizer_steps():
    # 4 prompts × 2 samples / global batch 4 = 2 steps per rollout; 5 rollouts → D = 10
    args = parse_args([
        *BASE, "--n-samples-per-prompt", "2", "--global-batch-size", "4", "--num-rollout", "5",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "linear",
    ])  # fmt: skip
    assert args.lr_decay_iters == 10 and args.lr_warmup_init == 0.0
    s = LRSchedule.from_args(args)
    assert lr_at(6, s) == pytest.approx(1e-4 + 0.5 * 9e-4)
    explicit = parse_args([*BASE, "--num-rollout", "5", "--lr-decay-style", "cosine", "--lr-decay-iters", "3"])
    assert explicit.lr_decay_iters == 3


def test_warmup_fraction_of_decay_iters():
    args = parse_args([*BASE, "--lr", "1.0", "--lr-decay-style", "linear", "--lr-decay-iters", "20",
                       "--lr-warmup-fraction", "0.1"])  # fmt: skip
    s = LRSchedule.from_args(args)
    assert s.warmup_steps == 2.0 and lr_at(1, s) == 0.5


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lr-decay-style", "linear"], "--lr-decay-style linear needs the number of decay steps"),
        (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3", "--num-rollout", "9"], "give one of them"),
        (["--lr-warmup-fraction", "1.0", "--num-rollout", "9"], "--lr-warmup-fraction must be in [0, 1)"),
        (["--lr-decay-iters", "0"], "--lr-decay-iters must be > 0, got 0"),
        (["--lr-warmup-init", "-1"], "--lr-warmup-init must be >= 0"),
        (["--lr-decay-style", "linear", "--num-rollout", "2", "--lr-warmup-iters", "4"], "must be < decay steps 2"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "need 0 <= min_lr <= lr"),
        (["--lr-decay-style", "step"], None),  # argparse choices
    ],
)
def test_flag_errors(argv, needle):
    if needle is None:
        with pytest.raises(SystemExit):
            parse_args([*BASE, *argv])
        return
    with pytest.raises(ValueError) as e:
        parse_args([*BASE, *argv])
    assert needle in str(e.value)
