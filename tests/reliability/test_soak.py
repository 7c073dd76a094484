"""A short bounded soak: 200 mixed requests against one embedded server on 127.0.0.1, no errors, stable RSS."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

N_REQUESTS = 200
WARMUP = 20
CONCURRENCY = 8


def _payload(i: int) -> dict:
    rng = random.Random(i)
    prompt = [rng.randrange(3, 99) for _ in range(rng.randrange(2, 40))]
    kind = i % 4
    if kind == 0:  # rollout-style sampling with log-probs and top-K
        return {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 1.0},
                "return_logprob": True, "top_logprobs_num": 4}  # fmt: skip
    if kind == 1:  # teacher-style prefill scoring
        return {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": 0, "top_logprobs_num": 4}  # fmt: skip
    if kind == 2:  # a batch of two prompts, greedy
        return {"input_ids": [prompt, prompt[::-1]], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}
    return {"text": "1+1=", "sampling_params": {"max_new_tokens": 6, "n": 2, "sampling_seed": i}}


@pytest.mark.slow
def test_soak_200_requests_no_errors_stable_memory(teacher_server, tmp_path):
    proc = psutil.Process(teacher_server.pid)
    session = requests.Session()
    session.headers.update(teacher_server.headers)

    def call(i: int) -> str | None:
        r = session.post(teacher_server.url + "/generate", json=_payload(i), timeout=120)
        if r.status_code != 200:
            return f"request {i}: HTTP {r.status_code} {r.text[:200]}"
        body = r.json()
        answers = body if isinstance(body, list) else [body]
        if not answers or any("meta_info" not in a for a in answers):
            return f"request {i}: malformed answer {str(body)[:200]}"
        return None

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        warm_errors = [e for e in pool.map(call, range(WARMUP)) if e]
        rss_before = proc.memory_info().rss
        served_before = session.get(teacher_server.url + "/get_server_info", timeout=30).json()["num_requests_served"]
        errors = [e for e in pool.map(call, range(WARMUP, WARMUP + N_REQUESTS)) if e]
    rss_after = proc.memory_info().rss
    served_after = session.get(teacher_server.url + "/get_server_info", timeout=30).json()["num_requests_served"]
    report = {"requests": N_REQUESTS, "errors": len(errors), "rss_before_mib": rss_before / 2**20,
              "rss_after_mib": rss_after / 2**20, "answers_served": served_after - served_before}  # fmt: skip
    print("soak:", json.dumps(report))
    if os.environ.get("RELIABILITY_REPORT"):
        with open(os.environ["RELIABILITY_REPORT"], "a") as f:
            f.write(json.dumps({"soak": report}) + "\n")
    assert warm_errors == [] and errors == []
    # 50 of each kind; kinds 2 and 3 give two answers each
    assert served_after - served_before == 50 * (1 + 1 + 2 + 2)
    # stable: the prompt cache and batches are bounded, so memory after 200 requests stays near the warm level
    assert rss_after < rss_before * 1.25 + 64 * 2**20, report
