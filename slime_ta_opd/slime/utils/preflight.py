"""Fail-closed pre-flight checks of a student/teacher pair before OPD training (docs/preflight.md).

Each check returns a ``CheckResult`` (PASS / WARN / FAIL / SKIP with the measured number). A FAIL
stops the run unless the user downgrades that check by name (``--preflight-warn NAME``). The
check functions are pure: they take tokenizers, numbers and SGLang-shaped answer lists, so the
standalone tool (``tools/opd_preflight.py``), ``train.py`` and tests share them. The HTTP side
(real rollouts from the student server, teacher scoring through the OPD module itself) lives in
``slime.utils.preflight_probe``; ``run_preflight(args, rollout_manager)`` is the ``train.py`` hook.

Checks, in order: ``tokenizer``, ``eos_pad``, ``padded_vocab``, ``chat_template``,
``position_alignment``, ``determinism``, ``topk``, ``teacher_temperature``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

CHECK_NAMES = (
    "tokenizer",
    "eos_pad",
    "padded_vocab",
    "chat_template",
    "position_alignment",
    "determinism",
    "topk",
    "teacher_temperature",
)

# Defaults of the numeric tolerances (the CLI exposes them; train.py uses these).
POSITION_TOL = 0.05  # mean |log p_copy - log p_rollout| (nats) at the right position; bf16 engines reach ~1e-2
SAMPLED_KL_TOL = 0.01  # |mean(log p_S - log p_T)| with teacher = student copy
DETERMINISM_REL_TOL = 0.05  # repeat spread allowed, as a fraction of the mean OPD signal |log p_T - log p_S|
DETERMINISM_ABS_TOL = 1e-3  # floor of that tolerance (nats), for pairs whose signal is tiny
TEMPERATURE_REL_TOL = 0.05  # measured effective teacher temperature vs requested
TOPK_SORT_TOL = 1e-5
TOPK_MATCH_TOL = 1e-4  # the sampled token's log-prob vs its entry in the same position's top-K list

# Conversations rendered by both chat templates (check_chat_template): one turn, a system prompt,
# and a multi-turn history, which is where templates most often differ (thinking tags, separators).
DEFAULT_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 17 + 25? Put the answer in \\boxed{}."},),
    (
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "Solve x^2 - 5x + 6 = 0."},
    ),
    (
        {"role": "user", "content": "Compute 3 * 4."},
        {"role": "assistant", "content": "3 * 4 = 12, so the answer is \\boxed{12}."},
        {"role": "user", "content": "And 12 / 4?"},
    ),
)


@dataclass
class CheckResult:
    """One check's outcome: ``status`` with the measured number(s) in ``measured`` and the why in ``detail``."""

    name: str
    status: str
    measured: str
    detail: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.status:<4} {self.name:<19} {self.measured}"
        if self.detail:
            text += "\n" + "\n".join("     " + row for row in self.detail.splitlines())
        return text


@dataclass
class PreflightReport:
    """All check results of one pre-flight; ``ok`` is False when any check FAILs (after downgrades)."""

    results: list[CheckResult]
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == FAIL]

    def get(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check {name!r} in this report; checks: {[r.name for r in self.results]}")

    def format(self) -> str:
        head = f"OPD pre-flight ({self.elapsed_s:.1f} s): " + (
            "all checks passed" if self.ok else f"FAILED: {', '.join(self.failed)}"
        )
        tail = ""
        if not self.ok:
            tail = (
                "\nThe run is stopped. Fix the pair, or downgrade a check you accept with "
                + " ".join(f"--preflight-warn {n}" for n in self.failed)
                + " (or --skip-preflight to skip all; see docs/preflight.md)."
            )
        return "\n".join([head] + [r.line() for r in self.results]) + tail

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "elapsed_s": self.elapsed_s,
            "checks": [
                {"name": r.name, "status": r.status, "measured": r.measured, "detail": r.detail, "values": r.values}
                for r in self.results
            ],
        }


class PreflightError(RuntimeError):
    """Raised when a pre-flight check FAILs; ``report`` holds every result."""

    def __init__(self, report: PreflightReport):
        super().__init__(report.format())
        self.report = report


