"""Lanes of the shared-servers suite (``python -m slime.suite --lanes N``, the launcher's ``SUITE_LANES``).

Real Ray, real embedded engines, router and teacher at the tiniest size: a 2-lane suite writes every entry's
files, and each entry's metrics equal those of the same entry run on one lane.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from test_suite_shared import REPO, SUITE, dry_run, entry_args

import slime.suite as suite_module
from slime.suite import Entry, LaneResourceError, _lanes, _ray_cpu_count, lane_needs, run_suite, start_ray
from slime.utils.arguments import parse_args

# what differs between two runs of one entry by design: timings and where the processes ran
_TIMING = ("perf/", "time", "_s", "wall")


def _steps(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)} for r in rows]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    """The launcher's flags (DRY_RUN) for three entries of seed 5, written once; each test runs a copy."""
    return dry_run(
        tmp_path_factory.mktemp("planned"), tiny_student_dir, tiny_teacher_dir,
        "pure_opd:1.0:1 random:0.2:2 teachability:0.2:3", "5", LR="0.05",
        EXTRA_ARGS="--rollout-num-engines 1 --opd-topk-metrics-k 4",
    )  # fmt: skip


def _copy(planned, dest) -> list[Entry]:
    """The planned entries under ``dest``: their flags with every path into the planned suite moved there."""
    entries = []
    for run in sorted((planned / "runs").iterdir()):
        argv = [a.replace(str(planned), str(dest)) for a in (run / "train_args.txt").read_text().splitlines()]
        run_dir = dest / "runs" / run.name
        run_dir.mkdir(parents=True)
        (run_dir / "train_args.txt").write_text("\n".join(argv) + "\n")
        entries.append(Entry(run.name, "fresh", run_dir, parse_args(argv)))
    return entries


