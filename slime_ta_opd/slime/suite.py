"""``python -m slime.suite --plan PLAN``: the runs of a method suite in one process, sharing the servers.

``scripts/train/run_method_suite.sh`` (``SHARED_SERVERS=1``) writes each entry's train.py flags to
``<run>/train_args.txt`` and the plan, one ``name<TAB>plan<TAB>run_dir`` line per entry (plan: fresh,
restart, resume, skip). Ray, the placement group, the RolloutManager (student engines, router, teacher
server) and the training ranks start once, with the first entry's flags; pre-flight runs once. Then for
each entry:

1. the RolloutManager takes the entry's flags (``reconfigure``: data source and plug-ins rebuilt, a fresh
   data position from its ``--rollout-seed``; refused when it differs in a flag the servers depend on);
2. the trainer starts over (``reset``): the student's exact weights from ``--hf-checkpoint`` (or the
   entry's ``--load`` checkpoint under RESUME), a fresh optimizer, RNGs from the entry's ``--seed``;
3. those weights are pushed to the engines before the first rollout;
4. the loop of train.py (``slime.loop.run_loop``) writes the entry's metrics.jsonl, eval_results.jsonl
   and checkpoints into its run dir, as a train.py run would;
5. ``launcher.json`` (exit code, wall time, start-up) and, on success, ``complete.json`` are written.

The time from an entry's start to its first rollout is logged as ``perf/startup_s`` in its first
metrics record (for the first entry it includes starting Ray and the servers). Exit status: 0 when
every entry finished, 130 when interrupted, else 1 (each entry's own code is in its launcher.json).
"""

from __future__ import annotations

import time

_T_PROCESS = time.perf_counter()  # the first entry's start-up counts the imports, as train.py's does

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from argparse import Namespace  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402

from slime.loop import RUN_STOPS, run_loop, stop_exit_code  # noqa: E402
from slime.preflight import run_preflight  # noqa: E402
from slime.ray.cluster import init_ray  # noqa: E402
from slime.ray.placement_group import create_placement_groups, create_training_models, remove_placement_groups  # noqa: E402
from slime.ray.rollout import create_rollout_manager  # noqa: E402
from slime.utils.arguments import parse_args  # noqa: E402
from slime.utils.logging_utils import MetricsLogger, configure_logger  # noqa: E402
from slime.utils.misc import atomic_write_text  # noqa: E402
from slime.utils.run_dirs import prepare_run_dirs  # noqa: E402

logger = logging.getLogger("slime.suite")

PLANS = ("fresh", "restart", "resume", "skip")
COMPLETE_MARKER = "complete.json"  # the launcher's TA_COMPLETE_MARKER: RESUME=1 skips an entry that has it


@dataclass
class Entry:
    """One run of the suite: its name, plan, output dir and parsed train.py flags."""

    name: str
    plan: str
    run_dir: Path
    args: Namespace


def read_plan(path: str | os.PathLike) -> list[Entry]:
    """The plan file's entries with their flags parsed by the stack's parser (``<run_dir>/train_args.txt``, one
    argument per line; a ``resume`` entry gets ``--load <run_dir>/checkpoints``, as the launcher gives train.py).

    Raises ValueError naming ``file:line`` for a malformed line or an unknown plan."""
    entries = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[1] not in PLANS:
            raise ValueError(f"{path}:{lineno}: expected 'name<TAB>plan<TAB>run_dir' with plan in {PLANS}: {line!r}")
        name, plan, run_dir = parts
        argv = (Path(run_dir) / "train_args.txt").read_text().splitlines()
        if plan == "resume":
            argv += ["--load", str(Path(run_dir) / "checkpoints")]
        entries.append(Entry(name, plan, Path(run_dir), parse_args(argv)))
    return entries


