"""OPD pre-flight: each deliberately broken pair is caught with a clear message; the healthy pair passes.

Fast tests call the pure checks with tokenizers and numbers; the slow ones run the whole pre-flight
against real embedded servers on 127.0.0.1 (a student and a teacher nano model), with small stub
proxies in front of the teacher for the failures a healthy server cannot show (noise, a dropped field).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests

from slime import preflight as pf
from slime.utils.arguments import get_parser, parse_args

BASE = ["--rollout-batch-size", "2", "--rollout-max-response-len", "16"]


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------


def _tokenizer(path, chat_template=None, eos=None):
    from slime.embedded.tokenizer import CHAT_TEMPLATE, build_tokenizer, load_tokenizer

    build_tokenizer(path, chat_template=chat_template or CHAT_TEMPLATE)
    if eos is not None:
        tok = load_tokenizer(path)
        tok.eos_token = eos
        tok.save_pretrained(path)
    return load_tokenizer(path)


# ChatML with ": " after the role instead of a newline: a plausible near-miss template.
OTHER_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ': ' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight_toks")
    return SimpleNamespace(
        student=_tokenizer(root / "student"),
        same=_tokenizer(root / "same"),
        other_template=_tokenizer(root / "template", chat_template=OTHER_TEMPLATE),
        base_eos=_tokenizer(root / "eos", eos="<|endoftext|>"),
        root=root,
    )


def test_identical_tokenizers_pass(toks):
    for check in (pf.check_tokenizer, pf.check_eos_pad, pf.check_chat_template):
        result = check(toks.student, toks.same)
        assert result.status == pf.PASS, result.line()
    assert "0 differing" in pf.check_tokenizer(toks.student, toks.same).measured


def test_different_vocab_fails_naming_tokens():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab
            self.all_special_tokens = []

        def get_vocab(self):
            return dict(self.vocab)

    result = pf.check_tokenizer(Tok({"a": 0, "b": 1, "c": 2}), Tok({"a": 0, "c": 1, "d": 2}))
    assert result.status == pf.FAIL
    assert "'c' student 2 / teacher 1" in result.detail and "only in the student: 'b'" in result.detail


def test_different_chat_template_fails_showing_first_difference(toks):
    result = pf.check_chat_template(toks.student, toks.other_template)
    assert result.status == pf.FAIL
    # "<|im_start|>user\n" vs "<|im_start|>user: ": ids 0-4 agree, the 5th differs
    assert "first difference at id 5" in result.measured
    assert "'\\nWhat is 17 '" in result.detail and "': What is 17'" in result.detail
    assert "student:" in result.detail and "teacher:" in result.detail


def test_base_student_instruct_teacher_eos_fails(toks):
    result = pf.check_eos_pad(toks.student, toks.base_eos)
    assert result.status == pf.FAIL
    assert "'<|im_end|>' (2)" in result.measured and "'<|endoftext|>' (0)" in result.measured
    assert "runaway" in result.detail
    # the same EOS in the tokenizer but another one in generation_config.json is caught too
    result = pf.check_eos_pad(toks.student, toks.same, student_generation_eos=[2], teacher_generation_eos=[0])
    assert result.status == pf.FAIL


def test_padded_vocabulary_is_explained_not_refused(toks):
    # real Qwen: 151,936 vs 152,064 rows for one tokenizer; here 128 vs 136 rows for 99 tokens
    result = pf.check_padded_vocab(toks.student, toks.same, 128, 136)
    assert result.status == pf.PASS
    assert "padded vocabulary" in result.detail and "harmless" in result.detail
    assert "128 / teacher 136" in result.measured and "largest id 98" in result.measured
    assert pf.check_padded_vocab(toks.student, toks.same, 128, 128).status == pf.PASS
    short = pf.check_padded_vocab(toks.student, toks.same, 128, 64)
    assert short.status == pf.FAIL and "not a row of the teacher model (64 rows)" in short.detail
    assert pf.check_padded_vocab(toks.student, toks.same, 128, None).status == pf.WARN


# ------------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------------


def _rollouts(seed=0, n=3, length=20):
    rng = random.Random(seed)
    return [[-rng.uniform(0.05, 4.0) for _ in range(length)] for _ in range(n)]


def test_position_alignment_exact_copy_passes_and_off_by_one_fails():
    rollout = _rollouts()
    ok = pf.check_position_alignment(rollout, [[x + 1e-7 for x in row] for row in rollout])
    assert ok.status == pf.PASS and ok.values["mean_abs_diff"] < 1e-6
    shifted = [[row[0]] + row[:-1] for row in rollout]  # each token gets its predecessor's log-prob
    bad = pf.check_position_alignment(rollout, shifted)
    assert bad.status == pf.FAIL
    assert "offset +1" in bad.detail and "off by one" in bad.detail and "reading one position early" in bad.detail
    assert bad.values["mean_abs_diff"] > 0.5


def test_position_alignment_wrong_length_and_kl():
    rollout = _rollouts()
    assert pf.check_position_alignment(rollout, [row[:-1] for row in rollout]).status == pf.FAIL
    biased = pf.check_position_alignment(rollout, [[x - 0.03 for x in row] for row in rollout])
    assert biased.status == pf.FAIL and "sampled KL" in biased.detail


def test_determinism_tolerance_scales_with_the_signal():
    ref = _rollouts()
    rng = random.Random(1)
    noisy = [[x + rng.gauss(0, 0.05) for x in row] for row in ref]
    same = pf.check_determinism({"t #1": ref, "t #2": [list(r) for r in ref]}, opd_signal=0.3)
    assert same.status == pf.PASS and same.values["spread_mean"] == 0
    bad = pf.check_determinism({"t #1": ref, "t #2": noisy}, opd_signal=0.3)
    assert bad.status == pf.FAIL and "t #2 disagrees with t #1" in bad.detail
    assert bad.values["tolerance"] == pytest.approx(0.015)
    # the same noise is acceptable against a 10x larger OPD signal
    assert pf.check_determinism({"a": ref, "b": noisy}, opd_signal=3.0).status == pf.PASS


def _top(logps, ids):
    return [[lp, i, None] for lp, i in zip(logps, ids, strict=True)]


def test_topk_sanity_catches_each_violation():
    good = [[_top([-0.5, -1.5, -2.0], [3, 7, 1])] * 2]
    assert pf.check_topk(good, 3, 128).status == pf.PASS
    cases = {
        "short_or_long": [[_top([-0.5, -1.5], [3, 7])]],
        "unsorted": [[_top([-1.5, -0.5, -2.0], [3, 7, 1])]],
        "id_out_of_range": [[_top([-0.5, -1.5, -2.0], [3, 700, 1])]],
        "nonfinite": [[_top([-0.5, math.nan, -2.0], [3, 7, 1])]],
        "not_a_distribution": [[_top([-0.1, -0.2, -0.3], [3, 7, 1])]],
        "duplicate": [[_top([-0.5, -1.5, -2.0], [3, 3, 1])]],
    }
    for kind, lists in cases.items():
        result = pf.check_topk(lists, 3, 128)
        assert result.status == pf.FAIL and kind in result.detail, (kind, result.line())
    mismatch = pf.check_topk(good, 3, 128, sampled=[[(7, -0.9), (7, -1.5)]])
    assert mismatch.status == pf.FAIL and "sampled_mismatch: 1" in mismatch.detail


def test_teacher_temperature_ignored_applied_and_not_requested():
    base = _rollouts(length=6)
    tops = [[_top([-0.2, -1.2, -2.7], [1, 2, 3])] * 6] * 3
    ignored = pf.check_teacher_temperature(0.7, 0.7, base, base, tops, tops)
    assert ignored.status == pf.FAIL and "ignored" in ignored.detail and "logprob_temperature" in ignored.detail
    assert "SGLang" in ignored.detail
    # logits / T: log-prob gaps grow by 1/T (the normaliser cancels in a gap)
    scaled_tops = [[_top([-0.1, -0.1 - 1.0 / 0.7, -0.1 - 2.5 / 0.7], [1, 2, 3])] * 6] * 3
    scaled = [[x / 0.7 for x in row] for row in base]
    ok = pf.check_teacher_temperature(0.7, 0.7, base, scaled, tops, scaled_tops)
    assert ok.status == pf.PASS and ok.values["applied"] == pytest.approx(0.7)
    wrong = pf.check_teacher_temperature(0.5, 0.5, base, scaled, tops, scaled_tops)
    assert wrong.status == pf.FAIL and "not as log_softmax(logits / T)" in wrong.detail
    assert pf.check_teacher_temperature(1.0, 1.0).status == pf.SKIP
    mixed = pf.check_teacher_temperature(1.0, 0.6)
    assert mixed.status == pf.WARN and "--opd-teacher-temperature 0.6" in mixed.detail


def test_downgrade_by_name_and_report_format():
    results = [pf.CheckResult("tokenizer", pf.PASS, "ok"), pf.CheckResult("chat_template", pf.FAIL, "differs")]
    report = pf.PreflightReport(results, 1.0)
    assert not report.ok and report.failed == ["chat_template"]
    assert "--preflight-warn chat_template" in report.format()
    down = pf.PreflightReport(pf.apply_downgrades(results, ["chat_template"]))
    assert down.ok and down.get("chat_template").status == pf.WARN
    assert "downgraded by --preflight-warn" in down.get("chat_template").detail
    with pytest.raises(ValueError, match="unknown pre-flight check"):
        pf.apply_downgrades(results, ["chat-template"])
    with pytest.raises(pf.PreflightError, match="FAILED: chat_template"):
        raise pf.PreflightError(report)


def test_preflight_flags():
    args = parse_args(BASE)
    assert args.preflight is True and args.preflight_only is False and args.preflight_warn == []
    assert parse_args(BASE + ["--skip-preflight"]).preflight is False
    warned = parse_args(BASE + ["--preflight-warn", "determinism", "--preflight-warn", "topk"])
    assert warned.preflight_warn == ["determinism", "topk"]
    with pytest.raises(ValueError, match="contradict"):
        parse_args(BASE + ["--preflight", "--skip-preflight"])
    with pytest.raises(SystemExit):
        get_parser().parse_args(["--preflight-warn", "nonsense"])


# ------------------------------------------------------------------------------------------------
# live servers
# ------------------------------------------------------------------------------------------------


class _StubTeacher:
    """A proxy in front of a real teacher: ``noise`` adds N(0, σ) to input log-probs, ``drop_temperature``
    removes the temperature field as a real SGLang engine (or router) does."""

    def __init__(self, upstream: str, mode: str, sigma: float = 0.05):
        stub = self
        self.upstream, self.mode, self.sigma, self.rng = upstream, mode, sigma, random.Random(0)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                r = requests.get(stub.upstream + self.path, timeout=30)
                self._send(r.status_code, r.json() if r.content else {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.mode == "drop_temperature":
                    body.pop("logprob_temperature", None)
                    body.pop("custom_labels", None)
                r = requests.post(stub.upstream + self.path, json=body, timeout=60)
                answer = r.json()
                if stub.mode == "noise" and r.status_code == 200:
                    entries = answer["meta_info"].get("input_token_logprobs") or []
                    for e in entries:
                        if e[0] is not None:
                            e[0] = min(0.0, e[0] + stub.rng.gauss(0, stub.sigma))
                self._send(r.status_code, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from slime.backends.embedded_sglang.launch import launch_server
    from slime.embedded.models import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("preflight_pair")
    student = build_tiny_checkpoint(root / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(root / "teacher", size="nano", seed=1)
    with ThreadPoolExecutor(2) as pool:  # start both servers at once
        s_srv, t_srv = pool.map(launch_server, [str(student), str(teacher)])
    yield SimpleNamespace(student=student, teacher=teacher, s=s_srv, t=t_srv, root=root)
    s_srv.stop()
    t_srv.stop()


def _args(**kw):
    args = get_parser().parse_args([])
    args.use_opd, args.opd_type = True, "sglang"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _target(pair, teacher_urls=None, teacher_path=None):
    from slime.preflight.probe import PreflightTarget

    return PreflightTarget(
        pair.s.url, teacher_urls or [pair.t.url], str(pair.student), str(teacher_path or pair.teacher)
    )


def _small(*only):
    from slime.preflight.probe import PreflightOptions

    return PreflightOptions(num_rollouts=2, max_new_tokens=12, only=only or None)


@pytest.mark.slow
def test_healthy_embedded_pair_passes_through_the_train_hook(pair, monkeypatch, capsys):
    """``run_preflight(args, rollout_manager)`` as train.py calls it; the manager only has to report its URLs."""
    import ray

    info = {
        "router_url": pair.s.url,
        "sglang_router_ip": "127.0.0.1",
        "sglang_router_port": int(pair.s.url.rsplit(":", 1)[1]),
        "rm_url": pair.t.url + "/generate",
    }
    manager = SimpleNamespace(server_info=SimpleNamespace(remote=lambda: info))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    args = _args(hf_checkpoint=str(pair.student), opd_teacher_hf_checkpoint=str(pair.teacher))
    t0 = time.perf_counter()
    report = pf.run_preflight(args, manager)
    elapsed = time.perf_counter() - t0
    assert report.ok, report.format()
    statuses = {r.name: r.status for r in report.results}
    assert list(statuses) == list(pf.CHECK_NAMES)
    assert all(s == pf.PASS for n, s in statuses.items() if n != "teacher_temperature"), report.format()
    assert statuses["teacher_temperature"] == pf.SKIP
    pos = report.get("position_alignment").values
    assert pos["mean_abs_diff"] < 1e-5 and pos["one_off_mean_abs_diff"] > 100 * pos["mean_abs_diff"]
    assert report.get("determinism").values["spread_mean"] < 1e-5
    with capsys.disabled():
        print(f"\n[healthy embedded pair: pre-flight {elapsed:.1f} s]\n{report.format()}")


@pytest.mark.slow
def test_off_by_one_extraction_is_caught(pair):
    from slime.preflight.probe import run_checks

    def off_by_one(args, samples):
        """A teacher-logprob extraction with the classic bug: it reads the log-prob one position early."""
        out = []
        for s in samples:
            prompt_len = len(s.tokens) - s.response_length
            answer = requests.post(
                args.rm_url,
                json={"input_ids": s.tokens, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                      "logprob_start_len": 0},
                timeout=60,
            ).json()  # fmt: skip
            entries = answer["meta_info"]["input_token_logprobs"]  # entry j: log p(token j | tokens < j)
            out.append([e[0] for e in entries[prompt_len - 1 : prompt_len - 1 + s.response_length]])
        return out

    report = run_checks(_args(), _target(pair), options=_small("position_alignment"), extract=off_by_one)
    result = report.get("position_alignment")
    assert result.status == pf.FAIL and "off by one, reading one position early" in result.detail
    assert result.values["mean_abs_diff"] > 1e4 * result.values["one_off_mean_abs_diff"]
    assert report.failed == ["position_alignment"]


@pytest.mark.slow
def test_tokenizer_mismatches_are_caught_on_a_live_pair(pair, tmp_path):
    from slime.preflight.probe import run_checks

    teacher_dir = tmp_path / "teacher_tok"
    _tokenizer(teacher_dir, chat_template=OTHER_TEMPLATE, eos="<|endoftext|>")
    tokenizer_checks = ("tokenizer", "eos_pad", "padded_vocab", "chat_template")
    report = run_checks(_args(), _target(pair, teacher_path=teacher_dir), options=_small(*tokenizer_checks))
    assert report.failed == ["eos_pad", "chat_template"], report.format()
    # downgraded by name, the run would go on
    report = run_checks(
        _args(), _target(pair, teacher_path=teacher_dir), options=_small(*tokenizer_checks),
        warn=["chat_template", "eos_pad"],
    )  # fmt: skip
    assert report.ok and report.get("chat_template").status == pf.WARN


@pytest.mark.slow
def test_noisy_teacher_fails_determinism(pair):
    from slime.preflight.probe import run_checks

    stub = _StubTeacher(pair.t.url, "noise", sigma=0.05)
    try:
        report = run_checks(_args(), _target(pair, teacher_urls=[stub.url]), options=_small("determinism"))
    finally:
        stub.stop()
    result = report.get("determinism")
    assert result.status == pf.FAIL, result.line()
    assert result.values["spread_mean"] > result.values["tolerance"]
    assert "OPD signal" in result.measured


@pytest.mark.slow
def test_teacher_temperature_applied_by_the_embedded_server_and_ignored_by_a_stub(pair):
    from slime.preflight.probe import run_checks

    args = _args(opd_teacher_temperature=0.7, rollout_temperature=0.7)
    applied = run_checks(args, _target(pair), options=_small("teacher_temperature")).get("teacher_temperature")
    assert applied.status == pf.PASS and applied.values["applied"] == pytest.approx(0.7, rel=1e-3), applied.line()
    stub = _StubTeacher(pair.t.url, "drop_temperature")
    try:
        report = run_checks(args, _target(pair, teacher_urls=[stub.url]), options=_small("teacher_temperature"))
    finally:
        stub.stop()
    ignored = report.get("teacher_temperature")
    assert ignored.status == pf.FAIL and "ignored" in ignored.detail
    assert "--opd-teacher-temperature 1" in ignored.detail


# ------------------------------------------------------------------------------------------------
# --allow-tokenizer-mismatch: only added/special tokens may differ
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def added_pair(tmp_path_factory):
    """The student's tokenizer, and a teacher's: the same tokens plus two added special tokens (new ids)."""
    from slime.embedded.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("added_pair")
    student = _tokenizer(root / "student")
    teacher = _tokenizer(root / "teacher")
    teacher.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    teacher.save_pretrained(root / "teacher")
    return SimpleNamespace(student=student, teacher=load_tokenizer(root / "teacher"), root=root)


def test_added_special_tokens_are_accepted_with_the_flag_and_reported(added_pair):
    s, t = added_pair.student, added_pair.teacher
    n = len(s.get_vocab())
    refused = pf.check_tokenizer(s, t)
    assert refused.status == pf.FAIL and "--allow-tokenizer-mismatch accepts such a pair" in refused.detail
    accepted = pf.check_tokenizer(s, t, allow_mismatch=True)
    assert accepted.status == pf.WARN, accepted.line()
    assert f"ids 0..{n - 1} decode to the same strings" in accepted.detail
    assert f"id {n}: student None / teacher '<think>'" in accepted.detail and "2 id(s) differ" in accepted.detail
    assert accepted.values["shared_ids"] == n
    # the teacher's extra ids are never sampled by the student: the padded-vocabulary check looks at the student's
    rows = len(s)
    assert pf.check_padded_vocab(s, t, rows, rows).status == pf.FAIL
    assert pf.check_padded_vocab(s, t, rows, rows, allow_mismatch=True).status == pf.PASS


def test_tokenizers_differing_in_regular_tokens_or_disjoint_are_refused_with_the_reason():
    class Tok:
        def __init__(self, vocab, added=()):
            self.vocab, self.all_special_tokens = vocab, list(added)

        def get_vocab(self):
            return dict(self.vocab)

        def convert_tokens_to_ids(self, token):
            return self.vocab.get(token)

    moved = pf.check_tokenizer(Tok({"a": 0, "b": 1, "<s>": 2}, ["<s>"]), Tok({"a": 0, "c": 1, "<s>": 2}, ["<s>"]),
                               allow_mismatch=True)  # fmt: skip
    assert moved.status == pf.FAIL
    why = "cannot accept this pair: 1 regular (not added/special) token(s) differ: id 1: student 'b' / teacher 'c'"
    assert why in moved.detail
    disjoint = pf.check_tokenizer(Tok({"a": 0, "b": 1}), Tok({"x": 0, "y": 1}), allow_mismatch=True)
    assert disjoint.status == pf.FAIL and "share no id with the same string (disjoint tokenizers)" in disjoint.detail


def test_teacher_check_and_fixed_context_vocab_follow_the_flag(added_pair):
    from slime.rollout.teacher_check import check_same_tokenizer
    from ta_opd.diagnostics.cli.eval_bank import resolve_vocab

    s_dir, t_dir = added_pair.root / "student", added_pair.root / "teacher"
    with pytest.raises(ValueError, match="does not match"):
        check_same_tokenizer(s_dir, t_dir)
    check_same_tokenizer(s_dir, t_dir, allow_mismatch=True)  # accepted, with a warning naming the ids
    n = len(added_pair.student.get_vocab())
    widths = [n + 2, n]
    with pytest.raises(ValueError, match="tokenizers differ.*--allow-tokenizer-mismatch"):
        resolve_vocab([str(t_dir), str(s_dir)], widths, "auto")
    assert resolve_vocab([str(t_dir), str(s_dir)], widths, "auto", allow_mismatch=True) == n
