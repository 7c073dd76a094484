"""The rollout → train → push → eval/log/save step loop of one run (upstream slime's train.py loop).

One function, used by ``train.py`` (one run per process) and by ``slime.suite`` (many runs sharing the
servers): both hand it a started RolloutManager and training group and the run's MetricsLogger.
"""

from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Any

import ray
from tqdm import tqdm

from slime.preflight import PreflightError
from slime.utils.nonfinite import NonFiniteError
from slime.utils.run_dirs import OutputPathError, SaveDirLockedError

logger = logging.getLogger("slime.train")

# How a run stops short, and its exit code: one table for train.py and slime.suite (per entry).
RUN_STOPS = (KeyboardInterrupt, PreflightError, OutputPathError, SaveDirLockedError, NonFiniteError)


def stop_exit_code(error: BaseException) -> int:
    """Log why the run stopped and return its exit code: 130 interrupted (servers and actors stopped), 2 refused
    before anything started, 3 pre-flight FAIL (the report is in the log), 4 a non-finite value (nothing
    applied, saved or pushed: docs/training.md)."""
    if isinstance(error, KeyboardInterrupt):
        logger.warning("interrupted: servers and actors stopped")
        return 130
    if isinstance(error, PreflightError):
        logger.error("pre-flight failed (%s): not training", ", ".join(error.report.failed))
        return 3
    if isinstance(error, OutputPathError | SaveDirLockedError):
        logger.error("%s", error)
        return 2
    if isinstance(error, NonFiniteError):
        logger.error("stopped on a non-finite value: %s", error)
        return 4
    raise TypeError(f"not a run stop: {error!r}") from error


def should_run_periodic_action(rollout_id: int, interval: int | None, num_rollout: int | None = None) -> bool:
    if interval is None:
        return False
    return (num_rollout is not None and rollout_id == num_rollout - 1) or (rollout_id + 1) % interval == 0


def run_loop(
    args: Namespace, rollout_manager: Any, actor_model: Any, metrics_logger: Any, startup_s: float | None = None
) -> dict[str, Any]:
    """Train from ``args.start_rollout_id`` to ``args.num_rollout``; returns the last logged record.

    ``startup_s`` (seconds from the run's start to here) goes into the run's first record as ``perf/startup_s``.
    """
    if args.num_rollout is None:  # derive from --num-epoch as upstream
        args.num_rollout = ray.get(rollout_manager.get_num_rollout_per_epoch.remote()) * (args.num_epoch or 1)
    if args.start_rollout_id > 0:  # resumed: the data position and the engines' weights follow the checkpoint
        if args.rollout_global_dataset:
            ray.get(rollout_manager.load.remote(args.start_rollout_id - 1))
        actor_model.update_weights()
    first = {} if startup_s is None else {"startup_s": startup_s}  # perf/* of the run's first record
    record: dict[str, Any] = {}
    if args.eval_interval is not None and args.start_rollout_id == 0 and not args.skip_eval_before_train:
        evaluation = ray.get(rollout_manager.eval.remote(0, log_id=-1))
        record = metrics_logger.log_step(-1, {}, {}, evaluation, **first)
        first = {}

    t_start = time.perf_counter()
    rollouts = range(args.start_rollout_id, args.num_rollout)
    bar = tqdm(rollouts, total=args.num_rollout, initial=args.start_rollout_id, desc="rollout")
    for rollout_id in bar:
        t0 = time.perf_counter()
        rollout_data = ray.get(rollout_manager.generate.remote(rollout_id))
        t_rollout = time.perf_counter() - t0
        if getattr(args, "debug_rollout_only", False):  # rollouts only: no training step, save or weight push
            record = metrics_logger.log_step(rollout_id, rollout_data, {}, None, rollout_time=t_rollout, **first)
            first = {}
            continue
        if args.offload:  # colocated: the engines give their memory to the trainer
            ray.get(rollout_manager.offload.remote())
        train_metrics = ray.get(actor_model.async_train(rollout_id, ray.put(rollout_data)))[0]

        if args.save and should_run_periodic_action(rollout_id, args.save_interval, args.num_rollout):
            if args.rollout_global_dataset:  # data position first: the trainer's pointer file is the commit
                ray.get(rollout_manager.save.remote(rollout_id))
            actor_model.save_model(rollout_id)
        if args.offload:  # trainer caches out, engines back in; their weights are refreshed right after
            actor_model.sleep()
            ray.get(rollout_manager.onload.remote())
        actor_model.update_weights()

        evaluation = None
        if should_run_periodic_action(rollout_id, args.eval_interval, args.num_rollout):
            evaluation = ray.get(rollout_manager.eval.remote(rollout_id))
        record = metrics_logger.log_step(
            rollout_id, rollout_data, train_metrics, evaluation,
            rollout_time=t_rollout, step_time=time.perf_counter() - t0, **first,
        )  # fmt: skip
        first = {}
        bar.set_postfix(loss=train_metrics["train/loss"], kl=train_metrics.get("train/teacher_kl_all"))
    bar.close()
    logger.info("done in %.1fs: %s", time.perf_counter() - t_start, metrics_logger.summary())
    return record
