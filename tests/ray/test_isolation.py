"""A Ray cluster already running on the machine (``ray start --head``) does not capture the tests or a run.

With the cluster's address file where a bare ``ray.init()`` looks (its ``RAY_TMPDIR``), ``ray.init(num_cpus=2)``
attaches to it and Ray refuses the CPU count (the failure the tests had); the suite's ``ray_local`` fixture
(``tests/conftest.py``) and ``train.py``'s ``init_ray()`` without ``RAY_ADDRESS`` start a Ray of their own, and
``init_ray()`` with ``RAY_ADDRESS`` joins the cluster. The cluster is started with its own temp dir and free
ports, and stopped by pid (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.cluster.local_cluster import _kill_leftovers

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from tests.conftest import start_local_ray
    from slime.ray.cluster import init_ray

    out = {}
    try:
        ray.init(num_cpus=2, include_dashboard=False)  # what the tests did: attaches to the running cluster
        out["bare"] = ray.get_runtime_context().gcs_address
        ray.shutdown()
    except Exception as e:
        out["bare"] = f"refused: {type(e).__name__}"
    start_local_ray()
    out["fixture"] = ray.get_runtime_context().gcs_address
    ray.shutdown()
    assert init_ray() is True
    out["run"] = ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ["RAY_ADDRESS"] = sys.argv[1]
    assert init_ray() is True
    out["joined"] = ray.get_runtime_context().gcs_address
    out["joined_cpus"] = ray.cluster_resources().get("CPU")
    ray.shutdown()
    print("PROBE " + json.dumps(out))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_running_cluster_does_not_capture_the_test_fixture_or_a_run():
    pytest.importorskip("psutil")
    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp_dir, RAY_agent_register_timeout_ms="300000", RAY_raylet_start_wait_time_s="300")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    port = _free_port()
    head = [
        "ray", "start", "--head", "--port", str(port), "--num-cpus", "1", "--resources", '{"elsewhere": 1}',
        "--object-store-memory", str(80 * 1024**2), "--include-dashboard", "false", "--disable-usage-stats",
        "--ray-client-server-port", str(_free_port()),
        # the agents' ports given up front (free ones: no clash with another Ray here; the raylet need not wait)
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
    ]  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        address = f"{socket.gethostbyname(socket.gethostname())}:{port}"
        with open(os.path.join(temp_dir, "ray", "ray_current_cluster")) as f:  # what a bare ray.init() finds
            address = f.read().strip() or address
        probe = subprocess.run([sys.executable, "-c", PROBE, address], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=900)  # fmt: skip
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
        out = json.loads(next(ln for ln in probe.stdout.splitlines() if ln.startswith("PROBE "))[6:])
    finally:
        _kill_leftovers(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
    assert out["bare"].startswith("refused"), out  # the environment reproduces the captured ray.init
    assert out["fixture"] != address and out["run"] != address, out  # Rays of their own
    assert out["joined"] == address and out["joined_cpus"] == 1, out  # RAY_ADDRESS joins the running cluster
