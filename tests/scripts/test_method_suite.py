"""scripts/train/run_method_suite.sh: METHOD_LIST validation, method_mapping.csv, and (slow) two real runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "train" / "run_method_suite.sh"


def run_suite(env_extra: dict[str, str], *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER_MODEL", "STUDENT_HF", "PROMPT_DATA")}
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def tiny_suite_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The suite's settings for real runs at the tiniest size (fast-test assets, 2 rollouts of 4 prompts × 2)."""
    return {
        "EMBEDDED_RECIPE": "fast-test",
        "ASSETS_CACHE_DIR": str(tmp_path / "cache"),
        "NUM_ROLLOUT": "2",
        "ROLLOUT_BATCH_SIZE": "4",
        "N_SAMPLES_PER_PROMPT": "2",
        "OUTPUT_ROOT": str(tmp_path / "out"),
        "OMP_NUM_THREADS": "1",
        **settings,
    }


@pytest.fixture
def explicit_paths(tmp_path, tiny_student_dir, tiny_teacher_dir):
    from slime.embedded.task import write_splits

    train, held_out = write_splits(tmp_path / "data", 16, 4, seed=0)
    return {
        "STUDENT_HF": str(tiny_student_dir),
        "TEACHER_MODEL": str(tiny_teacher_dir),
        "PROMPT_DATA": str(train),
        "EVAL_PROMPT_DATA": str(held_out),
        "OUTPUT_ROOT": str(tmp_path / "out"),
        "SUITE_NAME": "s",
        "PROFILE": "embedded",
    }


@pytest.mark.parametrize(
    ("method_list", "message"),
    [
        ("bogus:0.1:1", "unknown alias 'bogus'"),
        ("teachability:0:1", "ratio must be > 0 with mask 'dlearn_high'"),
        ("tip:0.1:3 entropy:0.2:3", "duplicate idx 3"),
        ("tip-0.1-1", "malformed entry 'tip-0.1-1'"),
        ("tip:0.1", "malformed entry 'tip:0.1'"),
        ("tip:abc:1", "malformed entry"),
        ("", "METHOD_LIST is empty"),
    ],
)
def test_bad_method_list_fails_before_anything_starts(tmp_path, method_list, message):
    out = tmp_path / "out"
    r = run_suite({"METHOD_LIST": method_list, "OUTPUT_ROOT": str(out), "STUDENT_HF": str(tmp_path / "nope")})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not out.exists()  # nothing written, nothing built


def test_every_bad_entry_is_reported_at_once(tmp_path):
    r = run_suite({"METHOD_LIST": "bogus:0.1:1 tip:0:2", "OUTPUT_ROOT": str(tmp_path / "out")})
    assert r.returncode == 2
    assert "unknown alias 'bogus'" in r.stderr and "'tip:0:2': ratio must be > 0" in r.stderr


def test_missing_student_path_fails_before_anything_starts(tmp_path):
    r = run_suite({"METHOD_LIST": "tip:0.1:1", "STUDENT_HF": str(tmp_path / "missing"), "OUTPUT_ROOT": str(tmp_path)})
    assert r.returncode == 2
    assert f"STUDENT_HF={tmp_path / 'missing'}: no such directory" in r.stderr
    assert not (tmp_path / "suite").exists() and not list(tmp_path.iterdir())


def test_bad_train_flag_is_caught_by_the_stack_parser(explicit_paths):
    r = run_suite({**explicit_paths, "METHOD_LIST": "tip:0.1:1", "EXTRA_ARGS": "--no-such-flag 3", "DRY_RUN": "1"})
    assert r.returncode == 2
    assert "runs/1_tip_r0.1_s1234/train_args.txt" in r.stderr and "nothing was started" in r.stderr


