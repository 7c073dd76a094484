"""Shared fixtures: tiny offline checkpoints built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from slime.embedded.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    """A random 'nano' Qwen3 checkpoint (model + tokenizer) on disk."""
    from slime.embedded.models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "student", size="nano", seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A second random 'nano' checkpoint with another seed, standing in for a teacher."""
    from slime.embedded.models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "teacher", size="nano", seed=1)