class SharedServers:
    """Ray, the RolloutManager and the training group, started once and handed from entry to entry."""

    def __init__(self, entries: Sequence[Entry]):
        first = entries[0].args
        self.started_ray = init_ray()  # joins $RAY_ADDRESS, else a Ray of its own (slime.ray.cluster)
        self.pgs: dict[str, Any] = {}
        self.rollout_manager: Any = None
        self.actor_model: Any = None
        try:
            self.pgs = create_placement_groups(first)
            # the engines may load the weights every entry pushes from its own run dir
            root = os.path.commonpath([os.path.abspath(e.run_dir) for e in entries])
            self.rollout_manager = create_rollout_manager(first, self.pgs["rollout"], weights_roots=[root])
            if first.preflight:  # once: every entry talks to the same servers
                run_preflight(first, self.rollout_manager)
        except BaseException:
            self.close()
            raise

    def start_entry(self, args: Namespace) -> None:
        """Hand the servers and the trainer to a run: its flags on the RolloutManager, the trainer reset to the
        student checkpoint (or ``--load``) with a fresh optimizer, and those weights on the engines."""
        ray.get(self.rollout_manager.reconfigure.remote(args))
        if self.actor_model is None:  # the first entry: the engines already serve the student checkpoint
            self.actor_model, start = create_training_models(args, self.pgs, self.rollout_manager)
        else:
            start = self.actor_model.reset(args)
            if start == 0:  # a resumed run pushes its checkpoint's weights in run_loop
                self.actor_model.update_weights()
        if args.start_rollout_id is None:
            args.start_rollout_id = start

    def close(self) -> None:
        if self.rollout_manager is not None:
            try:
                ray.get(self.rollout_manager.shutdown.remote())
            except Exception as e:  # an entry's own error matters more than a failed cleanup
                logger.warning("rollout manager shutdown failed: %s", e)
            ray.kill(self.rollout_manager, no_restart=True)
            self.rollout_manager = None
        if self.actor_model is not None:
            self.actor_model.shutdown()
            self.actor_model = None
        remove_placement_groups(self.pgs)
        self.pgs = {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def run_entry(servers: SharedServers, entry: Entry, t_start: float) -> int:
    """One entry on the shared servers; returns its exit code (train.py's codes: 0, 2, 3, 4, 130; 1 for any other
    error, logged with its traceback). KeyboardInterrupt is re-raised after the entry's files are written."""
    save_lock = None
    metrics_logger = None
    code = 0
    try:
        save_lock = prepare_run_dirs(entry.args)
        metrics_logger = MetricsLogger(entry.args)
        servers.start_entry(entry.args)
        startup = time.perf_counter() - t_start
        logger.info("%s: start-up %.2f s", entry.name, startup)
        run_loop(entry.args, servers.rollout_manager, servers.actor_model, metrics_logger, startup)
    except RUN_STOPS as e:
        code = stop_exit_code(e)
    except Exception:
        logger.error("%s failed:\n%s", entry.name, traceback.format_exc())
        code = 1
    finally:
        if metrics_logger is not None:
            metrics_logger.close()
        if save_lock is not None:
            save_lock.release()
    return code


def write_entry_files(entry: Entry, code: int, start: float, end: float) -> None:
    """``launcher.json`` as the launcher writes it for a train.py run, and ``complete.json`` when it finished."""
    info = {"name": entry.name, "exit_code": code, "start": start, "end": end, "wall_seconds": round(end - start, 1)}
    entry.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(entry.run_dir / "launcher.json", json.dumps(info) + "\n")
    if code == 0:
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(
            entry.run_dir / COMPLETE_MARKER, json.dumps({"name": entry.name, "finished": finished}) + "\n"
        )


def run_suite(entries: Sequence[Entry], continue_on_error: bool = False, t_process: float | None = None) -> int:
    """Every entry not planned ``skip``, in order, on one set of servers; the exit status of the module doc."""
    todo = [e for e in entries if e.plan != "skip"]
    for e in entries:
        if e.plan == "skip":
            logger.info("%s: already finished; skipped", e.name)
    if not todo:
        return 0
    configure_logger()
    t_entry = time.perf_counter() if t_process is None else t_process
    failed = []
    servers = None
    try:
        servers = SharedServers(todo)
        for n, entry in enumerate(todo, start=1):
            logger.info("[%d/%d] %s (%s)", n, len(todo), entry.name, entry.plan)
            wall_start = time.time() - (time.perf_counter() - t_entry)
            code = run_entry(servers, entry, t_entry)
            write_entry_files(entry, code, wall_start, time.time())
            t_entry = time.perf_counter()
            if code == 130:
                raise KeyboardInterrupt
            if code:
                failed.append(entry.name)
                logger.error("%s failed (exit %d); log: this suite's suite.log", entry.name, code)
                if not continue_on_error:
                    break
    except RUN_STOPS as e:  # interrupted, or the shared start-up refused / failed its pre-flight
        return stop_exit_code(e)
    finally:
        if servers is not None:
            servers.close()
    return 1 if failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, help="name<TAB>plan<TAB>run_dir lines (run_method_suite.sh)")
    parser.add_argument("--continue-on-error", type=int, choices=(0, 1), default=0)
    ns = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # the launcher stopping the suite takes the clean path
    entries = read_plan(ns.plan)
    return run_suite(entries, bool(ns.continue_on_error), _T_PROCESS)


if __name__ == "__main__":
    sys.exit(main())
