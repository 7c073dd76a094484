"""Held-out accuracy of a causal LM on the embedded task, with plain ``transformers`` (no server).

Batched generation with left padding, greedy (``temperature=0``) or sampled; the verifier is
``slime.embedded.task.verify``. Used by the asset builder (to measure teacher and student) and by
``tools/eval_task_accuracy.py`` / the ``eval_task_accuracy`` command (``main``), which scores any HF
checkpoint, e.g. a run's final weights.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slime.embedded.task import build_prompt, verify


@dataclass
class EvalResult:
    accuracy: float
    num_prompts: int
    num_correct: int
    mean_response_tokens: float
    responses: list[str]


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) of a HF checkpoint directory, offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    model.to(device).eval()
    return model, tokenizer


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    batch_size: int = 256,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[str], list[int]]:
    """Decode one response per question; returns (texts without special tokens, response token counts)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    vocab_size = len(tokenizer)
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    lengths: list[int] = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False)
    try:
        for start in starts:
            chunk = questions[start : start + batch_size]
            prompt_ids = [tokenizer.encode(build_prompt(q, tokenizer), add_special_tokens=False) for q in chunk]
            width = max(len(p) for p in prompt_ids)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(prompt_ids):  # left padding: generation continues every row at the same column
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention[i, width - len(ids) :] = 1
            sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
            if temperature > 0 and top_p < 1.0:
                sampling["top_p"] = top_p
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                top_k=None,
                **sampling,
            )
            for row in out[:, width:].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                lengths.append(len(row))
                # ids past the tokenizer (the padded embedding rows) decode to nothing
                texts.append(tokenizer.decode([t for t in row if t < vocab_size], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
        if was_training:
            model.train()
    return texts, lengths


def evaluate_model(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    input_key: str = "prompt",
    label_key: str = "label",
    **generate_kwargs: Any,
) -> EvalResult:
    """Accuracy of ``model`` on JSONL-style rows (``{"prompt": question, "label": answer}``)."""
    if not rows:
        raise ValueError("no evaluation rows")
    missing = [k for k in (input_key, label_key) if k not in rows[0]]
    if missing:
        raise ValueError(f"evaluation rows lack key(s) {missing}; first row has {sorted(rows[0])}")
    questions = [r[input_key] for r in rows]
    texts, lengths = generate_responses(model, tokenizer, questions, **generate_kwargs)
    correct = sum(verify(t, r[label_key]) for t, r in zip(texts, rows, strict=True))
    return EvalResult(
        accuracy=correct / len(rows),
        num_prompts=len(rows),
        num_correct=correct,
        mean_response_tokens=sum(lengths) / len(lengths),
        responses=texts,
    )


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
