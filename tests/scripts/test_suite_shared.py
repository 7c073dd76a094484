"""Paired seeds and shared servers of the method suite (run_method_suite.sh, slime.suite).

The flags are the launcher's own (a DRY_RUN writes every entry's train_args.txt); the data source, Ray, the
embedded engines, router and teacher are real, at the tiniest size.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from slime.utils.arguments import parse_args
from slime.utils.misc import load_function

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "train" / "run_method_suite.sh"


def dry_run(tmp_path, student, teacher, method_list: str, seeds: str, **extra: str) -> Path:
    """The launcher's DRY_RUN: every entry's train.py flags written and parsed, nothing started."""
    from slime.embedded.task import write_splits

    train, held_out = write_splits(tmp_path / "data", 24, 4, seed=0)
    env = {k: v for k, v in os.environ.items() if k not in ("SEED", "SEEDS", "ROLLOUT_SEED", "RESUME", "FORCE")}
    env.update(
        STUDENT_HF=str(student), TEACHER_MODEL=str(teacher), PROMPT_DATA=str(train), EVAL_PROMPT_DATA=str(held_out),
        OUTPUT_ROOT=str(tmp_path / "out"), SUITE_NAME="s", PROFILE="embedded", METHOD_LIST=method_list, SEEDS=seeds,
        NUM_ROLLOUT="2", ROLLOUT_BATCH_SIZE="4", N_SAMPLES_PER_PROMPT="2", ROLLOUT_MAX_RESPONSE_LEN="8",
        EVAL_INTERVAL="2", EVAL_MAX_RESPONSE_LEN="8", DRY_RUN="1", **extra,
    )  # fmt: skip
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return tmp_path / "out" / "s"


def entry_args(suite: Path, name: str):
    return parse_args((suite / "runs" / name / "train_args.txt").read_text().splitlines())


def prompt_order(args, steps: int = 7) -> list[tuple[int, str]]:
    """(index, prompt) of every group the run's data source hands out in its first ``steps`` rollouts."""
    source = load_function(args.data_source_path)(args)
    return [(g[0].index, g[0].prompt) for _ in range(steps) for g in source.get_samples(args.rollout_batch_size)]


def test_methods_of_one_seed_see_the_same_prompts_in_the_same_order(tmp_path, tiny_student_dir, tiny_teacher_dir):
    suite = dry_run(
        tmp_path,
        tiny_student_dir,
        tiny_teacher_dir,
        "pure_opd:1.0:1 teachability:0.2:2 random:0.2:3 sft_teacher:1:4",
        "11 12",
    )
    orders = {
        (alias, seed): prompt_order(entry_args(suite, f"{idx}_{alias}_r{ratio}_s{seed}"))
        for seed in (11, 12)
        for idx, alias, ratio in ((1, "pure_opd", "1.0"), (2, "teachability", "0.2"), (3, "random", "0.2"),
                                  (4, "sft_teacher", "1.0"))
    }  # fmt: skip
    for seed in (11, 12):
        first = orders[("pure_opd", seed)]
        assert len(first) == 28 and len({prompt for _, prompt in first}) == 24  # 7 rollouts of 4: past one epoch
        for alias in ("teachability", "random", "sft_teacher"):
            assert orders[(alias, seed)] == first, (alias, seed)
    assert orders[("pure_opd", 11)] != orders[("pure_opd", 12)]  # each seed draws its own prompt order

    # the order follows --rollout-seed only: other method flags and --seed leave it as it is
    args = entry_args(suite, "2_teachability_r0.2_s11")
    args.seed, args.opd_budget_mask_seed = 999, 5
    assert prompt_order(args) == orders[("pure_opd", 11)]
    args.rollout_seed = 12
    assert prompt_order(args) == orders[("pure_opd", 12)]


