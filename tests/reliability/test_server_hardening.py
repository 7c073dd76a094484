"""Second-pass hardening of the embedded server: each test drives a real server over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from slime.backends.embedded_sglang.launch import find_free_port

KEY = "hardening-key-6b1f"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [5, 6, 7, 8, 9]


def post(server, payload, path="/generate", timeout=120):
    return requests.post(server.url + path, json=payload, headers=AUTH, timeout=timeout)


def post_raw(server, body: bytes, path="/generate"):
    headers = dict(AUTH, **{"Content-Type": "application/json"})
    return requests.post(server.url + path, data=body, headers=headers, timeout=60)


def message(r) -> str:
    body = r.json()
    return body["error"]["message"] if "error" in body else body["message"]


def assert_serving(server):
    r = post(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


# ---------------------------------------------- 1: no code runs from a weight payload
def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that would create ``marker`` if anything of them ran."""
    cmd = f"touch {marker}".encode()
    red = "torch.multiprocessing.reductions"

    def s(text: str) -> bytes:  # SHORT_BINUNICODE
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    def u(data: bytes) -> bytes:  # BINUNICODE
        return b"X" + len(data).to_bytes(4, "little") + data

    class Evil:
        def __reduce__(self):
            return (os.system, (cmd.decode(),))

    return {
        # the reported attack: protocol 4 walks rebuild_tensor.__builtins__.get -> eval
        "dotted_builtins_walk": b"\x80\x04"
        + s(red)
        + s("rebuild_tensor.__builtins__.get")
        + b"\x93"
        + s("eval")
        + b"\x85R"
        + b"("
        + u(b"__import__('os').system('" + cmd + b"')")
        + b"tR.",
        "dotted_globals_walk": b"\x80\x04" + s(red) + s("rebuild_tensor.__globals__.get") + b"\x93" + b".",
        "other_prefix_name": b"\x80\x04" + s(red) + s("rebuild_event_evil") + b"\x93.",
        "os_system_reduce": pickle.dumps([("a", Evil())], protocol=2),
        "os_system_protocol5": pickle.dumps([("a", Evil())], protocol=5),
        "builtins_eval_global": b"cbuiltins\neval\n(" + u(b"__import__('os').system('" + cmd + b"')") + b"tR.",
        "allowed_value_called": b"\x80\x04" + s("torch") + s("Tensor") + b"\x93)R.",
        "subprocess_module": b"\x80\x04" + s("subprocess") + s("getoutput") + b"\x93" + u(cmd) + b"\x85R.",
        "memoized_callable": b"\x80\x04" + s("posix") + s("system") + b"\x93\x94h\x00" + u(cmd) + b"\x85R.",
        "inst_opcode": b"(" + u(cmd) + b"ios\nsystem\n.",
        "obj_opcode": b"\x80\x02(cos\nsystem\n" + u(cmd) + b"o.",
        "ext_code": b"\x80\x02\x82\x01" + u(cmd) + b"\x85R.",
        "persistent_id": b"\x80\x02P" + cmd + b"\n.",
        "build_on_class": b"\x80\x04" + s("torch") + s("Tensor") + b"\x93}" + s("x") + b"K\x01sb.",
    }


def test_weight_payload_never_runs_code(server, tmp_path):
    marker = tmp_path / "pwned"
    for name, raw in _payloads(marker).items():
        r = post(server, {"serialized_named_tensors": [_b64(raw)], "load_format": None}, "/update_weights_from_tensor")
        assert r.status_code == 400 and r.json()["success"] is False, (name, r.text)
        assert "refused before unpickling" in r.json()["message"], (name, r.json())
        assert not marker.exists(), f"{name}: the payload's command ran"
    # a second rank's entry is checked too
    good_then_bad = [_b64(pickle.dumps([])), _b64(_payloads(marker)["os_system_reduce"])]
    r = post(server, {"serialized_named_tensors": good_then_bad}, "/update_weights_from_tensor")
    assert r.status_code == 400 and not marker.exists()
    assert_serving(server)


def test_weight_payload_checker_refuses_before_unpickling(tmp_path):
    from slime.backends.weight_payload import check_payload

    marker = tmp_path / "pwned"
    for name, raw in _payloads(marker).items():
        with pytest.raises(ValueError, match="refused before unpickling|not well-formed|truncated"):
            check_payload(raw)
        assert not marker.exists(), name


