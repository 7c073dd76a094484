"""Math evaluation: estimator, extraction, clustering, and the CLI on hand-counted fixtures."""

from __future__ import annotations

import csv
import http.server
import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ta_opd import math_eval as me

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "math_sample"


def _load_tool():
    spec = importlib.util.spec_from_file_location("eval_math_tool", ROOT / "tools" / "eval_math.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["eval_math_tool"] = mod
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


# --------------------------------------------------------------------------------------------
# ta_opd.math_eval
# --------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    assert me.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert me.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert me.pass_at_k(12, 0, 12) == 0.0
    assert me.pass_at_k(12, 1, 12) == 1.0  # n - c < k
    assert me.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # Pass@1 = c/n


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_binomial_formula(nck):
    n, c, k = nck
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert me.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for args in [(4, 5, 2), (4, 2, 5), (0, 0, 1), (4, 2, 0)]:
        with pytest.raises(ValueError):
            me.pass_at_k(*args)
    with pytest.raises(TypeError):
        me.pass_at_k(4.0, 2, 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"first \boxed{3}, then corrected: \boxed{ 4 }", "4"),
        (r"\fbox{x^{2}}", "x^{2}"),
        ("There are 1,000 ways; no wait, 1,024 ways.", "1024"),
        ("the ratio is -3 / 4", "-3/4"),
        ("about 2.50 units", "2.50"),
        ("no answer here", None),
        ("", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_answer(text, expected):
    assert me.extract_answer(text) == expected


def test_invalid_cluster_takes_part_in_plurality():
    eq = me.string_equivalent
    # INVALID ×3 beats "5" ×2: Maj picks INVALID and scores 0 even though "5" is right.
    answers = [None, "5", None, "5", None]
    members, invalid = me.majority_cluster(answers, eq)
    assert invalid and members == [0, 2, 4]
    s = me.score_problem([False, True, False, True, False], answers, 5, eq)
    assert s.maj == 0.0 and s.majority_invalid and s.avg == pytest.approx(0.4) and s.pass_k == 1.0
    # Ties go to the cluster whose first member came first.
    members, invalid = me.majority_cluster(["7", None, None, "7"], eq)
    assert members == [0, 3] and not invalid


def test_clusters_use_the_given_equivalence():
    def eq(a, b):
        return abs(float(a) - float(b)) < 1e-9

    assert me.cluster_answers(["0.5", "1", "0.50", None, "1.0"], eq) == [[0, 2], [1, 4], [3]]


def test_score_problem_uses_first_k_for_majority_and_all_n_for_avg():
    eq = me.string_equivalent
    s = me.score_problem([False, False, True, True], ["1", "1", "2", "2"], 2, eq)
    assert s.maj == 0.0 and s.avg == pytest.approx(0.5) and s.pass_k == pytest.approx(5 / 6)


# --------------------------------------------------------------------------------------------
# math-verify equivalence
# --------------------------------------------------------------------------------------------


def test_math_verify_equivalence_in_main_and_worker_threads():
    verifier = tool.MathVerifier()
    cases = [(r"\frac{1}{2}", "0.5", True), (r"\sqrt{3}", "3^{1/2}", True), ("21", r"\frac{42}{2}", True)]
    cases += [("2", "3", False), ("2418", "2,418", True)]
    for a, b, want in cases:
        assert verifier.equivalent(a, b) is want, (a, b)
    # Outside the main thread math-verify's signal timeouts must be off (else it raises).
    results = {}

    def worker():
        fresh = tool.MathVerifier()
        results["v"] = fresh.equivalent(r"\frac{3}{4}", "0.75")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert results["v"] is True


# --------------------------------------------------------------------------------------------
# The CLI on the shipped fixture (hand counts in data/math_sample/README.md)
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("k, expected", [(4, (40.0, 80.0, 40.0)), (2, (40.0, 63.3333, 40.0))])
def test_cli_reproduces_hand_counted_scores(tmp_path, k, expected):
    out = tmp_path / "out"
    argv = ["--data", f"aime={SAMPLE / 'aime_sample.jsonl'}"]
    argv += ["--responses", str(SAMPLE / "aime_sample_responses_k4.jsonl"), "--k", str(k), "--out-dir", str(out)]
    assert tool.main(argv) == 0
    (row,) = _read_csv(out / "results.csv")
    assert row["dataset"] == "aime" and row["n_problems"] == "5"
    got = (float(row[f"avg@{k}"]), float(row[f"pass@{k}"]), float(row[f"maj@{k}"]))
    assert got == pytest.approx(expected, abs=1e-3)
    md = (out / "results.md").read_text()
    assert f"| avg@{k} |" in md and "| aime |" in md
    per = [json.loads(x) for x in (out / "per_problem.jsonl").read_text().splitlines()]
    assert [p["n_correct"] for p in per] == [3, 1, 2, 2, 0]
    assert per[2]["majority_invalid"] == (k == 4) or k == 2
    assert per[2]["answers"] == [None, None, "2418", "2,418"]
    # responses.jsonl can be scored again
    again = tmp_path / "again"
    argv2 = ["--data", f"aime={SAMPLE / 'aime_sample.jsonl'}", "--responses", str(out / "responses.jsonl")]
    assert tool.main(argv2 + ["--k", str(k), "--out-dir", str(again)]) == 0
    assert _read_csv(again / "results.csv") == _read_csv(out / "results.csv")


def test_dataset_keys_and_solution_answers():
    hmmt = tool.load_dataset("hmmt", SAMPLE / "hmmt_sample.jsonl")
    assert [p.answer for p in hmmt] == [r"\frac{1}{4}", "18", "84", r"\sqrt{3}"]
    assert hmmt[0].id == "0" and hmmt[0].problem.startswith("Compute")
    explicit = tool.load_dataset("h", SAMPLE / "hmmt_sample.jsonl", problem_key="question", answer_key="solution")
    assert [p.answer for p in explicit] == [p.answer for p in hmmt]
    with pytest.raises(ValueError, match="no answer key 'final'"):
        tool.load_dataset("h", SAMPLE / "hmmt_sample.jsonl", answer_key="final")
    assert tool.parse_data_arg("x=/a/b.jsonl") == ("x", "/a/b.jsonl")
    assert tool.parse_data_arg(str(SAMPLE / "hmmt_sample.jsonl"))[0] == "hmmt_sample"


def test_missing_responses_is_an_error(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"id": "aime-s1", "responses": ["\\boxed{16}"] * 4}) + "\n")
    argv = ["--data", f"aime={SAMPLE / 'aime_sample.jsonl'}", "--responses", str(responses), "--k", "4"]
    with pytest.raises(ValueError, match="no responses for problem 'aime-s2'"):
        tool.main(argv + ["--out-dir", str(tmp_path / "o")])