def _greedy(url: str, input_ids: list[int]) -> tuple[list[int], list[float]]:
    body = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 8},
        "return_logprob": True,
    }
    request = urllib.request.Request(
        f"{url.rstrip('/')}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        meta = json.loads(answer.read())["meta_info"]
    return [int(t[1]) for t in meta["output_token_logprobs"]], [float(t[0]) for t in meta["output_token_logprobs"]]


@pytest.mark.slow
def test_a_shared_server_entry_starts_from_the_student_checkpoints_exact_weights(
    tmp_path, tiny_student_dir, tiny_teacher_dir
):
    import ray
    import torch

    from slime.backends.embedded_sglang.launch import launch_server
    from slime.backends.torch_utils.model import load_hf_model
    from slime.rollout.data_source import load_tokenizer
    from slime.suite import Entry, SharedServers, run_entry, write_entry_files

    suite = dry_run(
        tmp_path, tiny_student_dir, tiny_teacher_dir, "pure_opd:1.0:1 random:0.2:2", "5", LR="0.05",
        EXTRA_ARGS="--rollout-num-engines 1 --opd-topk-metrics-k 4 --skip-preflight",
    )  # fmt: skip
    names = ["1_pure_opd_r1.0_s5", "2_random_r0.2_s5"]
    entries = [Entry(n, "fresh", suite / "runs" / n, entry_args(suite, n)) for n in names]
    student = {k: v.clone() for k, v in load_hf_model(tiny_student_dir).state_dict().items()}
    prompt = load_tokenizer(str(tiny_student_dir)).encode("12+7=", add_special_tokens=False)
    fresh = launch_server(tiny_student_dir)
    try:
        fresh_answer = _greedy(fresh.url, prompt)
    finally:
        fresh.stop()

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    servers = None
    try:
        servers = SharedServers(entries)
        t0 = time.perf_counter()
        assert run_entry(servers, entries[0], t0) == 0
        write_entry_files(entries[0], 0, 0.0, 1.0)
        trainer = servers.actor_model._actor_handlers[0]
        trained = ray.get(trainer.state_for_test.remote())
        assert any(not torch.equal(trained[k], student[k]) for k in student)  # entry 1 moved the weights

        servers.start_entry(entries[1].args)  # reset to the checkpoint, fresh optimizer, weights pushed
        reset = ray.get(trainer.state_for_test.remote())
        assert reset.keys() == student.keys()
        assert all(torch.equal(reset[k], student[k]) for k in student)  # bit for bit
        assert ray.get(trainer.__ray_call__.remote(lambda self: (self.global_step, len(self.optimizer.state)))) == (
            0,
            0,
        )
        router = ray.get(servers.rollout_manager.server_info.remote())["router_url"]
        tokens, logprobs = _greedy(router, prompt)
        assert tokens == fresh_answer[0]
        assert logprobs == pytest.approx(fresh_answer[1], abs=1e-5)
        info = ray.get(servers.rollout_manager.server_info.remote())
        assert info["rm_url"] and entries[1].args.rm_url is None  # the teacher is the one started for entry 1
    finally:
        if servers is not None:
            servers.close()
        ray.shutdown()
    records = [json.loads(line) for line in (entries[0].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in records] == [-1, 0, 1] and records[0]["perf/startup_s"] > 0
    assert (entries[0].run_dir / "eval_results.jsonl").is_file() and (entries[0].run_dir / "complete.json").is_file()


@pytest.mark.slow
def test_shared_server_suite_end_to_end(tmp_path):
    """The launcher with SHARED_SERVERS=1 (fast-test assets): 2 methods x 2 seeds in one process; the later
    entries start within seconds; the summary pools the seeds with CIs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER_MODEL", "STUDENT_HF", "PROMPT_DATA", "SEED")}
    env.update(
        EMBEDDED_RECIPE="fast-test", ASSETS_CACHE_DIR=str(tmp_path / "cache"),
        METHOD_LIST="pure_opd:1.0:1 random:0.2:2",
        SEEDS="1 2", NUM_ROLLOUT="2", ROLLOUT_BATCH_SIZE="4", N_SAMPLES_PER_PROMPT="2", ROLLOUT_MAX_RESPONSE_LEN="16",
        EVAL_INTERVAL="1", EVAL_MAX_RESPONSE_LEN="16", OUTPUT_ROOT=str(tmp_path / "out"), SUITE_NAME="e2e",
        OMP_NUM_THREADS="1", SHARED_SERVERS="1", EXTRA_ARGS="--rollout-num-engines 1 --opd-topk-metrics-k 4",
    )  # fmt: skip
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    suite = tmp_path / "out" / "e2e"
    assert "Full OPD: " in r.stdout and "points vs random 20%" in r.stdout  # the verdict line
    for name in ("1_pure_opd_r1.0_s1", "2_random_r0.2_s1", "1_pure_opd_r1.0_s2", "2_random_r0.2_s2"):
        run = suite / "runs" / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [rec["rollout_id"] for rec in records] == [-1, 0, 1] and (run / "complete.json").is_file()
        assert json.loads((run / "launcher.json").read_text())["exit_code"] == 0
    # the evaluation before training (greedy, the checkpoint's weights) ran once and the later entries reused it
    before = {
        name: [json.loads(line) for line in (suite / "runs" / name / "eval_results.jsonl").read_text().splitlines()][0]
        for name in ("1_pure_opd_r1.0_s1", "2_random_r0.2_s1", "1_pure_opd_r1.0_s2", "2_random_r0.2_s2")
    }
    assert all(rec["rollout_id"] == -1 for rec in before.values())
    assert len({json.dumps(rec["rewards"]) for rec in before.values()}) == 1
    reused = [
        json.loads((suite / "runs" / name / "metrics.jsonl").read_text().splitlines()[0])[
            "eval/reused_from_earlier_run"
        ]
        for name in before
    ]
    assert sorted(reused) == [0.0, 1.0, 1.0, 1.0]
    with open(suite / "summary.csv", newline="") as f:
        rows = {row["alias"]: row for row in csv.DictReader(f)}
    assert rows["pure_opd"]["seeds"] == "2" and rows["pure_opd"]["accuracy_after_ci_low"] != ""
    assert rows["pure_opd"]["gain_vs_random_ci_high"] != "" and rows["random"]["gain_vs_random_mean"] == ""


def test_demo_method_list_pairs_every_method_and_forces_full_ratios():
    from slime.embedded.demo import DEFAULT_METHODS, DEFAULT_SEEDS, method_list

    assert method_list(DEFAULT_METHODS, 0.1) == (
        "pure_opd:1.0:10 teachability:0.1:20 random:0.1:30 tip:0.1:40 entropy:0.1:50 sft_teacher:1.0:60"
    )
    assert DEFAULT_SEEDS.split() == ["1", "2", "3"]
