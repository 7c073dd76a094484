"""kill -9 of a training run mid-run, then ``--load``: the resumed run ends bit-identical to an uninterrupted one.

The real ``train.py`` loop, real Ray, the real torch trainer and checkpoints; the stand-in
RolloutManager of tests/e2e gives the same rollout data for the same rollout id, so any
difference after the resume would come from the checkpoint (weights, AdamW state, RNG, step
counter, data position). The Ray cluster is started once by this test process (on 127.0.0.1) and
the training runs join it as drivers, as on a shared cluster: killing a driver with SIGKILL ends
its job, and Ray reclaims that job's actors. Only the process this test started is killed, by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from slime.utils.logging_utils import read_metrics

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "train_driver.py"
E2E = HERE.parent / "e2e"
NUM_ROLLOUT = 4


def _argv(student: Path, run: Path) -> list[str]:
    return [
        "--hf-checkpoint", str(student), "--rollout-batch-size", "4", "--rollout-max-response-len", "8",
        "--micro-batch-size", "2", "--lr", "1e-3", "--num-rollout", str(NUM_ROLLOUT),
        "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate",
        "--output-dir", str(run / "out"), "--save", str(run / "ckpt"), "--load", str(run / "ckpt"),
        "--save-interval", "1", "--keep-last-n-checkpoints", "2",
        "--skip-preflight",  # the stand-in RolloutManager has no servers to check
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # workers inherit the raylet's environment: the stand-in RolloutManager's module must be importable there
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(E2E), old) if p)
    try:
        info = ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield info.address_info["gcs_address"]
    ray.shutdown()


def _start(student: Path, run: Path, address: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(E2E), env.get("PYTHONPATH")) if p)
    env["RAY_ADDRESS"] = address
    log = open(run / "driver.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(DRIVER), *_argv(student, run)], env=env, stdout=log, stderr=log)


def _pointer(run: Path) -> int | None:
    p = run / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(p.read_text()) if p.is_file() else None


def _held(run: Path) -> bool:
    log = run / "out" / "fake_rm_calls.jsonl"
    return log.is_file() and '"call": "hold"' in log.read_text()


def _kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL the driver (by pid) and anything it started itself (none expected: it joined our cluster)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "ckpt" / f"iter_{NUM_ROLLOUT - 1:07d}" / "model" / "model.safetensors")


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, tiny_student_dir, ray_cluster):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    reference.mkdir()
    victim.mkdir()

    ref = _start(tiny_student_dir, reference, ray_cluster)
    assert ref.wait(timeout=900) == 0, (reference / "driver.log").read_text()[-3000:]

    # the stand-in RolloutManager holds the victim's generate(2): checkpoint 1 is committed and the run cannot go on
    hold = victim / "out" / "hold_at"
    hold.parent.mkdir(parents=True)
    hold.write_text("2")
    proc = _start(tiny_student_dir, victim, ray_cluster)
    for _ in range(6000):  # bounded poll: until the run is held at rollout 2
        if _held(victim) or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended early: " + (victim / "driver.log").read_text()[-3000:]
    assert _held(victim), "the run never reached rollout 2"
    _kill_9(proc)
    killed_at = _pointer(victim)
    print(f"kill-resume: SIGKILL with checkpoint {killed_at} committed; resuming at rollout {killed_at + 1}")
    assert killed_at == 1
    hold.unlink()

    resumed = _start(tiny_student_dir, victim, ray_cluster)
    assert resumed.wait(timeout=900) == 0, (victim / "driver.log").read_text()[-3000:]

    # the same weights, bit for bit, after the last step
    want, got = _final_weights(reference), _final_weights(victim)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # and the same per-step training metrics for every step the resumed run did
    ref_records = {r["rollout_id"]: r for r in read_metrics(reference / "out" / "metrics.jsonl")}
    resumed_ids = [r["rollout_id"] for r in read_metrics(victim / "out" / "metrics.jsonl")]
    assert resumed_ids[-1] == NUM_ROLLOUT - 1
    last_run = [r for r in read_metrics(victim / "out" / "metrics.jsonl")][-(NUM_ROLLOUT - 1 - killed_at) :]
    assert [r["rollout_id"] for r in last_run] == list(range(killed_at + 1, NUM_ROLLOUT))
    for r in last_run:
        for key in ("train/loss", "train/grad_norm", "train/step", "train/kept_tokens"):
            assert r[key] == ref_records[r["rollout_id"]][key], (key, r["rollout_id"])
