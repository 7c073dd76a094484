"""The embedded server's OpenAI-compatible routes over real HTTP on 127.0.0.1 (tiny random model)."""

from __future__ import annotations

import pytest
import requests
from transformers import AutoTokenizer

KEY = "openai-routes-key"  # the conftest `server` fixture starts the server with it
AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body, headers=AUTH):
    return requests.post(server.url + path, json=body, headers=headers, timeout=120)


def test_echo_logprobs_are_the_native_prefill_logprobs(server):
    """What lm-eval's loglikelihood sends: echo + logprobs + max_tokens=1 on token ids."""
    ids = [5, 6, 7, 8, 9, 10]
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(lp["text_offset"]) == len(ids) + 1
    native_body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    native_body |= {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1}
    native = post(server, "/generate", native_body)
    meta = native.json()["meta_info"]
    expected = [e[0] for e in meta["input_token_logprobs"]] + [e[0] for e in meta["output_token_logprobs"]]
    assert expected[0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected[1:], abs=1e-6)
    for logprob, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert len(top) == 1 and max(top.values()) >= logprob - 1e-6  # the top-1 is at least the scored token
    # greedy: the generated token is the argmax, so its log-prob is the top-1 value
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
    assert choice["text"].startswith(AutoTokenizer.from_pretrained(server.model_path).decode(ids))


def test_batched_prompts_with_n_samples_are_prompt_major(server):
    body = {"prompt": [[5, 6, 7], [8, 9], [10]], "max_tokens": 3, "temperature": 0, "n": 2, "seed": 3}
    out = post(server, "/v1/completions", body).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    texts = [c["text"] for c in out["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[4] == texts[5]  # greedy: samples agree
    assert out["usage"]["prompt_tokens"] == 3 + 2 + 1
    assert out["usage"]["completion_tokens"] == sum(1 for _ in texts) * 3
    assert all(c["finish_reason"] in ("length", "stop") for c in out["choices"])
    single = post(server, "/v1/completions", {"prompt": [8, 9], "max_tokens": 3, "temperature": 0}).json()
    assert single["choices"][0]["text"] == texts[2]


def test_text_prompt_echo_and_models(server):
    r = post(server, "/v1/completions", {"prompt": "12+3=", "max_tokens": 2, "temperature": 0, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("12+3=")
    assert r.json()["object"] == "text_completion"
    models = requests.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["max_model_len"] > 0


def test_chat_completion_is_generate_on_the_chat_template(server):
    tok = AutoTokenizer.from_pretrained(server.model_path)
    messages = [{"role": "user", "content": "7+8="}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    out = post(server, "/v1/chat/completions", body).json()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    native = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": native.json()["text"]}
    assert out["usage"]["prompt_tokens"] == len(ids)
    content = choice["logprobs"]["content"]
    assert len(content) == native.json()["meta_info"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "7+8="}]}], "max_tokens": 4,
             "temperature": 0}  # fmt: skip
    assert post(server, "/v1/chat/completions", parts).json()["choices"][0]["message"] == choice["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", {"prompt": "1", "stream": True}, 400, "streaming is not supported"),
        ("/v1/completions", {"prompt": "1", "foo": 1}, 400, "unknown fields ['foo']"),
        ("/v1/completions", {"max_tokens": 2}, 400, "'prompt' is required"),
        ("/v1/completions", {"prompt": [1.5]}, 400, "prompt must be a string"),
        ("/v1/completions", {"prompt": "1", "logprobs": 21}, 400, "logprobs must be an integer in [0, 20]"),
        ("/v1/completions", {"prompt": "1", "temperature": -1}, 400, "temperature must be a number"),
        ("/v1/completions", {"prompt": "1", "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported"),
        ("/v1/completions", {"prompt": "1", "best_of": 3}, 400, "best_of=3"),
        ("/v1/completions", {"prompt": "1", "max_tokens": 10**6}, 400, "exceeds"),
        ("/v1/completions", {"prompt": [[5, 10**6]]}, 400, "outside the model vocabulary"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "content must be a string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
         "top_logprobs needs logprobs=true"),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_400s(server, path, body, status, needle):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_api_key_is_required(server):
    r = post(server, "/v1/completions", {"prompt": "1"}, headers={})
    assert r.status_code == 401
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert post(server, "/v1/completions", "a JSON string, not an object").status_code == 400
