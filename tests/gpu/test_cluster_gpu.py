"""The three-node cluster run of tests/cluster with real SGLang engines and the Megatron trainer (GPU machine).

The nodes are the local cluster of :mod:`tests.cluster.local_cluster`, each with one GPU (distinct GPUs when the
machine has three, else all on GPU 0: the tiny models fit). ``train.py`` joins it through ``RAY_ADDRESS`` and
runs 3 steps: the Megatron rank on the ``trainer`` node, one SGLang engine on each ``rollout`` node, the teacher
on the ``teacher`` node, weights broadcast over NCCL after each step.

Run on a GPU machine: ``pip install -e '.[megatron,sglang]' && pytest -m gpu tests/gpu/test_cluster_gpu.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slime.utils.logging_utils import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.megatron, pytest.mark.cluster]

TRAIN_PY = Path(__file__).resolve().parents[2] / "slime_ta_opd" / "train.py"
ROLES = {
    "trainer": {"num_cpus": 2, "num_gpus": 1, "resources": {"trainer": 1}},
    "rollout-a": {"num_cpus": 1, "num_gpus": 1, "resources": {"rollout": 1}},
    "rollout-b": {"num_cpus": 1, "num_gpus": 1, "resources": {"rollout": 1, "teacher": 1}},
}


@pytest.mark.parametrize("mode", ["disk", "distributed"])
def test_cluster_run_with_real_sglang_and_megatron(tiny_student_dir, tiny_teacher_dir, tmp_path, mode):
    pytest.importorskip("sglang")
    pytest.importorskip("megatron.core")
    pytest.importorskip("psutil")
    from slime.embedded.task import write_splits
    from tests.cluster.local_cluster import start_local_cluster
    from tests.e2e.tiny_runs import opd_argv

    n = torch.cuda.device_count()
    gpus = {role: str(i if n >= len(ROLES) else 0) for i, role in enumerate(ROLES)}
    train, _ = write_splits(tmp_path / "data", num_train=24, num_eval=4, seed=0)
    out = tmp_path / "out"
    argv = opd_argv(tiny_student_dir, tiny_teacher_dir, train, out, batch=2, n=2, max_len=8, num_rollout=3, extra=[
        "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
        "--opd-topk-metrics-k", "4", "--skip-preflight",
        "--train-backend", "megatron", "--rollout-backend", "sglang",
        "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "1",
        "--rollout-num-gpus", "2", "--rollout-num-gpus-per-engine", "1", "--weight-update-mode", mode,
        "--actor-ray-resource", "trainer", "--rollout-ray-resource", "rollout", "--teacher-ray-resource", "teacher",
        "--api-key", "cluster-test-key",
    ])  # fmt: skip
    with start_local_cluster(ROLES, gpus=gpus) as cluster:
        r = subprocess.run([sys.executable, str(TRAIN_PY), *argv], env=cluster.env(), capture_output=True,
                           text=True, timeout=3600)  # fmt: skip
        ids = {role: cluster.node_id(role) for role in ROLES}
    assert r.returncode == 0, r.stderr[-6000:]
    rows = [row for row in read_metrics(out / "metrics.jsonl") if row.get("rollout_id", -1) >= 0]
    assert [row["rollout_id"] for row in rows] == [0, 1, 2]
    # bf16 engines against the trainer's log-probs: pushed weights keep the difference small
    assert all(math.isfinite(row["train/rollout_logp_abs_diff"]) and row["train/rollout_logp_abs_diff"] < 0.05
               for row in rows), [row["train/rollout_logp_abs_diff"] for row in rows]  # fmt: skip
    where = json.loads((out / "placement.json").read_text())
    assert [t["node_id"] for t in where["trainer"]] == [ids["trainer"]]
    assert sorted(e["node_id"] for e in where["engines"]) == sorted([ids["rollout-a"], ids["rollout-b"]])
    assert where["teacher"]["node_id"] == ids["rollout-b"]
    assert where["rollout_manager"]["node_id"] == ids["trainer"]
