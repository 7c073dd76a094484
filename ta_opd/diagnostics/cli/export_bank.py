"""Export a fixed-context bank: prompt + first N response tokens of frozen student rollouts (docs/method.md §6.1).

Usage:
    export_fixed_context_bank --student STUDENT_HF --prompts train.jsonl --out contexts.jsonl \
        [--num-contexts 300] [--response-tokens 192] [--seed 0] [--temperature 1.0]
    export_fixed_context_bank --from-token-bank BANK_DIR --out contexts.jsonl [--num-contexts 300]

Each output line: ``context_id``, ``prompt_id`` (the bootstrap cluster), ``prompt_token_ids``,
``response_token_ids`` (at most ``--response-tokens``), ``source``. From a student, rollouts are
sampled with transformers ``generate`` (seeded, batched, left padding). From a token bank, the
``contexts_step*.jsonl`` sidecars written by ``ta_opd.token_bank.TokenBankWriter`` are used.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ta_opd.diagnostics.io import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_fixed_context_bank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", help="HF checkpoint of the student (θ0) that samples the rollouts.")
    src.add_argument("--from-token-bank", help="Token bank directory with contexts_step*.jsonl sidecars.")
    p.add_argument("--prompts", help="Prompt JSONL (with --student).")
    p.add_argument("--out", required=True, help="Output context bank (.jsonl).")
    p.add_argument("--num-contexts", type=int, default=300, help="Contexts to export (default 300).")
    p.add_argument("--response-tokens", type=int, default=192, help="Response tokens kept per context (192).")
    p.add_argument("--min-response-tokens", type=int, default=1, help="Drop contexts with fewer response tokens.")
    p.add_argument("--input-key", default="prompt", help="Prompt field: a string or a list of chat messages.")
    p.add_argument("--prompt-id-key", default=None, help="Field holding a prompt id (default: the line number).")
    p.add_argument("--no-chat-template", action="store_true", help="Tokenize the raw prompt text.")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="Rollouts per prompt (same cluster).")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (and prompt order shuffle seed).")
    p.add_argument("--shuffle-prompts", action="store_true", help="Shuffle prompts with --seed before taking them.")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts per generate call.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def _prompt_text(row: dict[str, Any], key: str, tokenizer: Any, chat: bool, lineno: int) -> str:
    if key not in row:
        raise ValueError(f"prompt line {lineno} has no {key!r} field (keys: {sorted(row)})")
    value = row[key]
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        raise ValueError(f"prompt line {lineno}: {key!r} is a message list but the tokenizer has no chat template")
    return value


def contexts_from_student(args: argparse.Namespace) -> list[dict[str, Any]]:
    import random

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not args.prompts:
        raise ValueError("--student needs --prompts PROMPTS.jsonl")
    rows = read_jsonl(args.prompts)
    order = list(range(len(rows)))
    if args.shuffle_prompts:
        random.Random(args.seed).shuffle(order)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=getattr(torch, args.dtype)).to(args.device)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos_ids.discard(None)
    contexts: list[dict[str, Any]] = []
    bar = tqdm(total=args.num_contexts, desc="sampling contexts", unit="ctx")
    for start in range(0, len(order), args.batch_size):
        if len(contexts) >= args.num_contexts:
            break
        chunk = order[start : start + args.batch_size]
        prompts, prompt_ids = [], []
        for i in chunk:
            pid = rows[i].get(args.prompt_id_key, i) if args.prompt_id_key else i
            text = _prompt_text(rows[i], args.input_key, tokenizer, not args.no_chat_template, i + 1)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for _ in range(args.samples_per_prompt):
                prompts.append(ids)
                prompt_ids.append(pid)
        width = max(len(x) for x in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in prompts], device=args.device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=args.device)
        torch.manual_seed(args.seed * 1_000_003 + start)  # one seed per batch: reproducible, order-dependent
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=args.response_tokens,
                pad_token_id=pad_id,
            )
        for j, (ids, pid) in enumerate(zip(prompts, prompt_ids, strict=True)):
            response = out[j, width:].tolist()
            for cut, tok in enumerate(response):  # keep up to and including the first EOS
                if tok in eos_ids:
                    response = response[: cut + 1]
                    break
            if len(response) < args.min_response_tokens or len(contexts) >= args.num_contexts:
                continue
            contexts.append(_record(len(contexts), pid, ids, response[: args.response_tokens], "student"))
            bar.update(1)
    bar.close()
    return contexts


def _as_list(x: Any) -> list[Any]:
    return [] if x is None else (list(x) if isinstance(x, list | tuple) else [x])


def _record(context_id: int, prompt_id: Any, prompt: list[int], response: list[int], source: str) -> dict[str, Any]:
    return {
        "context_id": context_id,
        "prompt_id": prompt_id,
        "prompt_token_ids": [int(t) for t in prompt],
        "response_token_ids": [int(t) for t in response],
        "source": source,
    }


def contexts_from_token_bank(args: argparse.Namespace) -> list[dict[str, Any]]:
    bank = Path(args.from_token_bank)
    files = sorted(bank.glob("contexts_step*.jsonl"))
    if not files:
        raise ValueError(
            f"{bank}: no contexts_step*.jsonl sidecars; the token bank writer stores prompts only when given "
            "prompt_token_ids (or export with --student --prompts instead)"
        )
    contexts: list[dict[str, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    for f in files:
        for row in read_jsonl(f):
            key = (row.get("rollout_id"), row.get("sample_id"))
            response = row["response_token_ids"][: args.response_tokens]
            if key in seen or len(response) < args.min_response_tokens:
                continue
            seen.add(key)
            pid = row.get("prompt_id")
            pid = pid if pid is not None else f"r{row.get('rollout_id')}s{row.get('sample_id')}"
            contexts.append(_record(len(contexts), pid, row["prompt_token_ids"], response, "token_bank"))
            if len(contexts) >= args.num_contexts:
                return contexts
    return contexts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("num_contexts", "response_tokens", "samples_per_prompt", "batch_size", "min_response_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    contexts = contexts_from_student(args) if args.student else contexts_from_token_bank(args)
    if not contexts:
        raise SystemExit("no contexts exported (all responses shorter than --min-response-tokens?)")
    if len(contexts) < args.num_contexts:
        logger.warning("exported %d contexts, fewer than --num-contexts %d", len(contexts), args.num_contexts)
    write_jsonl(args.out, contexts)
    n_tok = sum(len(c["response_token_ids"]) for c in contexts)
    logger.info("wrote %d contexts (%d response tokens) to %s", len(contexts), n_tok, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