def test_mapping_csv_and_train_args(explicit_paths):
    env = {**explicit_paths, "METHOD_LIST": "pure_opd:0.3:10 teachability:0.10:20 sft_teacher:0.5:30",
           "SEEDS": "100 7", "DRY_RUN": "1"}  # fmt: skip
    r = run_suite(env, "--", "--opd-budget-mask-seed", "7")
    assert r.returncode == 0, r.stderr
    suite = Path(env["OUTPUT_ROOT"]) / "s"
    with open(suite / "method_mapping.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["idx"], r["alias"], r["mask"], r["ratio"], r["seed"], r["run_dir"]) for r in rows] == [
        ("10", "pure_opd", "full", "1.0", "100", "runs/10_pure_opd_r1.0_s100"),
        ("20", "teachability", "dlearn_high", "0.10", "100", "runs/20_teachability_r0.10_s100"),
        ("30", "sft_teacher", "full", "1.0", "100", "runs/30_sft_teacher_r1.0_s100"),
        ("10", "pure_opd", "full", "1.0", "7", "runs/10_pure_opd_r1.0_s7"),
        ("20", "teachability", "dlearn_high", "0.10", "7", "runs/20_teachability_r0.10_s7"),
        ("30", "sft_teacher", "full", "1.0", "7", "runs/30_sft_teacher_r1.0_s7"),
    ]  # every entry once per seed; idx names the run, the seed is the seed's (paired)

    def flags(name):
        args = (suite / "runs" / name / "train_args.txt").read_text().splitlines()
        return args, lambda flag: args[args.index(flag) + 1]

    args, value = flags("20_teachability_r0.10_s100")
    assert value("--opd-budget-mask") == "dlearn_high" and value("--opd-budget-ratio") == "0.10"
    assert value("--seed") == "100" and value("--rollout-seed") == "100"
    assert value("--output-dir") == str(suite / "runs" / "20_teachability_r0.10_s100")
    assert value("--opd-teacher-hf-checkpoint") == explicit_paths["TEACHER_MODEL"]
    assert value("--custom-rm-path") == "slime.rollout.on_policy_distillation.reward_func"
    assert value("--eval-custom-rm-path") == "slime.embedded.task.reward_func"
    assert "--use-opd" in args and args[-2:] == ["--opd-budget-mask-seed", "7"]
    assert "--loss-type" not in args
    assert not (suite / "runs" / "20_teachability_r0.10_s100" / "metrics.jsonl").exists()  # dry run: nothing ran
    # the methods of one seed differ only in their method flags and names: same seed, prompts, student
    pure, _ = flags("10_pure_opd_r1.0_s100")
    differ = {a for a in set(args) ^ set(pure)}
    runs = suite / "runs"
    assert differ <= {"dlearn_high", "full", "0.10", "1.0", str(runs / "20_teachability_r0.10_s100"),
                      str(runs / "10_pure_opd_r1.0_s100"), str(runs / "20_teachability_r0.10_s100" / "token_bank"),
                      str(runs / "10_pure_opd_r1.0_s100" / "token_bank")}, differ  # fmt: skip
    assert value("--opd-token-bank-dir") == str(runs / "20_teachability_r0.10_s100" / "token_bank")  # its own bank
    args, value = flags("20_teachability_r0.10_s7")
    assert value("--seed") == "7" and value("--rollout-seed") == "7"
    # the SFT baseline row: its loss and generate function from ta_opd.aliases.METHOD_FLAGS, no selection
    args, value = flags("30_sft_teacher_r1.0_s7")
    assert value("--loss-type") == "sft_loss" and value("--opd-budget-mask") == "full"
    assert value("--custom-generate-function-path") == "slime.rollout.sft_baseline.generate_with_teacher"

    # ROLLOUT_SEED set: one prompt order for every seed; TEACHER_URL replaces the teacher checkpoint with --rm-url
    env2 = {**env, "SUITE_NAME": "s2", "ROLLOUT_SEED": "42", "TEACHER_URL": "http://127.0.0.1:9/generate"}
    r = run_suite(env2)
    assert r.returncode == 0, r.stderr
    args = (Path(env["OUTPUT_ROOT"]) / "s2" / "runs" / "10_pure_opd_r1.0_s7" / "train_args.txt").read_text()
    args = args.splitlines()
    assert args[args.index("--rm-url") + 1] == "http://127.0.0.1:9/generate"
    assert args[args.index("--rollout-seed") + 1] == "42" and args[args.index("--seed") + 1] == "7"
    assert "--opd-teacher-hf-checkpoint" not in args


def test_help():
    r = run_suite({}, "--help")
    assert r.returncode == 0 and "METHOD_LIST" in r.stdout


