"""Math evaluation: Avg@k, Pass@k (unbiased) and Maj@k per dataset (docs/math_eval.md).

Usage:
    # score pre-generated responses
    python tools/eval_math.py --data aime=data/math_sample/aime_sample.jsonl \\
        --responses data/math_sample/aime_sample_responses_k4.jsonl --k 4 --out-dir eval_results/demo
    # sample k answers per problem from a Hugging Face checkpoint (transformers generate, batched)
    python tools/eval_math.py --data aime24.jsonl --model outputs/run_merged --k 12 --out-dir eval_results/run
    # or from an SGLang-compatible server (/generate)
    python tools/eval_math.py --data hmmt25.jsonl --server-url http://127.0.0.1:30000 --k 12 --out-dir ...

Datasets are JSONL (or a JSON list, or parquet with pandas) of AIME/HMMT-style rows; the problem
and answer keys are found automatically (problem/question/prompt, answer/final_answer/solution)
or set with --problem-key/--answer-key; a solution-like answer (with \\boxed{}) is reduced to its
last boxed expression. Answers are compared with math-verify (its signal-based timeouts are
disabled outside the main thread) after a normalised string check. Writes results.csv,
results.md, per_problem.jsonl and responses.jsonl (re-scorable with --responses) to --out-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ta_opd import math_eval as me

logger = logging.getLogger("eval_math")

PROBLEM_KEYS = ("problem", "question", "prompt", "input", "Problem", "Question")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "Answer", "solution", "Solution")
ID_KEYS = ("id", "unique_id", "problem_id", "idx", "ID")
DEFAULT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass
class Problem:
    dataset: str
    id: str
    problem: str
    answer: str


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be a list of objects")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _pick(row: dict, key: str | None, candidates: Sequence[str], what: str, where: str) -> Any:
    if key is not None:
        if key not in row:
            raise ValueError(f"{where}: no {what} key {key!r}; keys are {sorted(row)}")
        return row[key]
    for cand in candidates:
        if cand in row and row[cand] not in (None, ""):
            return row[cand]
    raise ValueError(f"{where}: none of the {what} keys {list(candidates)} found; keys are {sorted(row)}")


def load_dataset(
    name: str,
    path: str | Path,
    problem_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
) -> list[Problem]:
    """Problems of one dataset file; ids default to the row index."""
    path = Path(path)
    problems = []
    for i, row in enumerate(_read_rows(path)):
        where = f"{path}:{i + 1}"
        problem = str(_pick(row, problem_key, PROBLEM_KEYS, "problem", where))
        answer = str(_pick(row, answer_key, ANSWER_KEYS, "answer", where))
        boxed = me.extract_boxed(answer)
        if boxed is not None:  # a full solution: its final boxed expression is the answer
            answer = boxed
        pid = row.get(id_key) if id_key else next((row[k] for k in ID_KEYS if k in row), i)
        problems.append(Problem(dataset=name, id=str(pid), problem=problem, answer=answer.strip()))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def parse_data_arg(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (name = file stem)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec).stem, spec


# --------------------------------------------------------------------------------------------
# Verification (math-verify)
# --------------------------------------------------------------------------------------------


def _mv_timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


class MathVerifier:
    """Answer equivalence: normalised string match, else math-verify on both parsed answers."""

    def __init__(self, use_math_verify: bool = True) -> None:
        self._cache: dict[str, Any] = {}
        self._mv = None
        if use_math_verify:
            import math_verify

            self._mv = math_verify

    def _parse(self, answer: str) -> Any:
        if answer not in self._cache:
            parsed: Any = []
            if self._mv is not None:
                timeout = _mv_timeout()
                for text in (f"${answer}$", answer):
                    try:
                        parsed = self._mv.parse(text, parsing_timeout=timeout)
                    except Exception:  # noqa: BLE001 - math-verify may raise on odd inputs; treat as unparsed
                        parsed = []
                    if parsed:
                        break
            self._cache[answer] = parsed
        return self._cache[answer]

    def equivalent(self, a: str, b: str) -> bool:
        if me.string_equivalent(a, b):
            return True
        pa, pb = self._parse(a), self._parse(b)
        if not pa or not pb or self._mv is None:
            return False
        timeout = _mv_timeout()
        try:
            return bool(self._mv.verify(pa, pb, timeout_seconds=timeout)) or bool(
                self._mv.verify(pb, pa, timeout_seconds=timeout)
            )
        except Exception:  # noqa: BLE001
            return False


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(
    problems: Sequence[Problem], responses: dict[tuple[str, str], list[str]], k: int, equivalent: Callable
) -> tuple[list[dict], list[dict]]:
    """(per-dataset rows, per-problem rows) from responses keyed by (dataset, id)."""
    per_problem, by_dataset = [], {}
    for p in problems:
        texts = responses.get((p.dataset, p.id))
        if texts is None:
            raise ValueError(f"no responses for problem {p.id!r} of dataset {p.dataset!r}")
        if len(texts) < k:
            raise ValueError(f"problem {p.id!r} of {p.dataset!r} has {len(texts)} responses, fewer than k={k}")
        answers = [me.extract_answer(t) for t in texts]
        correct = [a is not me.INVALID and equivalent(p.answer, a) for a in answers]
        s = me.score_problem(correct, answers, k, equivalent)
        by_dataset.setdefault(p.dataset, []).append(s)
        per_problem.append(
            {
                "dataset": p.dataset,
                "id": p.id,
                "gold": p.answer,
                "answers": answers,
                "correct": correct,
                "n": s.n,
                "n_correct": s.n_correct,
                "avg": s.avg,
                "pass": s.pass_k,
                "maj": s.maj,
                "majority_size": s.majority_size,
                "majority_invalid": s.majority_invalid,
            }
        )
    rows = []
    for name, scores in by_dataset.items():
        agg = me.aggregate(scores)
        rows.append(
            {
                "dataset": name,
                "n_problems": agg["n_problems"],
                "k": k,
                "n_samples": min(s.n for s in scores),
                f"avg@{k}": round(agg["avg"], 4),
                f"pass@{k}": round(agg["pass"], 4),
                f"maj@{k}": round(agg["maj"], 4),
            }
        )
    return rows, per_problem


def load_responses(path: str | Path, problems: Sequence[Problem]) -> dict[tuple[str, str], list[str]]:
    """Rows `{"id", "responses": [...]}` or `{"id", "response": "..."}` (optionally with `dataset`)."""
    ids: dict[str, list[str]] = {}
    for p in problems:
        ids.setdefault(p.id, []).append(p.dataset)
    out: dict[tuple[str, str], list[str]] = {}
    for i, row in enumerate(_read_rows(Path(path))):
        pid = str(next((row[k] for k in ID_KEYS if k in row), ""))
        texts = row["responses"] if "responses" in row else [row.get("response", row.get("text"))]
        if texts is None or any(t is not None and not isinstance(t, str) for t in texts):
            raise ValueError(f"{path}:{i + 1}: expected 'responses' (list of strings) or 'response' (string)")
        datasets = [row["dataset"]] if "dataset" in row else ids.get(pid, [])
        if not datasets:
            raise ValueError(f"{path}:{i + 1}: id {pid!r} matches no problem")
        if len(datasets) > 1:
            raise ValueError(f"{path}:{i + 1}: id {pid!r} is in several datasets {datasets}; add a 'dataset' field")
        out.setdefault((datasets[0], pid), []).extend(t or "" for t in texts)
    return out


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def build_prompts(problems: Sequence[Problem], template: str) -> list[str]:
    return [template.format(problem=p.problem) for p in problems]


def generate_hf(
    model_path: str,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    chat_template: bool = True,
) -> list[list[str]]:
    """k sampled completions per prompt with transformers `generate` (left padding, batched)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template and getattr(tok, "chat_template", None):
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    else:
        texts = list(prompts)
    out: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                pad_token_id=tok.pad_token_id,
            )
        completions = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(completions[i * k : (i + 1) * k] for i in range(len(batch)))
    return out


