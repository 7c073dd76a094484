"""The patch's ``reward_func`` against a local stub teacher on 127.0.0.1 and the real embedded server."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from aiohttp import web
from patch_helpers import PRIVILEGED_PROMPT, VOCAB, make_batch, make_sample, opd_args, teacher_answer

import slime_patch.slime.rollout.on_policy_distillation as patch_opd


class StubTeacher:
    """A SGLang-API ``/generate`` stub: records requests, answers prefill scoring deterministically."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_first = 0  # answer 503 to this many requests first
        self.status: int | None = None  # always answer this status
        self.malformed = False

    @staticmethod
    def logits(ids: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(ids) * 31 + len(ids))
        return torch.randn(len(ids), VOCAB, generator=g) * 2.0

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="busy")
        if self.status is not None:
            return web.Response(status=self.status, text="nope")
        if self.malformed:
            return web.json_response({"text": ""})
        ids = body["input_ids"]
        answer = teacher_answer(
            ids,
            body["logprob_start_len"],
            self.logits(ids),
            body.get("top_logprobs_num", 0),
            body.get("token_ids_logprob"),
        )
        return web.json_response(answer)


async def _with_stub(stub: StubTeacher, fn):
    app = web.Application()
    app.router.add_post("/generate", stub.generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(f"http://127.0.0.1:{port}/generate", port)
    finally:
        await runner.cleanup()


def _strip(samples):
    for s in samples:
        s.reward = None
        s.metadata.pop("_teacher_logits", None)
    return samples


def test_reward_func_request_and_answer_then_selection():
    stub = StubTeacher()
    samples = _strip(make_batch(k=8))

    async def run(url, port):
        args = opd_args(rm_url=url, opd_budget_mask="dlearn_high", opd_budget_ratio=0.2, opd_topk_metrics_k=8)
        for s in samples:
            s.reward = await patch_opd.reward_func(args, s)
        return args

    args = asyncio.run(_with_stub(stub, run))
    assert len(stub.requests) == len(samples)
    for s, req in zip(samples, stub.requests, strict=True):
        prompt_len = len(s.tokens) - s.response_length
        assert req["input_ids"] == s.tokens
        assert req["sampling_params"]["max_new_tokens"] == 0
        assert req["return_logprob"] is True
        assert req["logprob_start_len"] == prompt_len - 1
        assert req["top_logprobs_num"] == 8
        assert "token_ids_logprob" not in req and "logprob_temperature" not in req
        assert s.reward["meta_info"]["input_token_logprobs"][-1][1] == s.tokens[-1]
    patch_opd.post_process_rewards(args, samples, rollout_id=0)
    for s in samples:
        logp = torch.log_softmax(StubTeacher.logits(s.tokens), -1)
        n = s.response_length
        want = logp[torch.arange(len(s.tokens) - n, len(s.tokens)), torch.tensor(s.tokens[-n:])]
        assert torch.allclose(s.teacher_log_probs, want.float(), atol=1e-6)
    assert 0 < sum(sum(s.loss_mask) for s in samples) < sum(s.response_length for s in samples)


@pytest.mark.parametrize("overflow", ["fallback", "truncate", "error"])
def test_exact_cmass_requests_the_student_union(overflow):
    stub = StubTeacher()
    sample = _strip([make_sample(5, prompt_len=4, response_len=6, k=4, seed=3)])[0]
    union = sorted({e[1] for pos in sample.metadata["student_top_logprobs"] for e in pos})

    async def run(url, port):
        big = opd_args(rm_url=url, opd_exact_cmass=True, opd_topk_metrics_k=4)
        await patch_opd.reward_func(big, sample)
        small = opd_args(rm_url=url, opd_exact_cmass=True, opd_topk_metrics_k=4, opd_exact_cmass_max_union=5,
                         opd_exact_cmass_overflow=overflow)  # fmt: skip
        return await patch_opd.reward_func(small, sample)

    if overflow == "error":
        with pytest.raises(ValueError, match="sample 5.*max-union"):
            asyncio.run(_with_stub(stub, run))
        return
    answer = asyncio.run(_with_stub(stub, run))
    assert stub.requests[0]["token_ids_logprob"] == union
    if overflow == "fallback":
        assert "token_ids_logprob" not in stub.requests[1]
        assert "input_token_ids_logprobs" not in answer["meta_info"]
    else:
        sent = stub.requests[1]["token_ids_logprob"]
        assert len(sent) == 5 and set(sent) <= set(union)
        best = {}
        for pos in sample.metadata["student_top_logprobs"]:
            for lp, tid, _ in pos:
                best[tid] = max(best.get(tid, -1e9), lp)
        assert min(best[t] for t in sent) >= max(best[t] for t in union if t not in sent)
    # post-process runs with exact C (union ids present or the lower-bound fallback)
    args = opd_args(opd_exact_cmass=True, opd_topk_metrics_k=4, opd_budget_mask="dlearn_high", opd_budget_ratio=0.5)
    sample.reward = answer
    patch_opd.post_process_rewards(args, [sample], rollout_id=1)
    assert sum(sample.loss_mask) >= 1


def test_student_top_k_is_fetched_from_the_router_when_missing():
    stub = StubTeacher()
    sample = _strip([make_sample(2, prompt_len=3, response_len=5, k=4, seed=1, with_student_topk=False)])[0]

    async def run(url, port):
        args = opd_args(rm_url=url, opd_budget_mask="tip", opd_budget_ratio=0.5, opd_topk_metrics_k=4,
                        sglang_router_ip="127.0.0.1", sglang_router_port=port)  # fmt: skip
        sample.reward = await patch_opd.reward_func(args, sample)
        return args

    args = asyncio.run(_with_stub(stub, run))
    assert len(stub.requests) == 2  # one student prefill, one teacher prefill
    student_top = sample.metadata["student_top_logprobs"]
    assert len(student_top) == 5 and all(len(pos) == 4 for pos in student_top)
    patch_opd.post_process_rewards(args, [sample], rollout_id=0)

    sample2 = _strip([make_sample(3, prompt_len=3, response_len=5, k=4, seed=1, with_student_topk=False)])[0]
    with pytest.raises(ValueError, match="sample 3.*sglang-router"):
        asyncio.run(patch_opd.reward_func(opd_args(rm_url="http://127.0.0.1:9/generate",
                                                   opd_budget_mask="tip"), sample2))  # fmt: skip


def test_transient_failures_are_retried_then_raise_naming_the_sample():
    stub = StubTeacher()
    stub.fail_first = 1
    sample = _strip([make_sample(4, prompt_len=3, response_len=3, k=2, seed=0)])[0]

    async def ok(url, port):
        return await patch_opd.reward_func(opd_args(rm_url=url, http_max_retries=2), sample)

    assert "meta_info" in asyncio.run(_with_stub(stub, ok))
    assert len(stub.requests) == 2

    stub = StubTeacher()
    stub.status = 500

    async def always_500(url, port):
        return await patch_opd.reward_func(opd_args(rm_url=url, http_max_retries=1), sample)

    with pytest.raises(patch_opd.TeacherScoringError, match="sample 4.*after 2 attempts"):
        asyncio.run(_with_stub(stub, always_500))
    assert len(stub.requests) == 2

    stub = StubTeacher()
    stub.status = 400
    with pytest.raises(patch_opd.TeacherScoringError, match="sample 4.*HTTP 400"):
        asyncio.run(_with_stub(stub, always_500))
    assert len(stub.requests) == 1  # a client error is not retried

    stub = StubTeacher()
    stub.malformed = True
    with pytest.raises(patch_opd.TeacherScoringError, match="sample 4.*meta_info"):
        asyncio.run(_with_stub(stub, always_500))

    with pytest.raises(patch_opd.TeacherScoringError, match="sample 4.*failed after 1 attempts"):
        asyncio.run(patch_opd.reward_func(opd_args(rm_url="http://127.0.0.1:9/generate", http_max_retries=0), sample))


def test_teacher_temperature_is_sent_only_when_not_one():
    stub = StubTeacher()
    sample = _strip([make_sample(0, prompt_len=3, response_len=3, k=2, seed=0)])[0]

    async def run(url, port):
        await patch_opd.reward_func(opd_args(rm_url=url, opd_teacher_temperature=1.0), copy.deepcopy(sample))
        await patch_opd.reward_func(opd_args(rm_url=url, opd_teacher_temperature=2.0), copy.deepcopy(sample))

    asyncio.run(_with_stub(stub, run))
    assert "logprob_temperature" not in stub.requests[0]
    assert stub.requests[1]["logprob_temperature"] == 2.0


def test_teacher_prefill_hook_rewrites_the_request_and_is_optional():
    stub = StubTeacher()
    sample = _strip([make_sample(5, prompt_len=3, response_len=3, k=2, seed=0)])[0]
    response = sample.tokens[-3:]

    async def run(url, port):
        plain = await patch_opd.reward_func(opd_args(rm_url=url), copy.deepcopy(sample))
        hook = "patch_helpers.privileged_prompt_hook"
        hooked = await patch_opd.reward_func(
            opd_args(rm_url=url, custom_teacher_prefill_function_path=hook), copy.deepcopy(sample)
        )
        return plain, hooked

    plain, hooked = asyncio.run(_with_stub(stub, run))
    assert stub.requests[0]["input_ids"] == sample.tokens and stub.requests[0]["logprob_start_len"] == 2
    assert stub.requests[1]["input_ids"] == PRIVILEGED_PROMPT + response
    assert stub.requests[1]["logprob_start_len"] == len(PRIVILEGED_PROMPT) - 1
    # both answers score the same response ids, each in its own context
    for answer in (plain, hooked):
        assert [e[1] for e in answer["meta_info"]["input_token_logprobs"][-3:]] == response
    assert plain["meta_info"]["input_token_logprobs"] != hooked["meta_info"]["input_token_logprobs"]

    async def broken(url, port):
        args = opd_args(rm_url=url, custom_teacher_prefill_function_path="patch_helpers.broken_prefill_hook")
        return await patch_opd.reward_func(args, copy.deepcopy(sample))

    with pytest.raises(TypeError, match="--custom-teacher-prefill-function-path patch_helpers.broken_prefill_hook"):
        asyncio.run(_with_stub(StubTeacher(), broken))


def test_self_distillation_sets_the_privileged_prefill_hook():
    from slime.utils.arguments import SD_TEACHER_PREFILL, get_parser, validate_self_distillation_args

    def args(*flags):
        return get_parser().parse_args(["--label-key", "label", "--hf-checkpoint", "student", *flags])

    on = args("--self-distillation")
    validate_self_distillation_args(on)
    assert (
        on.custom_teacher_prefill_function_path
        == SD_TEACHER_PREFILL
        == ("slime.rollout.self_distillation.privileged_prefill")
    )
    own = args("--self-distillation", "--custom-teacher-prefill-function-path", "my.hook")
    validate_self_distillation_args(own)
    assert own.custom_teacher_prefill_function_path == "my.hook"
    off = args()
    validate_self_distillation_args(off)
    assert off.custom_teacher_prefill_function_path is None


def test_self_distillation_prompt_reaches_the_teacher_through_the_stack(tiny_tokenizer_dir):
    from slime.rollout.on_policy_distillation import reward_func  # the stack's module: the patch file itself
    from slime.rollout.self_distillation import teacher_prompt_ids
    from slime.utils.arguments import get_parser, validate_self_distillation_args

    class Stub(StubTeacher):  # the tokenizer's ids exceed the stub's vocabulary: score them modulo VOCAB
        async def generate(self, request):
            body = await request.json()
            self.requests.append(body)
            ids = [t % VOCAB for t in body["input_ids"]]
            answer = teacher_answer(ids, body["logprob_start_len"], self.logits(ids), body.get("top_logprobs_num", 0))
            return web.json_response(answer)

    stub = Stub()
    sample = _strip([make_sample(6, prompt_len=3, response_len=3, k=2, seed=0)])[0]
    response = sample.tokens[-3:]

    async def run(url, port):
        argv = ["--self-distillation", "--label-key", "label", "--hf-checkpoint", str(tiny_tokenizer_dir),
                "--rm-url", url, "--opd-topk-metrics-k", "2"]  # fmt: skip
        args = get_parser().parse_args(argv)
        validate_self_distillation_args(args)
        return args, await reward_func(args, sample)

    args, answer = asyncio.run(_with_stub(stub, run))
    privileged = teacher_prompt_ids(args, sample)
    assert len(privileged) > 3 and privileged != sample.tokens[:3]
    assert stub.requests[0]["input_ids"] == privileged + response
    assert stub.requests[0]["logprob_start_len"] == len(privileged) - 1
    assert [e[1] for e in answer["meta_info"]["input_token_logprobs"][-3:]] == response


def test_stack_and_patch_register_the_prefill_flag_alike():
    import argparse

    from slime.utils.arguments import get_parser
    from slime_patch.slime.utils.ta_opd_arguments import TEACHER_PREFILL_FLAG, add_ta_opd_arguments

    def action(parser):
        return next(a for a in parser._actions if TEACHER_PREFILL_FLAG in a.option_strings)

    stack, patch = action(get_parser()), action(add_ta_opd_arguments(argparse.ArgumentParser()))
    expected = ("custom_teacher_prefill_function_path", str, None)
    assert (stack.dest, stack.type, stack.default) == (patch.dest, patch.type, patch.default) == expected


@pytest.mark.slow
def test_against_the_embedded_sglang_server(tiny_teacher_dir):
    from slime.backends.embedded_sglang.launch import launch_server

    srv = launch_server(str(tiny_teacher_dir))
    try:
        samples = _strip(make_batch(k=4, lengths=(6, 4)))
        port = srv.port
        for s in samples:
            del s.metadata["student_top_logprobs"]  # fetched from the "router" (the same server here)
        args = opd_args(rm_url=srv.url + "/generate", opd_budget_mask="dlearn_high", opd_budget_ratio=0.3,
                        opd_topk_metrics_k=4, opd_exact_cmass=True, sglang_router_ip="127.0.0.1",
                        sglang_router_port=port)  # fmt: skip

        async def score():
            return await asyncio.gather(*(patch_opd.reward_func(args, s) for s in samples))

        for s, answer in zip(samples, asyncio.run(score()), strict=True):
            s.reward = answer
        patch_opd.post_process_rewards(args, samples, rollout_id=0)
    finally:
        srv.stop()
    for s in samples:
        assert torch.isfinite(s.teacher_log_probs).all() and (s.teacher_log_probs <= 0).all()
        assert s.teacher_log_probs.shape == (s.response_length,)
        # the student (here the same model) top-K at each response position, K entries, best first
        top = s.metadata["student_top_logprobs"]
        assert len(top) == s.response_length and all(len(p) == 4 for p in top)
    metrics = samples[0].metadata["opd_step_metrics"]
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    kept = sum(sum(s.loss_mask) for s in samples)
    assert 3 <= kept <= 3 + len(samples)  # ceil(0.3 * 10) + min-keep