def validate_check_names(names: Iterable[str]) -> list[str]:
    names = list(names or [])
    unknown = sorted(set(names) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown pre-flight check name(s) {unknown}; expected some of {list(CHECK_NAMES)}")
    return names


def apply_downgrades(results: Sequence[CheckResult], warn: Iterable[str]) -> list[CheckResult]:
    """FAIL → WARN for every check named in ``warn`` (``--preflight-warn NAME``), saying so."""
    warn = set(validate_check_names(warn))
    out = []
    for r in results:
        if r.status == FAIL and r.name in warn:
            r = replace(
                r, status=WARN, detail=(r.detail + "\n" if r.detail else "") + "(FAIL downgraded by --preflight-warn)"
            )
        out.append(r)
    return out


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


# ------------------------------------------------------------------------------------------------
# Tokenizer checks (pure functions of two HF tokenizers)
# ------------------------------------------------------------------------------------------------


def _special_tokens(tok: Any) -> dict[int, str]:
    """id → content of every added/special token."""
    out: dict[int, str] = {}
    for tid, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        out[int(tid)] = str(getattr(added, "content", added))
    for text in getattr(tok, "all_special_tokens", []) or []:
        tid = tok.convert_tokens_to_ids(text)
        if tid is not None:
            out[int(tid)] = str(text)
    return out


def check_tokenizer(student_tok: Any, teacher_tok: Any) -> CheckResult:
    """Same vocabulary (token → id) and the same special/added tokens: OPD compares token *ids*."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    only_s = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)
    only_t = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)
    moved = sorted((tok for tok in set(s_vocab) & set(t_vocab) if s_vocab[tok] != t_vocab[tok]), key=s_vocab.get)
    s_special, t_special = _special_tokens(student_tok), _special_tokens(teacher_tok)
    special_diff = sorted(tid for tid in set(s_special) | set(t_special) if s_special.get(tid) != t_special.get(tid))
    n_diff = len(only_s) + len(only_t) + len(moved)
    measured = (
        f"vocab {len(s_vocab)} vs {len(t_vocab)} tokens, {n_diff} differing; "
        f"special/added tokens {len(s_special)} vs {len(t_special)}, {len(special_diff)} differing"
    )
    values = {"student_vocab": len(s_vocab), "teacher_vocab": len(t_vocab), "differing": n_diff}
    if n_diff == 0 and not special_diff:
        return CheckResult("tokenizer", PASS, measured, values=values)
    lines = []
    if moved:
        lines.append(
            "same token, other id: "
            + ", ".join(f"{tok!r} student {s_vocab[tok]} / teacher {t_vocab[tok]}" for tok in moved[:5])
        )
    if only_s:
        lines.append("only in the student: " + ", ".join(f"{tok!r} ({s_vocab[tok]})" for tok in only_s[:5]))
    if only_t:
        lines.append("only in the teacher: " + ", ".join(f"{tok!r} ({t_vocab[tok]})" for tok in only_t[:5]))
    if special_diff:
        lines.append(
            "special tokens: "
            + ", ".join(
                f"id {i}: student {s_special.get(i)!r} / teacher {t_special.get(i)!r}" for i in special_diff[:5]
            )
        )
    lines.append(
        "OPD scores the student's token ids with the teacher: with another tokenizer the teacher's log-prob "
        "at each position is that of a different token. Use a teacher from the same tokenizer family."
    )
    return CheckResult("tokenizer", FAIL, measured, "\n".join(lines), values)


def _token_name(tok: Any, tid: int | None) -> str:
    if tid is None:
        return "None"
    try:
        return f"{tok.convert_ids_to_tokens(int(tid))!r} ({tid})"
    except Exception:  # an id outside this tokenizer
        return f"<id {tid}>"


def check_eos_pad(
    student_tok: Any,
    teacher_tok: Any,
    student_generation_eos: Sequence[int] | None = None,
    teacher_generation_eos: Sequence[int] | None = None,
) -> CheckResult:
    """Same stop tokens (tokenizer EOS ∪ generation_config eos_token_id) on both sides; pad compared too.

    A base student (EOS ``<|endoftext|>``) with an instruct teacher (EOS ``<|im_end|>``) is the classic case:
    the teacher never puts mass on the student's stop token, OPD teaches the student not to stop, and
    response lengths run away.
    """
    s_eos = {int(t) for t in (student_generation_eos or [])} | (
        {int(student_tok.eos_token_id)} if student_tok.eos_token_id is not None else set()
    )
    t_eos = {int(t) for t in (teacher_generation_eos or [])} | (
        {int(teacher_tok.eos_token_id)} if teacher_tok.eos_token_id is not None else set()
    )
    s_pad, t_pad = student_tok.pad_token_id, teacher_tok.pad_token_id

    def names(tok: Any, ids: set[int]) -> str:
        return "{" + ", ".join(_token_name(tok, i) for i in sorted(ids)) + "}"

    measured = (
        f"stop ids student {names(student_tok, s_eos)} vs teacher {names(teacher_tok, t_eos)}; pad {s_pad} vs {t_pad}"
    )
    values = {"eos_equal": float(s_eos == t_eos), "pad_equal": float(s_pad == t_pad)}
    if not s_eos or not t_eos:
        return CheckResult(
            "eos_pad",
            FAIL,
            measured,
            "a side has no EOS token: the rollout cannot stop on it and the teacher cannot score stopping",
            values,
        )
    if s_eos != t_eos:
        detail = (
            "EOS differs: the teacher assigns little probability to the student's stop token (and vice versa), so "
            "the OPD advantage at the end of every response pushes the student not to stop: runaway response "
            "lengths (typical of a base student with an instruct teacher). Use matching base/instruct variants, or "
            "set the same eos_token in both tokenizer_config.json / generation_config.json."
        )
        return CheckResult("eos_pad", FAIL, measured, detail, values)
    if s_pad != t_pad:
        return CheckResult(
            "eos_pad",
            WARN,
            measured,
            "pad ids differ; pad tokens only fill batches and are never scored, so this is usually harmless",
            values,
        )
    return CheckResult("eos_pad", PASS, measured, values=values)


def check_padded_vocab(
    student_tok: Any, teacher_tok: Any, student_rows: int | None, teacher_rows: int | None
) -> CheckResult:
    """Model embedding rows vs tokenizer size: padding (151,936 vs 152,064 rows for one Qwen tokenizer) is harmless.

    What matters is that every id the tokenizer can produce is a row of both models and that the two
    tokenizers are the same (``tokenizer``); rows past the tokenizer are never sampled into a prompt and
    hold ~0 probability, so comparing log-probs by token id stays exact.
    """
    s_ids = list(student_tok.get_vocab().values()) + list(_special_tokens(student_tok))
    t_ids = list(teacher_tok.get_vocab().values()) + list(_special_tokens(teacher_tok))
    max_id = max(s_ids + t_ids)
    same_tokenizer = student_tok.get_vocab() == teacher_tok.get_vocab()
    measured = (
        f"model rows student {student_rows if student_rows is not None else '?'} / teacher "
        f"{teacher_rows if teacher_rows is not None else '?'}; tokenizer {len(student_tok)} / {len(teacher_tok)} "
        f"tokens, largest id {max_id}"
    )
    values = {"max_tokenizer_id": float(max_id)}
    if student_rows is not None:
        values["student_rows"] = float(student_rows)
    if teacher_rows is not None:
        values["teacher_rows"] = float(teacher_rows)
    short = [(side, rows) for side, rows in (("student", student_rows), ("teacher", teacher_rows)) if rows is not None]
    for side, rows in short:
        if max_id >= rows:
            return CheckResult(
                "padded_vocab",
                FAIL,
                measured,
                f"tokenizer id {max_id} is not a row of the {side} model ({rows} rows): the {side} cannot score it",
                values,
            )
    unknown = [side for side, rows in (("student", student_rows), ("teacher", teacher_rows)) if rows is None]
    if unknown:
        return CheckResult(
            "padded_vocab",
            WARN,
            measured,
            f"the {' and '.join(unknown)} model's vocabulary size is unknown (no config.json here, no vocab_size in "
            "/get_model_info); top-K ids are checked against the tokenizer size instead",
            values,
        )
    if student_rows != teacher_rows:
        if not same_tokenizer:
            return CheckResult(
                "padded_vocab",
                FAIL,
                measured,
                "the model vocabularies differ AND the tokenizers differ (see tokenizer): not a padding difference",
                values,
            )
        return CheckResult(
            "padded_vocab",
            PASS,
            measured,
            f"padded vocabulary: the models have {student_rows} and {teacher_rows} embedding rows for one tokenizer "
            f"of {len(student_tok)} tokens (largest id {max_id}). The extra rows are padding for matrix shapes, never "
            "produced by the tokenizer; OPD compares log-probs by token id, so this is harmless.",
            values,
        )
    return CheckResult("padded_vocab", PASS, measured, values=values)


def render_chat(tok: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Render as the data source does: template text (generation prompt on), then ids without added specials."""
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def check_chat_template(
    student_tok: Any, teacher_tok: Any, conversations: Sequence[Sequence[dict[str, str]]] = DEFAULT_CONVERSATIONS
) -> CheckResult:
    """The same conversations rendered by the student's and the teacher's chat template give the same ids.

    The teacher scores the student's prompt ids; a teacher whose own template differs sees an
    out-of-distribution prompt on every sample (a bias of ~0.3 nats/token in one published case).
    """
    s_has, t_has = bool(getattr(student_tok, "chat_template", None)), bool(getattr(teacher_tok, "chat_template", None))
    if not s_has and not t_has:
        return CheckResult("chat_template", PASS, "no chat template on either side (raw prompts): nothing to compare")
    if s_has != t_has:
        side = "student" if not s_has else "teacher"
        return CheckResult(
            "chat_template",
            FAIL,
            f"the {side} tokenizer has no chat template, the other has one",
            "prompts rendered with the student's template are not the format the teacher was trained on",
        )
    n_ids = 0
    for i, conv in enumerate(conversations):
        try:
            s_ids = render_chat(student_tok, conv)
        except Exception as e:
            return CheckResult("chat_template", FAIL, f"the student template cannot render conversation {i}: {e}")
        try:
            t_ids = render_chat(teacher_tok, conv)
        except Exception as e:
            return CheckResult("chat_template", FAIL, f"the teacher template cannot render conversation {i}: {e}")
        n_ids += len(s_ids)
        if s_ids != t_ids:
            j = next(
                (k for k, (a, b) in enumerate(zip(s_ids, t_ids, strict=False)) if a != b), min(len(s_ids), len(t_ids))
            )
            lo = max(0, j - 8)
            s_at = s_ids[j] if j < len(s_ids) else "end"
            t_at = t_ids[j] if j < len(t_ids) else "end"
            s_show = repr(student_tok.decode(s_ids[lo:j])) + " | " + repr(student_tok.decode(s_ids[j : j + 12]))
            t_show = repr(teacher_tok.decode(t_ids[lo:j])) + " | " + repr(teacher_tok.decode(t_ids[j : j + 12]))
            detail = (
                f"conversation {i} ({[m['role'] for m in conv]}): first difference at id {j} "
                f"(student {s_at} vs teacher {t_at})\n"
                f"student: {s_show}\nteacher: {t_show}\n"
                "The teacher scores prompts in the student's format; use a pair whose templates agree, or give the "
                "student the teacher's chat_template (tokenizer_config.json)."
            )
            return CheckResult(
                "chat_template",
                FAIL,
                f"conversation {i}: {len(s_ids)} vs {len(t_ids)} ids, first difference at id {j}",
                detail,
                {"first_difference": float(j)},
            )
    return CheckResult(
        "chat_template",
        PASS,
        f"{len(conversations)} conversations, {n_ids} ids, identical on both templates",
        values={"ids": float(n_ids)},
    )


# ------------------------------------------------------------------------------------------------
# Checks on server answers (pure functions of per-sample lists)
# ------------------------------------------------------------------------------------------------


def _mean_abs_diff(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], offset: int
) -> tuple[float, float, int]:
    """mean and max |a[i][t] - b[i][t + offset]| over positions where both exist."""
    total, worst, n = 0.0, 0.0, 0
    for row_a, row_b in zip(a, b, strict=True):
        for t, x in enumerate(row_a):
            u = t + offset
            if 0 <= u < len(row_b):
                d = abs(float(x) - float(row_b[u]))
                if not math.isfinite(d):
                    d = math.inf
                total += d
                worst = max(worst, d)
                n += 1
    return (total / n if n else math.nan), worst, n


