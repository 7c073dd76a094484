"""The default rollout against a real embedded SGLang-API server (student) and a teacher server."""

from __future__ import annotations

import json
import math

import pytest

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.sglang_rollout import build_sampling_params, generate_rollout
from slime.utils.arguments import parse_args
from slime.utils.http_utils import init_http_client
from slime.utils.types import Sample


@pytest.fixture(scope="module")
def servers(tiny_student_dir, tiny_teacher_dir):
    from slime.backends.embedded_sglang.launch import launch_server

    student = launch_server(tiny_student_dir)
    try:
        teacher = launch_server(tiny_teacher_dir)
    except BaseException:
        student.stop()
        raise
    yield student, teacher
    teacher.stop()
    student.stop()


def prompt_file(tmp_path, n=2):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(n)))
    return str(path)


def rollout_args(tmp_path, student_dir, student_url, *extra):
    host, port = student_url.split("://")[1].rsplit(":", 1)
    argv = [
        "--hf-checkpoint", str(student_dir), "--prompt-data", prompt_file(tmp_path),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "6",
        "--sglang-router-ip", host, "--sglang-router-port", port, "--save", str(tmp_path / "ckpt"),
        *extra,
    ]  # fmt: skip
    args = parse_args(argv)
    init_http_client(args)
    return args


@pytest.mark.slow
def test_generate_rollout_with_opd_topk_and_teacher_rm(tmp_path, servers, tiny_student_dir):
    student, teacher = servers
    args = rollout_args(
        tmp_path, tiny_student_dir, student.url,
        "--use-opd", "--opd-type", "sglang", "--rm-url", f"{teacher.url}/generate", "--opd-topk-metrics-k", "4",
        "--custom-rm-path", "opd_stub_plugins.teacher_rm",
    )  # fmt: skip
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    assert isinstance(out, RolloutFnTrainOutput)
    assert [len(g) for g in out.samples] == [2, 2]
    assert [s.index for g in out.samples for s in g] == [0, 1, 2, 3]
    for s in (s for g in out.samples for s in g):
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
        assert 1 <= s.response_length <= 6
        assert len(s.tokens) > s.response_length and len(s.loss_mask) == s.response_length == len(s.rollout_log_probs)
        assert all(math.isfinite(x) and x <= 0 for x in s.rollout_log_probs)
        top = s.metadata["student_top_logprobs"]
        assert len(top) == s.response_length and all(len(entry) == 4 for entry in top)
        # the sampled token's log-prob is consistent with the top-K list when it appears there
        for lp, tok, entry in zip(s.rollout_log_probs, s.tokens[-s.response_length :], top, strict=True):
            ids = [e[1] for e in entry]
            if tok in ids:
                assert abs(entry[ids.index(tok)][0] - lp) < 1e-4
        # the teacher reward is the server's whole answer (prefill only)
        teacher_lp = s.reward["meta_info"]["input_token_logprobs"]
        assert teacher_lp[0][0] is None and len(teacher_lp) == len(s.tokens)
    assert out.metrics["rollout/num_samples"] == 4 and out.metrics["rollout/http_failures"] == 0


@pytest.mark.slow
def test_truncation_custom_generate_and_eval(tmp_path, servers, tiny_student_dir):
    student, _ = servers
    eval_file = prompt_file(tmp_path)
    args = rollout_args(
        tmp_path, tiny_student_dir, student.url,
        "--custom-rm-path", "opd_stub_plugins.length_rm", "--rollout-max-response-len", "1",
        "--eval-prompt-data", "arith", eval_file, "--eval-rm-type", "exact_match", "--eval-max-response-len", "3",
    )  # fmt: skip
    assert build_sampling_params(args, evaluation=True)["max_new_tokens"] == 3
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    samples = [s for g in out.samples for s in g]
    # one token allowed: anything that is not an immediate stop is cut by length
    assert all(s.response_length == 1 and s.reward == 1.0 for s in samples)
    assert all(s.status in (Sample.Status.TRUNCATED, Sample.Status.COMPLETED) for s in samples)
    assert "student_top_logprobs" not in samples[0].metadata  # no OPD, no top-K request

    ev = generate_rollout(args, 0, None, evaluation=True)
    assert isinstance(ev, RolloutFnEvalOutput)
    assert len(ev.data["arith"]["rewards"]) == 2 and set(ev.data["arith"]["rewards"]) <= {0.0, 1.0}
    assert "eval/arith/reward_mean" in ev.metrics

    args.custom_generate_function_path = "opd_stub_plugins.echo_generate"
    out = generate_rollout(args, 1, RolloutDataSourceWithBuffer(args))
    s = out.samples[0][0]
    assert s.tokens == [5, 6, 7, 8, 9] and s.response == "ab" and s.reward == 2.0
    assert s.status is Sample.Status.COMPLETED


def test_missing_router_is_a_clear_error(tmp_path, tiny_student_dir):
    args = parse_args(
        ["--hf-checkpoint", str(tiny_student_dir), "--prompt-data", prompt_file(tmp_path), "--input-key", "prompt",
         "--rollout-batch-size", "1", "--rollout-max-response-len", "2", "--rm-type", "exact_match"]
    )  # fmt: skip
    with pytest.raises(ValueError, match="--sglang-router-ip"):
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))


@pytest.mark.slow
def test_batched_requests_give_the_per_sample_answers_in_fewer_requests(tmp_path, servers, tiny_student_dir):
    """--sglang-batch-requests: the rollout (top-k 1: greedy, so comparable) and the OPD patch's teacher scoring send
    batched /generate requests; tokens and log-probs equal the one-request-per-sample path's."""
    from slime.rollout import on_policy_distillation as opd

    student, teacher = servers
    results = {}
    for mode in ("--no-sglang-batch-requests", "--sglang-batch-requests"):
        args = rollout_args(
            tmp_path, tiny_student_dir, student.url, mode,
            "--use-opd", "--opd-type", "sglang", "--rm-url", f"{teacher.url}/generate", "--opd-topk-metrics-k", "4",
            "--custom-rm-path", "slime.rollout.on_policy_distillation.reward_func", "--rollout-top-k", "1",
        )  # fmt: skip
        opd.reset_http_stats()
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        samples = [s for g in out.samples for s in g]
        results[mode] = (
            [s.tokens for s in samples],
            [s.rollout_log_probs for s in samples],
            [[e[0] for e in s.reward["meta_info"]["input_token_logprobs"]] for s in samples],
            out.metrics["rollout/http_requests"],
            opd.reset_http_stats()["requests"],
        )
    one, batched = results["--no-sglang-batch-requests"], results["--sglang-batch-requests"]
    assert batched[0] == one[0]  # the same greedy responses
    for a, b in zip(one[1] + one[2], batched[1] + batched[2], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert one[3] == 4 and one[4] == 4  # one student and one teacher request per sample
    assert batched[3] == 1 and 1 <= batched[4] < 4  # one batch; teacher batches per distinct prompt length
