"""Managed SGLang engines with fake processes and fake HTTP: command lines, health waits, restart, weights."""

from __future__ import annotations

import itertools
from argparse import Namespace

import pytest

from slime.backends.select import MissingExtraError
from slime.backends.sglang_utils import engines as eng


class FakeProcess:
    def __init__(self, cmd, **kwargs):
        self.cmd, self.returncode, self.terminated = cmd, None, False
        self.env = kwargs.get("env")

    def poll(self):
        return self.returncode

    def terminate(self):
        self.terminated, self.returncode = True, -15

    def kill(self):
        self.returncode = -9

    def wait(self, timeout=None):
        return self.returncode


class FakeCluster:
    """Records processes and HTTP calls; engines are healthy once their process runs."""

    def __init__(self):
        self.processes: list[FakeProcess] = []
        self.calls: list[tuple[str, str, dict | None]] = []

    def popen(self, cmd, **kwargs):
        p = FakeProcess(cmd, **kwargs)
        self.processes.append(p)
        return p

    def http(self, method, url, payload, timeout):
        self.calls.append((method, url, payload))
        return {"success": True} if method == "POST" else None


def flags(**over):
    base = dict(hf_checkpoint="/models/qwen3", rollout_num_gpus=4, rollout_num_gpus_per_engine=2, api_key="k",
                colocate=False, offload=False)  # fmt: skip
    base.update(over)
    return Namespace(**base)


def group(cluster, **over):
    ports = itertools.count(30000)
    return eng.launch_sglang_engine_group(
        flags(**over), popen=cluster.popen, http=cluster.http, port_fn=lambda: next(ports)
    )


def test_engine_command_lines_follow_the_rollout_flags():
    cluster = FakeCluster()
    g = group(cluster)
    engine_cmds = [p.cmd for p in cluster.processes if "sglang.launch_server" in p.cmd]
    assert len(engine_cmds) == 2
    first, second = engine_cmds
    assert first[first.index("--tp-size") + 1] == "2"
    assert first[first.index("--base-gpu-id") + 1] == "0" and second[second.index("--base-gpu-id") + 1] == "2"
    assert first[first.index("--model-path") + 1] == "/models/qwen3"
    # the API key never is on a command line (readable by every user): keyed_launch reads it from the environment
    from slime.backends.sglang_utils.keyed_launch import KEY_ENV

    for p in cluster.processes:
        assert "k" not in p.cmd and "--api-key" not in p.cmd, p.cmd
        assert p.cmd[2] == "slime.backends.sglang_utils.keyed_launch" and p.env[KEY_ENV] == "k"
    assert "--enable-memory-saver" not in first
    router = [p.cmd for p in cluster.processes if "sglang_router.launch_router" in p.cmd]
    assert len(router) == 1 and router[0][-2:] == g.engine_urls
    assert g.url == "http://127.0.0.1:30002"


def test_single_engine_has_no_router_and_colocate_enables_memory_saver():
    cluster = FakeCluster()
    g = group(cluster, rollout_num_gpus=1, rollout_num_gpus_per_engine=1, colocate=True, offload=True)
    assert len(cluster.processes) == 1 and g.url == g.engine_urls[0]
    cmd = cluster.processes[0].cmd
    assert "--enable-memory-saver" in cmd and cmd[cmd.index("--mem-fraction-static") + 1] == "0.5"


def test_dead_engine_is_restarted_on_its_port_and_reloaded():
    cluster = FakeCluster()
    g = group(cluster)
    g.update_weights_from_disk("/w/v1")
    g.engines[1].process.returncode = 1  # crash
    cluster.calls.clear()
    assert g.check_and_restart() == [g.engines[1].url]
    assert g.engines[1].is_alive() and g.engines[1].restarts == 1
    posts = [(u, p) for m, u, p in cluster.calls if m == "POST"]
    assert (f"{g.engines[1].url}/update_weights_from_disk", {"model_path": "/w/v1"}) in posts
    assert g.engines[1].spec.port == 30001  # same URL: the router routes to it again without re-registration
    assert g.check_and_restart() == []


def test_weight_update_and_offload_hit_every_engine():
    cluster = FakeCluster()
    g = group(cluster)
    g.update_weights_from_disk("/w/v2")
    g.release_memory_occupation()
    assert g.sleeping
    g.resume_memory_occupation()
    urls = [u for m, u, _ in cluster.calls if m == "POST"]
    for e in g.engine_urls:
        for path in ("/update_weights_from_disk", "/release_memory_occupation", "/resume_memory_occupation"):
            assert e + path in urls