def check_position_alignment(
    rollout_logprobs: Sequence[Sequence[float]],
    extracted_logprobs: Sequence[Sequence[float]],
    tol: float = POSITION_TOL,
    kl_tol: float = SAMPLED_KL_TOL,
) -> CheckResult:
    """Teacher = student copy: the OPD module's teacher log-probs must equal the rollout's at every position.

    ``rollout_logprobs[i][t]``: the student engine's log-prob of response token t of rollout i (sampled at
    T = 1); ``extracted_logprobs[i][t]``: what the project's teacher-scoring path (request + extraction)
    gives for the same token when the "teacher" is the student. The mismatch is also measured one position
    off either way: an off-by-one extraction matches a shifted copy better than the aligned one.
    """
    lengths_r = [len(r) for r in rollout_logprobs]
    lengths_e = [len(r) for r in extracted_logprobs]
    if lengths_r != lengths_e:
        bad = next(i for i, (a, b) in enumerate(zip(lengths_r, lengths_e, strict=True)) if a != b)
        return CheckResult(
            "position_alignment",
            FAIL,
            f"rollout {bad}: {lengths_e[bad]} teacher log-probs for {lengths_r[bad]} response tokens",
            "the extraction does not return one log-prob per response token",
        )
    n_tokens = sum(lengths_r)
    if n_tokens == 0:
        return CheckResult("position_alignment", FAIL, "the student's rollouts have no response tokens to compare")
    mean0, max0, _ = _mean_abs_diff(rollout_logprobs, extracted_logprobs, 0)
    shifted = {d: _mean_abs_diff(rollout_logprobs, extracted_logprobs, d)[0] for d in (-1, 1)}
    kl = sum(
        float(s) - float(t)
        for rs, rt in zip(rollout_logprobs, extracted_logprobs, strict=True)
        for s, t in zip(rs, rt, strict=True)
    )
    kl /= n_tokens
    best = min([(mean0, 0)] + [(v, d) for d, v in shifted.items() if math.isfinite(v)])
    one_off = min((v for v in shifted.values() if math.isfinite(v)), default=math.nan)
    measured = (
        f"mean |Δ log p| = {_fmt(mean0)} (max {_fmt(max0)}) at the right position vs {_fmt(one_off)} one position "
        f"off; sampled KL = {_fmt(kl)} over {n_tokens} tokens of {len(lengths_r)} rollouts"
    )
    values = {"mean_abs_diff": mean0, "max_abs_diff": max0, "one_off_mean_abs_diff": one_off, "sampled_kl": kl}
    problems = []
    if best[1] != 0 and best[0] < mean0:
        # extracted[t + d] matches rollout[t]: d = +1 → token t got the log-prob of token t - 1 (read early)
        way = "early: token t gets the log-prob of token t-1" if best[1] > 0 else "late: token t gets token t+1's"
        problems.append(
            f"the extracted log-probs match the rollout's at offset {best[1]:+d} (mean |Δ| {_fmt(best[0])}): the "
            f"teacher-scoring extraction is off by one, reading one position {way}. Every token is then "
            "supervised with its neighbour's teacher log-prob (a one-token response loses all signal)."
        )
    if not mean0 <= tol:
        problems.append(f"mean |Δ log p| {_fmt(mean0)} > tolerance {tol} (teacher = student copy must agree)")
    if not abs(kl) <= kl_tol:
        problems.append(f"|sampled KL| {_fmt(abs(kl))} > tolerance {kl_tol} (teacher = student copy must give ~0)")
    if problems:
        return CheckResult("position_alignment", FAIL, measured, "\n".join(problems), values)
    return CheckResult("position_alignment", PASS, measured, values=values)


