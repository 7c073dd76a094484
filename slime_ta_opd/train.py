"""Entry point: ``python slime_ta_opd/train.py [slime flags]`` (upstream slime's train loop).

rollout (student sampling → teacher scoring → selection, in the RolloutManager) → train →
push weights → eval / log / save. See docs/training.md.
"""

import time

_T_PROCESS = time.perf_counter()  # before the heavy imports: a run's start-up (perf/startup_s) counts them

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import ray  # noqa: E402

from slime.loop import RUN_STOPS, run_loop, should_run_periodic_action, stop_exit_code  # noqa: E402,F401
from slime.preflight import run_preflight  # noqa: E402
from slime.ray.cluster import init_ray  # noqa: E402
from slime.ray.placement_group import (  # noqa: E402
    create_placement_groups,
    create_rollout_manager,
    create_training_models,
    remove_placement_groups,
)
from slime.utils.arguments import parse_args  # noqa: E402
from slime.utils.logging_utils import MetricsLogger, configure_logger  # noqa: E402
from slime.utils.run_dirs import prepare_run_dirs  # noqa: E402

logger = logging.getLogger("slime.train")


def train(args, t_start: float | None = None) -> dict:
    """Start the servers and the trainer, run the loop (slime.loop); returns the last step's logged metrics.
    Servers and actors are stopped on any exit. ``t_start``: when the run started (default: now)."""
    t_start = time.perf_counter() if t_start is None else t_start
    configure_logger()
    # before anything starts: output paths writable, --load meaningful, --save locked for the run's life
    save_lock = prepare_run_dirs(args)
    rollout_manager, actor_model, pgs, metrics_logger = None, None, {}, None
    started_ray = False
    try:
        # joins the cluster $RAY_ADDRESS names; otherwise a Ray of this run's own, even if another runs here
        started_ray = init_ray()
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
        return run_loop(args, rollout_manager, actor_model, metrics_logger, time.perf_counter() - t_start)
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
        train(args, _T_PROCESS)
    except RUN_STOPS as e:  # interrupted (130), refused (2), pre-flight FAIL (3), non-finite value (4)
        return stop_exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
