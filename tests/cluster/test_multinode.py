"""The cluster path on a real three-node Ray cluster on this machine (tests/cluster/conftest.py).

1. ``run_method_suite.sh`` joins the cluster through ``RAY_ADDRESS`` and runs a 3-step TA-OPD entry: the trainer
   runs on the ``trainer`` node, the two engines on the two ``rollout`` nodes (one each), the teacher on the
   ``teacher`` node, the RolloutManager and the router on the driver's node (as the actors report them in
   ``placement.json``); the weights pushed from disk after each step reach both engines (the engines' log-probs
   of the next rollout equal the trainer's); the metrics have the keys of the same run on one node, which
   ``train.py`` runs on a Ray of its own although the cluster runs on the machine and ``ray.init()`` would find it.
2. A rollout node is lost mid-step (its raylet killed by pid, then every process under it): with
   ``--weight-update-mode distributed`` the run carries on with the other engine (the step redone behind the
   restarted router, the weight-update group remade) and completes 3 steps; every checkpoint is kept.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slime.utils.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "train" / "run_method_suite.sh"
TRAIN_PY = REPO / "slime_ta_opd" / "train.py"
STEPS = 3
# each role on the nodes offering its resource (tests/cluster/local_cluster.py)
ROLE_FLAGS = [
    *("--actor-ray-resource", "trainer", "--rollout-ray-resource", "rollout", "--teacher-ray-resource", "teacher"),
    *("--api-key", "cluster-test-key"),  # servers bound to a node's IP check a key
]

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from slime.embedded.models import build_tiny_checkpoint
    from slime.embedded.task import write_splits

    root = tmp_path_factory.mktemp("cluster_assets")
    student = build_tiny_checkpoint(root / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(root / "teacher", size="nano", seed=1)
    train, _ = write_splits(root / "data", num_train=24, num_eval=4, seed=0)
    return {"student": student, "teacher": teacher, "train": train, "root": root}


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("rollout_id", -1) >= 0]


def _pushed_weights_served(rows: list[dict]) -> None:
    """Rollouts 1.. ran on the weights pushed after the step before (at lr 1e-2 a stale engine differs by far more)."""
    diffs = [r["train/rollout_logp_abs_diff"] for r in rows]
    assert all(math.isfinite(d) and d < 1e-4 for d in diffs), diffs


def _without_role_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ROLE_FLAGS[:6:2]:
            skip = True
        else:
            out.append(a)
    return out


def test_suite_joins_the_cluster_places_roles_per_node_and_matches_a_one_node_run(local_cluster, assets, tmp_path):
    env = local_cluster.env()
    env.update(
        STUDENT_HF=str(assets["student"]), TEACHER_MODEL=str(assets["teacher"]), PROMPT_DATA=str(assets["train"]),
        OUTPUT_ROOT=str(tmp_path / "suites"), SUITE_NAME="cluster", PROFILE="embedded",
        METHOD_LIST="teachability:0.5:1", SEEDS="1", NUM_ROLLOUT=str(STEPS), ROLLOUT_BATCH_SIZE="2",
        N_SAMPLES_PER_PROMPT="2", ROLLOUT_MAX_RESPONSE_LEN="8", LR="1e-2", SHARED_SERVERS="0", SUMMARIZE="0",
        EXTRA_ARGS=" ".join(["--rollout-num-engines", "2", "--opd-topk-metrics-k", "4", "--skip-preflight",
                             *ROLE_FLAGS]),
    )  # fmt: skip
    for k in ("SEED", "RESUME", "FORCE", "EVAL_PROMPT_DATA"):
        env.pop(k, None)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, cwd=REPO, timeout=1500)
    cluster_s = time.perf_counter() - t0
    run_dir = tmp_path / "suites" / "cluster" / "runs" / "1_teachability_r0.5_s1"
    assert r.returncode == 0, r.stderr[-3000:] + (run_dir / "train.log").read_text()[-5000:]

    rows = _steps(run_dir)
    assert [r["rollout_id"] for r in rows] == list(range(STEPS))
    _pushed_weights_served(rows)
    assert all(r["rollout/engines"] == 2 and r["rollout/engines_lost_total"] == 0 for r in rows)

    where = json.loads((run_dir / "placement.json").read_text())
    ids = {role: local_cluster.node_id(role) for role in local_cluster.nodes}
    assert [t["node_id"] for t in where["trainer"]] == [ids["trainer"]]
    assert where["driver"]["node_id"] == ids["trainer"]
    assert where["rollout_manager"]["node_id"] == where["router"]["node_id"] == ids["trainer"]
    assert sorted(e["node_id"] for e in where["engines"]) == sorted([ids["rollout-a"], ids["rollout-b"]])
    assert where["teacher"]["node_id"] == ids["rollout-b"]  # the only node offering "teacher"
    assert all(e["url"].split(":")[1].lstrip("/") == e["node_ip"] for e in where["engines"])

    # the same entry on one node: train.py without RAY_ADDRESS starts its own Ray (the cluster's address file,
    # which a bare ray.init() would follow, is in this process's RAY_TMPDIR)
    argv = (run_dir / "train_args.txt").read_text().splitlines()
    one = tmp_path / "one_node"
    argv = [a.replace(str(run_dir), str(one)) for a in _without_role_flags(argv)]  # its own output paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "slime_ta_opd"), str(REPO), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(TRAIN_PY), *argv], env=env, capture_output=True, text=True, timeout=1500)
    one_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-5000:]
    one_rows = _steps(one)
    assert [sorted(r) for r in one_rows] == [sorted(r) for r in rows]
    one_where = json.loads((one / "placement.json").read_text())
    assert one_where["driver"]["node_id"] not in ids.values()  # a Ray of its own, not the running cluster
    assert {e["node_id"] for e in one_where["engines"]} == {one_where["rollout_manager"]["node_id"]}
    print(f"3-step suite entry on the cluster: {cluster_s:.1f}s; the same on one node: {one_s:.1f}s")


def test_lost_rollout_node_mid_step_the_run_carries_on_with_the_other_engine(local_cluster, assets, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    (out / "hold_at").write_text("1")  # rollout 1 waits (cluster_plugins) until the node is gone
    argv = [
        "--hf-checkpoint", str(assets["student"]), "--prompt-data", str(assets["train"]),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "8",
        "--rollout-num-engines", "2", "--num-rollout", str(STEPS),
        "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(assets["teacher"]),
        "--opd-topk-metrics-k", "4", "--micro-batch-size", "4", "--lr", "1e-2", "--skip-preflight",
        "--rollout-function-path", "cluster_plugins.generate_rollout",
        "--weight-update-mode", "distributed", "--update-weight-buffer-size", "65536",
        "--output-dir", str(out), "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "1",
        *ROLE_FLAGS,
    ]  # fmt: skip
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *argv], env=local_cluster.env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 900
        while not (out / "held_1").exists():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "rollout 1 never started"
            time.sleep(0.2)
        where = json.loads((out / "placement.json").read_text())
        victim = "rollout-a"  # an engine's node without the teacher
        lost = [e for e in where["engines"] if e["node_id"] == local_cluster.node_id(victim)]
        assert len(lost) == 1 and where["teacher"]["node_id"] != local_cluster.node_id(victim)
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"  # step 0 saved
        killed = local_cluster.kill_node(victim)
        (out / "release_1").write_text("go")
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "train.log").read_text()
    assert rc == 0, text[-6000:]
    assert lost[0]["server_pid"] in killed  # the engine went down with its node
    rows = _steps(out)
    assert [r["rollout_id"] for r in rows] == list(range(STEPS))
    # the engine is dropped in step 1: when its redone rollout or, if the router's retries saved the rollout, when
    # the weight push after it fails on the lost engine (then step 1's rollout still counted 2)
    engines = [r["rollout/engines"] for r in rows]
    assert engines[0] == 2 and engines[2] == 1, engines
    assert rows[2]["rollout/engines_lost_total"] == 1 and rows[0]["rollout/engines_lost_total"] == 0
    _pushed_weights_served(rows)  # rollout 2 ran on the weights broadcast to the surviving engine
    assert "left the Ray cluster; continuing with the other engines" in text
    for step in range(STEPS):  # nothing saved is lost; the last checkpoint resumes
        assert (ckpt / f"iter_{step:07d}").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS - 1)
    print(f"3 steps with a rollout node lost in step 1: {time.perf_counter() - t0:.1f}s")