def test_failed_update_raises_with_the_answer():
    cluster = FakeCluster()
    g = group(cluster)
    g.http = lambda m, u, p, t: {"success": False, "message": "bad path"} if m == "POST" else None
    with pytest.raises(RuntimeError, match="bad path"):
        g.update_weights_from_disk("/nope")


def test_engine_that_dies_during_startup_is_reported(monkeypatch):
    cluster = FakeCluster()

    def http(method, url, payload, timeout):
        cluster.processes[0].returncode = 3
        raise ConnectionError("refused")

    ports = itertools.count(31000)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        eng.launch_sglang_engine_group(
            flags(rollout_num_gpus=1, rollout_num_gpus_per_engine=1), popen=cluster.popen, http=http,
            port_fn=lambda: next(ports),
        )  # fmt: skip


def test_stop_terminates_only_started_processes():
    cluster = FakeCluster()
    g = group(cluster)
    g.stop()
    assert all(p.terminated for p in cluster.processes)


def test_missing_extra_gives_install_hint(monkeypatch):
    monkeypatch.setattr("slime.backends.select.extra_available", lambda extra: False)
    with pytest.raises(MissingExtraError, match=r"\[sglang\]"):
        eng.launch_sglang_engine_group(flags())


def test_bad_gpu_split_is_refused():
    with pytest.raises(ValueError, match="must divide"):
        eng.engine_specs(flags(rollout_num_gpus=3), "127.0.0.1", [1])


def test_bundles_are_ordered_by_node_then_gpu():
    from slime.ray.placement_group import order_bundles

    where = [("10.0.0.2", 1), ("10.0.0.1", 3), ("10.0.0.2", 0), ("10.0.0.1", 2)]
    assert order_bundles(where) == ([3, 1, 2, 0], [("10.0.0.1", 2), ("10.0.0.1", 3), ("10.0.0.2", 0), ("10.0.0.2", 1)])


def test_an_engine_split_over_two_nodes_is_refused():
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="consecutive GPUs of one node"):
        eng.remote_engines(
            flags(rollout_num_gpus=2, rollout_num_gpus_per_engine=2), (object(), [0, 1], [("a", 7), ("b", 0)])
        )


@pytest.mark.slow
def test_engines_on_their_placement_group_bundles_start_route_and_restart(tiny_student_dir, tmp_path):
    """Real Ray actors pinned to placement-group bundles start the servers on their node (the embedded server
    stands in for sglang.launch_server on CPU): the router serves them, and a killed engine comes back on the
    same port through its host actor."""
    import os
    import signal

    import ray
    import requests
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(os.environ)})
    try:
        pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
        ray.get(pg.ready())
        args = flags(hf_checkpoint=str(tiny_student_dir), rollout_num_gpus=2, rollout_num_gpus_per_engine=1)
        group = eng.launch_sglang_engine_group(
            args, placement=(pg, [0, 1], [None, None]), command_fn=eng.embedded_server_command, log_dir=str(tmp_path)
        )
        try:
            node_ip = ray.util.get_node_ip_address()
            assert all(isinstance(e, eng.RemoteEngine) for e in group.engines)
            assert [e.url.rsplit(":", 1)[0] for e in group.engines] == [f"http://{node_ip}"] * 2
            auth = {"Authorization": "Bearer k"}
            probe = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}
            first = requests.post(f"{group.url}/generate", json=probe, headers=auth, timeout=60).json()
            assert len(first["output_ids"]) == 2
            victim = group.engines[1]
            os.kill(victim.pid, signal.SIGKILL)
            ray.get(victim.host_actor.stop.remote())  # reap it: the host sees the exit code
            assert not group.engine_alive(victim)
            assert group.check_and_restart() == [victim.url]
            assert group.engine_alive(victim) and victim.restarts == 1
            for _ in range(2):  # both engines answer behind the router again
                again = requests.post(f"{group.url}/generate", json=probe, headers=auth, timeout=60).json()
                assert again["output_ids"] == first["output_ids"]
        finally:
            group.stop()
        assert all(ray.get(e.host_actor.exit_code.remote()) is not None for e in group.engines)
        remove_placement_group(pg)
    finally:
        ray.shutdown()
