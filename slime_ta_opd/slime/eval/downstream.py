"""One lm-evaluation-harness run of a checkpoint: a HF directory (lm-eval's ``hf`` model) or an SGLang-API server
(the embedded server or real SGLang, through lm-eval's ``local-completions`` / ``local-chat-completions``).

Usage::

    downstream_eval --model-dir outputs/run/checkpoints/iter_0000100/model --tasks gsm8k_cot \\
        --output-path eval/pure_opd/0.10/seed0
    downstream_eval --server-url http://127.0.0.1:30000 --tokenizer DIR --tasks aime24,aime25 \\
        --gen-kwargs max_gen_toks=4096 --output-path eval/base/seed0
    downstream_eval --server-url URL --chat --tasks ifeval --output-path ...        # /v1/chat/completions
    downstream_eval --model-dir DIR --tasks my_task --include-path tasks/ --data-dir data/ --output-path ...

Datasets never come from the network: ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` are set unless already
set, so a task reads its data from the local datasets cache (``HF_DATASETS_CACHE``), or, with ``--data-dir DIR``,
from local files: a task ``T`` whose directory ``DIR/T/`` holds ``<split>.jsonl`` (or ``.json`` / ``.parquet``)
files reads those splits instead of its ``dataset_path`` (the task's own prompt, answer extraction and metrics
are kept). ``--include-path`` adds a directory of task YAMLs (lm-eval's ``TaskManager(include_path=...)``).

The server's API key is read from ``$SGLANG_API_KEY`` or ``$OPENAI_API_KEY`` (never from the command line).
Writes ``results_<time>.json`` (lm-eval's results, configs and versions; ``samples_<task>_<time>.jsonl`` too with
``--log-samples``) and a ``DONE`` marker under ``--output-path``: the layout ``aggregate_results`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from slime.eval.cli import run_printing_path
from ta_opd.atomic_io import atomic_write_text

logger = logging.getLogger(__name__)

DONE_MARKER = "DONE"
SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet")
API_KEY_ENVS = ("SGLANG_API_KEY", "OPENAI_API_KEY")


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a clear error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise SystemExit(
            "error: lm-evaluation-harness is not installed; install the optional extra: pip install -e '.[eval]'"
        ) from None
    return lm_eval


def local_splits(data_dir: Path, task: str) -> dict[str, str]:
    """``{split: file}`` of ``data_dir/task/<split>.<jsonl|json|parquet>`` (empty when the directory is absent)."""
    folder = data_dir / task
    if not folder.is_dir():
        return {}
    splits: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in SPLIT_SUFFIXES and path.is_file():
            if path.stem in splits:
                raise ValueError(f"{folder}: two files for split {path.stem!r}")
            splits[path.stem] = str(path.resolve())
    if not splits:
        raise ValueError(f"{folder} holds no <split>.jsonl/.json/.parquet file")
    kinds = {Path(p).suffix for p in splits.values()}
    if len(kinds) > 1:
        raise ValueError(f"{folder}: mixed file types {sorted(kinds)}; use one")
    return splits


def task_specs(task_manager: Any, tasks: list[str], data_dir: Path | None) -> list[str | dict[str, Any]]:
    """The task list for ``simple_evaluate``: a name, or (with local files under ``data_dir``) the task's full
    config with its dataset replaced by those files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs: list[str | dict[str, Any]] = []
    for name in tasks:
        entry = task_manager.task_index.get(name)
        if entry is None:
            raise ValueError(f"unknown lm-eval task {name!r} (add its YAML directory with --include-path)")
        splits = local_splits(data_dir, name) if data_dir is not None else {}
        if not splits:
            specs.append(name)
            continue
        if entry.yaml_path is None:
            raise ValueError(f"task {name!r} has no YAML config: its dataset cannot be replaced by {data_dir}/{name}")
        cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
        if "task" not in cfg:
            raise ValueError(f"{name!r} is a group; put the files of its tasks under {data_dir}/<task>/")
        suffix = Path(next(iter(splits.values()))).suffix
        cfg["dataset_path"] = "parquet" if suffix == ".parquet" else "json"
        cfg["dataset_name"] = None
        cfg["dataset_kwargs"] = {"data_files": splits}
        for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
            if cfg.get(key) and cfg[key] not in splits:
                have = sorted(splits)
                raise ValueError(f"task {name!r} reads split {cfg[key]!r} ({key}); {data_dir}/{name}/ has {have}")
        logger.info("task %s reads %s", name, splits)
        specs.append(cfg)
    return specs