# ---------------------------------------------- 3: numeric ranges; one bad request never hangs others
@pytest.mark.parametrize(
    "sampling, needle",
    [
        ({"sampling_seed": 1 << 63}, "sampling_params.sampling_seed"),
        ({"sampling_seed": -1}, "sampling_params.sampling_seed=-1 is out of range [0, 9223372036854775807]"),
        ({"sampling_seed": (1 << 63) - 1, "n": 2}, "sampling_seed"),
        ({"sampling_seed": 10**400}, "an integer of 401 digits"),
        ({"temperature": 10**400}, "sampling_params.temperature"),
        ({"temperature": -0.5}, "temperature=-0.5 is out of range"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 1 << 40}, "sampling_params.top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_new_tokens": 1 << 40}, "max_new_tokens"),
        ({"min_new_tokens": 1 << 40}, "min_new_tokens"),
        ({"n": 0}, "sampling_params.n"),
        ({"frequency_penalty": 1e300}, "frequency_penalty"),
    ],
)
def test_out_of_range_sampling_params_get_400(server, sampling, needle):
    r = post(server, {"input_ids": PROMPT, "sampling_params": dict({"max_new_tokens": 2}, **sampling)})
    assert r.status_code == 400, r.text
    assert needle in message(r)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"return_logprob": True, "top_logprobs_num": 1 << 40}, "top_logprobs_num"),
        ({"return_logprob": True, "logprob_start_len": 1 << 40}, "logprob_start_len"),
        ({"return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
        ({"logprob_temperature": 1e300}, "logprob_temperature"),
        ({"custom_labels": {"logprob_temperature": "nan"}}, "logprob_temperature"),
        ({"custom_labels": {"logprob_temperature": 10**400}}, "logprob_temperature"),
        ({"token_ids_logprob": [1 << 70], "return_logprob": True}, "token_ids_logprob"),
    ],
)
def test_out_of_range_request_fields_get_400(server, extra, needle):
    r = post(server, dict({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}, **extra))
    assert r.status_code == 400, r.text
    assert needle in message(r)


def test_non_finite_json_numbers_get_400(server):
    for field, value in (("temperature", b"NaN"), ("top_p", b"Infinity"), ("min_p", b"-Infinity")):
        body = b'{"input_ids": [5, 6], "sampling_params": {"%s": %s}}' % (field.encode(), value)
        r = post_raw(server, body)
        assert r.status_code == 400 and f"sampling_params.{field} must be a finite number" in message(r), r.text
    r = post_raw(server, b'{"input_ids": [5, 6], "logprob_temperature": NaN}')
    assert r.status_code == 400 and "logprob_temperature" in message(r)


def test_a_failing_request_fails_alone_and_the_engine_serves_on(server):
    """An engine error fails exactly the requests it touched: the others of the same prefill batch are answered."""
    from slime.backends.embedded_sglang.engine import Engine, EngineRequestError, GenRequest

    engine = Engine(str(Path(server.model_path)), max_running_requests=8)
    try:
        good = [GenRequest(rid=f"g{i}", input_ids=PROMPT, max_new_tokens=3, temperature=0.0) for i in range(3)]
        bad = GenRequest(rid="bad", input_ids=PROMPT, max_new_tokens=3, seed=1 << 64)  # overflows int64 in the step
        futs = engine.submit_many([good[0], bad, good[1], good[2]])
        with pytest.raises(EngineRequestError, match="the engine failed"):
            futs[1].result(timeout=120)
        assert all(len(f.result(timeout=120).output_ids) == 3 for f in (futs[0], futs[2], futs[3]))
        after = engine.generate([GenRequest(rid="after", input_ids=PROMPT, max_new_tokens=2)], timeout=120)
        assert len(after[0].output_ids) == 2
    finally:
        engine.shutdown()


def _start_server_process(model_dir, log_path, extra=()):
    port = find_free_port()
    cmd = [sys.executable, "-m", "slime.backends.embedded_sglang.server", "--model-path", str(model_dir),
           "--port", str(port), *extra]  # fmt: skip
    env = dict(os.environ, SGLANG_API_KEY=KEY)
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller's cleanup
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log_path).read_text()[-2000:]
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server not healthy; log: {Path(log_path).read_text()[-2000:]}")