def check_determinism(
    runs: dict[str, Sequence[Sequence[float]]],
    opd_signal: float,
    rel_tol: float = DETERMINISM_REL_TOL,
    abs_tol: float = DETERMINISM_ABS_TOL,
) -> CheckResult:
    """The same scoring request, repeated and on every teacher replica, must agree to much less than the signal.

    ``runs``: label (e.g. ``"http://t0 #2"``) → per-sample teacher log-probs of the sampled tokens; the
    first run is the reference. ``opd_signal``: mean |log p_T − log p_S| over the same tokens (the
    typical OPD advantage magnitude). Tolerance = max(abs_tol, rel_tol · signal) on the mean spread.
    """
    labels = list(runs)
    if len(labels) < 2:
        return CheckResult("determinism", FAIL, f"{len(labels)} teacher answer(s): need at least two to compare")
    ref = runs[labels[0]]
    worst_mean, worst_max, worst_label = 0.0, 0.0, labels[1]
    for label in labels[1:]:
        mean_d, max_d, _ = _mean_abs_diff(ref, runs[label], 0)
        if not math.isfinite(mean_d) or mean_d > worst_mean or (mean_d == worst_mean and max_d > worst_max):
            worst_mean, worst_max, worst_label = mean_d, max_d, label
    tolerance = max(abs_tol, rel_tol * float(opd_signal))
    measured = (
        f"spread mean |Δ| = {_fmt(worst_mean)} (max {_fmt(worst_max)}) over {len(labels)} answers vs tolerance "
        f"{_fmt(tolerance)} = max({abs_tol}, {rel_tol} × OPD signal {_fmt(opd_signal)})"
    )
    values = {"spread_mean": worst_mean, "spread_max": worst_max, "tolerance": tolerance, "opd_signal": opd_signal}
    if not worst_mean <= tolerance:
        detail = (
            f"{worst_label} disagrees with {labels[0]}: the teacher's noise is "
            f"{_fmt(worst_mean / max(opd_signal, 1e-12))}× the OPD signal, so the advantage carries scoring noise. "
            "Use deterministic inference on the "
            "teacher (same dtype/kernels on every replica, no nondeterministic attention), or score on one replica."
        )
        return CheckResult("determinism", FAIL, measured, detail, values)
    return CheckResult("determinism", PASS, measured, values=values)


