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
every entry finished, 130 when interrupted, 2 when the cluster cannot hold the lanes, else 1 (each
entry's own code is in its launcher.json).

Lanes (``--lanes N``, the launcher's ``SUITE_LANES``): N independent sets of servers, each with its own
RolloutManager (engines, router, teacher), placement group and training rank, driven by one thread
each. A lane takes the next entry of the plan whenever it is free, so N entries run at once; every
entry's files are those of a one-lane run. One entry alternates between sampling, scoring and the
backward pass, each in its own single-threaded process, so on a small CPU machine a second lane fills
the cores the first leaves idle. Lane 1 starts first and runs the pre-flight; each further lane starts
its servers once the previous one is up (its server logs go to the run dir of its first entry). The
lanes' bundles must fit the cluster: a Ray this process starts gets enough logical CPUs, a cluster
joined through ``RAY_ADDRESS`` is checked first. With more than one lane each log line of the driver
starts with ``[lane K]`` and each lane has its own progress bar.
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
import threading  # noqa: E402
import traceback  # noqa: E402
from argparse import Namespace  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

import slime.loop  # noqa: E402
from slime.loop import RUN_STOPS, run_loop, stop_exit_code  # noqa: E402
from slime.preflight import run_preflight  # noqa: E402
from slime.ray.cluster import init_ray, missing_resources, ray_address  # noqa: E402
from slime.ray.placement_group import (  # noqa: E402
    cluster_has_gpus,
    create_placement_groups,
    create_training_models,
    remove_placement_groups,
    run_resource_needs,
)
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
    """Ray, the RolloutManager and the training group, started once and handed from entry to entry (one lane).

    ``entries[0]``'s flags start the servers (their logs go to its run dir); the engines may load weights from
    under the common root of every entry's run dir. ``preflight``: run the pre-flight once the servers are up
    (lane 1; the other lanes talk to servers started the same way)."""

    def __init__(self, entries: Sequence[Entry], preflight: bool = True):
        first = entries[0].args
        self.started_ray = init_ray()  # joins $RAY_ADDRESS, else a Ray of its own (slime.ray.cluster)
        self.pgs: dict[str, Any] = {}
        self.rollout_manager: Any = None
        self.actor_model: Any = None
        self._close_lock = threading.Lock()  # an interrupt closes a lane from the main thread while it runs
        try:
            self.pgs = create_placement_groups(first)
            # the engines may load the weights every entry pushes from its own run dir
            root = os.path.commonpath([os.path.abspath(e.run_dir) for e in entries])
            self.rollout_manager = create_rollout_manager(first, self.pgs["rollout"], weights_roots=[root])
            if preflight and first.preflight:  # once: every entry talks to the same servers
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
        """Stop the servers and the trainer and release the bundles (again: nothing to do)."""
        with self._close_lock:
            self._close()

    def _close(self) -> None:
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


def run_entry(servers: SharedServers, entry: Entry, t_start: float, interrupted: threading.Event | None = None) -> int:
    """One entry on the shared servers; returns its exit code (train.py's codes: 0, 2, 3, 4, 130; 1 for any other
    error, logged with its traceback). An entry whose servers an interrupt closed under it (``interrupted`` set)
    ends with 130, as one interrupted in the calling thread does."""
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
        if interrupted is not None and interrupted.is_set():
            logger.warning("%s: interrupted", entry.name)
            code = 130
        else:
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


class LaneResourceError(ValueError):
    """The cluster cannot hold every lane's bundles and servers (exit 2: nothing started)."""


def lane_needs(args: Namespace, lanes: int, use_gpu: bool) -> dict[str, float]:
    """Ray resources of ``lanes`` lanes started with ``args``: each lane's placement group and teacher."""
    return {name: lanes * n for name, n in run_resource_needs(args, use_gpu).items()}


def start_ray(args: Namespace, lanes: int) -> bool:
    """Join ``$RAY_ADDRESS`` or start a local Ray with logical CPUs for every lane; returns whether this call
    connected. Raises LaneResourceError naming what the cluster lacks for ``lanes`` lanes."""
    options = {}
    if lanes > 1 and not ray.is_initialized() and ray_address() == "local":
        # a lane's processes are mostly idle on one thread each: its one-CPU bundles may share the cores
        per_lane = max(run_resource_needs(args, use_gpu).get("CPU", 0) for use_gpu in (False, True))
        options["num_cpus"] = max(_ray_cpu_count(), int(lanes * per_lane))
    started = init_ray(**options)
    try:
        needs = lane_needs(args, lanes, cluster_has_gpus())
        short = missing_resources(needs)
        if short:
            detail = ", ".join(f"{name} {n:g} (the cluster offers {have:g})" for name, (n, have) in short.items())
            raise LaneResourceError(
                f"{lanes} lane(s) need {detail}: each lane holds its own placement group, engines and teacher; "
                "lower SUITE_LANES (--lanes) or add nodes/resources to the cluster"
            )
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _ray_cpu_count() -> int:
    """The CPUs a local Ray would register by itself (it honours the container's CPU quota)."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:  # a Ray without it: the cores of this machine
        return os.cpu_count() or 1
    return int(get_num_cpus())


_LANE = threading.local()  # .number: the lane (1, 2, ...) the current thread drives; unset in other threads


@contextmanager
def lane_output(lanes: int) -> Iterator[None]:
    """With more than one lane: ``[lane K]`` before every log record made in lane K's thread, and run_loop's
    progress bar as one line per lane (``lane K``, at row K)."""
    if lanes <= 1:
        yield
        return
    make_record = logging.getLogRecordFactory()

    def record(*a, **kw):
        rec = make_record(*a, **kw)
        number = getattr(_LANE, "number", None)
        if number is not None:
            rec.msg = f"[lane {number}] {rec.msg}"
        return rec

    class LaneBar(tqdm):
        def __init__(self, *a, **kw):
            number = getattr(_LANE, "number", None)
            if number is not None:
                kw.update(desc=f"lane {number}", position=number - 1)
            super().__init__(*a, **kw)

    logging.setLogRecordFactory(record)
    slime.loop.tqdm = LaneBar
    try:
        yield
    finally:
        slime.loop.tqdm = tqdm
        logging.setLogRecordFactory(make_record)


class Lanes:
    """The entries of one suite on ``lanes`` sets of servers, each driven by a thread that takes the next entry
    of the plan when it is free."""

    def __init__(self, todo: Sequence[Entry], lanes: int, continue_on_error: bool, t_process: float):
        self.todo = list(todo)
        self.lanes = lanes
        self.continue_on_error = continue_on_error
        self.t_process = t_process
        self.queue = deque(enumerate(self.todo, start=1))
        self.lock = threading.Lock()
        self.stop = threading.Event()  # no lane takes another entry
        self.interrupted = threading.Event()  # the servers are being closed under the running entries
        self.up = [threading.Event() for _ in range(lanes)]  # lane k's servers started (or failed): k+1 may start
        self.done = [threading.Event() for _ in range(lanes)]  # lane k's thread has finished (its files written)
        self.servers: list[SharedServers | None] = [None] * lanes
        self.failed: list[str] = []
        self.stopped_by_interrupt = False  # an entry ended with 130
        self.startup_error: BaseException | None = None

    def _next(self) -> tuple[int, Entry] | None:
        with self.lock:
            if self.stop.is_set() or not self.queue:
                return None
            return self.queue.popleft()

    def _lane(self, k: int) -> None:
        try:
            self._drive(k)
        finally:
            self.done[k].set()

    def _drive(self, k: int) -> None:
        if self.lanes > 1:
            _LANE.number = k + 1
        t_entry = self.t_process if k == 0 else None
        item = None
        servers = None
        try:
            if k > 0:  # one lane's servers at a time: their ports are bound before the next lane picks its own
                self.up[k - 1].wait()
                t_entry = time.perf_counter()
            item = self._next()
            if item is None:
                return
            if self.lanes > 1:
                logger.info("starting servers (with the flags of %s)", item[1].name)
            servers = SharedServers([item[1], *self.todo], preflight=k == 0)
            with self.lock:
                self.servers[k] = servers
                if self.interrupted.is_set():  # interrupted while this lane started: nothing closed it yet
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised by run() in the main thread
            with self.lock:
                if self.startup_error is None and not self.interrupted.is_set():
                    self.startup_error = e
            self.stop.set()
            return
        finally:
            self.up[k].set()
            if servers is not None and self.interrupted.is_set():
                servers.close()
        try:
            while item is not None:
                n, entry = item
                logger.info("[%d/%d] %s (%s)", n, len(self.todo), entry.name, entry.plan)
                wall_start = time.time() - (time.perf_counter() - t_entry)
                code = run_entry(servers, entry, t_entry, self.interrupted)
                write_entry_files(entry, code, wall_start, time.time())
                t_entry = time.perf_counter()
                if code == 130:
                    self.stopped_by_interrupt = True
                    self.stop.set()
                    break
                if code:
                    with self.lock:
                        self.failed.append(entry.name)
                    logger.error("%s failed (exit %d); log: this suite's suite.log", entry.name, code)
                    if not self.continue_on_error:
                        self.stop.set()
                item = self._next()
        finally:
            servers.close()

    def close_all(self) -> None:
        """Interrupt: close every lane's servers; the entries running on them end with 130."""
        self.interrupted.set()
        self.stop.set()
        with self.lock:
            started = [s for s in self.servers if s is not None]
        for servers in started:
            servers.close()

    def run(self) -> int:
        """The exit status of the module doc; a start-up error of a lane (pre-flight FAIL included) is raised."""
        threads = [
            threading.Thread(target=self._lane, args=(k,), name=f"lane-{k + 1}", daemon=True)
            for k in range(self.lanes)
        ]
        for t in threads:
            t.start()
        # the main thread waits on events, not Thread.join: a KeyboardInterrupt landing inside join can leave the
        # thread looking finished while it still runs
        try:
            for done in self.done:
                while not done.wait(timeout=1.0):  # short waits: the main thread stays responsive to SIGINT/SIGTERM
                    pass
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping %s", "every lane" if self.lanes > 1 else "the suite")
            self.close_all()
            for done in self.done:  # each lane writes the files of its interrupted entry
                done.wait(timeout=120)
            return 130
        if self.startup_error is not None:
            raise self.startup_error
        if self.stopped_by_interrupt:
            return 130
        return 1 if self.failed else 0


def run_suite(
    entries: Sequence[Entry], continue_on_error: bool = False, t_process: float | None = None, lanes: int = 1
) -> int:
    """Every entry not planned ``skip``, in plan order, on ``lanes`` sets of servers; the exit status of the module
    doc."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes={lanes!r}: expected an integer >= 1 (sets of servers running entries at once)")
    todo = [e for e in entries if e.plan != "skip"]
    for e in entries:
        if e.plan == "skip":
            logger.info("%s: already finished; skipped", e.name)
    if not todo:
        return 0
    configure_logger()
    if lanes > len(todo):
        logger.info("%d lane(s) asked for, %d entr%s to run: %d lane(s)", lanes, len(todo),
                    "y" if len(todo) == 1 else "ies", len(todo))  # fmt: skip
        lanes = len(todo)
    t_first = time.perf_counter() if t_process is None else t_process
    started_ray = False
    try:
        started_ray = start_ray(todo[0].args, lanes)
        if lanes > 1:
            logger.info("%d lanes: %d entries, each lane takes the next one when it is free", lanes, len(todo))
        with lane_output(lanes):
            return Lanes(todo, lanes, continue_on_error, t_first).run()
    except LaneResourceError as e:
        logger.error("%s", e)
        return 2
    except RUN_STOPS as e:  # interrupted, or the shared start-up refused / failed its pre-flight
        return stop_exit_code(e)
    finally:
        if started_ray:
            ray.shutdown()


def _lanes(value: str) -> int:
    """argparse type of ``--lanes``: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer >= 1 (sets of servers running entries)")
    return n


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, help="name<TAB>plan<TAB>run_dir lines (run_method_suite.sh)")
    parser.add_argument("--continue-on-error", type=int, choices=(0, 1), default=0)
    parser.add_argument(
        "--lanes", type=_lanes, default=1, help="sets of servers running entries at once (SUITE_LANES; default 1)"
    )
    ns = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # the launcher stopping the suite takes the clean path
    entries = read_plan(ns.plan)
    return run_suite(entries, bool(ns.continue_on_error), _T_PROCESS, ns.lanes)


if __name__ == "__main__":
    sys.exit(main())