class _FakeSGLang(http.server.BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        # answer "\boxed{18}" to everything: right for exactly one of the four HMMT problems
        payload = json.dumps([{"text": "so \\boxed{18}", "meta_info": {}} for _ in body["text"]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_cli_samples_from_sglang_compatible_server(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        argv = ["--data", str(SAMPLE / "hmmt_sample.jsonl"), "--server-url", url, "--k", "3", "--batch-size", "3"]
        assert tool.main(argv + ["--max-new-tokens", "16", "--out-dir", str(tmp_path)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    bodies = _FakeSGLang.bodies
    assert [len(b["text"]) for b in bodies] == [9, 3]  # 3 prompts × k, then 1 × k
    assert bodies[0]["sampling_params"]["max_new_tokens"] == 16
    assert "put your final answer within \\boxed{}" in bodies[0]["text"][0]
    (row,) = _read_csv(tmp_path / "results.csv")
    assert (float(row["avg@3"]), float(row["pass@3"]), float(row["maj@3"])) == (25.0, 25.0, 25.0)


@pytest.mark.slow
def test_cli_samples_from_hf_checkpoint(tmp_path, tiny_student_dir):
    argv = ["--data", f"hmmt={SAMPLE / 'hmmt_sample.jsonl'}", "--model", str(tiny_student_dir), "--k", "2"]
    argv += ["--max-new-tokens", "6", "--batch-size", "3", "--out-dir", str(tmp_path)]
    assert tool.main(argv) == 0
    per = [json.loads(x) for x in (tmp_path / "per_problem.jsonl").read_text().splitlines()]
    assert len(per) == 4 and all(p["n"] == 2 for p in per)
    responses = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert all(len(r["responses"]) == 2 and all(isinstance(t, str) for t in r["responses"]) for r in responses)
    (row,) = _read_csv(tmp_path / "results.csv")
    assert row["k"] == "2" and row["n_problems"] == "4"
