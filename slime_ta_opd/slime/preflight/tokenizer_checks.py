"""Pre-flight checks of the two tokenizers: vocabulary, stop tokens, padded vocabulary, chat template.

Pure functions of two HF tokenizers (and model row counts); each returns a ``CheckResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slime.preflight.report import FAIL, PASS, WARN, CheckResult

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


def check_tokenizer(student_tok: Any, teacher_tok: Any, allow_mismatch: bool = False) -> CheckResult:
    """Same vocabulary (token → id) and the same special/added tokens: OPD compares token *ids*.

    ``allow_mismatch`` (``--allow-tokenizer-mismatch``): tokenizers that differ only in added/special tokens — every
    id both have below the first difference decodes to the same string, and every differing id is an added/special
    token on each side that has it — pass with a WARN naming the differing ids; anything else still fails, with the
    reason (a regular token that differs, or vocabularies that share no id).
    """
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
    from ta_opd.diagnostics.vocab import added_tokens, compare_vocabularies

    cmp = compare_vocabularies(s_vocab, t_vocab, added_tokens(student_tok), added_tokens(teacher_tok))
    values["shared_ids"] = cmp.shared_ids
    if allow_mismatch and cmp.compatible:
        detail = (
            f"accepted by --allow-tokenizer-mismatch: ids 0..{cmp.shared_ids - 1} decode to the same strings on "
            f"both sides and only added/special tokens differ ({cmp.describe()}). Tokens at those ids mean different "
            "text to the two models: check eos_pad, and keep them out of the responses."
        )
        return CheckResult("tokenizer", WARN, measured, detail, values)
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
    if allow_mismatch:
        lines.append(f"--allow-tokenizer-mismatch cannot accept this pair: {cmp.reason()}")
    elif cmp.compatible:
        lines.append(
            f"Only added/special tokens differ ({cmp.describe()}): --allow-tokenizer-mismatch accepts such a pair."
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
    student_tok: Any,
    teacher_tok: Any,
    student_rows: int | None,
    teacher_rows: int | None,
    allow_mismatch: bool = False,
) -> CheckResult:
    """Model embedding rows vs tokenizer size: padding (151,936 vs 152,064 rows for one Qwen tokenizer) is harmless.

    What matters is that every id the tokenizer can produce is a row of both models and that the two
    tokenizers are the same (``tokenizer``); rows past the tokenizer are never sampled into a prompt and
    hold ~0 probability, so comparing log-probs by token id stays exact.
    """
    s_ids = list(student_tok.get_vocab().values()) + list(_special_tokens(student_tok))
    t_ids = list(teacher_tok.get_vocab().values()) + list(_special_tokens(teacher_tok))
    # with --allow-tokenizer-mismatch the ids that reach both models are the student's (it samples them)
    max_id = max(s_ids) if allow_mismatch else max(s_ids + t_ids)
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
