"""Tools and launchers that must not lose or mix data.

The suite launchers run for real through bash, with
a stand-in train.py (SLIME_DIR) that parses its flags with the stack's parser and writes metrics and checkpoints
the way the real one does; eval_fixed_context_bank on real files. The installer's and merge_token_banks' own
safety tests live with their other tests (tests/slime_patch/test_installer.py, tests/diagnostics/).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "train" / "run_method_suite.sh"
SWEEP = REPO / "scripts" / "train" / "run_budget_sweep.sh"

# ------------------------------------------------------------------------------------- eval_fixed_context_bank


def test_resumed_fixed_context_eval_refuses_changed_weights_at_the_same_path(
    tmp_path, tiny_student_dir, tiny_teacher_dir
):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ta_opd.diagnostics.cli.eval_bank import main

    gen = torch.Generator().manual_seed(0)
    rows = [{"context_id": i, "prompt_token_ids": torch.randint(3, 60, (4,), generator=gen).tolist(),
             "response_token_ids": torch.randint(3, 60, (3,), generator=gen).tolist()} for i in range(4)]  # fmt: skip
    ctx = tmp_path / "contexts.jsonl"
    ctx.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tau = tmp_path / "run" / "hf_final"
    shutil.copytree(tiny_student_dir, tau)
    out = tmp_path / "eval"
    base = ["--contexts", str(ctx), "--teacher", str(tiny_teacher_dir), "--student", f"theta0={tiny_student_dir}",
            "--student", f"tau={tau}", "--k", "2", "--support-ks", "2", "--contexts-per-chunk", "2",
            "--format", "csv", "--out-dir", str(out)]  # fmt: skip
    assert main([*base, "--max-chunks", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == [0] and set(manifest["config"]["weights_sha256"]) == {
        "teacher", "student theta0", "student tau"}  # fmt: skip

    # θτ retrained into the same directory: different weights, same path
    (weights,) = tau.glob("*.safetensors")
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert "weights of student tau" in str(exc.value) and "--overwrite" in str(exc.value), exc.value
    assert json.loads((out / "manifest.json").read_text())["done"] == [0]  # nothing mixed in
    assert main([*base, "--overwrite"]) == 0  # start fresh on the new weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == [0, 1]
    assert main(base) == 0  # unchanged weights resume (digests reused from the manifest's stat cache)


# ---------------------------------------------------------------------------------------------- suite launchers

# A stand-in for slime_ta_opd/train.py (SLIME_DIR/train.py): the stack's parser, the real MetricsLogger, and the
# checkpoint pointer protocol (--save / --save-interval / --load), without models. STANDIN_CRASH="<run dir name>:<k>"
# exits 1 right after step k is logged (and saved, when due).
STANDIN_TRAIN = """
import os, sys
from pathlib import Path
from slime.utils.arguments import parse_args
from slime.utils.logging_utils import MetricsLogger

