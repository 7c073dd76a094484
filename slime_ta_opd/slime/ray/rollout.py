# Over 600 lines: the RolloutManager is one Ray actor class (servers, faults, data, conversion), as upstream's.
"""``RolloutManager``: the Ray actor that owns the rollout servers, the data source and the rollout.

It starts (embedded backend) ``--rollout-num-engines`` SGLang-API engines behind a real
sglang-router and, for ``--use-opd --opd-type sglang`` without ``--rm-url``, a teacher server
from ``--opd-teacher-hf-checkpoint``; it points ``args.sglang_router_ip/port`` and
``args.rm_url`` at them. With ``--sglang-router-ip/--sglang-router-port`` given it starts no
engines and uses that router (an existing SGLang deployment).

``generate(rollout_id)`` runs the rollout plug-in, then the reward post-process plug-in on all
samples of the step (as upstream: for TA-OPD that is where tokens are selected), and returns
the rollout data dict documented in docs/design.md. The class is plain; ``ray.remote`` is
applied where it is created (``create_rollout_manager``).

Faults (docs/reliability.md): before each step every server this manager started is checked
(process alive and ``/health`` answering) and a dead one is restarted through its launch handle
on the same port. A step that fails while one of them died (e.g. the teacher killed mid-step,
after the HTTP retries ran out) is redone once from the same data position after the restart:
``--rollout-step-retries``, default 1. Counters: ``rollout/server_restarts`` (this step),
``rollout/server_restarts_total``, ``rollout/step_retries``. A failure with every server healthy
is raised as is (retrying a bad answer would not fix it).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import time
from argparse import Namespace
from typing import Any

import torch

from slime.rollout.base_types import RolloutFnTrainOutput, call_rollout_fn
from slime.utils.arguments import DEFAULT_ROLLOUT_FUNCTION
from slime.utils.async_utils import run
from slime.utils.compat_flags import load_debug_rollout, save_debug_rollout
from slime.utils.http_utils import close_session, get, init_http_client, post
from slime.utils.misc import load_function
from slime.utils.types import Sample
from ta_opd.loss_mask import valid_loss_mask

logger = logging.getLogger(__name__)

# Per-prompt evaluation results of a run, one JSON line per eval step and dataset (RolloutManager._log_eval_results).
EVAL_RESULTS_FILE = "eval_results.jsonl"


def _float_list(values: Any) -> list[float]:
    if torch.is_tensor(values):
        return [float(v) for v in values.detach().cpu().reshape(-1).tolist()]
    return [float(v) for v in values]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class RolloutManager:
    """Owns rollout servers, the data source and the rollout/eval plug-ins (see the module doc)."""

    def __init__(self, args: Namespace, pg: Any = None, weights_roots: list[str] | None = None):
        self.args = args
        self.pg = pg
        # where the embedded engines may load pushed weights from (default: <output-dir>/weights); a suite sharing
        # the engines across runs (slime.suite) passes the folder holding every run's output dir
        self._weights_roots = list(weights_roots) if weights_roots else None
        self._engine_group = None
        self._teacher = None
        self._latest_weights: str | None = None  # the newest dir pushed with update_weights_from_disk
        self.server_restarts = 0  # servers found dead and restarted since start
        self.engine_restarts = 0  # of which student engines (a pushed-weights sender reconnects when it grows)
        self.step_retries = 0  # steps redone after a server restart
        self._before_training_evals: dict[str, tuple[dict, dict]] = {}  # eval(): reused by later runs
        self.engines_lost: list[str] = []  # URLs of engines dropped because their node left the cluster
        self._configure_run()
        try:
            self._start_servers()
        except BaseException:
            self.shutdown()
            raise

    def _configure_run(self) -> None:
        """Everything that follows the run's flags rather than the servers: HTTP limits, input checks, the data
        source and the rollout/eval/reward plug-ins."""
        args = self.args
        init_http_client(args)
        self._check_inputs_before_start()
        self.data_source = load_function(args.data_source_path)(args)
        self.generate_rollout = load_function(args.rollout_function_path)
        self.eval_generate_rollout = load_function(args.eval_function_path or args.rollout_function_path)
        self.custom_reward_post_process_func = (
            load_function(args.custom_reward_post_process_path) if args.custom_reward_post_process_path else None
        )
        self.custom_convert_func = (
            load_function(args.custom_convert_samples_to_train_data_path)
            if getattr(args, "custom_convert_samples_to_train_data_path", None)
            else None
        )
        self.rollout_id = -1

    # Flags the servers were started from: a run on the same servers (reconfigure) must have the same values.
    SERVER_FLAGS = (
        "hf_checkpoint", "opd_teacher_hf_checkpoint", "rollout_num_engines", "rollout_backend", "api_key",
        "weight_update_mode", "use_opd", "opd_type", "colocate", "offload", "rollout_ray_resource",
        "teacher_ray_resource",
    )  # fmt: skip

    def reconfigure(self, args: Namespace) -> dict[str, Any]:
        """Serve another run on the running servers (slime.suite): ``args`` replaces the run's flags, and the data
        source and plug-ins are rebuilt from them (a fresh data position, seeded by its ``--rollout-seed``); the
        engines, router and teacher stay. ``args`` gets the servers' addresses. Returns :meth:`server_info`.

        Raises ValueError naming the flag when ``args`` differs in a flag the servers were started from
        (``SERVER_FLAGS``, a router or teacher address of its own)."""
        differ = [n for n in self.SERVER_FLAGS if getattr(args, n, None) != getattr(self.args, n, None)]
        for name in ("sglang_router_ip", "sglang_router_port", "rm_url"):
            value = getattr(args, name, None)
            if value is None:
                setattr(args, name, getattr(self.args, name, None))
            elif value != getattr(self.args, name, None):
                differ.append(name)
        if differ:
            raise ValueError(
                "this run cannot share the running servers: it differs in "
                + ", ".join(f"--{n.replace('_', '-')} ({getattr(args, n, None)!r} vs {getattr(self.args, n, None)!r})"
                            for n in differ)
            )  # fmt: skip
        self.args = args
        self._configure_run()
        return self.server_info()

    # ------------------------------------------------------------------ servers
    def _check_inputs_before_start(self) -> None:
        """Refuse what would fail later, before any server starts: a teacher with another tokenizer, a bank
        directory that cannot be written, a bad ``--eval-prompt-data`` file (read in full here, not at the first
        periodic eval; the prompt data is read in full when the data source is built, right after)."""
        args = self.args
        if getattr(args, "eval_datasets", None) and args.eval_function_path == DEFAULT_ROLLOUT_FUNCTION:
            from slime.rollout.data_source import eval_datasets

            eval_datasets(args)  # cached: the eval rollout reuses them
        bank_dir = getattr(args, "opd_token_bank_dir", None)
        if bank_dir:
            from ta_opd.token_bank import TokenBankWriter

            TokenBankWriter.from_args(args)  # mkdir + write probe; refuses a directory holding another run's bank
        teacher_dir = getattr(args, "opd_teacher_hf_checkpoint", None)
        if args.use_opd and teacher_dir and args.hf_checkpoint:
            from slime.rollout.teacher_check import check_same_tokenizer

            check_same_tokenizer(args.hf_checkpoint, teacher_dir, getattr(args, "allow_tokenizer_mismatch", False))

    def _check_external_teacher(self) -> None:
        if not (self.args.use_opd and self.args.opd_type == "sglang" and self.args.rm_url and self.args.hf_checkpoint):
            return
        from slime.rollout.teacher_check import check_teacher_server_info

        base = self.args.rm_url.rsplit("/generate", 1)[0]
        try:
            info = run(get(f"{base}/get_model_info", max_retries=2, timeout=30))
        except Exception as e:  # an external server may not expose it; scoring will fail loudly if it is down
            logger.warning("could not read %s/get_model_info to check the teacher tokenizer: %s", base, e)
            return
        if isinstance(info, dict):
            check_teacher_server_info(self.args.hf_checkpoint, info, base)

    def check_servers(self) -> int:
        """Restart every server this manager started that is dead or not answering ``/health``; returns how many.

        Engines come back on the same port, so the router's worker URLs stay valid, and load the newest weights
        pushed from disk (with ``--weight-update-mode distributed|tensor`` they serve the initial weights until
        the trainer's next push, which reconnects). A dead router is started again on its port too.
        """
        restarted = 0
        group = self._engine_group
        if group is not None:
            restarted += self._drop_lost_engines()
            for i, engine in enumerate(group.engines):
                if group.engine_alive(engine):
                    continue
                logger.warning("engine %d (%s, pid %s) is not healthy: restarting it", i, engine.url, engine.pid)
                group.restart_engine(engine)
                restarted += 1
                self.engine_restarts += 1
                self._reload_latest_weights(engine.url)
            restarted += int(group.restart_router_if_dead(self._log_dir()))
        if self._teacher is not None and not self._teacher.is_alive():
            logger.warning("teacher (%s, pid %s) is not healthy: restarting it", self._teacher.url, self._teacher.pid)
            self._teacher.restart()
            restarted += 1
        self.server_restarts += restarted
        return restarted

    def _drop_lost_engines(self) -> int:
        """Engines on a node that left the cluster are dropped and the router restarted with the others (the
        caller redoes the step's requests); returns how many. Raises when no engine is left."""
        group = self._engine_group
        lost = group.lost_engines() if hasattr(group, "lost_engines") else []
        for engine in lost:
            logger.error("engine %s: its node %s left the Ray cluster; continuing with the other engines",
                         engine.url, engine.node.get("node_id"))  # fmt: skip
            group.drop_engine(engine)
            self.engines_lost.append(engine.url)
            self.engine_restarts += 1  # the engine set changed: a weight-update group made before is stale
        if lost and not group.engines:
            raise RuntimeError(
                f"every rollout engine was lost with its node ({', '.join(self.engines_lost)}); the run stops. "
                "Resume from the last checkpoint with --load once the nodes are back"
            )
        return len(lost)

    def _reload_latest_weights(self, url: str) -> None:
        if self._latest_weights is not None:
            answer = run(post(f"{url}/update_weights_from_disk", {"model_path": self._latest_weights}))
            if not (isinstance(answer, dict) and answer.get("success")):
                raise RuntimeError(f"restarted engine {url} could not load {self._latest_weights!r}: {answer}")
            logger.info("restarted engine %s reloaded %s", url, self._latest_weights)
        elif getattr(self.args, "weight_update_mode", "disk") != "disk":
            logger.warning("restarted engine %s serves the initial weights until the next weight push", url)

    def _start_servers(self) -> None:
        args = self.args
        backend = getattr(args, "rollout_backend", "auto")
        external = args.sglang_router_ip is not None and args.sglang_router_port is not None
        from slime.backends.select import choose_rollout_backend, extra_available, gpus_available

        choice = choose_rollout_backend(backend, gpus_available(), extra_available("sglang"), external)
        if choice == "sglang":  # real engines on the rollout GPUs (after the actor's, unless colocated)
            from slime.backends.sglang_utils.engines import launch_sglang_engine_group

            base_gpu = 0 if args.colocate else args.actor_num_nodes * args.actor_num_gpus_per_node
            # engines on their bundles' nodes when the placement group reserved rollout bundles; else local
            placement = self._rollout_bundles()
            self._engine_group = launch_sglang_engine_group(
                args, base_gpu_id=base_gpu, log_dir=self._log_dir(), placement=placement
            )
            host, _, port = self._engine_group.url.split("://", 1)[-1].rstrip("/").rpartition(":")
            args.sglang_router_ip, args.sglang_router_port = host, int(port)
        elif not external:
            if args.hf_checkpoint is None:
                raise ValueError("the embedded rollout backend needs --hf-checkpoint (the student)")
            from slime.backends.embedded_sglang.launch import launch_engine_group

            n = max(1, int(args.rollout_num_engines or 1))
            on_nodes = self._rollout_bundles()
            logger.info("starting %d embedded engine(s) from %s behind sglang-router%s", n, args.hf_checkpoint,
                        " on their placement-group nodes" if on_nodes else "")  # fmt: skip
            extra: tuple[str, ...] = ()
            if getattr(args, "output_dir", None) or self._weights_roots:
                # the trainer pushes weights from <output-dir>/weights: the engines may load from there only
                roots = self._weights_roots or [os.path.join(os.path.abspath(args.output_dir), "weights")]
                # ... and from the initial checkpoint's folder (a resumed or re-pushed initial model)
                roots = [os.path.abspath(r) for r in roots] + [os.path.dirname(os.path.abspath(args.hf_checkpoint))]
                for root in roots[:-1]:
                    os.makedirs(root, exist_ok=True)
                extra = tuple(x for root in roots for x in ("--weights-root", root))
            if on_nodes:
                from slime.backends.sglang_utils.engines import embedded_server_command, launch_sglang_engine_group

                if args.weight_update_mode == "distributed":  # the trainer's rank 0 is on another node (keyed run)
                    extra += ("--allow-remote-weight-update-master",)

                self._engine_group = launch_sglang_engine_group(
                    args, log_dir=self._log_dir(), placement=on_nodes, command_fn=embedded_server_command,
                    num_engines=len(on_nodes[1]), extra_args=extra,
                )  # fmt: skip
            else:
                self._engine_group = launch_engine_group(
                    args.hf_checkpoint, n, api_key=args.api_key, router=True, log_dir=self._log_dir(), extra_args=extra
                )
            host, _, port = self._engine_group.url.split("://", 1)[-1].rstrip("/").rpartition(":")
            args.sglang_router_ip, args.sglang_router_port = host, int(port)
        if args.use_opd and args.opd_type == "sglang" and args.rm_url is None:
            if args.opd_teacher_hf_checkpoint is None:
                raise ValueError("--opd-type sglang needs --rm-url or --opd-teacher-hf-checkpoint")
            from slime.backends.embedded_sglang.launch import launch_server

            logger.info("starting the embedded teacher server from %s", args.opd_teacher_hf_checkpoint)
            log_dir = self._log_dir()
            log_file = None if log_dir is None else os.path.join(log_dir, "teacher.log")
            if args.teacher_ray_resource:  # on a node offering that resource (slime.ray.cluster)
                from slime.backends.sglang_utils.engines import RemoteServer

                self._teacher = RemoteServer(
                    args.opd_teacher_hf_checkpoint, args.teacher_ray_resource, api_key=args.api_key, log_path=log_file
                ).start()
            else:
                self._teacher = launch_server(args.opd_teacher_hf_checkpoint, api_key=args.api_key, log_file=log_file)
            args.rm_url = f"{self._teacher.url.rstrip('/')}/generate"
        elif args.use_opd and args.opd_type == "sglang":
            self._check_external_teacher()

    def _rollout_bundles(self) -> tuple[Any, list[int], list[Any]] | None:
        """The rollout part of the placement group when it reserved bundles for the engines, else None."""
        pg = self.pg
        return pg if isinstance(pg, tuple) and pg[0] is not None and pg[1] else None

    def placement(self) -> dict[str, Any]:
        """Where the rollout side runs, as each process reports it: ``rollout_manager`` and ``router`` (this
        actor's node), ``engines`` (one per serving engine, with its ``url``), ``teacher`` (None when external),
        ``engines_lost`` (URLs dropped with their node). Entries: ``{node_id, node_ip, pid}`` (+ ``url``)."""
        from slime.ray.cluster import where

        here = where()
        group = self._engine_group
        if group is None:
            engines = []
        elif hasattr(group, "placement"):
            engines = group.placement()
        else:  # embedded engines: processes of this actor
            engines = [{**here, "url": e.url, "server_pid": e.pid} for e in group.engines]
        teacher = None
        if self._teacher is not None:
            teacher = (self._teacher.placement() if hasattr(self._teacher, "placement")
                       else {**here, "url": self._teacher.url, "server_pid": self._teacher.pid})  # fmt: skip
        router = {**here, "url": f"http://{self.args.sglang_router_ip}:{self.args.sglang_router_port}"}
        return {"rollout_manager": here, "router": router, "engines": engines, "teacher": teacher,
                "engines_lost": list(self.engines_lost)}  # fmt: skip

    def _log_dir(self) -> str | None:
        out = getattr(self.args, "output_dir", None)
        if out is None:
            return None
        path = os.path.join(out, "logs")
        os.makedirs(path, exist_ok=True)
        return path

    def server_info(self) -> dict[str, Any]:
        """Where the servers are (the trainer's copy of args does not see the actor's updates)."""
        return {
            "router_url": f"http://{self.args.sglang_router_ip}:{self.args.sglang_router_port}",
            "sglang_router_ip": self.args.sglang_router_ip,
            "sglang_router_port": self.args.sglang_router_port,
            "engine_urls": self.engine_urls(),
            "rm_url": self.args.rm_url,
            "teacher_url": None if self._teacher is None else self._teacher.url,
        }

    def engine_restart_count(self) -> int:
        """Student engines restarted since start: a weight-update group made before a restart is stale."""
        return self.engine_restarts

    def engine_urls(self) -> list[str]:
        """Base URLs of the student engines (not the router); empty for an external router."""
        return [] if self._engine_group is None else list(self._engine_group.engine_urls)

    def update_weights_from_disk(self, path: str) -> list[dict[str, Any]]:
        """Load new student weights on every engine (each engine directly, not through the router)."""
        urls = self.engine_urls()
        if not urls:
            raise RuntimeError("no engines owned by this RolloutManager; update an external deployment yourself")

        async def push():
            import asyncio

            return await asyncio.gather(
                *(post(f"{u}/update_weights_from_disk", {"model_path": path}) for u in urls), return_exceptions=True
            )

        answers = run(push())
        failed = [(u, a) for u, a in zip(urls, answers, strict=True) if not (isinstance(a, dict) and a.get("success"))]
        if failed and self._drop_lost_engines():  # an engine's node left the cluster: the others carry on
            failed = [(u, a) for u, a in failed if u not in self.engines_lost]
        if failed:
            raise RuntimeError(f"update_weights_from_disk({path!r}) failed on {failed}")
        self._latest_weights = path
        return list(answers)

    def drop_lost_engines(self) -> int:
        """Drop the engines whose node left the cluster (a trainer's failed weight push asks); how many."""
        return 0 if self._engine_group is None else self._drop_lost_engines()

    def offload(self) -> None:
        """Colocated runs: the engines free their weights and caches while the trainer runs
        (``/release_memory_occupation``); no-op without engines of our own."""
        self._memory_call("/release_memory_occupation")

    def onload(self) -> None:
        """Bring the engines' memory back (``/resume_memory_occupation``); new weights must follow."""
        self._memory_call("/resume_memory_occupation")

    def _memory_call(self, path: str) -> None:
        urls = self.engine_urls()

        async def call_all():
            import asyncio

            return await asyncio.gather(*(post(f"{u}{path}", {}) for u in urls))

        answers = run(call_all()) if urls else []
        failed = [(u, a) for u, a in zip(urls, answers, strict=True) if not (isinstance(a, dict) and a.get("success"))]
        if failed:
            raise RuntimeError(f"{path} failed on {failed}")

    def health(self) -> dict[str, Any]:
        """``GET /health`` of the router, each engine and the teacher: {url: True | error text}."""
        urls = [f"http://{self.args.sglang_router_ip}:{self.args.sglang_router_port}"] + self.engine_urls()
        if self._teacher is not None:
            urls.append(self._teacher.url)

        async def probe(url: str):
            try:
                await get(f"{url.rstrip('/')}/health", max_retries=0, timeout=10, expect_json=False)
                return True
            except Exception as e:  # report, do not raise: this is a status call
                return f"{type(e).__name__}: {e}"

        async def probe_all():
            import asyncio

            return await asyncio.gather(*(probe(u) for u in urls))

        return dict(zip(urls, run(probe_all()), strict=True))

    def shutdown(self) -> None:
        """Stop the servers this manager started (by their handles; nothing else) and close the HTTP session."""
        try:
            run(close_session())
        except Exception:  # a session on a loop that is already gone: nothing left to close
            logger.debug("closing the HTTP session failed", exc_info=True)
        for name in ("_teacher", "_engine_group"):
            handle = getattr(self, name, None)
            if handle is not None:
                try:
                    handle.stop()
                except Exception:
                    logger.exception("stopping %s failed", name)
                setattr(self, name, None)

    # ------------------------------------------------------------------ data
    def get_num_rollout_per_epoch(self) -> int:
        return len(self.data_source) // self.args.rollout_batch_size

    def save(self, rollout_id: int) -> None:
        self.data_source.save(rollout_id)

    def load(self, rollout_id: int | None = None) -> None:
        self.data_source.load(rollout_id)

    # ------------------------------------------------------------------ rollout
    def _data_position(self) -> dict[str, Any] | None:
        """The data source's position (and buffer), to redo a failed step on the same prompts."""
        ds = self.data_source
        if not hasattr(ds, "state_dict") or not hasattr(ds, "load_state_dict"):
            return None
        return {"state": copy.deepcopy(ds.state_dict()), "buffer": copy.deepcopy(getattr(ds, "buffer", None))}

    def _restore_data_position(self, position: dict[str, Any]) -> None:
        self.data_source.load_state_dict(copy.deepcopy(position["state"]))
        if position["buffer"] is not None:
            self.data_source.buffer = copy.deepcopy(position["buffer"])

    def generate(self, rollout_id: int, return_samples: bool = False) -> dict[str, Any]:
        """One rollout step → the rollout data dict (keys: docs/design.md "Rollout data").

        Dead servers are restarted first; a step that fails while a server died is redone (module doc).
        """
        start = time.perf_counter()
        restarts_before = self.server_restarts
        self.check_servers()
        max_retries = max(0, int(getattr(self.args, "rollout_step_retries", 1)))
        position = self._data_position() if max_retries else None
        retries = 0
        while True:
            try:
                data = self._generate_once(rollout_id, return_samples)
                break
            except Exception as e:
                # only a failure that came with a dead server is worth redoing, and only from the same prompts
                if retries >= max_retries or position is None or self.check_servers() == 0:
                    raise
                retries += 1
                self.step_retries += 1
                logger.warning(
                    "rollout %d failed (%s: %s) and a server was restarted: redoing the step (retry %d/%d)",
                    rollout_id,
                    type(e).__name__,
                    e,
                    retries,
                    max_retries,
                )
                self._restore_data_position(position)
        metrics = data["metrics"]
        metrics["rollout/server_restarts"] = float(self.server_restarts - restarts_before)
        metrics["rollout/server_restarts_total"] = float(self.server_restarts)
        metrics["rollout/step_retries"] = float(retries)
        metrics["rollout/engines"] = float(len(self.engine_urls()))
        metrics["rollout/engines_lost_total"] = float(len(self.engines_lost))
        metrics["rollout/time_s"] = time.perf_counter() - start
        return data

    def _generate_once(self, rollout_id: int, return_samples: bool) -> dict[str, Any]:
        self.rollout_id = rollout_id
        loaded = load_debug_rollout(self.args, rollout_id)  # --load-debug-rollout-data: no generation
        out = RolloutFnTrainOutput(samples=loaded) if loaded is not None else call_rollout_fn(
            self.generate_rollout, self.args, rollout_id, self.data_source, evaluation=False
        )  # fmt: skip
        samples = out.samples
        while samples and isinstance(samples[0], list):
            samples = [s for group in samples for s in group]
        if not samples:
            raise RuntimeError(f"rollout {rollout_id} produced no samples")
        save_debug_rollout(self.args, rollout_id, samples)  # --save-debug-rollout-data
        data = self._convert_samples_to_train_data(samples)
        if getattr(self.args, "self_distillation", False):  # the trainer's teacher reads the privileged prompt
            from slime.rollout.self_distillation import teacher_prompt_ids

            data["sd_teacher_prompt_tokens"] = [teacher_prompt_ids(self.args, s) for s in samples]
        metrics = dict(out.metrics or {})
        metrics.update(data.pop("_metrics"))
        data["rollout_id"] = rollout_id
        data["metrics"] = metrics
        if return_samples:
            data["samples"] = [s.to_dict() for s in samples]
        return data

    def eval(self, rollout_id: int, log_id: int | None = None) -> dict[str, Any]:
        """Evaluation on ``--eval-prompt-data``: {"rollout_id", "metrics", "data": {name: {rewards, truncated}}}.

        The per-prompt rewards go to ``<output-dir>/eval_results.jsonl`` too (:meth:`_log_eval_results`), under
        ``log_id`` (the step the caller logs this evaluation at: -1 before training) or ``rollout_id``.

        The evaluation before training (``log_id`` -1) of a run on shared servers (slime.suite) is computed once
        and reused by every later run with the same starting weights and evaluation (:meth:`_before_training_key`):
        greedy decoding of the same weights on the same prompts gives the same answers.
        """
        key = self._before_training_key() if log_id == -1 else None
        reused = key is not None and key in self._before_training_evals
        if reused:
            metrics, data = copy.deepcopy(self._before_training_evals[key])
            logger.info("evaluation before training: same weights and greedy evaluation as an earlier run: reused")
        else:
            out = call_rollout_fn(self.eval_generate_rollout, self.args, rollout_id, self.data_source, evaluation=True)
            entries = (out.data or {}).items()
            data = {name: {k: v for k, v in entry.items() if k != "samples"} for name, entry in entries}
            metrics = dict(out.metrics or {})
            if key is not None:
                self._before_training_evals[key] = copy.deepcopy((metrics, data))
        if key is not None:  # 1: an earlier run's evaluation before training (same weights, greedy), not recomputed
            metrics["eval/reused_from_earlier_run"] = float(reused)
        self._log_eval_results(rollout_id if log_id is None else log_id, data)
        return {"rollout_id": rollout_id, "metrics": metrics, "data": data}

    # what decides the answers of the evaluation before training, besides the servers (which a run shares)
    _EVAL_FLAGS = (
        "hf_checkpoint", "load", "eval_datasets", "input_key", "label_key", "metadata_key", "apply_chat_template",
        "rollout_max_prompt_len", "rollout_filter_long_prompts", "n_samples_per_eval_prompt", "eval_custom_rm_path",
        "eval_rm_type", "eval_reward_key", "reward_key", "custom_rm_path", "rm_type", "custom_generate_function_path",
        "eval_function_path", "rollout_function_path", "use_opd", "opd_topk_metrics_k",
    )  # fmt: skip

    def _before_training_key(self) -> str | None:
        """The evaluation before training's identity, or None when its answers may differ between runs (not greedy,
        or a custom evaluation function): the starting weights, the flags of ``_EVAL_FLAGS``, the sampling."""
        from slime.rollout.sglang_rollout import build_sampling_params

        args = self.args
        if args.eval_function_path not in (None, DEFAULT_ROLLOUT_FUNCTION) or (
            args.rollout_function_path != DEFAULT_ROLLOUT_FUNCTION
        ):
            return None
        params = build_sampling_params(args, evaluation=True)
        if params["temperature"] != 0 and params["top_k"] != 1:
            return None
        flags = {name: getattr(args, name, None) for name in self._EVAL_FLAGS}
        return json.dumps({"flags": flags, "sampling": params}, sort_keys=True, default=repr)

    def _log_eval_results(self, step: int, data: dict[str, Any]) -> None:
        """One JSON line per dataset: ``{"rollout_id", "dataset", "n_samples_per_prompt", "rewards"}`` with the
        rewards in eval order (prompt i's samples at ``i*n .. i*n+n-1``; a non-numeric reward is null). The suite
        summary's paired bootstrap over eval prompts reads them (slime.suite_report.summary)."""
        out = getattr(self.args, "output_dir", None)
        if out is None or not data:
            return
        n = int(getattr(self.args, "n_samples_per_eval_prompt", 1) or 1)
        lines = []
        for name, entry in data.items():
            rewards = [float(r) if _is_number(r) else None for r in entry.get("rewards") or []]
            record = {"rollout_id": int(step), "dataset": name, "n_samples_per_prompt": n, "rewards": rewards}
            lines.append(json.dumps(record) + "\n")
        with open(os.path.join(out, EVAL_RESULTS_FILE), "a") as f:
            f.write("".join(lines))
            f.flush()

    def _post_process_rewards(self, samples: list[Sample]) -> tuple[list[Any], list[float]]:
        fn = self.custom_reward_post_process_func
        if fn is not None:
            # the contract is (args, samples, **kwargs); rollout_id goes to plug-ins that take it
            params = inspect.signature(fn).parameters
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            if takes_kwargs or "rollout_id" in params:
                return fn(self.args, samples, rollout_id=self.rollout_id)
            return fn(self.args, samples)
        raw = [s.get_reward_value(self.args) for s in samples]
        if not all(_is_number(r) for r in raw):
            bad = next(r for r in raw if not _is_number(r))
            raise TypeError(
                f"rewards must be numbers without --custom-reward-post-process-path (or set --reward-key); got {bad!r}"
            )
        args = self.args
        n = args.n_samples_per_prompt
        if (
            args.advantage_estimator in ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
            and args.rewards_normalization
            and len(raw) % n == 0
        ):
            # GRPO-style group normalisation, as upstream's default post-process
            rewards = torch.tensor(raw, dtype=torch.float64).reshape(-1, n)
            rewards = rewards - rewards.mean(dim=-1, keepdim=True)
            if args.advantage_estimator in ("grpo", "gspo", "cispo") and args.grpo_std_normalization and n > 1:
                rewards = rewards / (rewards.std(dim=-1, keepdim=True) + 1e-6)
            return raw, rewards.flatten().tolist()
        return raw, [float(r) for r in raw]

    def _convert_samples_to_train_data(self, samples: list[Sample]) -> dict[str, Any]:
        if self.custom_convert_func is not None:
            data = self.custom_convert_func(self.args, samples)
            data.setdefault("_metrics", {})
            return data
        raw_rewards, rewards = self._post_process_rewards(samples)
        if len(raw_rewards) != len(samples) or len(rewards) != len(samples):
            raise ValueError(
                f"reward post-process returned {len(raw_rewards)}/{len(rewards)} rewards for {len(samples)} samples"
            )
        metrics: dict[str, float] = {}
        step_metrics = samples[0].metadata.pop("opd_step_metrics", None) if samples[0].metadata else None
        if step_metrics:
            metrics.update({k: float(v) for k, v in step_metrics.items()})

        loss_masks, teacher, prompt_lengths = [], [], []
        for s in samples:
            s.loss_mask = valid_loss_mask(
                s.loss_mask, s.response_length, removed=bool(s.remove_sample), sample_index=s.index
            )
            loss_masks.append(list(s.loss_mask))
            prompt_len = len(s.tokens) - s.response_length
            if prompt_len < 1:
                raise ValueError(
                    f"sample {s.index}: {len(s.tokens)} tokens cannot hold a prompt and "
                    f"{s.response_length} response tokens"
                )
            prompt_lengths.append(prompt_len)
            if s.teacher_log_probs is not None:
                t = _float_list(s.teacher_log_probs)
                if len(t) != s.response_length:
                    raise ValueError(
                        f"sample {s.index}: {len(t)} teacher log-probs for a response of {s.response_length} tokens"
                    )
                teacher.append(t)
        if teacher and len(teacher) != len(samples):
            raise ValueError("teacher_log_probs set on some samples but not all")
        if self.args.use_opd and self.args.opd_type == "sglang" and not teacher:
            raise ValueError("--use-opd --opd-type sglang: the reward post-process set no sample.teacher_log_probs")

        rollout_ids = [s.rollout_id if s.rollout_id is not None else s.index for s in samples]
        mask_sum_by_rollout: dict[int, int] = {}
        for rid, m in zip(rollout_ids, loss_masks, strict=True):
            mask_sum_by_rollout[rid] = mask_sum_by_rollout.get(rid, 0) + sum(m)
        data: dict[str, Any] = {
            "tokens": [list(map(int, s.tokens)) for s in samples],
            "response_lengths": [s.response_length for s in samples],
            "prompt_lengths": prompt_lengths,
            "loss_masks": loss_masks,
            "rewards": [float(r) for r in rewards],
            "truncated": [int(s.status == Sample.Status.TRUNCATED) for s in samples],
            "sample_indices": [s.index for s in samples],
            "rollout_ids": rollout_ids,
            "rollout_mask_sums": [mask_sum_by_rollout[r] for r in rollout_ids],
        }
        if all(_is_number(r) for r in raw_rewards):
            data["raw_reward"] = [float(r) for r in raw_rewards]
        if all(s.rollout_log_probs is not None for s in samples):
            data["rollout_log_probs"] = [_float_list(s.rollout_log_probs) for s in samples]
        if teacher:
            data["teacher_log_probs"] = teacher
        if all(s.train_metadata is not None for s in samples):
            data["metadata"] = [s.train_metadata for s in samples]

        n_valid = sum(s.response_length for s in samples)
        n_kept = sum(sum(m) for m in loss_masks)
        metrics["rollout/loss_mask_tokens"] = float(n_kept)
        metrics["rollout/response_tokens"] = float(n_valid)
        metrics["rollout/kept_token_ratio"] = n_kept / max(n_valid, 1)
        metrics["rollout/reward_mean"] = sum(data["rewards"]) / len(samples)
        if "raw_reward" in data:
            metrics["rollout/raw_reward_mean"] = sum(data["raw_reward"]) / len(samples)
        if teacher and "rollout_log_probs" in data:
            # mean sampled-token reverse KL estimate log p_S - log p_T (docs/method.md §9), over all tokens
            student_lp = torch.tensor([x for row in data["rollout_log_probs"] for x in row], dtype=torch.float64)
            teacher_lp = torch.tensor([x for row in teacher for x in row], dtype=torch.float64)
            diff = student_lp - teacher_lp
            diff = diff[torch.isfinite(diff)]
            if diff.numel():
                metrics["rollout/teacher_kl_sampled"] = float(diff.mean())
        data["_metrics"] = metrics
        return data


def create_rollout_manager(
    args: Namespace, pg: Any = None, weights_roots: list[str] | None = None, **ray_options
) -> Any:
    """Start the RolloutManager as a Ray actor (``ray.remote`` applied here) on the driver's node (where the router
    it starts serves the driver's pre-flight) and wait until it is up."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "num_gpus": 0, "max_concurrency": 1, "scheduling_strategy": here}
    options.update(ray_options)
    actor = ray.remote(RolloutManager).options(**options).remote(args, pg, weights_roots)
    ray.get(actor.server_info.remote())  # surfaces constructor errors here
    return actor