@pytest.mark.slow
def test_sigterm_stops_a_busy_server_within_seconds(tiny_student_dir, tmp_path):
    """A huge seed is refused; a long generation in flight does not keep SIGTERM from stopping the server."""
    proc, url, log = _start_server_process(tiny_student_dir, tmp_path / "server.log")
    try:
        r = requests.post(
            url + "/generate",
            json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "sampling_seed": 1 << 63}},
            headers=AUTH,
            timeout=30,
        )
        assert r.status_code == 400 and "sampling_seed" in r.json()["error"]["message"]
        long_req = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
        busy = threading.Thread(
            target=lambda: _ignore_errors(lambda: requests.post(url + "/generate", json=long_req, headers=AUTH)),
            daemon=True,
        )
        busy.start()
        time.sleep(1.0)  # the long request is running
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - start < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _ignore_errors(fn):
    try:
        fn()
    except requests.RequestException:
        pass


# ---------------------------------------------- 8: weights files: regular, inside the root, off the loop
def test_weights_file_symlink_outside_root_is_refused(server, weights_root, tmp_path, tiny_teacher_dir):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(Path(tiny_teacher_dir) / "model.safetensors", outside)
    (weights_root / "linked").mkdir()
    (weights_root / "linked" / "model.safetensors").symlink_to(outside)
    r = post(server, {"model_path": str(weights_root / "linked")}, "/update_weights_from_disk")
    assert r.status_code == 400, r.text
    assert "outside --weights-root" in r.json()["message"] and "model.safetensors" in r.json()["message"]
    assert_serving(server)


def test_weights_fifo_is_refused_and_health_stays_up(server, weights_root):
    (weights_root / "fifo").mkdir()
    os.mkfifo(weights_root / "fifo" / "model.safetensors")
    result = {}
    t = threading.Thread(
        target=lambda: result.update(r=post(server, {"model_path": "fifo"}, "/update_weights_from_disk", timeout=60))
    )
    t.start()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    t.join(timeout=60)
    r = result["r"]
    assert r.status_code == 400 and "is a FIFO" in r.json()["message"], r.text
    assert_serving(server)


def test_weights_directory_named_safetensors_is_refused(server, weights_root):
    (weights_root / "dirfile" / "model.safetensors").mkdir(parents=True)
    r = post(server, {"model_path": "dirfile"}, "/update_weights_from_disk")
    assert r.status_code == 400 and "is a directory" in r.json()["message"], r.text


