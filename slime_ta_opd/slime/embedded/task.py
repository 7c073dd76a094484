"""The embedded task: multi-step integer arithmetic with a written chain of intermediate results.

A problem is a left-to-right chain of additions and subtractions; the answer shows every
intermediate result, then the final one after ``#``::

    question  "37+48-19="
    response  "37+48=85;85-19=66;#66"
    label     "66"

Only the final answer is verified (``verify``), so a response with a sloppy chain but the right
answer still counts, as with GSM8K-style ``#### 66`` answers. The chain gives the student many
easy tokens (copied operands, ``=``, ``;``) and a few hard ones (the digits of each result), which
is exactly the mix token selection (docs/method.md §4) is about.

Usage::

    python -m slime.embedded.task --out-dir /tmp/arith --num-train 4000 --num-eval 200 --seed 0
    # writes train.jsonl and eval.jsonl with keys "prompt" and "label"
    # (matching --input-key prompt --label-key label --apply-chat-template)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The final answer follows the last "#"; an optional minus sign is allowed so that a wrong
# negative answer parses (and is judged wrong) rather than failing to parse.
_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the arithmetic task.

    ``min_terms``/``max_terms``: operands per problem (2 → one step, 3 → two steps, ...).
    ``max_operand``: operands are drawn from ``[0, max_operand]``.
    ``ops``: the operators used, a subset of "+-".
    ``max_value``: every intermediate result stays in ``[0, max_value]`` (problems are redrawn
    until they do), which bounds the number of digits a result can have.
    """

    min_terms: int = 2
    max_terms: int = 3
    max_operand: int = 49
    ops: str = "+-"
    max_value: int = 99

    def validate(self) -> TaskConfig:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or set(self.ops) - {"+", "-"}:
            raise ValueError(f"ops must be a non-empty subset of '+-', got {self.ops!r}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand})")
        return self


@dataclass(frozen=True)
class Problem:
    question: str  # "37+48-19="
    chain: str  # "37+48=85;85-19=66;#66" (the target response, without EOS)
    answer: int

    @property
    def label(self) -> str:
        return str(self.answer)


def solve(operands: Sequence[int], ops: Sequence[str]) -> Problem:
    """The problem and its reference chain for ``operands[0] ops[0] operands[1] ...`` (left to right)."""
    if len(operands) != len(ops) + 1 or len(operands) < 2:
        raise ValueError(f"need len(operands) == len(ops) + 1 >= 2, got {len(operands)} operands, {len(ops)} ops")
    question = str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:], strict=True)) + "="
    value = operands[0]
    steps = []
    for op, b in zip(ops, operands[1:], strict=True):
        if op == "+":
            new = value + b
        elif op == "-":
            new = value - b
        else:
            raise ValueError(f"unknown operator {op!r}; expected '+' or '-'")
        steps.append(f"{value}{op}{b}={new};")
        value = new
    return Problem(question=question, chain="".join(steps) + f"#{value}", answer=value)


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    """Draw one problem whose intermediate results all lie in ``[0, cfg.max_value]``."""
    n_terms = rng.randint(cfg.min_terms, cfg.max_terms)
    while True:
        operands = [rng.randint(0, cfg.max_operand) for _ in range(n_terms)]
        ops = [rng.choice(cfg.ops) for _ in range(n_terms - 1)]
        value, ok = operands[0], True
        for op, b in zip(ops, operands[1:], strict=True):
            value = value + b if op == "+" else value - b
            ok = ok and 0 <= value <= cfg.max_value
        if ok:
            return solve(operands, ops)


