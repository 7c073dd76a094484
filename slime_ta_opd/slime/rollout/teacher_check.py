"""Refuse a teacher whose tokenizer differs from the student's, before any server starts or any step runs.

OPD scores the student's token ids with the teacher (docs/method.md §1): the ids only mean the same
text when both sides share one tokenizer. A different vocabulary would silently give the teacher's
log-prob of another token at every position. The models' *padded* vocabularies (lm-head rows) may
differ; the tokenizers may not.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def _tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_same_tokenizer(
    student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, allow_mismatch: bool = False
) -> None:
    """Raise ValueError naming both paths and the first difference when the two tokenizers differ.

    ``allow_mismatch`` (``--allow-tokenizer-mismatch``): a pair that differs only in added/special tokens is accepted
    with a warning naming the differing ids (ta_opd.diagnostics.vocab); any other difference is still refused."""
    student, teacher = _tokenizer(student_dir), _tokenizer(teacher_dir)
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    if allow_mismatch:
        from ta_opd.diagnostics.vocab import added_tokens, compare_vocabularies

        cmp = compare_vocabularies(s_vocab, t_vocab, added_tokens(student), added_tokens(teacher))
        if not cmp.compatible:
            raise ValueError(
                f"teacher tokenizer {str(teacher_dir)!r} and student tokenizer {str(student_dir)!r} differ beyond "
                f"added/special tokens, so --allow-tokenizer-mismatch cannot accept them: {cmp.reason()}"
            )
        logger.warning("--allow-tokenizer-mismatch: %s", cmp.describe())
        return
    if len(s_vocab) != len(t_vocab):
        detail = f"vocabulary sizes differ: student {len(s_vocab)}, teacher {len(t_vocab)}"
    else:
        token = next(t for t in sorted(s_vocab) if t_vocab.get(t) != s_vocab[t])
        detail = f"token {token!r} has id {s_vocab[token]} in the student and {t_vocab.get(token)} in the teacher"
    raise ValueError(
        f"teacher tokenizer {str(teacher_dir)!r} does not match student tokenizer {str(student_dir)!r}: {detail}; "
        "OPD compares token ids, so teacher and student must share one tokenizer"
    )


def check_teacher_server_info(student_dir: str | os.PathLike, info: dict[str, Any], url: str) -> None:
    """Compare the tokenizer size a teacher server reports (``/get_model_info``) with the student's."""
    size = info.get("tokenizer_vocab_size")
    if size is None:
        return  # real SGLang does not report it; nothing to compare
    student = len(_tokenizer(student_dir))
    if int(size) != student:
        raise ValueError(
            f"teacher server {url} reports a tokenizer of {size} tokens, the student tokenizer "
            f"{str(student_dir)!r} has {student}: OPD needs one shared tokenizer"
        )
