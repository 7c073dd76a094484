"""The embedded SGLang-compatible server over real HTTP on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from slime.backends.embedded_sglang.launch import find_free_port, launch_server
from slime.backends.embedded_sglang.server import check_bind, resolve_weights_path

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"
PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("weights_root")
    shutil.copytree(tiny_student_dir, root / "student")
    shutil.copytree(tiny_teacher_dir, root / "teacher")
    (root / "notweights").mkdir()
    (root / "notweights" / "model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    return root


@pytest.fixture(scope="module")
def server(weights_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    extra = [
        "--weights-root",
        str(weights_root),
        "--max-body-bytes",
        "200000",
        "--max-new-tokens-cap",
        "512",
        "--random-seed",
        "7",
    ]
    handle = launch_server(weights_root / "student", api_key=KEY, extra_args=extra, log_file=str(log))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def hf_model(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_student_dir)).eval()


def post(server, payload, path="/generate", headers=AUTH):
    return requests.post(server.url + path, json=payload, headers=headers, timeout=120)


def logprob_payload(sampling_params: dict, start: int = 0, **fields) -> dict:
    """A /generate request over PROMPT that returns log-probs from position `start` on."""
    return {
        "input_ids": PROMPT,
        "sampling_params": sampling_params,
        "return_logprob": True,
        "logprob_start_len": start,
        **fields,
    }


def direct_logprobs(model, ids, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)  # [L, V]


def test_plain_generate_has_contract_shape(server):
    r = post(server, logprob_payload({"max_new_tokens": 5, "temperature": 0.7}, top_logprobs_num=3))
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["prompt_tokens"] == len(PROMPT)
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert meta["input_token_logprobs"][0] == [None, PROMPT[0], None]
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(PROMPT)
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == len(meta["output_top_logprobs"])
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(top) == 3 for top in meta["output_top_logprobs"])


def test_api_key_required_and_health_open(server):
    assert post(server, {"input_ids": PROMPT}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server, {"input_ids": PROMPT}, headers={}).status_code == 401
    assert requests.get(server.url + "/get_model_info", timeout=10).status_code == 401
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200


def test_prefill_scoring_matches_direct_forward(server, hf_model):
    k = 5
    payload = logprob_payload({"max_new_tokens": 0, "temperature": 0}, top_logprobs_num=k, token_ids_logprob=[3, 120])
    r = post(server, payload)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["output_token_logprobs"] == [] and meta["completion_tokens"] == 0
    ref = direct_logprobs(hf_model, PROMPT)
    got = torch.tensor([e[0] for e in meta["input_token_logprobs"][1:]])
    want = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert torch.allclose(got, want, atol=1e-5)
    for pos, top in enumerate(meta["input_top_logprobs"][1:]):
        vals = [e[0] for e in top]
        assert vals == sorted(vals, reverse=True) and len(top) == k
        ref_vals, ref_ids = torch.topk(ref[pos], k)
        assert torch.allclose(torch.tensor(vals), ref_vals, atol=1e-5)
        assert [e[1] for e in top] == ref_ids.tolist()
    assert meta["input_token_ids_logprobs"][0] is None
    for pos, entries in enumerate(meta["input_token_ids_logprobs"][1:]):
        assert [e[1] for e in entries] == [3, 120]
        assert torch.allclose(torch.tensor([e[0] for e in entries]), ref[pos, [3, 120]], atol=1e-5)


def test_logprob_start_len_and_temperature_field(server, hf_model):
    s = 3
    r = post(server, logprob_payload({"max_new_tokens": 0}, s, logprob_temperature=2.0))
    meta = r.json()["meta_info"]
    # SGLang: len(input) - s entries for input_ids[s:], the first with a None log-prob.
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT[s:]
    assert meta["input_token_logprobs"][0][0] is None
    ref = direct_logprobs(hf_model, PROMPT, temperature=2.0)
    want = [ref[i - 1, PROMPT[i]].item() for i in range(s + 1, len(PROMPT))]
    assert torch.allclose(
        torch.tensor([e[0] for e in meta["input_token_logprobs"][1:]]), torch.tensor(want), atol=1e-5
    )
    # Through the router the field is dropped; custom_labels carries it instead.
    r2 = post(server, logprob_payload({"max_new_tokens": 0}, s, custom_labels={"logprob_temperature": "2.0"}))
    assert r2.json()["meta_info"]["input_token_logprobs"] == meta["input_token_logprobs"]
    # Default logprob_start_len (-1): no input log-probs, as in current SGLang.
    r3 = post(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True})
    assert r3.json()["meta_info"]["input_token_logprobs"] == []


def test_greedy_topk1_and_sampling_params(server, hf_model):
    greedy = post(
        server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    ).json()
    topk1 = post(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.3, "top_k": 1, "ignore_eos": True},
        },
    ).json()
    assert greedy["output_ids"] == topk1["output_ids"]
    ids = list(PROMPT)
    for tok in greedy["output_ids"]:
        assert tok == int(direct_logprobs(hf_model, ids)[-1].argmax())
        ids.append(tok)
    # top_k=3: every sampled first token is among the 3 most likely.
    top3 = set(torch.topk(direct_logprobs(hf_model, PROMPT)[-1], 3).indices.tolist())
    payload = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_k": 3, "n": 24}}
    firsts = {o["output_ids"][0] for o in post(server, payload).json()}
    assert firsts <= top3 and len(firsts) >= 2
    # top_p tiny: only the argmax survives.
    payload = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_p": 1e-6, "n": 8},
    }
    assert {o["output_ids"][0] for o in post(server, payload).json()} == {greedy["output_ids"][0]}
    # Output log-probs are of the temperature-scaled distribution (SGLang's default).
    r = post(
        server,
        {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0.5}, "return_logprob": True},
    ).json()
    lp, tok, _ = r["meta_info"]["output_token_logprobs"][0]
    assert abs(lp - direct_logprobs(hf_model, PROMPT, 0.5)[-1, tok].item()) < 1e-5
    # Same sampling_seed -> same sample.
    seeded = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8, "sampling_seed": 11, "ignore_eos": True}}
    assert post(server, seeded).json()["output_ids"] == post(server, seeded).json()["output_ids"]


def test_stop_token_ids_and_stop_strings(server):
    greedy = post(
        server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    ).json()
    first = greedy["output_ids"][0]
    out = post(
        server,
        {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "stop_token_ids": [first]}},
    ).json()
    assert out["output_ids"] == [first]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    text = greedy["text"]
    stop = text[1:3]
    out = post(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True, "stop": [stop]},
        },
    ).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]
    kept = post(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {
                "max_new_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "stop": [stop],
                "no_stop_trim": True,
            },
        },
    ).json()
    assert kept["text"].endswith(stop)


def test_batch_and_n_samples(server):
    prompts = [PROMPT, [20, 21, 22], PROMPT]
    single = [
        post(server, {"input_ids": p, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
        for p in prompts
    ]
    batch = post(server, {"input_ids": prompts, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
    assert isinstance(batch, list) and len(batch) == 3
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in single]
    texts = post(server, {"text": ["ab", "cd"], "sampling_params": {"max_new_tokens": 2}}).json()
    assert len(texts) == 2 and all("meta_info" in t for t in texts)
    many = post(
        server, {"input_ids": [40, 41, 42, 43], "sampling_params": {"max_new_tokens": 6, "n": 6, "ignore_eos": True}}
    ).json()
    assert len(many) == 6 and len({tuple(m["output_ids"]) for m in many}) > 1
    assert sum(m["meta_info"]["cached_tokens"] > 0 for m in many) >= 5  # one prefill shared by the n samples


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"input_ids": PROMPT, "text": "hi"}, "exactly one of"),
        ({"input_ids": []}, "is empty"),
        ({"input_ids": [1, 2, 999]}, "outside the model vocabulary"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10_000}}, "exceeds the server cap"),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "unknown keys"),
        ({"input_ids": "12"}, "input_ids"),
        ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
        ({"input_ids": [1, 2], "token_ids_logprob": [500], "return_logprob": True}, "token_ids_logprob"),
    ],
)
def test_malformed_requests_get_400(server, payload, needle):
    r = post(server, payload)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_extra_router_fields_are_ignored(server):
    payload = {
        "model": None,
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 2},
        "stream": False,
        "log_metrics": True,
        "return_hidden_states": False,
        "rid": "abc",
        "lora_path": None,
        "bootstrap_host": None,
        "background": False,
        "no_logs": False,
        "return_bytes": False,
        "return_entropy": False,
        "custom_labels": {"x": "y"},
    }
    r = post(server, payload)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["id"] == "abc"


def test_body_cap_413(server):
    r = post(server, {"input_ids": PROMPT, "pad": "x" * 300_000})
    assert r.status_code == 413


def test_info_endpoints(server):
    info = requests.get(server.url + "/get_model_info", headers=AUTH, timeout=10).json()
    assert info["is_generation"] is True and info["vocab_size"] == 128 and info["tokenizer_vocab_size"] == 99
    for path in ("/get_server_info", "/server_info", "/model_info", "/get_load"):
        assert requests.get(server.url + path, headers=AUTH, timeout=10).status_code == 200
    assert requests.post(server.url + "/flush_cache", headers=AUTH, timeout=30).status_code == 200


def test_answers_match_upstream_fixture_structure(server):
    """Our answers have the fixture's keys, nesting, types and None placement (fixtures built from SGLang source)."""

    def skeleton(x):
        if x is None:
            return None
        if isinstance(x, bool):
            return "bool"
        if isinstance(x, int | float):
            return "num"
        if isinstance(x, str):
            return "str"
        if isinstance(x, list):
            return [skeleton(e) for e in x]
        return {k: skeleton(v) for k, v in x.items()}

    for name in ("generate_logprobs.json", "prefill_scoring.json"):
        fixture = json.loads((FIXTURES / name).read_text())
        req = dict(fixture["request"])
        n = len(req["input_ids"])
        req["input_ids"] = PROMPT[:n]
        if "token_ids_logprob" in req:
            req["token_ids_logprob"] = [2]
        req["sampling_params"] = dict(req["sampling_params"], ignore_eos=True)
        ours = post(server, req).json()
        want = fixture["response"]
        assert set(ours) == set(want)
        assert set(ours["meta_info"]) == set(want["meta_info"]), name
        for key in want["meta_info"]:
            if key in ("finish_reason", "id"):
                continue
            assert skeleton(ours["meta_info"][key]) == skeleton(want["meta_info"][key]), (name, key)
        assert skeleton(ours["output_ids"]) == skeleton(want["output_ids"])
        assert ours["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_update_weights_from_disk(server, weights_root):
    probe = logprob_payload({"max_new_tokens": 0})
    before = post(server, probe).json()["meta_info"]["input_token_logprobs"]
    bad = [str(weights_root / ".." / "elsewhere"), "/etc", "../../", str(weights_root / "notweights")]
    for path in bad:
        r = post(server, {"model_path": path}, path="/update_weights_from_disk")
        assert r.status_code == 400 and r.json()["success"] is False, (path, r.text)
    r = post(server, {"model_path": str(weights_root / "teacher")}, path="/update_weights_from_disk")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    after = post(server, probe).json()["meta_info"]["input_token_logprobs"]
    assert after != before
    r = post(server, {"model_path": "student"}, path="/update_weights_from_disk")  # relative to the root
    assert r.json()["success"] is True
    assert post(server, probe).json()["meta_info"]["input_token_logprobs"] == before


def test_path_and_bind_guards(tmp_path):
    (tmp_path / "root" / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    assert resolve_weights_path("ok", tmp_path / "root") == (tmp_path / "root" / "ok").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "link", "", None):
        with pytest.raises(ValueError):
            resolve_weights_path(bad, tmp_path / "root")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ValueError, match="without --api-key"):
        check_bind("0.0.0.0", None)


def test_cli_refuses_public_bind_without_key(tiny_student_dir):
    cmd = [
        sys.executable,
        "-m",
        "slime.backends.embedded_sglang.server",
        "--model-path",
        str(tiny_student_dir),
        "--host",
        "0.0.0.0",
        "--port",
        str(find_free_port()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"SGLANG_API_KEY": "", "PATH": ""})
    assert proc.returncode == 2 and "without --api-key" in proc.stderr
