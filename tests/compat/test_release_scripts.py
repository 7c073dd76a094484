"""The original release's script names and environment variables, checked with DRY_RUN=1 (nothing trained)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "scripts" / "train"
# copied verbatim from the release's scripts/train/*.sh defaults
RELEASE_METHOD_LIST = "pure_opd:1.0:10 teachability:0.10:20 entropy:0.10:30 teachability_entropy:0.10:40 tip:0.10:50"
RELEASE_RUN_LIST = "dlearn_high:0.01:10 dlearn_high:0.05:20 dlearn_high:0.10:30 q3_highc:0.01:40 q3_highc:0.05:50"
RELEASE_VARS = ("TAG", "SEED_LABEL", "LOG_DIR", "RUN_LIST", "METHOD_LIST", "SKIP_EVAL", "COMMON_CONTEXT",
                "BASELINE_METRICS", "OPD_TOKEN_BANK_FORMAT", "PY", "EVAL_GPUS", "RAY_GPUS", "COLOCATE",
                "ACTOR_NUM_GPUS_PER_NODE", "TEACHER_PORT", "SEED", "OPD_BUDGET_MASK", "OPD_BUDGET_RATIO")  # fmt: skip


def run(script: Path, env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RELEASE_VARS and not k.startswith("OPD_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def paths(tmp_path, tiny_student_dir, tiny_teacher_dir):
    from slime.embedded.task import write_splits

    train, held_out = write_splits(tmp_path / "data", 16, 4, seed=0)
    return {"STUDENT_HF": str(tiny_student_dir), "TEACHER_MODEL": str(tiny_teacher_dir), "PROMPT_DATA": str(train),
            "EVAL_PROMPT_DATA": str(held_out), "OUTPUT_ROOT": str(tmp_path / "out"), "PROFILE": "embedded",
            "DRY_RUN": "1"}  # fmt: skip


def mapping(suite: Path) -> list[dict[str, str]]:
    with open(suite / "method_mapping.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_args(suite: Path, name: str) -> list[str]:
    return (suite / "runs" / name / "train_args.txt").read_text().splitlines()


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_release_method_suite_defaults(paths):
    r = run(TRAIN / "run_teachability_opd_method_suite.sh", {**paths, "SEED_LABEL": "seed2", "SEED": "2"})
    assert r.returncode == 0, r.stderr
    suite = Path(paths["OUTPUT_ROOT"]) / "teachability_method_suite_k16_seed2"  # TAG's default from SEED_LABEL
    rows = mapping(suite)
    assert list(rows[0])[:5] == ["method", "mask", "ratio", "idx", "notes"]
    assert [(r["method"], r["mask"], r["ratio"], r["idx"]) for r in rows] == [
        ("pure_opd", "full", "1.0", "10"), ("teachability", "dlearn_high", "0.10", "20"),
        ("entropy", "entropy", "0.10", "30"), ("teachability_entropy", "ca_softor", "0.10", "40"),
        ("tip", "tip", "0.10", "50"),
    ]  # fmt: skip
    assert rows[0]["notes"].startswith("full OPD") and rows[3]["notes"].startswith("soft-OR")
    assert {r["seed_label"] for r in rows} == {"seed2"}
    for r in rows:  # one seed for every method (a paired comparison); idx only names the run
        args = train_args(suite, Path(r["run_dir"]).name)
        assert value(args, "--seed") == "2" and value(args, "--opd-topk-metrics-k") == "16"
        assert value(args, "--opd-token-bank-format") == "csv"
        assert value(args, "--opd-token-bank-dir") == str(suite / r["run_dir"] / "token_bank")
    fc = (suite / "fixed_context_args.txt").read_text().splitlines()  # SKIP_EVAL=0: the release's default
    assert value(fc, "--teacher") == paths["TEACHER_MODEL"] and value(fc, "--student") == paths["STUDENT_HF"]


def test_release_budget_sweep_defaults_and_run_list(paths):
    r = run(TRAIN / "run_opd_budget_ratio_sweep.sh", {**paths, "TAG": "sweep"})
    assert r.returncode == 0, r.stderr
    suite = Path(paths["OUTPUT_ROOT"]) / "sweep"
    rows = mapping(suite)
    assert [f"{r['mask']}:{r['ratio']}:{r['idx']}" for r in rows] == RELEASE_RUN_LIST.split()
    args = train_args(suite, Path(rows[3]["run_dir"]).name)
    assert value(args, "--opd-budget-mask") == "q3_highc" and value(args, "--num-rollout") == "50"  # release sizes
    assert value(args, "--rollout-max-response-len") == "64"


def test_method_list_and_run_list_together_are_refused(paths):
    r = run(TRAIN / "run_method_suite.sh", {**paths, "METHOD_LIST": "tip:0.1:1", "RUN_LIST": "tip:0.1:1"})
    assert r.returncode == 2 and "METHOD_LIST and RUN_LIST are both set" in r.stderr


def test_release_single_run_and_opd_variables(paths, tmp_path):
    env = {**paths, "SUITE_NAME": "one", "OPD_BUDGET_MASK": "ca_softor", "OPD_BUDGET_RATIO": "0.5",
           "OPD_BUDGET_GAMMA": "0.25", "OPD_COMPAT_PROXY": "bc", "OPD_METRIC_NORMALIZATION": "batch_minmax",
           "OPD_EXACT_CMASS": "1", "OPD_EXACT_CMASS_MAX_UNION": "64", "OPD_EXACT_CMASS_OVERFLOW": "error",
           "OPD_BUDGET_MASK_SEED": "42", "OPD_TOKEN_BANK_FORMAT": "jsonl", "OPD_TOKEN_BANK_LAYOUT": "release",
           "OPD_TOKEN_BANK_RAW_TOPK": "1", "OPD_TOKEN_BANK_PAIR_ID": "a_to_b", "OPD_TOPK_METRICS_K": "8",
           "OPD_TOKEN_BANK_DIR": str(tmp_path / "bank"), "SAVE_DEBUG_ROLLOUT_DATA": "1", "DEBUG_ROLLOUT_ONLY": "1",
           "ACTOR_NUM_GPUS_PER_NODE": "2", "COLOCATE": "1", "TEACHER_PORT": "13141"}  # fmt: skip
    r = run(TRAIN / "run_method_suite.sh", env)
    assert r.returncode == 0, r.stderr
    suite = Path(paths["OUTPUT_ROOT"]) / "one"
    (row,) = mapping(suite)
    assert (row["method"], row["mask"], row["ratio"]) == ("ca_softor", "ca_softor", "0.5")
    args = train_args(suite, Path(row["run_dir"]).name)
    expected = {
        "--opd-budget-gamma": "0.25",
        "--opd-compat-proxy": "bc",
        "--opd-metric-normalization": "batch_minmax",
        "--opd-exact-cmass-max-union": "64",
        "--opd-exact-cmass-overflow": "error",
        "--opd-budget-mask-seed": "42",
        "--opd-token-bank-format": "jsonl",
        "--opd-token-bank-layout": "release",
        "--opd-token-bank-pair-id": "a_to_b",
        "--opd-topk-metrics-k": "8",
        "--opd-token-bank-dir": str(tmp_path / "bank"),
        "--actor-num-gpus-per-node": "2",
        "--save-debug-rollout-data": str(suite / row["run_dir"] / "debug_rollout_data" / "{rollout_id}.pt"),
    }
    for flag, want in expected.items():  # fmt: skip
        assert value(args, flag) == want, flag
    for switch in ("--opd-exact-cmass", "--opd-token-bank-raw-topk", "--debug-rollout-only", "--colocate"):
        assert switch in args
    assert "TEACHER_PORT=13141: not needed here" in r.stderr


def test_one_bank_directory_for_several_runs_is_refused(paths, tmp_path):
    env = {**paths, "METHOD_LIST": "tip:0.1:1,random:0.1:2"}
    r = run(TRAIN / "run_method_suite.sh", {**env, "OPD_TOKEN_BANK_DIR": str(tmp_path / "bank")})
    assert r.returncode == 2 and "names one bank for several runs" in r.stderr
    r = run(TRAIN / "run_method_suite.sh", {**env, "EXTRA_ARGS": f"--opd-token-bank-dir {tmp_path / 'bank'}"})
    assert r.returncode == 2 and "one bank directory" in r.stderr


def test_skip_eval_common_context_baseline_eval_gpus(paths, tmp_path):
    base = {**paths, "METHOD_LIST": "tip:0.1:1"}
    r = run(TRAIN / "run_method_suite.sh", {**base, "SUITE_NAME": "a", "SKIP_EVAL": "1"})
    assert r.returncode == 0 and not (Path(paths["OUTPUT_ROOT"]) / "a" / "fixed_context_args.txt").exists()
    r = run(TRAIN / "run_method_suite.sh", {**base, "SUITE_NAME": "b", "SKIP_EVAL": "0",
                                            "COMMON_CONTEXT": str(tmp_path / "missing.jsonl")})  # fmt: skip
    assert r.returncode == 2 and "COMMON_CONTEXT=" in r.stderr and "no such file" in r.stderr
    ctx, theta0 = tmp_path / "ctx.jsonl", tmp_path / "theta0.parquet"
    ctx.write_text("{}\n")
    theta0.write_bytes(b"x")
    env = {**base, "SUITE_NAME": "c", "SKIP_EVAL": "0", "COMMON_CONTEXT": str(ctx), "BASELINE_METRICS": str(theta0),
           "EVAL_GPUS": "4,5"}  # fmt: skip
    r = run(TRAIN / "run_method_suite.sh", env)
    assert r.returncode == 0, r.stderr
    suite = Path(paths["OUTPUT_ROOT"]) / "c"
    fc = (suite / "fixed_context_args.txt").read_text().splitlines()
    assert value(fc, "--contexts") == str(ctx) and value(fc, "--baseline-metrics") == str(theta0)
    assert value(fc, "--student-device") == "cuda:0" and value(fc, "--teacher-device") == "cuda:1"
    args = train_args(suite, Path(mapping(suite)[0]["run_dir"]).name)
    assert "--save" in args  # the evaluation reads each run's final checkpoint


def test_log_dir_and_py(paths, tmp_path):
    py = tmp_path / "py"
    py.write_text(f'#!/usr/bin/env bash\necho called >> {tmp_path / "py.calls"}\nexec python3 "$@"\n')
    py.chmod(0o755)
    env = {**paths, "METHOD_LIST": "tip:0.1:1", "TAG": "logged", "LOG_DIR": str(tmp_path / "logs"), "PY": str(py)}
    r = run(TRAIN / "run_method_suite.sh", env)
    assert r.returncode == 0, r.stderr
    assert "DRY_RUN=1: every entry validated" in (tmp_path / "logs" / "logged.log").read_text()
    assert (tmp_path / "py.calls").read_text().count("called") >= 1  # the launcher's python is PY


@pytest.mark.parametrize(
    ("driver", "pair", "seed"),
    [("run_14b_to_1p7b_fixed_context_300.sh", "14b_to_1p7b", "14317"),
     ("run_14b_to_4b_fixed_context_300.sh", "14b_to_4b", "14417"),
     ("run_8b_to_1p7b_fixed_context_300.sh", "8b_to_1p7b", "8317"),
     ("run_8b_to_4b_fixed_context_300.sh", "8b_to_4b", "84317"),
     ("run_4b_to_1p7b_gsm8k_fixed_context_300.sh", "gsm8k_4b_to_1p7b", "41717"),
     ("run_4b_to_1p7b_heldout_fixed_context_300.sh", "heldout_4b_to_1p7b", "41717")],
)  # fmt: skip
def test_pair_diagnostic_presets(paths, tmp_path, driver, pair, seed):
    env = {k: paths[k] for k in ("STUDENT_HF", "TEACHER_MODEL", "PROMPT_DATA")}
    if "gsm8k" in driver or "heldout" in driver:  # the release's prompt-set variable names
        env.pop("PROMPT_DATA")
        env["GSM8K_DATA" if "gsm8k" in driver else "HELDOUT_DATA"] = paths["PROMPT_DATA"]
    r = run(REPO / "scripts" / "diagnostics" / driver, {**env, "DRY_RUN": "1", "STORY_ROOT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    settings = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert settings["PROFILE"] == "release" and settings["SEED"] == seed
    assert (settings["NUM_CONTEXTS"], settings["RESPONSE_TOKENS"], settings["NUM_ROLLOUT"]) == ("300", "192", "151")
    assert settings["METHOD_LIST"] == "pure_opd:1.0" and settings["PROMPT_DATA"] == paths["PROMPT_DATA"]
    assert settings["OUTPUT_DIR"] == str(tmp_path / f"{pair}_diag300")


def test_convert_wrappers(tmp_path):
    for script in ("convert_qwen3_1_7b_to_torch_dist.sh", "convert_qwen3_4b_to_torch_dist.sh"):
        path = REPO / "scripts" / "convert" / script
        r = run(path, {"HF_MODEL": str(tmp_path / "missing"), "SAVE_DIR": str(tmp_path / "out")})
        assert r.returncode == 2 and "HF_MODEL=" in r.stderr and "no such directory" in r.stderr
        (tmp_path / "hf").mkdir(exist_ok=True)
        (tmp_path / "out").mkdir(exist_ok=True)
        r = run(path, {"HF_MODEL": str(tmp_path / "hf"), "SAVE_DIR": str(tmp_path / "out")})
        assert r.returncode == 2 and "already exists; FORCE=1" in r.stderr
        assert run(path, {}, "--help").stdout.startswith("The release's Qwen3-")


def test_release_compat_doc_names_every_alias_column_flag_and_script():
    from slime.utils.compat_flags import IGNORED_FLAGS
    from ta_opd.aliases import METHOD_ALIASES
    from ta_opd.token_bank import RELEASE_COLUMNS

    doc = (REPO / "docs" / "release_compat.md").read_text()
    for alias, mask in METHOD_ALIASES.items():
        assert f"| `{alias}` | `{mask}` |" in doc, alias
    for release, native in RELEASE_COLUMNS.items():
        assert f"| `{release}` | `{native}` |" in doc, release
    for flag in IGNORED_FLAGS:
        assert f"| `{flag}` |" in doc, flag
    pairs = ("14b_to_1p7b", "14b_to_4b", "8b_to_1p7b", "8b_to_4b", "4b_to_1p7b_gsm8k", "4b_to_1p7b_heldout")
    scripts = [
        "scripts/train/run_teachability_opd_method_suite.sh",
        "scripts/train/run_opd_budget_ratio_sweep.sh",
        *(f"scripts/diagnostics/run_{p}_fixed_context_300.sh" for p in pairs),
        "scripts/convert/convert_qwen3_1_7b_to_torch_dist.sh",
        "scripts/convert/convert_qwen3_4b_to_torch_dist.sh",
    ]
    for script in scripts:
        assert (REPO / script).is_file(), script
        assert Path(script).name in doc, script
