"""Entry point: ``python slime_ta_opd/train.py [slime flags]`` (upstream slime's train loop).

rollout (student sampling → teacher scoring → selection, in the RolloutManager) → train →
push weights → eval / log / save. See docs/training.md.
"""

import logging
import signal
import sys
import time

import ray
from tqdm import tqdm

from slime.ray.placement_group import (
    create_placement_groups,
    create_rollout_manager,
    create_training_models,
    remove_placement_groups,
)
from slime.utils.arguments import parse_args
from slime.utils.logging_utils import MetricsLogger, configure_logger
from slime.utils.nonfinite import NonFiniteError
from slime.utils.preflight import PreflightError, run_preflight
from slime.utils.run_dirs import OutputPathError, SaveDirLockedError, prepare_run_dirs

logger = logging.getLogger("slime.train")


def should_run_periodic_action(rollout_id: int, interval: int | None, num_rollout: int | None = None) -> bool:
    if interval is None:
        return False
    return (num_rollout is not None and rollout_id == num_rollout - 1) or (rollout_id + 1) % interval == 0


def train(args) -> dict:
    """Run the loop; returns the last step's logged metrics. Servers and actors are stopped on any exit."""
    configure_logger()
    # before anything starts: output paths writable, --load meaningful, --save locked for the run's life
    save_lock = prepare_run_dirs(args)
    rollout_manager, actor_model, pgs, record, metrics_logger = None, None, {}, {}, None
    started_ray = not ray.is_initialized()
    try:
        if started_ray:  # RAY_ADDRESS joins an existing cluster; otherwise a local Ray starts here
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        metrics_logger = MetricsLogger(args)
        pgs = create_placement_groups(args)
        rollout_manager = create_rollout_manager(args, pgs["rollout"])
        if args.preflight:  # on unless --skip-preflight (docs/preflight.md); a FAIL raises PreflightError
            report = run_preflight(args, rollout_manager)
            if args.preflight_only:
                return report.to_dict()
        actor_model, start_rollout_id = create_training_models(args, pgs, rollout_manager)
        if args.start_rollout_id is None:
            args.start_rollout_id = start_rollout_id
        if args.num_rollout is None:  # derive from --num-epoch as upstream
            args.num_rollout = ray.get(rollout_manager.get_num_rollout_per_epoch.remote()) * (args.num_epoch or 1)
        if args.start_rollout_id > 0:  # resumed: the data position and the engines' weights follow the checkpoint
            if args.rollout_global_dataset:
                ray.get(rollout_manager.load.remote(args.start_rollout_id - 1))
            actor_model.update_weights()
        if args.eval_interval is not None and args.start_rollout_id == 0 and not args.skip_eval_before_train:
            metrics_logger.log_step(-1, {}, {}, ray.get(rollout_manager.eval.remote(0)))

        t_start = time.perf_counter()
        rollouts = range(args.start_rollout_id, args.num_rollout)
        bar = tqdm(rollouts, total=args.num_rollout, initial=args.start_rollout_id, desc="rollout")
        for rollout_id in bar:
            t0 = time.perf_counter()
            rollout_data = ray.get(rollout_manager.generate.remote(rollout_id))
            t_rollout = time.perf_counter() - t0
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
                rollout_time=t_rollout, step_time=time.perf_counter() - t0,
            )  # fmt: skip
            bar.set_postfix(loss=train_metrics["train/loss"], kl=train_metrics.get("train/teacher_kl_all"))
        bar.close()
        logger.info("done in %.1fs: %s", time.perf_counter() - t_start, metrics_logger.summary())
        return record
    finally:
        if rollout_manager is not None:
            try:
                ray.get(rollout_manager.shutdown.remote())
            except Exception as e:  # the loop's own error matters more than a failed cleanup
                logger.warning("rollout manager shutdown failed: %s", e)
            ray.kill(rollout_manager, no_restart=True)
        if actor_model is not None:
            actor_model.shutdown()
        remove_placement_groups(pgs)
        if metrics_logger is not None:
            metrics_logger.close()
        if started_ray:
            ray.shutdown()
        if save_lock is not None:
            save_lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler stopping the job takes the same clean path as Ctrl-C
    try:
        train(args)
    except KeyboardInterrupt:
        logger.warning("interrupted: servers and actors stopped")
        return 130
    except PreflightError as e:  # the full report is already in the log
        logger.error("pre-flight failed (%s): not training", ", ".join(e.report.failed))
        return 3
    except (OutputPathError, SaveDirLockedError) as e:  # refused before anything started
        logger.error("%s", e)
        return 2
    except NonFiniteError as e:  # nothing applied, saved or pushed (docs/training.md)
        logger.error("stopped on a non-finite value: %s", e)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