# ---------------------------------------------- 12: the API key is not on any command line
@pytest.mark.slow
def test_api_key_not_in_engine_or_router_cmdline(tiny_student_dir, tmp_path):
    from slime.backends.embedded_sglang.launch import launch_engine_group

    secret = "cmdline-secret-9d2c"
    group = launch_engine_group(tiny_student_dir, num_engines=1, api_key=secret, log_dir=str(tmp_path))
    try:
        assert group.pids
        for pid in group.pids:
            assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), pid
        gen = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}
        r = requests.post(group.url + "/generate", json=gen, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert requests.get(group.engine_urls[0] + "/get_model_info", timeout=10).status_code == 401
    finally:
        group.stop()


def test_api_key_file_and_env(tmp_path):
    from argparse import Namespace

    from slime.backends.embedded_sglang.server import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(Namespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    os.environ["SGLANG_API_KEY"] = "from-env"
    assert resolve_api_key(Namespace(api_key=None, api_key_file=None)) == "from-env"
    assert "SGLANG_API_KEY" not in os.environ  # removed once read
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="could not be read"):
        resolve_api_key(Namespace(api_key=None, api_key_file=str(tmp_path / "empty")))


# ---------------------------------------------- 13: weight-update group: bounded, loopback, off the engine
def _group(**over):
    base = {"master_address": "127.0.0.1", "master_port": find_free_port(), "rank_offset": 1, "world_size": 2,
            "group_name": "g", "backend": "gloo"}  # fmt: skip
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"timeout_s": 10**9}, "timeout_s 1000000000 must be a number in (0, 600]"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"timeout_s": "inf"}, "timeout_s"),
        ({"master_address": "10.1.2.3"}, "is not a loopback address"),
        ({"master_address": "example.com"}, "--allow-remote-weight-update-master"),
        ({"master_port": 70000}, "master_port 70000 is out of range"),
        ({"world_size": 1 << 40}, "world_size"),
    ],
)
def test_init_group_bounds_and_loopback(server, over, needle):
    r = post(server, _group(**over), "/init_weights_update_group", timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["message"]


def test_init_group_rendezvous_does_not_block_generation(server):
    """Nobody else joins: the rendezvous waits (bounded by timeout_s) while /generate keeps answering."""
    result = {}
    spec = _group(group_name="lonely", timeout_s=8)
    t = threading.Thread(target=lambda: result.update(r=post(server, spec, "/init_weights_update_group", timeout=60)))
    t.start()
    time.sleep(0.5)
    assert_serving(server)
    r = post(server, spec, "/init_weights_update_group", timeout=30)  # the same name while it is pending
    assert r.status_code == 400 and "already being joined" in r.json()["message"]
    t.join(timeout=60)
    assert result["r"].status_code == 400 and "failed" in result["r"].json()["message"]


# ---------------------------------------------- 15: deep JSON
@pytest.mark.parametrize("path", ["/generate", "/update_weights_from_disk", "/init_weights_update_group"])
def test_deeply_nested_json_gets_400(server, path):
    for depth in (50, 100_000):
        r = post_raw(server, b"[" * depth + b"]" * depth, path)
        assert r.status_code == 400, (depth, r.text)
        assert "nests JSON" in message(r)
    r = post_raw(server, b'{"input_ids": [' + b"9" * 5000 + b"]}", path)  # an integer literal too long to read
    assert r.status_code == 400 and "not acceptable JSON" in message(r)


# ---------------------------------------------- 16: smaller server defects
def test_sampling_params_must_be_an_object(server):
    for bad in ([], [{}], "x", 3):
        r = post(server, {"input_ids": PROMPT, "sampling_params": bad})
        assert r.status_code == 400, (bad, r.text)
        assert "sampling_params must be an object" in message(r)
    r = post(server, {"input_ids": [PROMPT, PROMPT], "sampling_params": []})
    assert r.status_code == 400 and "0 entries for 2 prompts" in message(r)


def test_prompt_without_room_to_generate_is_refused(server):
    ctx = requests.get(server.url + "/get_model_info", headers=AUTH, timeout=10).json()["max_context_length"]
    long_prompt = [5] * (ctx - 1)
    r = post(server, {"input_ids": long_prompt})
    assert r.status_code == 400 and "no room to generate" in message(r)
    r = post(server, {"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 400 and "exceeds the model's maximum context length" in message(r)
    r = post(server, {"input_ids": [5] * (ctx - 10), "sampling_params": {"max_new_tokens": 20}})
    assert r.status_code == 400 and "at most 9 new tokens fit" in message(r)
    scored = post(server, {"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 0}})
    assert scored.status_code == 200  # scoring a prompt one short of the context still works


def test_released_and_resumed_memory_give_clear_answers(server, weights_root):
    assert post(server, {}, "/release_memory_occupation").status_code == 200
    try:
        r = post(server, {"model_path": "teacher"}, "/update_weights_from_disk")
        assert r.status_code == 400 and "call /resume_memory_occupation first" in r.json()["message"], r.text
        r = post(server, {"input_ids": PROMPT})
        assert r.status_code == 503 and "released its memory" in message(r)
    finally:
        assert post(server, {}, "/resume_memory_occupation").status_code == 200
    r = post(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 503 and "weights are undefined after /resume_memory_occupation" in message(r), r.text
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 503
    r = post(server, {"model_path": "student"}, "/update_weights_from_disk")
    assert r.status_code == 200, r.text
    assert_serving(server)


# ---------------------------------------------- 17: /v1/loads
def test_v1_loads_has_sglang_shape(server):
    r = requests.get(server.url + "/v1/loads?include=core", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dp_rank_count"] == 1 and len(body["loads"]) == 1
    load = body["loads"][0]
    for key in ("dp_rank", "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                "max_running_requests", "token_usage"):  # fmt: skip
        assert key in load, key
    assert load["num_total_reqs"] == load["num_running_reqs"] + load["num_waiting_reqs"] == 0
    assert body["aggregate"]["total_reqs"] == 0
    # upstream slime's reader (num_requests_from_load) sums these per rank
    assert sum(x["num_running_reqs"] + x["num_waiting_reqs"] for x in body["loads"]) == 0
    full = requests.get(server.url + "/v1/loads", headers=AUTH, timeout=10).json()
    assert full["loads"][0]["queues"]["waiting"] == 0
    bad = requests.get(server.url + "/v1/loads?include=bogus", headers=AUTH, timeout=10)
    assert bad.status_code == 400 and "Invalid include sections" in bad.json()["error"]["message"]
    assert requests.get(server.url + "/v1/loads", timeout=10).status_code == 401


def test_json_depth_counts_without_recursion():
    from slime.backends.embedded_sglang.server import json_depth

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert json_depth(deep, 32) == 33
    assert json_depth({"a": [1, {"b": 2}]}, 32) == 3
    assert json.loads(json.dumps({"x": 1})) == {"x": 1}
