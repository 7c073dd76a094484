"""Held-out accuracy of a HF checkpoint on the embedded arithmetic task (or any prompt/label JSONL).

Batched generation directly with ``transformers`` (no server), greedy by default, scored by
``slime.embedded.task.verify`` (the number after the last ``#`` must equal the label).

Usage::

    python tools/eval_task_accuracy.py --model DIR --data eval.jsonl
    python tools/eval_task_accuracy.py --model RUN/checkpoints --data eval.jsonl --out RUN/eval_accuracy.json
    python tools/eval_task_accuracy.py --model DIR --data eval.jsonl --temperature 1.0 --seed 3 --limit 100

``--model`` may be a checkpoint directory of train.py's ``--save`` (the latest ``iter_*/model`` is used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A HF model directory: ``path`` itself, or the latest ``iter_*/model`` of a ``--save`` directory."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    pointer = p / "latest_checkpointed_iteration.txt"
    if pointer.is_file():
        model = p / f"iter_{int(pointer.read_text().strip()):07d}" / "model"
        if (model / "config.json").is_file():
            return model
    raise FileNotFoundError(f"{p} is neither a HF checkpoint (config.json) nor a --save dir with a latest iteration")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint dir, or a train.py --save dir")
    parser.add_argument("--data", required=True, help="JSONL with the prompt and label keys")
    parser.add_argument("--input-key", default="prompt")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the result as JSON here (atomically)")
    parser.add_argument("--show", type=int, default=3, help="print this many example responses")
    ns = parser.parse_args(argv)

    from slime.embedded.evaluate import evaluate_model, load_checkpoint
    from slime.embedded.task import read_jsonl

    try:
        model_dir = resolve_model_dir(ns.model)
        if not os.path.isfile(ns.data):
            raise FileNotFoundError(f"--data {ns.data!r} does not exist")
        rows = read_jsonl(ns.data)[: ns.limit]
        t0 = time.perf_counter()
        model, tokenizer = load_checkpoint(model_dir, ns.device)
        result = evaluate_model(
            model,
            tokenizer,
            rows,
            input_key=ns.input_key,
            label_key=ns.label_key,
            batch_size=ns.batch_size,
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_p=ns.top_p,
            seed=ns.seed,
            progress=True,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = {
        "model": str(model_dir),
        "data": str(ns.data),
        "accuracy": result.accuracy,
        "num_prompts": result.num_prompts,
        "num_correct": result.num_correct,
        "mean_response_tokens": result.mean_response_tokens,
        "temperature": ns.temperature,
        "seed": ns.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    for row, text in list(zip(rows, result.responses, strict=True))[: ns.show]:
        print(f"  {row[ns.input_key]!r} -> {text!r} (label {row[ns.label_key]})")
    print(json.dumps(record))
    if ns.out:
        out = Path(ns.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
