"""The tiny teacher/student pair, prompt files and train.py flags shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path


def tiny_pair(root: Path, num_train: int, num_eval: int = 4) -> tuple[Path, Path, Path, Path]:
    """(student, teacher, train.jsonl, eval.jsonl): two nano checkpoints of different seeds and the task's splits."""
    from slime.embedded.models import build_tiny_checkpoint
    from slime.embedded.task import write_splits

    student = build_tiny_checkpoint(root / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(root / "teacher", size="nano", seed=1)
    train_jsonl, eval_jsonl = write_splits(root / "data", num_train=num_train, num_eval=num_eval, seed=0)
    return student, teacher, train_jsonl, eval_jsonl


def opd_argv(student, teacher, prompts, out, *, batch: int, n: int, max_len: int, num_rollout: int, extra=()):
    """train.py flags of a tiny OPD run against a teacher server (the embedded task's prompts and labels)."""
    return [
        "--hf-checkpoint", str(student), "--prompt-data", str(prompts),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rollout-batch-size", str(batch), "--n-samples-per-prompt", str(n),
        "--rollout-max-response-len", str(max_len), "--num-rollout", str(num_rollout),
        "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(teacher),
        "--output-dir", str(out), *extra,
    ]  # fmt: skip