def generate_splits(
    num_train: int, num_eval: int, seed: int = 0, cfg: TaskConfig | None = None
) -> tuple[list[Problem], list[Problem]]:
    """Seeded, disjoint train / held-out splits (no held-out question appears in train)."""
    cfg = (cfg or TaskConfig()).validate()
    rng = random.Random(seed)
    eval_set: list[Problem] = []
    seen: set[str] = set()
    # Held-out first, deduplicated, so that the held-out set does not depend on num_train.
    attempts = 0
    while len(eval_set) < num_eval:
        p = sample_problem(rng, cfg)
        attempts += 1
        if p.question not in seen:
            seen.add(p.question)
            eval_set.append(p)
        elif attempts > 100 * (num_eval + 10):
            raise ValueError(f"cannot draw {num_eval} distinct held-out problems from {cfg}")
    train = []
    while len(train) < num_train:
        p = sample_problem(rng, cfg)
        if p.question not in seen:  # train may repeat itself, never a held-out question
            train.append(p)
    return train, eval_set


def to_record(problem: Problem) -> dict[str, Any]:
    """A JSONL row: ``prompt`` (the question, a user message), ``label`` (the final answer)."""
    return {"prompt": problem.question, "label": problem.label, "metadata": {"chain": problem.chain}}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(
    out_dir: str | os.PathLike, num_train: int, num_eval: int, seed: int = 0, cfg: TaskConfig | None = None
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; returns both paths."""
    train, held_out = generate_splits(num_train, num_eval, seed, cfg)
    out = Path(out_dir)
    return (
        write_jsonl((to_record(p) for p in train), out / "train.jsonl"),
        write_jsonl((to_record(p) for p in held_out), out / "eval.jsonl"),
    )


# --------------------------------------------------------------------------- prompts


def chat_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def build_prompt(question: str, tokenizer: Any | None = None) -> str:
    """The prompt text the model sees: the tokenizer's chat template applied to the question.

    With ``tokenizer=None`` the embedded tokenizer's ChatML template is used, so the text is the
    same as ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` on an embedded
    checkpoint (and as slime's ``--apply-chat-template`` produces).
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- verification


def extract_answer(response_text: str) -> int | None:
    """The integer after the last ``#`` in a response, or None when there is none."""
    matches = _ANSWER_RE.findall(response_text)
    return int(matches[-1]) if matches else None


def verify(response_text: str, label: str | int) -> bool:
    """True when the response's final answer (after the last ``#``) equals ``label``."""
    answer = extract_answer(response_text)
    if answer is None:
        return False
    try:
        return answer == int(str(label).strip())
    except ValueError:
        return False


def chain_is_valid(response_text: str) -> bool:
    """True when every written step ``a op b = c`` of a response is arithmetically right."""
    steps = re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+);", response_text)
    if not steps:
        return False
    return all((int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) for a, op, b, c in steps)


def _score(sample: Any) -> float:
    return 1.0 if verify(sample.response or "", sample.label) else 0.0


async def reward_func(args: Any, sample: Any, **kwargs: Any) -> float | list[float]:
    """``--custom-rm-path slime.embedded.task.reward_func``: 1.0 for a correct final answer, else 0.0.

    Takes one ``Sample`` (or a list of them, for group reward models) and reads ``sample.response``
    and ``sample.label``. Used for evaluation accuracy; with pure distillation the training
    reward comes from the teacher instead.
    """
    if isinstance(sample, list):
        return [_score(s) for s in sample]
    return _score(sample)


def accuracy(responses: Sequence[str], labels: Sequence[str | int]) -> float:
    """Share of responses whose final answer matches its label."""
    if len(responses) != len(labels):
        raise ValueError(f"got {len(responses)} responses for {len(labels)} labels")
    if not responses:
        return 0.0
    return sum(verify(r, y) for r, y in zip(responses, labels, strict=True)) / len(responses)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    defaults = TaskConfig()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    ns = parser.parse_args(argv)
    cfg = TaskConfig(**{f: getattr(ns, f) for f in asdict(defaults)})
    train, held_out = write_splits(ns.out_dir, ns.num_train, ns.num_eval, ns.seed, cfg)
    print(f"wrote {train} and {held_out}")


if __name__ == "__main__":
    main()
