"""Launchers: one embedded server (restart, liveness) and 2 engines behind a real sglang-router."""

from __future__ import annotations

import pytest
import requests

from slime.backends.embedded_sglang.launch import find_free_port, launch_engine_group, launch_server


def test_find_free_port_is_bindable():
    import socket

    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_two_engines_behind_sglang_router(tiny_student_dir, tmp_path):
    group = launch_engine_group(tiny_student_dir, num_engines=2, api_key="k", log_dir=str(tmp_path))
    try:
        headers = {"Authorization": "Bearer k"}
        assert len(group.engine_urls) == 2 and group.url not in group.engine_urls
        payload = {
            "input_ids": [5, 6, 7],
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
        }
        answers = [requests.post(group.url + "/generate", json=payload, headers=headers, timeout=60) for _ in range(6)]
        assert all(a.status_code == 200 for a in answers), answers[0].text
        first = answers[0].json()
        assert first["meta_info"]["input_token_logprobs"][0] == [None, 5, None]
        assert all(a.json()["output_ids"] == first["output_ids"] for a in answers)  # same weights, greedy
        served = [
            requests.get(u + "/get_server_info", headers=headers, timeout=10).json()["num_requests_served"]
            for u in group.engine_urls
        ]
        assert sum(served) == 6 and min(served) > 0  # the router spread the load over both engines
        assert requests.post(group.url + "/generate", json=payload, timeout=60).status_code == 401
    finally:
        pids = group.pids
        group.stop()
    import os

    for pid in pids:  # every process it started is gone (reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_server_restart_and_liveness(tiny_student_dir):
    srv = launch_server(tiny_student_dir)
    try:
        assert srv.is_alive()
        old_pid = srv.pid
        srv.restart()
        assert srv.is_alive() and srv.pid != old_pid
        r = requests.post(
            srv.url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=60
        )
        assert r.status_code == 200
    finally:
        srv.stop()
    assert not srv.is_alive()