def check_topk(
    lists: Sequence[Sequence[Any]],
    k: int,
    vocab_rows: int,
    sampled: Sequence[Sequence[tuple[int, float]]] | None = None,
    source: str = "teacher",
) -> CheckResult:
    """Top-K lists of every response position: exactly K entries, sorted desc, ids in range, finite, a distribution.

    ``lists[i][t]``: SGLang entries ``[[logprob, id, text], ...]`` of sample i at response position t;
    ``sampled[i][t]``: (id, log-prob) of the sampled token there — when it is in the list, both log-probs
    must agree (a list taken from another position would not).
    """
    expected = min(k, vocab_rows)
    counts = {"short_or_long": 0, "unsorted": 0, "id_out_of_range": 0, "nonfinite": 0, "duplicate": 0,
              "not_a_distribution": 0, "sampled_mismatch": 0}  # fmt: skip
    first: dict[str, str] = {}
    n_pos = 0
    for i, sample_lists in enumerate(lists):
        for t, entries in enumerate(sample_lists):
            n_pos += 1
            where = f"sample {i} position {t}"

            def bad(kind: str, what: str, where: str = where) -> None:
                counts[kind] += 1
                first.setdefault(kind, f"{where}: {what}")

            if entries is None:
                bad("short_or_long", "no list")
                continue
            if len(entries) != expected:
                bad("short_or_long", f"{len(entries)} entries, expected {expected}")
            vals, ids = [], []
            for e in entries:
                lp = e[0] if isinstance(e, list | tuple) and e else None
                tid = e[1] if isinstance(e, list | tuple) and len(e) > 1 else None
                if lp is None or not isinstance(lp, int | float) or not math.isfinite(lp) or lp > 1e-4:
                    bad("nonfinite", f"log-prob {lp!r}")
                    continue
                if not isinstance(tid, int) or not 0 <= tid < vocab_rows:
                    bad("id_out_of_range", f"id {tid!r} not in [0, {vocab_rows})")
                    continue
                vals.append(float(lp))
                ids.append(tid)
            if any(b > a + TOPK_SORT_TOL for a, b in zip(vals, vals[1:], strict=False)):
                bad("unsorted", f"log-probs {[round(v, 4) for v in vals[:5]]} ... not descending")
            if len(set(ids)) != len(ids):
                bad("duplicate", "an id appears twice")
            if vals and sum(math.exp(v) for v in vals) > 1.0 + 1e-3:
                bad("not_a_distribution", f"probabilities sum to {sum(math.exp(v) for v in vals):.4f} > 1")
            if sampled is not None and t < len(sampled[i]):
                sid, slp = sampled[i][t]
                if sid in ids and abs(vals[ids.index(sid)] - float(slp)) > TOPK_MATCH_TOL:
                    bad(
                        "sampled_mismatch",
                        f"token {sid}: {vals[ids.index(sid)]:.5f} in the top-K, {float(slp):.5f} as the sampled token",
                    )
    n_bad = sum(counts.values())
    measured = f"{source}: {n_pos} positions, K = {expected} requested, {n_bad} violation(s), ids < {vocab_rows}"
    values = {"positions": float(n_pos), "violations": float(n_bad)}
    if n_pos == 0:
        return CheckResult("topk", FAIL, f"{source}: no top-K lists returned for {k} requested", values=values)
    if n_bad:
        detail = "\n".join(f"{kind}: {counts[kind]} (first: {first[kind]})" for kind in counts if counts[kind])
        detail += "\nThe selectors read these lists as each side's top-K distribution (METHOD.md §2)."
        return CheckResult("topk", FAIL, measured, detail, values)
    return CheckResult("topk", PASS, measured, values=values)