def test_lanes_value_is_checked():
    assert _lanes("2") == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(Exception, match="expected an integer >= 1"):
            _lanes(bad)
    with pytest.raises(ValueError, match="lanes=0"):
        run_suite([], lanes=0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SUITE_LANES": "0"}, "SUITE_LANES=0"),
        ({"SUITE_LANES": "x"}, "SUITE_LANES=x"),
        ({"SUITE_LANES": "2", "SHARED_SERVERS": "0"}, "SHARED_SERVERS=1"),
    ],
)
def test_launcher_refuses_bad_lanes_before_any_work(tmp_path, env, message):
    full = {k: v for k, v in os.environ.items() if k not in ("SUITE_LANES", "SHARED_SERVERS")}
    full.update(OUTPUT_ROOT=str(tmp_path / "out"), SUITE_NAME="s", PROFILE="embedded", DRY_RUN="1", **env)
    r = subprocess.run(["bash", str(SUITE)], env=full, capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # refused before the suite directory was made


def test_lanes_must_fit_the_cluster(planned):
    import ray

    args = entry_args(planned, "1_pure_opd_r1.0_s5")
    assert lane_needs(args, 3, use_gpu=False) == {"CPU": 3}  # one training rank's bundle per lane
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert start_ray(args, 1) is False  # one lane fits one CPU
        with pytest.raises(LaneResourceError, match=r"2 lane\(s\) need CPU 2 \(the cluster offers 1\)"):
            start_ray(args, 2)
    finally:
        ray.shutdown()
    lanes = _ray_cpu_count() + 1
    assert start_ray(args, lanes) is True  # a Ray of our own gets a logical CPU per lane, whatever the cores
    try:
        assert ray.cluster_resources()["CPU"] == lanes
    finally:
        ray.shutdown()


class _Servers:
    """The lane's servers as the suite sees them; ``rollout_manager`` hands run_loop this object."""

    made: list[_Servers] = []

    def __init__(self, entries, preflight=True):
        self.first, self.preflight = entries[0].name, preflight
        self.closed = threading.Event()
        self.rollout_manager, self.actor_model = self, None
        _Servers.made.append(self)

    def start_entry(self, args):
        if self.closed.is_set():
            raise RuntimeError("servers closed")
        args.start_rollout_id = 0

    def close(self):
        self.closed.set()


def _lanes_with(monkeypatch, tmp_path, planned, run_loop):
    """Three real entries on two lanes whose servers and step loop are ``_Servers`` and ``run_loop``."""
    entries = _copy(planned, tmp_path / "suite")
    _Servers.made = []
    monkeypatch.setattr(suite_module, "SharedServers", _Servers)
    monkeypatch.setattr(suite_module, "run_loop", run_loop)
    return entries, suite_module.Lanes(entries, 2, continue_on_error=False, t_process=time.perf_counter())


def _code(entry) -> int | None:
    path = entry.run_dir / "launcher.json"
    return json.loads(path.read_text())["exit_code"] if path.is_file() else None


def test_an_interrupt_stops_every_lane_and_keeps_what_finished(monkeypatch, tmp_path, planned):
    running: list[str] = []

    def run_loop(args, servers, actor, metrics_logger, startup_s):
        if args.output_dir.endswith("1_pure_opd_r1.0_s5"):
            return {}
        running.append(args.output_dir)
        if len(running) == 2:  # both lanes busy: Ctrl-C
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not servers.closed.wait(60):  # the interrupt did not close this lane's servers: the entry "finishes"
            return {}
        raise RuntimeError("the actor died")  # what a closed server's pending call raises

    entries, lanes = _lanes_with(monkeypatch, tmp_path, planned, run_loop)
    assert lanes.run() == 130
    assert [_code(e) for e in entries] == [0, 130, 130]
    assert [(e.run_dir / "complete.json").is_file() for e in entries] == [True, False, False]
    lane1, lane2 = _Servers.made  # lane 1 runs the pre-flight, lane 2 does not; both are closed
    assert (lane1.first, lane1.preflight, lane1.closed.is_set()) == (entries[0].name, True, True)
    assert lane2.first in (entries[1].name, entries[2].name) and not lane2.preflight and lane2.closed.is_set()


def test_a_failed_entry_stops_new_entries_and_lets_the_running_one_finish(monkeypatch, tmp_path, planned):
    second_started = threading.Event()
    suite: dict[str, suite_module.Lanes] = {}

    def run_loop(args, servers, actor, metrics_logger, startup_s):
        if args.output_dir.endswith("1_pure_opd_r1.0_s5"):
            assert second_started.wait(60)
            raise ValueError("a broken entry")
        second_started.set()
        assert suite["lanes"].stop.wait(60)  # still running when the first entry fails
        return {}

    entries, lanes = _lanes_with(monkeypatch, tmp_path, planned, run_loop)
    suite["lanes"] = lanes
    assert lanes.run() == 1
    assert [_code(e) for e in entries] == [1, 0, None]  # the third entry never started
    assert all(s.closed.is_set() for s in _Servers.made)


def _start_of_training(run_dir) -> tuple[list, dict]:
    """What an entry's trainer saw: each step's prompts in order, and at step 0 the student's and the teacher's
    top-1 token and probability at each response's first position (context: the prompt alone, so they depend
    only on the prompt and the weights)."""
    bank = run_dir / "token_bank"
    prompts = [
        [(c["sample_id"], c["prompt_token_ids"]) for c in map(json.loads, path.read_text().splitlines())]
        for path in sorted(bank.glob("contexts_step*_rank000.jsonl"))
    ]
    with open(bank / "step0000000_rank000.csv", newline="") as f:
        first = {
            int(r["sample_id"]): (r["student_top1_id"], float(r["student_top1_prob"]),
                                  r["teacher_top1_id"], float(r["teacher_top1_prob"]))
            for r in csv.DictReader(f) if r["position"] == "0"
        }  # fmt: skip
    return prompts, first


@pytest.mark.slow
def test_two_lanes_write_every_entry_and_pair_with_one_lane(tmp_path, planned, caplog):
    """Every entry's files with 2 lanes; each entry sees the prompts of its 1-lane run in the same order and starts
    from the same weights. (The engines' sampling RNG runs on from their start, so an entry on reused servers
    samples other responses than on fresh ones: the metrics after step 0 are not compared.)"""
    entries = _copy(planned, tmp_path / "two")
    with caplog.at_level(logging.INFO, logger="slime.suite"):
        assert run_suite(entries, lanes=2) == 0
    messages = [r.getMessage() for r in caplog.records]
    started = [m.groups() for m in map(re.compile(r"\[lane (\d)\] \[(\d)/3\] (\S+) \(fresh\)$").match, messages) if m]
    assert sorted(n for _, n, _ in started) == ["1", "2", "3"]  # each entry once, taken in plan order
    assert {lane for lane, _, _ in started} == {"1", "2"}  # both lanes ran entries
    assert [name for _, _, name in sorted(started, key=lambda s: s[1])] == [e.name for e in entries]
    for e in entries:
        run = e.run_dir
        assert json.loads((run / "launcher.json").read_text())["exit_code"] == 0
        assert (run / "complete.json").is_file() and (run / "eval_results.jsonl").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["rollout_id"] for r in records] == [-1, 0, 1] and records[0]["perf/startup_s"] > 0

    # the same entries on one lane: the 2nd and 3rd on reused servers, a reset trainer
    ones = _copy(planned, tmp_path / "one")
    assert run_suite(ones, lanes=1) == 0
    for one, two in zip(ones, entries, strict=True):
        prompts_one, first_one = _start_of_training(one.run_dir)
        prompts_two, first_two = _start_of_training(two.run_dir)
        assert len(prompts_one) == 2 and prompts_one == prompts_two, one.name
        assert first_one.keys() == first_two.keys() and len(first_one) == 8
        for sample, (s_id, s_prob, t_id, t_prob) in first_one.items():
            assert (s_id, t_id) == (first_two[sample][0], first_two[sample][2]), (one.name, sample)
            assert (s_prob, t_prob) == pytest.approx((first_two[sample][1], first_two[sample][3]), rel=1e-5)
        before_one, before_two = _steps(one.run_dir)[0], _steps(two.run_dir)[0]  # greedy evaluation before training
        assert {k: v for k, v in before_one.items() if k.startswith("eval/heldout/")} == {
            k: v for k, v in before_two.items() if k.startswith("eval/heldout/")
        }