def model_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(lm-eval model type, model_args) for a HF directory or a server."""
    if args.model_dir:
        model_args: dict[str, Any] = {"pretrained": str(args.model_dir), "dtype": args.dtype}
        if args.max_length:
            model_args["max_length"] = args.max_length
        return "hf", model_args
    base = args.server_url.rstrip("/")
    name = args.served_model or str(args.tokenizer)
    if args.chat:
        model_args = {"model": name, "base_url": f"{base}/v1/chat/completions", "tokenizer_backend": "none"}
    else:
        model_args = {
            "model": name,
            "base_url": f"{base}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(args.tokenizer),
            "tokenized_requests": True,
        }
        if args.max_length:
            model_args["max_length"] = args.max_length
    model_args |= {"num_concurrent": args.num_concurrent, "max_retries": 3, "timeout": args.timeout}
    return ("local-chat-completions" if args.chat else "local-completions"), model_args


def _api_key() -> str | None:
    for env in API_KEY_ENVS:
        if os.environ.get(env):
            return os.environ[env]
    return None


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """``results_<time>.json`` (and ``samples_<task>_<time>.jsonl``) under ``out_dir``, each written atomically."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")
    samples = results.pop("samples", None)
    path = atomic_write_text(out_dir / f"results_{stamp}.json", json.dumps(results, indent=2, default=str) + "\n")
    for task, rows in (samples or {}).items():
        text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        atomic_write_text(out_dir / f"samples_{task}_{stamp}.jsonl", text)
    return path


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...], include_defaults: bool = True) -> Any:
    """lm-eval's task index, built once per process (indexing the task YAMLs lm-eval ships takes a minute on a
    small machine; ``include_defaults=False`` indexes only ``include_paths``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def evaluate(args: argparse.Namespace) -> Path:
    """Run lm-eval as ``args`` say; returns the results file."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks is empty; expected a comma-separated list of lm-eval task names")
    if args.only_include_path and not args.include_path:
        raise ValueError("--only-include-path needs --include-path DIR")
    if args.include_path:
        for p in args.include_path:
            if not Path(p).is_dir():
                raise ValueError(f"--include-path {p!r} is not a directory")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {str(args.data_dir)!r} is not a directory")
    manager = task_manager(tuple(str(Path(p).resolve()) for p in args.include_path), not args.only_include_path)
    specs = task_specs(manager, tasks, args.data_dir)
    model, model_args = model_spec(args)
    key = _api_key()
    if args.server_url and key:
        os.environ["OPENAI_API_KEY"] = key  # what lm-eval's local API models send as the bearer token
    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=specs,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device if args.model_dir else None,
        limit=args.limit,
        gen_kwargs=args.gen_kwargs,
        task_manager=manager,
        log_samples=args.log_samples,
        apply_chat_template=args.chat or args.apply_chat_template,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        bootstrap_iters=args.bootstrap_iters,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    out_dir = Path(args.output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_results(out_dir, dict(results))
    atomic_write_text(out_dir / DONE_MARKER, datetime.datetime.now(datetime.UTC).isoformat() + "\n")
    return path


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="downstream_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model-dir", type=Path, help="HF checkpoint directory (lm-eval's hf model)")
    target.add_argument("--server-url", help="an SGLang-API server, e.g. http://127.0.0.1:30000")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory of the served model (completions API)")
    p.add_argument("--served-model", default=None, help="the 'model' field sent to the server (default: --tokenizer)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (applies the chat template)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    p.add_argument(
        "--only-include-path", action="store_true", help="index only --include-path tasks, not lm-eval's (faster)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="local task data: DIR/<task>/<split>.jsonl")
    p.add_argument("--output-path", required=True, help="where results_<time>.json and DONE go")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random, numpy, torch and few-shot seeds")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--gen-kwargs", default=None, help="e.g. max_gen_toks=4096,temperature=0")
    p.add_argument("--limit", type=float, default=None, help="evaluate only this many documents per task")
    p.add_argument("--batch-size", default="1")
    p.add_argument("--device", default="cpu", help="device of the hf model")
    p.add_argument("--dtype", default="auto", help="dtype of the hf model")
    p.add_argument("--max-length", type=int, default=None, help="context length lm-eval truncates to")
    p.add_argument("--num-concurrent", type=int, default=1, help="concurrent requests to the server")
    p.add_argument("--timeout", type=int, default=600, help="seconds per server request")
    p.add_argument("--bootstrap-iters", type=int, default=0, help="lm-eval's stderr bootstrap (0: off)")
    p.add_argument("--log-samples", action="store_true", help="write the per-document samples too")
    p.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow code-executing tasks (HumanEval)")
    return p


def _checked_evaluate(args: argparse.Namespace) -> Path:
    """``evaluate(args)`` after the checks of flag combinations and paths the parser cannot express."""
    if args.server_url and not args.chat and args.tokenizer is None:
        raise ValueError("--server-url needs --tokenizer DIR (the served model's tokenizer) unless --chat")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise ValueError(f"--tokenizer {str(args.tokenizer)!r} is not a directory")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise ValueError(f"--model-dir {str(args.model_dir)!r} is not a directory")
    return evaluate(args)


def main(argv: list[str] | None = None) -> int:
    return run_printing_path(_checked_evaluate, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
