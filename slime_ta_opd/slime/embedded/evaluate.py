"""Held-out accuracy of a causal LM on the embedded task, with plain ``transformers`` (no server).

Batched generation with left padding, greedy (``temperature=0``) or sampled; the verifier is
``slime.embedded.task.verify``. Used by the asset builder (to measure teacher and student) and by
``tools/eval_task_accuracy.py`` (to score any HF checkpoint, e.g. a run's final weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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
