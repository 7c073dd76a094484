"""``opd-preflight`` (tools/opd_preflight.py): exit codes, report, servers started from checkpoint paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slime.preflight.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_checks():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "opd_preflight.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--student-url" in out and "--warn CHECK" in out and "position_alignment" in out


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["--teacher", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--student", "x", "--teacher", "y", "--warn", "no-such-check"])
    assert e.value.code == 2


def test_broken_pair_exits_1_with_the_reasons(tmp_path, capsys):
    """Unreachable servers and a teacher with another chat template: every check that cannot pass FAILs."""
    from slime.embedded.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "student")
    build_tokenizer(tmp_path / "teacher", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    dead = "http://127.0.0.1:9"
    code = main(
        ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--student-url", dead,
         "--teacher-url", dead, "--num-rollouts", "1", "--json", str(tmp_path / "report.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL chat_template" in out and "first difference at id 0" in out
    assert "FAIL position_alignment" in out and "student rollouts from http://127.0.0.1:9 failed" in out
    assert "--preflight-warn chat_template" in out
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] is False and statuses["tokenizer"] == "PASS" and statuses["chat_template"] == "FAIL"


@pytest.mark.slow
def test_starts_servers_from_checkpoints_and_explains_a_padded_vocabulary(tmp_path, capsys):
    """Student with 128 embedding rows, teacher with 136, one tokenizer: a PASS that says why."""
    from slime.embedded.models import build_tiny_checkpoint

    student = build_tiny_checkpoint(tmp_path / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(tmp_path / "teacher", size="nano", seed=1, vocab_size=136)
    code = main(
        ["--student", str(student), "--teacher", str(teacher), "--num-rollouts", "2", "--max-new-tokens", "12",
         "--opd-topk-metrics-k", "8", "--json", str(tmp_path / "report.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model rows student 128 / teacher 136" in out and "padded vocabulary" in out and "harmless" in out
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["padded_vocab"]["status"] == "PASS"
    assert checks["topk"]["values"]["teacher_violations"] == 0  # teacher ids checked against its 136 rows
    assert checks["position_alignment"]["values"]["mean_abs_diff"] < 1e-5
