"""HTTP faults between the stack and a real embedded server, injected by a proxy on 127.0.0.1.

Both clients are covered: the rollout's ``slime.utils.http_utils.post`` and the TA-OPD patch's
teacher scoring (``reward_func``). Dropped connections, 5xx answers and delays past the timeout are
retried with backoff; past the budget the call raises an error naming the url and the attempts;
an answer is never replaced by a silent default.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import requests

from slime.utils import http_utils
from slime.utils.async_utils import run
from slime.utils.http_utils import HTTPRequestError, post, reset_retry_stats
from slime.utils.types import Sample
from slime_patch.slime.rollout import on_policy_distillation as opd

SCORE = {
    "input_ids": [5, 9, 11, 20, 7],
    "sampling_params": {"max_new_tokens": 0},
    "return_logprob": True,
    "logprob_start_len": 0,
}


def _teacher_sample() -> Sample:
    return Sample(index=3, tokens=[5, 9, 11, 20, 7], response_length=2, metadata={})


API_KEY = "reliability-key"  # the teacher_server fixture's key (conftest.py)


def _args(url: str, **kw) -> Namespace:
    base = dict(
        rm_url=f"{url}/generate", api_key=API_KEY, http_timeout=30.0, http_max_retries=3, rollout_temperature=1.0,
        opd_topk_metrics_k=2, opd_budget_mask="full", opd_teacher_temperature=1.0,
    )  # fmt: skip
    base.update(kw)
    return Namespace(**base)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(opd, "_BACKOFF_BASE_S", 0.01)
    reset_retry_stats()
    opd._http_stats.clear()


def _post(url: str, **kw):
    return run(post(f"{url}/generate", SCORE, api_key=API_KEY, backoff_base=0.01, **kw))


def test_rollout_client_survives_500s_drops_and_delays(proxy, teacher_server):
    direct = requests.post(teacher_server.url + "/generate", json=SCORE, headers=teacher_server.headers).json()
    proxy.fail_next(2, status=500)
    proxy.drop_next(1)
    proxy.delay_next(1, seconds=3.0)  # longer than the 1 s timeout below: a timeout, retried
    answer = _post(proxy.url, timeout=1.0, max_retries=5)
    assert answer["meta_info"]["input_token_logprobs"] == direct["meta_info"]["input_token_logprobs"]
    assert proxy.counts["fail"] == 2 and proxy.counts["drop"] == 1 and proxy.counts["delay"] == 1
    assert http_utils.get_retry_stats() == {"requests": 1, "retries": 4, "failures": 0}


def test_rollout_client_fatal_after_budget_names_url_and_attempts(proxy):
    proxy.fail_next(10, status=503)
    with pytest.raises(HTTPRequestError, match=r"failed after 3 attempts; last error: HTTP 503") as info:
        _post(proxy.url, max_retries=2)
    assert info.value.url == f"{proxy.url}/generate" and info.value.attempts == 3
    assert http_utils.get_retry_stats()["failures"] == 1


def test_rollout_client_refuses_a_garbled_answer(proxy):
    proxy.garble_next(1)
    with pytest.raises(HTTPRequestError, match="not JSON"):
        _post(proxy.url)


def test_teacher_scoring_survives_faults_with_identical_answer(proxy, teacher_server):
    sample = _teacher_sample()
    direct = run(opd.reward_func(_args(teacher_server.url), _teacher_sample()))
    opd._http_stats.clear()
    proxy.fail_next(1, status=502)
    proxy.drop_next(1)
    proxy.delay_next(1, seconds=3.0)
    answer = run(opd.reward_func(_args(proxy.url, http_timeout=1.0), sample))
    assert answer["meta_info"]["input_token_logprobs"] == direct["meta_info"]["input_token_logprobs"]
    assert answer["meta_info"]["input_top_logprobs"] == direct["meta_info"]["input_top_logprobs"]
    assert dict(opd._http_stats) == {"requests": 1, "retries": 3}


def test_teacher_scoring_fatal_after_budget_never_a_silent_zero(proxy):
    proxy.drop_next(10)
    with pytest.raises(opd.TeacherScoringError, match=r"sample 3: teacher scoring request to .* failed after 2"):
        run(opd.reward_func(_args(proxy.url, http_max_retries=1), _teacher_sample()))
    assert opd._http_stats["failures"] == 1


def test_teacher_scoring_client_error_is_not_retried(proxy):
    with pytest.raises(opd.TeacherScoringError, match="HTTP 401"):
        run(opd.reward_func(_args(proxy.url, api_key="wrong"), _teacher_sample()))
    assert opd._http_stats["retries"] == 0 and proxy.counts["forwarded"] == 1