def generate_server(
    url: str,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    api_key: str | None = None,
    timeout: float = 3600.0,
) -> list[list[str]]:
    """k completions per prompt from an SGLang-compatible `/generate` (batched list of texts)."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    params = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        texts = [p for p in batch for _ in range(k)]
        resp = requests.post(
            url.rstrip("/") + "/generate",
            json={"text": texts, "sampling_params": params},
            headers=headers,
            timeout=timeout,
        )
        resp.raise_for_status()
        answers = resp.json()
        if not isinstance(answers, list) or len(answers) != len(texts):
            raise ValueError(f"/generate returned {type(answers).__name__} for {len(texts)} prompts")
        completions = [a["text"] for a in answers]
        out.extend(completions[i * k : (i + 1) * k] for i in range(len(batch)))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(rows: Sequence[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows: list[dict], per_problem: list[dict], responses: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv.tmp", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out_dir / "results.csv.tmp", out_dir / "results.csv")
    _atomic_write(out_dir / "results.md", markdown_table(rows))
    _atomic_write(out_dir / "per_problem.jsonl", "".join(json.dumps(r) + "\n" for r in per_problem))
    lines = [json.dumps({"dataset": d, "id": i, "responses": t}) for (d, i), t in responses.items()]
    _atomic_write(out_dir / "responses.jsonl", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="NAME=PATH or PATH (repeatable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--responses", help="JSONL of pre-generated responses to score")
    src.add_argument("--model", help="HF checkpoint directory to sample from (transformers generate)")
    src.add_argument("--server-url", help="SGLang-compatible server base URL (POST /generate)")
    p.add_argument("--k", type=int, default=12, help="k of Avg@k / Pass@k / Maj@k (default 12)")
    p.add_argument("--n", type=int, default=None, help="samples per problem when generating (>= k; default k)")
    p.add_argument("--problem-key", default=None, help=f"default: first of {list(PROBLEM_KEYS)}")
    p.add_argument("--answer-key", default=None, help=f"default: first of {list(ANSWER_KEYS)}")
    p.add_argument("--id-key", default=None, help=f"default: first of {list(ID_KEYS)}, else the row index")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="str.format template with {problem}")
    p.add_argument("--no-chat-template", action="store_true", help="HF: do not apply the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call / request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("SGLANG_API_KEY"))
    p.add_argument("--no-math-verify", action="store_true", help="compare answers by normalised strings only")
    p.add_argument("--out-dir", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    n = args.n or args.k
    if args.k < 1 or n < args.k:
        raise SystemExit(f"need 1 <= k <= n, got k={args.k}, n={n}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problems: list[Problem] = []
    for spec in args.data:
        name, path = parse_data_arg(spec)
        problems += load_dataset(name, path, args.problem_key, args.answer_key, args.id_key)
    if args.responses:
        responses = load_responses(args.responses, problems)
    else:
        prompts = build_prompts(problems, args.prompt_template)
        common = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        if args.model:
            gens = generate_hf(
                args.model, prompts, n, batch_size=args.batch_size, seed=args.seed,
                chat_template=not args.no_chat_template, **common,
            )  # fmt: skip
        else:
            gens = generate_server(
                args.server_url, prompts, n, batch_size=args.batch_size, api_key=args.api_key, **common
            )
        responses = {(p.dataset, p.id): g for p, g in zip(problems, gens, strict=True)}
    verifier = MathVerifier(use_math_verify=not args.no_math_verify)
    rows, per_problem = score(problems, responses, args.k, verifier.equivalent)
    write_outputs(Path(args.out_dir), rows, per_problem, responses)
    print(markdown_table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