def check_teacher_temperature(
    temperature: float,
    rollout_temperature: float,
    base: Sequence[Sequence[float]] | None = None,
    scaled: Sequence[Sequence[float]] | None = None,
    base_top: Sequence[Sequence[Any]] | None = None,
    scaled_top: Sequence[Sequence[Any]] | None = None,
    rel_tol: float = TEMPERATURE_REL_TOL,
) -> CheckResult:
    """``--opd-teacher-temperature T != 1``: the teacher's scores must change, by exactly logits / T.

    ``base``/``scaled``: the teacher's sampled-token log-probs for the same requests without and with the
    temperature; ``*_top``: their top-K lists. Temperature keeps the ranking, and log-prob gaps scale as
    1/T: gap_1 / gap_T over the top-K estimates the temperature the server really applied.
    """
    if temperature == 1.0:
        if rollout_temperature != 1.0:
            return CheckResult(
                "teacher_temperature",
                WARN,
                f"rollout temperature {rollout_temperature}, teacher scores at T = 1",
                "the rollout log-probs (log p_S) are at the sampling temperature, the teacher's at T = 1: the OPD "
                f"advantage mixes temperatures. Pass --opd-teacher-temperature {rollout_temperature} to score the "
                "teacher at the sampling temperature (needs a server that applies it: see teacher_temperature).",
            )
        return CheckResult("teacher_temperature", SKIP, "T = 1 requested: nothing to apply")
    if base is None or scaled is None:
        return CheckResult("teacher_temperature", FAIL, f"T = {temperature}: no teacher answers to compare")
    mean_d, max_d, n = _mean_abs_diff(base, scaled, 0)
    values = {"requested": temperature, "max_change": max_d}
    if not max_d > 1e-6:
        detail = (
            f"--opd-teacher-temperature {temperature} is ignored by the teacher server: its prefill log-probs are "
            "identical at T = 1 and T = {0}. A real SGLang engine has no input-log-prob temperature (it drops the "
            "request field `logprob_temperature`; a router in front drops it too), so the teacher would be "
            "scored at T = 1 while the run believes otherwise. Serve the teacher with this project's embedded "
            "server (it applies `logprob_temperature`, or `custom_labels.logprob_temperature` through a router), "
            "or run with --opd-teacher-temperature 1."
        ).format(temperature)
        return CheckResult(
            "teacher_temperature", FAIL, f"T = {temperature}: max |Δ log p| vs T = 1 is {_fmt(max_d)} over {n} tokens",
            detail, values,
        )  # fmt: skip
    ratios = []
    for rows_1, rows_t in zip(base_top or [], scaled_top or [], strict=False):
        for e1, et in zip(rows_1, rows_t, strict=False):
            if not e1 or not et or len(e1) < 2 or len(et) < 2:
                continue
            g1 = float(e1[0][0]) - float(e1[-1][0])
            gt = float(et[0][0]) - float(et[-1][0])
            if g1 > 1e-3 and gt > 1e-6:
                ratios.append(g1 / gt)
    if not ratios:
        return CheckResult(
            "teacher_temperature",
            WARN,
            f"T = {temperature}: scores change (max |Δ| {_fmt(max_d)}) but no top-K gaps to measure the applied T",
            values=values,
        )
    ratios.sort()
    applied = ratios[len(ratios) // 2]
    values["applied"] = applied
    measured = f"requested T = {temperature}, applied T = {applied:.4g} (median over {len(ratios)} top-K gaps)"
    if abs(applied - temperature) > rel_tol * temperature:
        return CheckResult(
            "teacher_temperature",
            FAIL,
            measured,
            "the teacher's scores change, but not as log_softmax(logits / T): the server applies something else",
            values,
        )
    status = PASS
    detail = ""
    if rollout_temperature != temperature:
        status = WARN
        detail = f"the rollout samples at T = {rollout_temperature}, the teacher scores at T = {temperature}"
    return CheckResult("teacher_temperature", status, measured, detail, values)


# ------------------------------------------------------------------------------------------------
# The train.py hook
# ------------------------------------------------------------------------------------------------


def preflight_applies(args: Any) -> bool:
    """Pre-flight needs a teacher server: ``--use-opd --opd-type sglang``."""
    return bool(getattr(args, "use_opd", False)) and getattr(args, "opd_type", None) == "sglang"


def run_preflight(args: Any, rollout_manager: Any) -> PreflightReport:
    """Run every check on the RolloutManager's student router and teacher; raise ``PreflightError`` on FAIL.

    Called by ``train.py`` before the first rollout (unless ``--skip-preflight``). The student and
    teacher tokenizers come from ``--hf-checkpoint`` and ``--opd-teacher-hf-checkpoint`` (else the
    teacher server's ``/get_model_info`` path, when it exists on this machine).
    """
    import ray

    from slime.utils.preflight_probe import PreflightTarget, run_checks

    if not preflight_applies(args):
        logger.info("pre-flight: skipped (needs --use-opd --opd-type sglang: a teacher server to check)")
        return PreflightReport([])
    info = ray.get(rollout_manager.server_info.remote())
    rm_url = info.get("rm_url") or getattr(args, "rm_url", None)
    if not rm_url:
        raise ValueError("pre-flight: the rollout manager reports no teacher URL (rm_url)")
    run_args = _copy_args(args)
    run_args.rm_url = rm_url
    run_args.sglang_router_ip, run_args.sglang_router_port = (
        info.get("sglang_router_ip"),
        info.get("sglang_router_port"),
    )
    target = PreflightTarget(
        student_url=info["router_url"],
        teacher_urls=[rm_url.rsplit("/generate", 1)[0]],
        student_path=getattr(args, "hf_checkpoint", None),
        teacher_path=getattr(args, "opd_teacher_hf_checkpoint", None),
        api_key=getattr(args, "api_key", None),
    )
    report = run_checks(run_args, target, warn=getattr(args, "preflight_warn", None) or ())
    for line in report.format().splitlines():
        (logger.info if report.ok else logger.error)("%s", line)
    if not report.ok:
        raise PreflightError(report)
    return report


def _copy_args(args: Any) -> Any:
    import copy

    return copy.copy(args)
