"""Dead servers during a run: the RolloutManager's health check restarts them and a step survives a restart.

Real components in this process (no Ray, to keep it light): one embedded student engine behind
the real sglang-router and an embedded teacher server, all on 127.0.0.1, with the real TA-OPD
teacher scoring and token selection. Faults are SIGKILLs of processes the manager started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import reliability_plugins as plugins
import requests

from slime.ray.rollout import RolloutManager
from slime.utils.arguments import parse_args


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=10) if psutil.pid_exists(pid) else None


@pytest.fixture(scope="module")
def manager(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    tmp = tmp_path_factory.mktemp("faults")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(8)))
    args = parse_args(
        [
            "--hf-checkpoint", str(tiny_student_dir), "--prompt-data", str(prompts),
            "--input-key", "prompt", "--label-key", "label",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
            "--rollout-num-engines", "1", "--api-key", "k",
            "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(tiny_teacher_dir),
            "--opd-topk-metrics-k", "3", "--opd-budget-mask", "dlearn_high", "--opd-budget-ratio", "0.5",
            "--custom-rm-path", "reliability_plugins.kill_teacher_then_score",
            "--custom-reward-post-process-path", "slime.rollout.on_policy_distillation.post_process_rewards",
            "--http-max-retries", "1", "--http-timeout", "60",
            "--output-dir", str(tmp / "out"),
        ]
    )  # fmt: skip
    # the OPD module counts teacher HTTP events since the last post-process, process-wide: start from zero
    from slime_patch.slime.rollout import on_policy_distillation as opd

    opd._http_stats.clear()
    m = RolloutManager(args)
    yield m
    m.shutdown()


@pytest.mark.slow
def test_dead_servers_are_restarted_and_a_step_survives_a_teacher_kill(manager, tiny_teacher_dir):
    # a normal step: nothing restarted
    data = manager.generate(0)
    m = data["metrics"]
    assert m["rollout/server_restarts"] == 0 and m["rollout/step_retries"] == 0
    assert m["opd/teacher_http_failures"] == 0
    assert data["sample_indices"] == [0, 1, 2, 3]

    # fault 1: the teacher is SIGKILLed by the first scoring request of step 1 → the request's retries
    # run out (--http-max-retries 1) → the health check finds the teacher dead and restarts it → the step
    # is redone from the same prompts and completes; the counters say so
    old_teacher = manager._teacher.pid
    plugins.KILL_AT_NEXT_SCORE["pid"] = old_teacher
    data = manager.generate(1)
    assert plugins.KILLED == [old_teacher] and manager._teacher.pid != old_teacher
    m = data["metrics"]
    assert m["rollout/step_retries"] == 1 and m["rollout/server_restarts"] == 1
    assert data["sample_indices"] == [4, 5, 6, 7]  # the same prompts as before the failure: nothing skipped
    assert len(data["teacher_log_probs"]) == 4 and all(len(t) > 0 for t in data["teacher_log_probs"])

    # fault 2: the student engine dies between steps → restarted by the pre-step health check; the router
    # still routes to it (same port), and it serves the newest pushed weights, not the initial checkpoint's
    pushed = Path(manager.args.output_dir) / "weights" / "weight_v000001"
    shutil.copytree(tiny_teacher_dir, pushed)
    manager.update_weights_from_disk(str(pushed))
    old_engine = manager._engine_group.engines[0].pid
    _kill(old_engine)
    data = manager.generate(2)
    assert manager._engine_group.engines[0].pid != old_engine
    assert data["metrics"]["rollout/server_restarts"] == 1 and data["metrics"]["rollout/step_retries"] == 0
    info = requests.get(
        manager._engine_group.engines[0].url + "/get_model_info", headers={"Authorization": "Bearer k"}
    )
    assert info.json()["weight_version"].startswith("weight_v000001@")

    # fault 3: the router dies → started again on its port
    old_router = manager._engine_group.router_proc.pid
    _kill(old_router)
    data = manager.generate(3)
    assert manager._engine_group.router_proc.pid != old_router
    assert data["metrics"]["rollout/server_restarts"] == 1
    assert data["metrics"]["rollout/server_restarts_total"] == 3
    assert all(v is True for v in manager.health().values())


def test_failure_with_healthy_servers_is_not_retried():
    """A bad answer is not a dead server: the step raises at once, the data position is not rewound."""
    m = RolloutManager.__new__(RolloutManager)
    m.args = parse_args(["--rollout-batch-size", "1", "--rollout-max-response-len", "1"])
    m._engine_group = m._teacher = None
    m.server_restarts = m.step_retries = 0
    calls = []

    class DataSource:
        def state_dict(self):
            return {"sample_offset": 3}

        def load_state_dict(self, state):
            calls.append(state)

    def rollout(args, rollout_id, data_source, evaluation=False):
        raise ValueError("teacher answer is misaligned")

    m.data_source, m.generate_rollout = DataSource(), rollout
    with pytest.raises(ValueError, match="misaligned"):
        m.generate(0)
    assert m.step_retries == 0 and calls == []
