"""Shared fixtures: tiny offline checkpoints built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never join a cluster the shell names: each starts a Ray of its own (ray_local) or names its cluster itself
os.environ.pop("RAY_ADDRESS", None)

TESTS = Path(__file__).resolve().parent
# modules the tests' Ray actors import by name: the stand-in RolloutManager (e2e), the rollout stub plug-ins
RAY_TEST_PATHS = (TESTS / "e2e", TESTS / "rollout")
RAY_OBJECT_STORE_BYTES = 80 * 1024**2


def start_local_ray(num_cpus: int = 2):
    """A Ray of this process's own on this machine: ``address="local"`` never attaches to a cluster that runs here
    (``ray start``), whatever ``ray.init()`` would discover. 2 logical CPUs, an 80 MB object store; the workers
    import :data:`RAY_TEST_PATHS`."""
    import ray

    path = os.pathsep.join([*map(str, RAY_TEST_PATHS), *filter(None, [os.environ.get("PYTHONPATH")])])
    for attempt in range(3):  # an overloaded machine can miss Ray's fixed 30 s for a node to register
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                object_store_memory=RAY_OBJECT_STORE_BYTES,
                include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
            return ray
        except Exception as e:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_local():
    """The test module's own local Ray (:func:`start_local_ray`), shut down after the module."""
    ray = start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: starts a multi-node Ray cluster on this machine (tests/cluster)")


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
