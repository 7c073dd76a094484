"""Math-evaluation metrics: Avg@k, Pass@k (unbiased), Maj@k with answer clustering.

Pure functions (stdlib + numpy); the equivalence test between two answers is passed in, so
this module knows nothing of math-verify (tools/eval_math.py plugs it in).

Definitions, for one problem with n sampled responses of which c are correct (n >= k):
- Avg@k: mean correctness of the k samples (with n > k: of all n, the unbiased estimate).
- Pass@k: 1 − C(n − c, k)/C(n, k), the unbiased estimator of "at least one of k correct"
  (Chen et al., 2021), computed as a product to stay exact for large n.
- Maj@k: the k first samples' final answers are clustered by equivalence; the largest
  cluster wins (ties: the cluster whose first member came first). Responses without an
  extractable or parseable answer form one INVALID cluster, which takes part in the
  plurality count like any other and scores 0 when it wins. A valid cluster scores the
  correctness of its first member (its representative).
Dataset scores are the unweighted means over problems, in percent.

Answer extraction (`extract_answer`): the content of the last `\\boxed{...}` (or `\\fbox{...}`,
balanced braces) in the response; failing that, the last number in the text (integer,
decimal or a/b fraction, commas as thousands separators removed); failing that, INVALID (None).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "INVALID",
    "ProblemScore",
    "aggregate",
    "avg_at_k",
    "cluster_answers",
    "extract_answer",
    "extract_boxed",
    "majority_cluster",
    "normalize_answer",
    "pass_at_k",
    "score_problem",
    "string_equivalent",
]

INVALID = None  # the answer of a response with no extractable / parseable final answer
Equivalence = Callable[[str, str], bool]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k = 1 − C(n−c, k)/C(n, k) for n samples of which c are correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c, k must be int, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean correctness of the samples (Avg@k when len(correct) == k)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} with balanced braces, or None."""
    result = None
    for match in _BOX_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    result = text[start:i].strip()
                    break
    return result


def extract_answer(text: str | None) -> str | None:
    """Last boxed answer, else last number, else INVALID (None). See the module docstring."""
    if not text:
        return INVALID
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return INVALID
    return re.sub(r"\s+", "", numbers[-1]).replace(",", "")


def normalize_answer(answer: str) -> str:
    """Light normalisation for string comparison: spacing, $, \\left/\\right, \\dfrac, trailing .0."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(left|right|displaystyle|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    return s


def string_equivalent(a: str, b: str) -> bool:
    """Equality after `normalize_answer` (the fallback equivalence when no CAS is available)."""
    return normalize_answer(a) == normalize_answer(b)


def cluster_answers(answers: Sequence[str | None], equivalent: Equivalence) -> list[list[int]]:
    """Greedy equivalence clusters of answer indices, in order of first occurrence.

    A non-INVALID answer joins the first cluster whose representative (first member) is
    equivalent to it; all INVALID answers form one cluster.
    """
    clusters: list[list[int]] = []
    reps: list[str | None] = []
    invalid_at: int | None = None
    for i, ans in enumerate(answers):
        if ans is INVALID:
            if invalid_at is None:
                invalid_at = len(clusters)
                clusters.append([])
                reps.append(INVALID)
            clusters[invalid_at].append(i)
            continue
        for j, rep in enumerate(reps):
            if rep is not INVALID and (rep == ans or equivalent(rep, ans)):
                clusters[j].append(i)
                break
        else:
            clusters.append([i])
            reps.append(ans)
    return clusters


def majority_cluster(answers: Sequence[str | None], equivalent: Equivalence) -> tuple[list[int], bool]:
    """(members of the plurality cluster, whether it is the INVALID cluster); ties → earliest."""
    if len(answers) == 0:
        raise ValueError("majority_cluster needs at least one answer")
    clusters = cluster_answers(answers, equivalent)
    best = max(clusters, key=lambda members: (len(members), -members[0]))
    return best, answers[best[0]] is INVALID


@dataclass(frozen=True)
class ProblemScore:
    n: int
    k: int
    n_correct: int
    avg: float  # Avg@k (fraction)
    pass_k: float  # Pass@k (fraction, unbiased)
    maj: float  # Maj@k (0 or 1)
    majority_size: int
    majority_invalid: bool


def score_problem(
    correct: Sequence[bool], answers: Sequence[str | None], k: int, equivalent: Equivalence
) -> ProblemScore:
    """Avg@k, Pass@k and Maj@k of one problem from per-sample correctness and final answers."""
    n = len(correct)
    if len(answers) != n:
        raise ValueError(f"{len(answers)} answers for {n} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    c = int(sum(bool(x) for x in correct))
    members, is_invalid = majority_cluster(list(answers[:k]), equivalent)
    maj = 0.0 if is_invalid else float(bool(correct[members[0]]))
    return ProblemScore(
        n=n,
        k=k,
        n_correct=c,
        avg=avg_at_k(correct if n > k else correct[:k]),
        pass_k=pass_at_k(n, c, k),
        maj=maj,
        majority_size=len(members),
        majority_invalid=is_invalid,
    )


def aggregate(scores: Sequence[ProblemScore]) -> dict[str, float]:
    """Dataset-level Avg@k / Pass@k / Maj@k in percent (unweighted mean over problems)."""
    if not scores:
        return {"n_problems": 0, "avg": math.nan, "pass": math.nan, "maj": math.nan}
    return {
        "n_problems": len(scores),
        "avg": 100.0 * float(np.mean([s.avg for s in scores])),
        "pass": 100.0 * float(np.mean([s.pass_k for s in scores])),
        "maj": 100.0 * float(np.mean([s.maj for s in scores])),
    }
