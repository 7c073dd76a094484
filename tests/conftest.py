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


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    """A fresh ``--weights-root`` per test module holding copies of the tiny student and teacher."""
    import shutil

    root = tmp_path_factory.mktemp("weights_root")
    shutil.copytree(tiny_student_dir, root / "student")
    shutil.copytree(tiny_teacher_dir, root / "teacher")
    return root


@pytest.fixture(scope="module")
def server(request, weights_root, tmp_path_factory):
    """An embedded server on the student, keyed with the test module's ``KEY``, confined to ``weights_root``."""
    from slime.backends.embedded_sglang.launch import launch_server

    log = tmp_path_factory.mktemp("logs") / "server.log"
    handle = launch_server(
        weights_root / "student",
        api_key=request.module.KEY,
        extra_args=["--weights-root", str(weights_root)],
        log_file=str(log),
    )
    yield handle
    handle.stop()
