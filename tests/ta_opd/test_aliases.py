"""The one alias table (ta_opd.aliases): every name of the original TA-OPD release, and METHOD_LIST / RUN_LIST."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ta_opd.aliases import (
    FORCED_RATIO,
    METHOD_ALIASES,
    METHOD_FLAGS,
    EntryListError,
    budget_mask_choices,
    known_names,
    method_flags,
    parse_entries,
    resolve_alias,
    split_entries,
)
from ta_opd.config import MASKS

REPO = Path(__file__).resolve().parents[2]

# The release's defaults, copied verbatim from its scripts/train/run_teachability_opd_method_suite.sh and
# scripts/train/run_opd_budget_ratio_sweep.sh.
RELEASE_METHOD_LIST = "pure_opd:1.0:10 teachability:0.10:20 entropy:0.10:30 teachability_entropy:0.10:40 tip:0.10:50"
RELEASE_RUN_LIST = "dlearn_high:0.01:10 dlearn_high:0.05:20 dlearn_high:0.10:30 q3_highc:0.01:40 q3_highc:0.05:50"

# What each name of the release selects: its method suite's method_to_mask ...
RELEASE_SUITE_NAMES = {
    "pure_opd": "full",
    "full_opd": "full",
    "full": "full",
    "none": "full",
    "teachability": "dlearn_high",
    "teachability_high": "dlearn_high",
    "dlearn": "dlearn_high",
    "dlearn_high": "dlearn_high",
    "entropy": "entropy",
    "high_entropy": "entropy",
    "teachability_entropy": "ca_softor",
    "entropy_teachability": "ca_softor",
    "ta_softor": "ca_softor",
    "dlearn_entropy": "ca_softor",
    "teachability_entropy_split": "split_budget_ca",
    "entropy_teachability_split": "split_budget_ca",
    "ta_split": "split_budget_ca",
    "tip": "tip",
    "tip_softor": "tip",
    "q3_highc": "q3_highc",
    "q3_highC": "q3_highc",
    "q3": "q3",
    "divergence": "divergence",
    "high_d": "divergence",
    "raw_d": "divergence",
    "random": "random",
    "compatibility": "compatibility",
    "high_c": "compatibility",
}
# ... and its train.py --opd-budget-mask choices (none/full: no masking; teachability*: the D^L score).
RELEASE_TRAIN_MASKS = {
    "none": "full",
    "full": "full",
    "random": "random",
    "entropy": "entropy",
    "divergence": "divergence",
    "tip": "tip",
    "compatibility": "compatibility",
    "ca_softor": "ca_softor",
    "split_budget_ca": "split_budget_ca",
    "q3": "q3",
    "q3_highc": "q3_highc",
    "q3_lowc": "q3_lowc",
    "dlearn_high": "dlearn_high",
    "teachability": "dlearn_high",
    "teachability_high": "dlearn_high",
    "q3_teachability_high": "q3_dlearn_high",
    "q3_teachability_low": "q3_dlearn_low",
    "q3_dlearn_high": "q3_dlearn_high",
    "q3_dlearn_low": "q3_dlearn_low",
    "q3_dincompat_high": "q3_dincompat_high",
    "dincompat_high": "dincompat_high",
}
# This project's own: the SFT baseline row of a suite.
OUR_NAMES = {"sft_teacher": "full"}
EXPECTED = {**RELEASE_SUITE_NAMES, **RELEASE_TRAIN_MASKS, **OUR_NAMES}
BASE = ["--rollout-batch-size", "2", "--rollout-max-response-len", "16"]
OPD = ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate"]


def test_the_table_holds_exactly_the_expected_names():
    assert sorted(EXPECTED) == known_names()  # a new name needs its meaning written out here
    assert set(MASKS) <= set(EXPECTED)  # every mask name names itself


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_name(name):
    from slime.utils.arguments import parse_args

    mask = EXPECTED[name]
    assert resolve_alias(name) == mask
    (entry,) = parse_entries(f"{name}:0.25:7")
    assert (entry.idx, entry.name, entry.mask, entry.ratio) == ("7", name, mask, "1.0" if mask == "full" else "0.25")
    assert (name in FORCED_RATIO) == (mask == "full")
    if name in METHOD_FLAGS:  # a launcher method: its flags set the loss, so it is not a mask of train.py
        assert name not in budget_mask_choices() and entry.flags == method_flags(name) != ()
        return
    assert entry.flags == ()
    args = parse_args([*BASE, *OPD, "--opd-budget-mask", name, "--opd-budget-ratio", "0.25"])
    assert args.opd_budget_mask == mask  # resolved once, at argument validation


def test_none_is_the_release_default_and_means_full_opd():
    from slime.utils.arguments import parse_args
    from ta_opd.flags import config_from_args

    args = parse_args([*BASE, *OPD, "--opd-budget-mask", "none", "--opd-budget-ratio", "0.1"])
    assert args.opd_budget_mask == "full" and not config_from_args(args).selecting


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method alias or mask 'teachabilty'; aliases: \[.*'ta_softor'"):
        resolve_alias("teachabilty")
    with pytest.raises(ValueError, match="unknown method alias or mask 'nope'"):
        method_flags("nope")
    assert METHOD_ALIASES["none"] == "full" and "sft_teacher" in METHOD_ALIASES


def test_release_default_method_list_parses():
    lines = [e.line() for e in parse_entries(RELEASE_METHOD_LIST)]
    assert lines == [
        "10 pure_opd full 1.0",
        "20 teachability dlearn_high 0.10",
        "30 entropy entropy 0.10",
        "40 teachability_entropy ca_softor 0.10",
        "50 tip tip 0.10",
    ]


def test_release_default_run_list_parses():
    lines = [e.line() for e in parse_entries(RELEASE_RUN_LIST, "RUN_LIST")]
    assert lines == [
        "10 dlearn_high dlearn_high 0.01",
        "20 dlearn_high dlearn_high 0.05",
        "30 dlearn_high dlearn_high 0.10",
        "40 q3_highc q3_highc 0.01",
        "50 q3_highc q3_highc 0.05",
    ]


def test_entries_split_on_commas_spaces_tabs_and_newlines():
    text = "tip:0.1:1,entropy:0.2:2\nrandom:0.3:3\t none:0:4 ,, \n\nq3_highC:0.05:005\n"
    assert split_entries(text) == ["tip:0.1:1", "entropy:0.2:2", "random:0.3:3", "none:0:4", "q3_highC:0.05:005"]
    entries = parse_entries(text)
    assert [(e.idx, e.mask, e.ratio) for e in entries] == [
        ("1", "tip", "0.1"),
        ("2", "entropy", "0.2"),
        ("3", "random", "0.3"),
        ("4", "full", "1.0"),  # the ratio of full OPD is forced to 1.0
        ("5", "q3_highc", "0.05"),  # leading zeros off: idx names the run
    ]


def test_every_error_is_reported_at_once():
    with pytest.raises(EntryListError) as info:
        parse_entries("bogus:0.1:1 tip:0:2 tip:0.1:4294967296 entropy:0.1:9 random:0.2:9 tip-0.1-3")
    errors = info.value.errors
    assert len(errors) == 5
    assert errors[0].startswith("entry 'bogus:0.1:1': unknown alias 'bogus' (known: ca_softor ")
    assert errors[1] == (
        "entry 'tip:0:2': ratio must be > 0 with mask 'tip' (the share of a step's valid tokens kept; "
        ">= 1 keeps every token), got 0.0"
    )
    assert (
        errors[2]
        == "entry 'tip:0.1:4294967296': idx 4294967296 is out of range (expected an integer in [0, 4294967295])"
    )
    assert "duplicate idx 9" in errors[3] and "random:0.2:9" in errors[3]
    assert errors[4] == "malformed entry 'tip-0.1-3' (expected alias:ratio:idx, e.g. teachability:0.10:20)"
    with pytest.raises(EntryListError, match="RUN_LIST is empty"):
        parse_entries(" ,\n", "RUN_LIST")


def test_a_ratio_above_one_keeps_every_token():
    (entry,) = parse_entries("tip:1.5:1")  # docs/method.md §5: valid, no masking
    assert entry.ratio == "1.5"


def _bash(function: str, value: str) -> subprocess.CompletedProcess:
    # the launchers' functions, run from outside the checkout with the interpreter under test
    script = f'source "{REPO}/scripts/lib/common.sh"; {function} "$LIST"'
    env = {**os.environ, "LIST": value, "PYTHON": sys.executable}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd="/")


def test_launcher_functions_print_one_line_per_entry():
    r = _bash("ta_parse_method_list", "pure_opd:0.3:10\nsft_teacher:0.5:30,teachability:0.10:20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "10 pure_opd full 1.0",
        "30 sft_teacher full 1.0 --loss-type sft_loss --custom-generate-function-path "
        "slime.rollout.sft_baseline.generate_with_teacher",
        "20 teachability dlearn_high 0.10",
    ]
    r = _bash("ta_parse_run_list", RELEASE_RUN_LIST)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 5
    r = _bash("ta_parse_run_list", "dlearn_high:0:1 bogus:0.1:2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[0].startswith("error: RUN_LIST: entry 'dlearn_high:0:1': ratio must be > 0")
    assert r.stderr.splitlines()[1].startswith("error: RUN_LIST: entry 'bogus:0.1:2': unknown alias 'bogus'")


def test_the_launchers_check_does_not_import_torch():
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ta_opd.aliases", "parse-method-list", RELEASE_METHOD_LIST],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "ta_opd" in imported and "torch" not in imported and "numpy" not in imported


# ---------------------------------------------------------------- the method suite plans every entry (DRY_RUN)


@pytest.fixture
def suite_env(tmp_path, tiny_student_dir, tiny_teacher_dir):
    from slime.embedded.task import write_splits

    train, held_out = write_splits(tmp_path / "data", 16, 4, seed=0)
    env = {k: v for k, v in os.environ.items() if k not in ("METHOD_LIST", "RUN_LIST", "TAG", "SUITE_NAME")}
    env.update(
        STUDENT_HF=str(tiny_student_dir),
        TEACHER_MODEL=str(tiny_teacher_dir),
        PROMPT_DATA=str(train),
        EVAL_PROMPT_DATA=str(held_out),
        OUTPUT_ROOT=str(tmp_path / "out"),
        SUITE_NAME="s",
        PROFILE="embedded",
        DRY_RUN="1",
        PYTHON=sys.executable,
    )
    return env


def _dry_run(env: dict[str, str]) -> list[dict[str, str]]:
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "train" / "run_method_suite.sh")], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    suite = Path(env["OUTPUT_ROOT"]) / env["SUITE_NAME"]
    with open(suite / "method_mapping.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # each planned run's train.py command was parsed by the stack's own parser
        args = (suite / row["run_dir"] / "train_args.txt").read_text().splitlines()
        assert args[args.index("--opd-budget-mask") + 1] == row["mask"]
        assert args[args.index("--opd-budget-ratio") + 1] == row["ratio"]
    return rows


def test_release_default_method_list_passes_a_dry_run(suite_env):
    rows = _dry_run({**suite_env, "METHOD_LIST": RELEASE_METHOD_LIST})
    assert [(r["idx"], r["alias"], r["mask"], r["ratio"]) for r in rows] == [
        ("10", "pure_opd", "full", "1.0"),
        ("20", "teachability", "dlearn_high", "0.10"),
        ("30", "entropy", "entropy", "0.10"),
        ("40", "teachability_entropy", "ca_softor", "0.10"),
        ("50", "tip", "tip", "0.10"),
    ]
    assert {r["seed"] for r in rows} == {"1234"}  # idx names the run; every method shares the seed


def test_newline_separated_method_list_plans_every_entry(suite_env):
    rows = _dry_run({**suite_env, "METHOD_LIST": "none:1.0:1\nta_softor:0.05:2\n  high_c:0.2:3,tip_softor:0.1:4\n"})
    assert [(r["alias"], r["mask"], r["ratio"]) for r in rows] == [
        ("none", "full", "1.0"),
        ("ta_softor", "ca_softor", "0.05"),
        ("high_c", "compatibility", "0.2"),
        ("tip_softor", "tip", "0.1"),
    ]


def test_release_default_run_list_passes_a_dry_run(suite_env):
    rows = _dry_run({**suite_env, "RUN_LIST": RELEASE_RUN_LIST})
    assert [(r["idx"], r["mask"], r["ratio"]) for r in rows] == [
        ("10", "dlearn_high", "0.01"),
        ("20", "dlearn_high", "0.05"),
        ("30", "dlearn_high", "0.10"),
        ("40", "q3_highc", "0.01"),
        ("50", "q3_highc", "0.05"),
    ]
