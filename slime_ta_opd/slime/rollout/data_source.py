"""Prompt data for rollouts: a JSONL dataset and the data source the RolloutManager owns.

Same class names and methods as upstream slime (``RolloutDataSource``,
``RolloutDataSourceWithBuffer``: ``get_samples / add_samples / save / load / __len__``).
Each JSONL line is an object; the prompt is under ``--input-key``, the label under
``--label-key`` and optional metadata under ``--metadata-key``. Bad input is an error that
names the file, the line number and the key, raised when the data source is built.
"""

from __future__ import annotations

import abc
import copy
import glob
import json
import logging
import os
import random
import re
from typing import Any

from slime.utils.misc import atomic_write_json, load_function
from slime.utils.types import Sample

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """The HF tokenizer of a checkpoint directory (offline).

    No ``trust_remote_code``: Python files shipped inside a checkpoint directory are never run.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


class Dataset:
    """Prompts of one JSONL file as ``Sample`` objects (prompt text after the chat template)."""

    def __init__(
        self,
        path: str,
        *,
        tokenizer: Any = None,
        max_length: int | None = None,
        prompt_key: str = "input",
        label_key: str | None = None,
        metadata_key: str | None = "metadata",
        tool_key: str | None = None,
        apply_chat_template: bool = False,
        apply_chat_template_kwargs: dict | None = None,
        filter_long_prompts: bool = False,
        seed: int = 42,
    ):
        if (apply_chat_template or max_length is not None) and tokenizer is None:
            raise ValueError(f"dataset {path!r}: a chat template or a prompt length limit needs a tokenizer")
        self.path = path
        self.seed = seed
        self.num_filtered = 0
        self.origin_samples: list[Sample] = []
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt data {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                if prompt_key not in row:
                    raise KeyError(f"{where}: missing prompt key {prompt_key!r} (--input-key); keys: {sorted(row)}")
                prompt = row[prompt_key]
                if label_key is not None and label_key not in row:
                    raise KeyError(f"{where}: missing label key {label_key!r} (--label-key); keys: {sorted(row)}")
                label = row[label_key] if label_key is not None else None
                metadata = row.get(metadata_key) if metadata_key else None
                if metadata is None:
                    metadata = {}
                if not isinstance(metadata, dict):
                    raise ValueError(f"{where}: metadata under {metadata_key!r} must be an object")
                if not prompt:
                    raise ValueError(f"{where}: empty prompt under {prompt_key!r}")
                if apply_chat_template:
                    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                        raise ValueError(f"{where}: a chat prompt must be a string or a list of messages")
                    tools = row.get(tool_key) if tool_key else None
                    text = tokenizer.apply_chat_template(
                        messages,
                        tools=tools,
                        tokenize=False,
                        add_generation_prompt=True,
                        **(apply_chat_template_kwargs or {}),
                    )
                elif isinstance(prompt, str):
                    text = prompt
                else:
                    raise ValueError(
                        f"{where}: prompt under {prompt_key!r} is a {type(prompt).__name__}; "
                        "pass --apply-chat-template for message lists"
                    )
                if not str(text).strip():
                    raise ValueError(f"{where}: prompt is empty after the chat template")
                if max_length is not None:
                    n = len(tokenizer.encode(text, add_special_tokens=False))
                    if n > max_length:
                        if not filter_long_prompts:
                            raise ValueError(
                                f"{where}: prompt has {n} tokens > --rollout-max-prompt-len {max_length} "
                                "(pass --rollout-filter-long-prompts to drop such prompts)"
                            )
                        self.num_filtered += 1
                        continue
                self.origin_samples.append(
                    Sample(prompt=text, label=None if label is None else str(label), metadata=dict(metadata))
                )
        if not self.origin_samples:
            raise ValueError(f"prompt data {path!r} holds no usable prompts")
        if self.num_filtered:
            logger.warning("%s: dropped %d prompts longer than %s tokens", path, self.num_filtered, max_length)
        self.samples = list(self.origin_samples)

    def shuffle(self, epoch_id: int) -> None:
        """Deterministic order for an epoch: a permutation seeded by (seed, epoch)."""
        order = list(range(len(self.origin_samples)))
        random.Random(f"{self.seed}:{epoch_id}").shuffle(order)
        self.samples = [self.origin_samples[i] for i in order]

    def __len__(self) -> int:
        return len(self.samples)


class DataSource(abc.ABC):
    @abc.abstractmethod
    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        """``num_samples`` groups of ``n_samples_per_prompt`` samples."""

    @abc.abstractmethod
    def add_samples(self, samples: list[list[Sample]]) -> None:
        """Give groups back (e.g. partial rollouts)."""

    @abc.abstractmethod
    def save(self, rollout_id: int) -> None:
        """Persist the position in the data."""

    @abc.abstractmethod
    def load(self, rollout_id: int | None = None) -> None:
        """Restore the position saved by ``save``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of prompts."""


def _state_path(root: str, rollout_id: int) -> str:
    return os.path.join(root, "rollout", f"global_dataset_state_dict_{rollout_id}.json")


class RolloutDataSource(DataSource):
    """Walks the prompt dataset in (optionally shuffled) epochs; groups share a prompt."""

    def __init__(self, args):
        self.args = args
        self.epoch_id = 0
        self.sample_group_index = 0
        self.sample_index = 0
        self.sample_offset = 0
        self.metadata: dict = {}
        self.dataset: Dataset | None = None
        if getattr(args, "rollout_global_dataset", True) and args.prompt_data is not None:
            needs_tok = args.apply_chat_template or args.rollout_max_prompt_len is not None
            if needs_tok and args.hf_checkpoint is None:
                raise ValueError("--apply-chat-template / --rollout-max-prompt-len need --hf-checkpoint (tokenizer)")
            tokenizer = load_tokenizer(args.hf_checkpoint) if needs_tok else None
            self.dataset = Dataset(
                args.prompt_data,
                tokenizer=tokenizer,
                max_length=args.rollout_max_prompt_len,
                prompt_key=args.input_key,
                label_key=args.label_key,
                metadata_key=args.metadata_key,
                tool_key=getattr(args, "tool_key", None),
                apply_chat_template=args.apply_chat_template,
                apply_chat_template_kwargs=getattr(args, "apply_chat_template_kwargs", None),
                filter_long_prompts=getattr(args, "rollout_filter_long_prompts", False),
                seed=args.rollout_seed,
            )
            if args.rollout_shuffle:
                self.dataset.shuffle(self.epoch_id)

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if self.dataset is None:
            prompts = [Sample() for _ in range(num_samples)]
        else:
            prompts = []
            while len(prompts) < num_samples:
                if self.sample_offset >= len(self.dataset):
                    self.epoch_id += 1
                    self.sample_offset = 0
                    if self.args.rollout_shuffle:
                        self.dataset.shuffle(self.epoch_id)
                take = min(num_samples - len(prompts), len(self.dataset) - self.sample_offset)
                prompts += self.dataset.samples[self.sample_offset : self.sample_offset + take]
                self.sample_offset += take
        groups = []
        for prompt in prompts:
            group = []
            for _ in range(self.args.n_samples_per_prompt):
                sample = copy.deepcopy(prompt)
                sample.group_index = self.sample_group_index
                sample.index = self.sample_index
                self.sample_index += 1
                group.append(sample)
            self.sample_group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        raise RuntimeError(f"{type(self).__name__} is read-only; use RolloutDataSourceWithBuffer")

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_offset": self.sample_offset,
            "epoch_id": self.epoch_id,
            "sample_group_index": self.sample_group_index,
            "sample_index": self.sample_index,
            "metadata": self.metadata,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sample_offset = int(state.get("sample_offset", 0))
        self.epoch_id = int(state.get("epoch_id", 0))
        self.sample_group_index = int(state.get("sample_group_index", 0))
        self.sample_index = int(state.get("sample_index", 0))
        self.metadata = dict(state.get("metadata", {}))
        if self.dataset is not None and self.args.rollout_shuffle:
            self.dataset.shuffle(self.epoch_id)

    def save(self, rollout_id: int) -> None:
        """Write the position to ``{--save}/rollout/global_dataset_state_dict_{rollout_id}.json`` (atomic)."""
        if not getattr(self.args, "rollout_global_dataset", True) or self.args.save is None:
            return
        atomic_write_json(_state_path(self.args.save, rollout_id), self.state_dict())

    def load(self, rollout_id: int | None = None) -> None:
        """Restore the position saved for ``rollout_id`` (the latest one when None) under ``--load``."""
        if not getattr(self.args, "rollout_global_dataset", True) or self.args.load is None:
            return
        if rollout_id is None:
            found = glob.glob(_state_path(self.args.load, "*"))
            ids = [int(m.group(1)) for p in found if (m := re.search(r"_(\d+)\.json$", p))]
            if not ids:
                logger.info("no data-source state under %s; starting from the beginning", self.args.load)
                return
            rollout_id = max(ids)
        path = _state_path(self.args.load, rollout_id)
        if not os.path.exists(path):
            logger.warning("data-source state %s does not exist; starting from the beginning", path)
            return
        with open(path) as f:
            self.load_state_dict(json.load(f))
        logger.info("loaded data-source state from %s", path)

    def __len__(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)


def pop_first(args, rollout_id, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """Default buffer filter: the oldest groups first."""
    n = min(len(buffer), num_samples)
    out = buffer[:n]
    del buffer[:n]
    return out


class RolloutDataSourceWithBuffer(RolloutDataSource):
    """A data source that first serves groups given back with ``add_samples``."""

    def __init__(self, args):
        super().__init__(args)
        self.buffer: list[list[Sample]] = []
        path = getattr(args, "buffer_filter_path", None)
        self.buffer_filter = pop_first if path is None else load_function(path)

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        groups = self.buffer_filter(self.args, None, self.buffer, num_samples) if self.buffer else []
        if len(groups) < num_samples:
            groups += super().get_samples(num_samples - len(groups))
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        if not samples:
            return
        for group in samples:
            if not isinstance(group, list) or len(group) != self.args.n_samples_per_prompt:
                raise ValueError(
                    f"add_samples takes groups of n_samples_per_prompt={self.args.n_samples_per_prompt} samples, "
                    f"got {type(group).__name__} of length {len(group) if isinstance(group, list) else '?'}"
                )
            self.buffer.append(group)

    def get_buffer_length(self) -> int:
        return len(self.buffer)
