"""Shared inputs of the torch-trainer tests: parsed arguments, a fake rollout-data dict and a trainer."""

from __future__ import annotations

import torch

from slime.backends.torch_utils.actor import TorchTrainRayActor
from slime.utils.arguments import parse_args


def trainer_args(student_dir, tmp_path, *extra: str, micro_batch_size: int = 1, lr: float = 1e-3):
    """A float64 torch-trainer run of 4 prompts (responses ≤ 8 tokens) writing under `tmp_path / "out"`."""
    return parse_args(
        [
            "--hf-checkpoint", str(student_dir),
            "--rollout-batch-size", "4",
            "--rollout-max-response-len", "8",
            "--micro-batch-size", str(micro_batch_size),
            "--train-dtype", "float64",
            "--lr", str(lr),
            "--clip-grad", "0",
            "--output-dir", str(tmp_path / "out"),
            *extra,
        ]
    )  # fmt: skip


def fake_rollout(
    seed: int = 0,
    n: int = 4,
    keep: float = 0.3,
    zero_sample: int | None = 1,
    *,
    min_response: int = 3,
    min_token_id: int = 0,
    log_probs: bool = True,
    teacher_prompts: bool = False,
) -> dict:
    """A fake rollout-data dict of the RolloutManager's shape (random ids and masks; sample `zero_sample` has no
    kept token). `log_probs`: random teacher and rollout log-probs; `teacher_prompts`: a longer privileged prompt
    per sample for the self-distillation teacher."""
    g = torch.Generator().manual_seed(seed)
    keys = ["tokens", "prompt_lengths", "response_lengths", "loss_masks", "rewards"]
    keys += ["teacher_log_probs", "rollout_log_probs"] if log_probs else []
    keys += ["sd_teacher_prompt_tokens"] if teacher_prompts else []
    data = {k: [] for k in keys}
    for i in range(n):
        p = int(torch.randint(2, 5, (1,), generator=g))
        r = int(torch.randint(min_response, 8, (1,), generator=g))
        data["tokens"].append(torch.randint(min_token_id, 99, (p + r,), generator=g).tolist())
        data["prompt_lengths"].append(p)
        data["response_lengths"].append(r)
        mask = (torch.rand(r, generator=g) < keep).int()
        mask[int(torch.randint(0, r, (1,), generator=g))] = 1
        if i == zero_sample:
            mask[:] = 0  # a sample whose tokens were all unselected
        data["loss_masks"].append(mask.tolist())
        if log_probs:
            data["teacher_log_probs"].append((-torch.rand(r, generator=g, dtype=torch.float64) * 6).tolist())
            data["rollout_log_probs"].append((-torch.rand(r, generator=g, dtype=torch.float64) * 6).tolist())
        data["rewards"].append(0.0)
        if teacher_prompts:
            data["sd_teacher_prompt_tokens"].append(torch.randint(3, 99, (p + 3,), generator=g).tolist())
    data["metrics"] = {}
    return data


def make_trainer(args) -> TorchTrainRayActor:
    trainer = TorchTrainRayActor(1, 0)
    trainer.init(args)
    return trainer