@pytest.mark.slow
def test_two_entry_suite_end_to_end(tmp_path):
    """Two real train.py runs at the tiniest size (fast-test assets), then the summary."""
    env = tiny_suite_env(
        tmp_path,
        METHOD_LIST="pure_opd:1.0:1 teachability:0.2:2",
        ROLLOUT_MAX_RESPONSE_LEN="16",
        EVAL_INTERVAL="1",
        EVAL_MAX_RESPONSE_LEN="16",
        SUITE_NAME="e2e",
        EXTRA_ARGS="--rollout-num-engines 1 --opd-topk-metrics-k 4",
    )
    r = run_suite(env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = tmp_path / "out" / "e2e"
    for name, ratio in (("1_pure_opd_r1.0_s1234", 1.0), ("2_teachability_r0.2_s1234", 0.2)):
        records = [json.loads(line) for line in (suite / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["rollout_id"] for r in records] == [-1, 0, 1]
        assert all(r["opd/nominal_ratio"] == ratio for r in records[1:])
        assert "eval/heldout/reward_mean" in records[-1]
        assert json.loads((suite / "runs" / name / "launcher.json").read_text())["exit_code"] == 0
    summary = (suite / "summary.md").read_text()
    assert "Full OPD" in summary and "TA-OPD" in summary
    assert (suite / "plots" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_entry_suite_writes_per_run_banks_and_the_budget_table(tmp_path):
    """Two real runs on the embedded task, then the fixed-context evaluation (SKIP_EVAL=0): each run's own token
    bank, shared contexts and θ0 scored once, each trained student scored, the Table-2 form table."""
    env = tiny_suite_env(
        tmp_path,
        METHOD_LIST="teachability:0.2:1,random:0.2:2",
        ROLLOUT_MAX_RESPONSE_LEN="12",
        EVAL_INTERVAL="2",
        EVAL_MAX_RESPONSE_LEN="8",
        TAG="fc",
        SEED_LABEL="seed1",
        SKIP_EVAL="0",
        FC_NUM_CONTEXTS="6",
        FC_RESPONSE_TOKENS="8",
        BOOTSTRAP="50",
        SUMMARIZE="0",
        EXTRA_ARGS="--rollout-num-engines 1",
        OPD_TOPK_METRICS_K="4",
    )
    # the assets are built once up front (as a user's cache would hold them); the launcher then reads them
    build = ["-m", "slime.embedded.assets", "--recipe", "fast-test", "--cache-dir", env["ASSETS_CACHE_DIR"]]
    subprocess.run([sys.executable, *build, "--print", "student_dir"], capture_output=True, check=True, cwd=REPO)
    r = run_suite(env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = tmp_path / "out" / "fc"  # TAG names the suite
    runs = ["1_teachability_r0.2_s1234", "2_random_r0.2_s1234"]
    owners = set()
    for name in runs:
        bank = suite / "runs" / name / "token_bank"
        assert sorted(p.name for p in bank.glob("step*_rank000.csv")) == [
            "step0000000_rank000.csv", "step0000001_rank000.csv"]  # fmt: skip
        owners.add(json.loads((bank / "bank_owner.json").read_text())["owner"])
        assert (suite / "runs" / name / "fixed_context" / "eval" / "token_stats.parquet").is_file()
    assert len(owners) == 2  # one bank per run
    fc = suite / "fixed_context"
    assert (fc / "contexts.jsonl").is_file() and (fc / "theta0" / "token_stats.parquet").is_file()
    with open(fc / "budget_table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["random", "teachability"]
    for row in rows:
        keep = float(row["keep"])
        assert 0.2 <= keep < 1.0  # the realised budget (plus min-keep per sample) from the run's bank
        g, lo, hi = float(row["G"]), float(row["G_ci_low"]), float(row["G_ci_high"])
        assert lo <= g <= hi and float(row["G_per_keep"]) == pytest.approx(g / keep)
        assert 0.0 <= float(row["q3_fraction"]) <= 1.0
    table = (fc / "budget_table.md").read_text()
    assert "| selector | seed | Keep @ 20 % | G @ 20 % [95 % CI] | G/K @ 20 % | Q3 frac @ 20 % |" in table
    with open(suite / "method_mapping.csv", newline="") as f:
        mapping = list(csv.DictReader(f))
    assert list(mapping[0])[:5] == ["method", "mask", "ratio", "idx", "notes"]
    assert {m["seed_label"] for m in mapping} == {"seed1"}


def test_sglang_batch_requests_is_on_by_default_and_checked(explicit_paths):
    env = {**explicit_paths, "METHOD_LIST": "tip:0.1:1", "DRY_RUN": "1"}
    args = Path(env["OUTPUT_ROOT"]) / "s" / "runs" / "1_tip_r0.1_s1234" / "train_args.txt"
    assert run_suite(env).returncode == 0
    assert "--sglang-batch-requests" in args.read_text().splitlines()
    assert run_suite({**env, "SGLANG_BATCH_REQUESTS": "0", "FORCE": "1"}).returncode == 0
    assert "--no-sglang-batch-requests" in args.read_text().splitlines()
    r = run_suite({**env, "SGLANG_BATCH_REQUESTS": "yes", "FORCE": "1"})
    assert r.returncode != 0 and "SGLANG_BATCH_REQUESTS=yes: expected 0 or 1" in r.stderr
