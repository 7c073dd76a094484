"""``Sample``: the one record that travels from rollout to loss.

Field names, defaults and methods follow upstream slime's ``slime.utils.types.Sample`` so
that plug-ins (and the TA-OPD patch files) written for upstream work here unchanged.
See docs/slime_interfaces.md ("Sample fields used by OPD").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


def _to_plain(value: Any) -> Any:
    """Tensors → lists (recursively through lists/tuples/dicts) so a dict is JSON-friendly."""
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


@dataclass
class Sample:
    """One generated (prompt, response) pair and everything the trainer needs about it."""

    group_index: int | None = None
    index: int | None = None
    # Id of the rollout this sample came from; None means "same as index" downstream.
    rollout_id: int | None = None
    # prompt: a string, or OpenAI-style messages before a chat template is applied
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)  # prompt + response ids
    multimodal_inputs: dict[str, Any] | None = None
    multimodal_train_inputs: dict[str, Any] | None = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    # response
    response: str = ""
    response_length: int = 0
    label: str | None = None
    # a float, or a dict (OPD stores the teacher server's whole JSON answer here)
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None  # length = response_length
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None  # one per response token, from the rollout engine
    remove_sample: bool = False
    # one per response token (upstream's OPD post-process stores a float32 tensor)
    teacher_log_probs: list[float] | torch.Tensor | None = None

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        # recoverable failure (tool error, external API error, ...); may hold partial output
        FAILED = "failed"

    status: Status = Status.PENDING

    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    # metadata used during training, e.g. which loss to use for this sample
    train_metadata: dict | None = None
    session_id: str | None = None
    non_generation_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (Status → its string value, tensors → lists); inverse of ``from_dict``."""
        return {name: _to_plain(getattr(self, name)) for name in self.__dataclass_fields__}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Sample:
        """Rebuild a Sample from ``to_dict`` output; unknown keys become plain attributes (as upstream)."""
        data = dict(data)
        if "status" in data and not isinstance(data["status"], Sample.Status):
            try:
                data["status"] = Sample.Status(data["status"])
            except ValueError as e:
                valid = [s.value for s in Sample.Status]
                raise ValueError(f"unknown Sample status {data['status']!r}; expected one of {valid}") from e
        fields = set(Sample.__dataclass_fields__)
        sample = Sample(**{k: v for k, v in data.items() if k in fields})
        for key, value in data.items():
            if key not in fields:
                setattr(sample, key, value)
        return sample

    def get_reward_value(self, args) -> Any:
        """The scalar reward: ``reward`` itself, or ``reward[args.reward_key]`` when a key is set."""
        key = getattr(args, "reward_key", None)
        if not key:
            return self.reward
        if not isinstance(self.reward, dict) or key not in self.reward:
            keys = sorted(self.reward) if isinstance(self.reward, dict) else None
            raise KeyError(
                f"--reward-key {key!r} not found in sample {self.index}'s reward "
                f"(type {type(self.reward).__name__}, keys {keys})"
            )
        return self.reward[key]

    @property
    def effective_response_length(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def append_response_tokens(
        self,
        args=None,
        *,
        tokens: list[int] | None = None,
        log_probs: list[float] | None = None,
        trainable: bool = True,
        meta_info: dict | None = None,
        text: str | None = None,
        update_terminal_info: bool = True,
    ) -> None:
        """Append response tokens keeping ``tokens``, ``loss_mask`` and ``rollout_log_probs`` aligned.

        Same keyword signature as upstream. Model tokens pass ``trainable=True`` plus their
        log-probs and SGLang's ``meta_info``; tool/environment tokens pass ``trainable=False``
        (loss-mask 0, log-prob 0). ``meta_info["finish_reason"]["type"]`` sets the status:
        length → TRUNCATED, abort → ABORTED, stop → COMPLETED.
        """
        tokens = [int(t) for t in (tokens.tolist() if torch.is_tensor(tokens) else tokens or [])]
        if log_probs is not None:
            log_probs = [float(x) for x in (log_probs.tolist() if torch.is_tensor(log_probs) else log_probs)]
            if len(log_probs) != len(tokens):
                raise ValueError(f"log_probs length {len(log_probs)} != tokens length {len(tokens)}")
        if tokens and trainable and log_probs is None:
            raise ValueError("trainable response tokens need rollout log-probabilities")
        if tokens and not trainable and log_probs is not None:
            raise ValueError("non-trainable response tokens must not carry rollout log-probabilities")
        previous = self.response_length
        if text is not None:
            self.response += text
        if tokens:
            self.tokens = list(self.tokens) + tokens
            self.response_length += len(tokens)
            if self.loss_mask is None:
                self.loss_mask = [1] * previous
            self.loss_mask = list(self.loss_mask) + [1 if trainable else 0] * len(tokens)
            if self.rollout_log_probs is None:
                if trainable and previous:
                    raise ValueError(
                        "cannot append trainable log-probs to a sample with response tokens but no rollout_log_probs"
                    )
                self.rollout_log_probs = [0.0] * previous
            self.rollout_log_probs = list(self.rollout_log_probs) + (log_probs or [0.0] * len(tokens))
        if meta_info and update_terminal_info:
            if "weight_version" in meta_info:
                self.weight_versions.append(str(meta_info["weight_version"]))
            finish = meta_info.get("finish_reason")
            if finish is not None:
                kind = finish.get("type") if isinstance(finish, dict) else finish
                mapping = {
                    "length": Sample.Status.TRUNCATED,
                    "abort": Sample.Status.ABORTED,
                    "stop": Sample.Status.COMPLETED,
                }
                if kind not in mapping:
                    raise ValueError(f"unknown finish_reason {finish!r}; expected type one of {sorted(mapping)}")
                self.status = mapping[kind]