args = parse_args(sys.argv[1:])
print("argv:", " ".join(sys.argv[1:]), flush=True)
log = MetricsLogger(args)
start = 0
if args.load and (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
    start = int((Path(args.load) / "latest_checkpointed_iteration.txt").read_text()) + 1
    print("resumed at", start, flush=True)
crash = os.environ.get("STANDIN_CRASH", ":").split(":")
if start == 0 and args.eval_interval is not None:
    log.log(-1, {"eval/heldout/reward_mean": 0.0})
for step in range(start, args.num_rollout):
    log.log(step, {"opd/nominal_ratio": args.opd_budget_ratio, "train/teacher_kl_all": 1.0 / (step + 1)})
    if args.save and ((step + 1) % args.save_interval == 0 or step == args.num_rollout - 1):
        (Path(args.save) / f"iter_{step:07d}").mkdir(parents=True, exist_ok=True)
        (Path(args.save) / "latest_checkpointed_iteration.txt").write_text(str(step))
    if crash == [Path(args.output_dir).name, str(step)]:
        sys.exit(1)
"""


@pytest.fixture
def suite_env(tmp_path, tiny_student_dir, tiny_teacher_dir):
    from slime.embedded.task import write_splits

    fake = tmp_path / "fake_slime"
    fake.mkdir()
    (fake / "train.py").write_text(STANDIN_TRAIN)
    train, held_out = write_splits(tmp_path / "data", 8, 4, seed=0)
    env = {k: v for k, v in os.environ.items() if k not in ("RESUME", "FORCE", "SEED", "SEEDS", "IDX", "DRY_RUN")}
    env.update(
        SLIME_DIR=str(fake), STUDENT_HF=str(tiny_student_dir), TEACHER_MODEL=str(tiny_teacher_dir),
        PROMPT_DATA=str(train), EVAL_PROMPT_DATA=str(held_out), OUTPUT_ROOT=str(tmp_path / "out"), SUITE_NAME="s",
        PROFILE="embedded", NUM_ROLLOUT="4", EVAL_INTERVAL="2", SUMMARIZE="1", METHOD_LIST="teachability:0.1:1",
        SEEDS="1", SHARED_SERVERS="0",
    )  # fmt: skip
    return env


def _launch(script: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**env, **extra}, capture_output=True, text=True, cwd=REPO)


def _summary(suite: Path) -> dict[str, dict[str, str]]:
    with open(suite / "runs.csv", newline="") as f:  # one row per run (summary.csv: one per method x budget)
        return {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}


def _rollout_ids(run_dir: Path) -> list[int]:
    return [json.loads(line)["rollout_id"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_suite_rerun_is_refused_and_force_moves_the_old_suite_aside(suite_env):
    suite = Path(suite_env["OUTPUT_ROOT"]) / "s"
    first = _launch(SUITE, suite_env)
    assert first.returncode == 0, first.stderr
    run = suite / "runs" / "1_teachability_r0.1_s1"
    assert _summary(suite)["1_teachability_r0.1_s1"]["steps"] == "4" and (run / "complete.json").exists()
    before = (run / "metrics.jsonl").read_bytes()

    for extra in ({"NUM_ROLLOUT": "1"}, {"NUM_ROLLOUT": "1", "DRY_RUN": "1"}):
        r = _launch(SUITE, suite_env, **extra)
        assert r.returncode == 2 and "already holds results of an earlier run" in r.stderr, r.stderr
        assert "RESUME=1" in r.stderr and "FORCE=1" in r.stderr and str(suite) in r.stderr
        assert (run / "metrics.jsonl").read_bytes() == before  # nothing appended, nothing rewritten

    r = _launch(SUITE, suite_env, NUM_ROLLOUT="1", FORCE="1")
    assert r.returncode == 0, r.stderr
    (aside,) = suite.parent.glob("s.replaced-*")
    assert (aside / "runs" / "1_teachability_r0.1_s1" / "metrics.jsonl").read_bytes() == before  # kept, not deleted
    assert _rollout_ids(run) == [-1, 0]
    row = _summary(suite)["1_teachability_r0.1_s1"]
    assert row["steps"] == "1" and float(row["teacher_kl_final"]) == 1.0  # the new run's numbers only

    r = _launch(SUITE, suite_env, RESUME="1", FORCE="1")
    assert r.returncode == 2 and "pick one" in r.stderr


def test_interrupted_suite_resumes_its_unfinished_entries_only(suite_env):
    env = {**suite_env, "METHOD_LIST": "teachability:0.1:1 tip:0.1:2 random:0.1:3", "SAVE_CHECKPOINT": "1",
           "SAVE_INTERVAL": "1", "STANDIN_CRASH": "2_tip_r0.1_s1:1"}  # fmt: skip
    suite = Path(env["OUTPUT_ROOT"]) / "s"
    r = _launch(SUITE, env)
    assert r.returncode == 2 and "failed run(s): 2_tip_r0.1_s1" in r.stderr
    done, crashed, unstarted = (
        suite / "runs" / n for n in ("1_teachability_r0.1_s1", "2_tip_r0.1_s1", "3_random_r0.1_s1")
    )
    assert _rollout_ids(crashed) == [-1, 0, 1] and not (crashed / "complete.json").exists()
    assert not unstarted.joinpath("metrics.jsonl").exists()
    done_log = (done / "train.log").read_bytes()

    # other settings: refused, the entry is named
    r = _launch(SUITE, env, RESUME="1", NUM_ROLLOUT="5", STANDIN_CRASH="")
    assert r.returncode == 2 and "entry 'teachability:0.1:1'" in r.stderr and "other train.py flags" in r.stderr

    r = _launch(SUITE, env, RESUME="1", STANDIN_CRASH="")
    assert r.returncode == 0, r.stderr
    assert (done / "train.log").read_bytes() == done_log  # finished entry skipped, not rerun
    assert "resumed at 2" in (crashed / "train.log").read_text() and "--load" in (crashed / "train.log").read_text()
    assert _rollout_ids(crashed) == [-1, 0, 1, 2, 3]  # continues its own metrics
    rows = _summary(suite)
    assert {name: rows[name]["steps"] for name in rows} == {d.name: "4" for d in (done, crashed, unstarted)}
    assert all(rows[name]["status"] == "ok" for name in rows)


def test_resume_without_a_checkpoint_restarts_the_entry_with_its_old_output_aside(suite_env):
    env = {**suite_env, "STANDIN_CRASH": "1_teachability_r0.1_s1:2"}
    suite = Path(env["OUTPUT_ROOT"]) / "s"
    assert _launch(SUITE, env).returncode == 2
    r = _launch(SUITE, env, RESUME="1", STANDIN_CRASH="")
    assert r.returncode == 0, r.stderr
    run = suite / "runs" / "1_teachability_r0.1_s1"
    assert _rollout_ids(run) == [-1, 0, 1, 2, 3]  # a clean run, not the crashed lines plus the new ones
    (old,) = (suite / "replaced").iterdir()
    assert _rollout_ids(old) == [-1, 0, 1, 2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"METHOD_LIST": "tip:0.1:99999999999999999999"}, "idx 99999999999999999999 is out of range"),
        ({"METHOD_LIST": "tip:0.1:9223372036854775808"}, "idx 9223372036854775808 is out of range"),
        ({"METHOD_LIST": "tip:0.1:4294967296"}, "idx 4294967296 is out of range"),
        ({"SEEDS": "1 4294967296"}, "SEEDS entry 4294967296: 4294967296 is out of range"),
        ({"SEEDS": "3 3"}, "SEEDS=3 3: seed 3 is listed twice"),
        ({"SEED": "-1"}, "SEED=-1: expected a non-negative integer"),
        ({"SEED": "1e3"}, "SEED=1e3: expected a non-negative integer"),
        ({"SEED": "18446744073709551617"}, "SEED=18446744073709551617: 18446744073709551617 is out of range"),
        ({"NUM_ROLLOUT": "99999999999999999999"}, "NUM_ROLLOUT=99999999999999999999"),
        ({"ROLLOUT_BATCH_SIZE": "a[$(touch PWNED)]"}, "ROLLOUT_BATCH_SIZE=a[$(touch PWNED)]: expected"),
        ({"SAVE_CHECKPOINT": "a[$(touch PWNED)]"}, "SAVE_CHECKPOINT=a[$(touch PWNED)]: expected 0 or 1"),
        ({"FORCE": "yes"}, "FORCE=yes: expected 0 or 1"),
    ],
)
def test_launcher_numbers_are_validated_before_any_arithmetic(suite_env, tmp_path, extra, message):
    r = subprocess.run(["bash", str(SUITE)], env={**suite_env, **extra}, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not Path(suite_env["OUTPUT_ROOT"]).exists() and not (tmp_path / "PWNED").exists()


def test_single_method_launcher_idx_is_validated(suite_env):
    r = _launch(REPO / "scripts" / "train" / "run_tip.sh", suite_env, IDX="18446744073709551616")
    assert r.returncode == 2 and "idx 18446744073709551616 is out of range" in r.stderr, r.stderr
    r = _launch(REPO / "scripts" / "train" / "run_tip.sh", suite_env, IDX="-3")
    assert r.returncode == 2 and "IDX=-3: expected a non-negative integer" in r.stderr, r.stderr


def test_budget_sweep_rerun_is_refused_and_force_moves_it_aside(suite_env):
    env = {**suite_env, "METHODS": "tip", "BUDGETS": "0.1", "INCLUDE_FULL_OPD": "0", "SWEEP_NAME": "w",
           "DRY_RUN": "1"}  # fmt: skip
    sweep = Path(env["OUTPUT_ROOT"]) / "w"
    started = sweep / "budget_0.1" / "runs" / "10_tip_r0.1"
    started.mkdir(parents=True)
    (started / "metrics.jsonl").write_text('{"rollout_id": 0}\n')
    r = _launch(SWEEP, env)
    assert r.returncode == 2 and "sweep directory (SWEEP_NAME=w)" in r.stderr and "already holds" in r.stderr
    assert (started / "metrics.jsonl").exists()
    r = _launch(SWEEP, env, INCLUDE_FULL_OPD="2")
    assert r.returncode == 2 and "INCLUDE_FULL_OPD=2: expected 0 or 1" in r.stderr
    r = _launch(SWEEP, env, FORCE="1")
    assert r.returncode == 0, r.stderr
    (aside,) = sweep.parent.glob("w.replaced-*")
    assert (aside / "budget_0.1" / "runs" / "10_tip_r0.1" / "metrics.jsonl").exists()
    assert (sweep / "budget_0.1" / "method_mapping.csv").exists()


def test_summary_reads_only_the_newest_run_of_a_metrics_file(tmp_path):
    from slime.suite_report.cli import summarize

    suite = tmp_path / "suite"
    run = suite / "runs" / "1_tip_r0.1"
    run.mkdir(parents=True)
    (suite / "method_mapping.csv").write_text("idx,alias,mask,ratio,seed,run_dir\n1,tip,tip,0.1,2,runs/1_tip_r0.1\n")
    old = [{"rollout_id": i, "train/teacher_kl_all": 9.0} for i in range(4)]
    new = [{"rollout_id": 0, "train/teacher_kl_all": 1.0}]
    # a resumed run re-logs step 1 after its checkpoint: one record per step, the newest wins
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*old, *new]))
    (row,) = summarize([suite], plots=False)["runs"]
    assert row["steps"] == 1 and row["teacher_kl_final"] == 1.0
    resumed = [
        *old[:3],
        {"rollout_id": 1, "train/teacher_kl_all": 2.0},
        {"rollout_id": 2, "train/teacher_kl_all": 3.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resumed))
    (row,) = summarize([suite], plots=False)["runs"]
    assert row["steps"] == 3 and row["teacher_kl_final"] == pytest.approx((9.0 + 2.0 + 3.0) / 3)


def test_fixed_context_diagnostic_rerun_needs_resume_with_the_same_settings_or_force(tmp_path, suite_env):
    script = REPO / "scripts" / "diagnostics" / "run_fixed_context.sh"
    out = tmp_path / "fc"
    env = {**suite_env, "OUTPUT_DIR": str(out), "PYTHON": "false"}  # `false`: stops at the first tool it would run
    assert _launch(script, env).returncode == 1  # fresh: settings recorded, then the stand-in tool fails
    settings = (out / "settings.txt").read_text()
    (out / "contexts.jsonl").write_text("{}\n")
    r = _launch(script, env)
    assert r.returncode == 2 and "already holds outputs of an earlier run" in r.stderr, r.stderr
    r = _launch(script, env, RESUME="1", NUM_CONTEXTS="7")
    assert r.returncode == 2 and "other settings (NUM_CONTEXTS=7)" in r.stderr, r.stderr
    assert (out / "settings.txt").read_text() == settings and (out / "contexts.jsonl").read_text() == "{}\n"
    assert _launch(script, env, RESUME="1").returncode == 1  # same settings: continues (to the stand-in tool)
    assert (out / "contexts.jsonl").read_text() == "{}\n"
    assert _launch(script, env, FORCE="1", NUM_CONTEXTS="7").returncode == 1
    (aside,) = tmp_path.glob("fc.replaced-*")
    assert (aside / "contexts.jsonl").read_text() == "{}\n" and "NUM_CONTEXTS=7" in (out / "settings.txt").read_text()
