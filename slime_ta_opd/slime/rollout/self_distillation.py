"""The privileged teacher prompt of ``--self-distillation`` (docs/method.md §7, last bullet).

The teacher is the student's own base weights; it reads the problem *and* the reference solution
(the sample's label) through ``--sd-teacher-prompt-template``, while the student reads only the
problem. The response tokens are the same ids in both contexts, appended after each prompt, so
response position j of the teacher sequence scores the same token as position j of the student's:

    student: prompt_ids(sample.prompt)                                  + response_ids
    teacher: prompt_ids(template.replace({prompt}, ...).replace({label}, ...)) + response_ids

The rollout manager writes the teacher prompt ids into the rollout data
(``sd_teacher_prompt_tokens``) for the trainer, and the OPD reward function scores the teacher
server on the same ids when ``--use-opd`` is also on (selection masks), so both teachers see one
context: ``privileged_prefill`` is that function's ``--custom-teacher-prefill-function-path`` hook,
which ``--self-distillation`` sets. Placeholders are replaced literally (labels may hold braces, e.g. LaTeX).
"""

from __future__ import annotations

import functools
from typing import Any

from slime.utils.types import Sample

__all__ = ["METADATA_KEY", "privileged_prefill", "reference_solution", "teacher_prompt_ids", "teacher_prompt_text"]

METADATA_KEY = "sd_teacher_prompt_ids"  # sample.metadata cache: one tokenisation per sample


THINK_END = "</think>"


def reference_solution(label: str) -> str:
    """The part of a reference solution after its last ``</think>`` (all of it when there is none).

    DeepSeek-R1-distilled and Olmo chat templates render an assistant turn without its reasoning (only what
    follows ``</think>``), and their generation prompt opens a ``<think>`` block; a reference that carries its
    reasoning would put a closed think block inside the teacher's prompt, a context these models never saw.
    """
    head, sep, tail = label.rpartition(THINK_END)
    return tail.lstrip("\n") if sep else label


def teacher_prompt_text(template: str, prompt: str, label: str) -> str:
    """The teacher's prompt: ``template`` with ``{prompt}`` and ``{label}`` (its :func:`reference_solution`)
    replaced literally."""
    for key in ("{prompt}", "{label}"):
        if key not in template:
            raise ValueError(f"--sd-teacher-prompt-template must contain {key}, got {template!r}")
    label = reference_solution(label)
    # {label} first: a label that contains the text "{prompt}" must stay as written
    return template.replace("{label}", "\0LABEL\0").replace("{prompt}", prompt).replace("\0LABEL\0", label)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from slime.rollout.data_source import load_tokenizer

    return load_tokenizer(path)


def teacher_prompt_ids(args: Any, sample: Sample) -> list[int]:
    """Token ids of the sample's privileged teacher prompt (cached in ``sample.metadata``)."""
    metadata = sample.metadata if isinstance(sample.metadata, dict) else None
    if metadata is not None and METADATA_KEY in metadata:
        return list(metadata[METADATA_KEY])
    if not isinstance(sample.prompt, str):
        raise TypeError(f"sample {sample.index}: --self-distillation needs a text prompt, got {type(sample.prompt)}")
    if sample.label is None:
        raise ValueError(f"sample {sample.index}: --self-distillation needs a label (the reference solution)")
    if not getattr(args, "hf_checkpoint", None):
        raise ValueError("--self-distillation needs --hf-checkpoint (its tokenizer encodes the teacher prompt)")
    text = teacher_prompt_text(args.sd_teacher_prompt_template, sample.prompt, str(sample.label))
    ids = [int(t) for t in _tokenizer(str(args.hf_checkpoint)).encode(text, add_special_tokens=False)]
    if not ids:
        raise ValueError(f"sample {sample.index}: the teacher prompt {text!r} encodes to no tokens")
    if metadata is not None:
        metadata[METADATA_KEY] = ids
    return ids


def privileged_prefill(args: Any, sample: Sample, payload: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a teacher prefill payload (on ``sample.tokens``) to score the response after the teacher prompt."""
    response_length = int(sample.response_length)
    response = [int(t) for t in sample.tokens[len(sample.tokens) - response_length :]] if response_length else []
    prompt = teacher_prompt_ids(args, sample)
    payload["input_ids"] = prompt + response
    payload["logprob_start_len"] = max(len(prompt) - 1, 0)
    return payload
