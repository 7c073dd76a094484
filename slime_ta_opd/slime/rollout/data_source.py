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


def model_context_length(hf_checkpoint: str | None) -> int | None:
    """The context length of a HF checkpoint directory (``config.json``), or None when it does not say."""
    if not hf_checkpoint:
        return None
    path = os.path.join(hf_checkpoint, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def context_limit(args) -> tuple[int | None, str]:
    """The context length a prompt plus its response must stay below, and where that number comes from.

    The smaller of ``--rollout-max-context-len`` and the student's ``config.json`` (what the engines serve).
    """
    limits = []
    if args.rollout_max_context_len is not None:
        limits.append((args.rollout_max_context_len, "--rollout-max-context-len"))
    model = model_context_length(args.hf_checkpoint)
    if model is not None:
        limits.append((model, f"--hf-checkpoint {args.hf_checkpoint!r} (max_position_embeddings)"))
    return min(limits) if limits else (None, "")


def _jsonl_lines(path: str):
    """``(line number, text)`` of every line, decoded as UTF-8 one line at a time so an error names its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # a UTF-8 byte-order mark on the first line is tolerated (editors on Windows write one)
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                hint = " (a UTF-16 file?)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start} of the line)"
                    f"{hint}; save the file as UTF-8"
                ) from None


def _chat_messages(where: str, prompt: Any, tools: Any) -> list[dict]:
    """The prompt as chat messages, shape-checked: the template's own errors are named after the line too."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a chat prompt must be a string or a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(
                f"{where}: message {i} must be an object with a string 'role' and a 'content', got {m!r:.200}"
            )
        content = m["content"]
        if not (content is None or isinstance(content, str | list)):
            raise ValueError(
                f"{where}: message {i} ({m['role']}) has content of type {type(content).__name__}; "
                "expected a string or a list of parts"
            )
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: tools must be a list of objects, got {type(tools).__name__}")
    return messages


# the data source's position in the prompt data (integers), saved with its metadata by state_dict
_POSITION_KEYS = ("sample_offset", "epoch_id", "sample_group_index", "sample_index")


class Dataset:
    """Prompts of one JSONL file as ``Sample`` objects (prompt text after the chat template).

    The whole file is read and checked at construction, so a bad line fails before any server
    starts: every line is decoded and parsed, the chat template is applied, and every prompt is
    tokenised once (one batch call) and checked against ``max_length`` and, with
    ``context_length``, against the context (prompt + ``max_response_len`` must stay below it,
    as SGLang requires). Each error names the file and the line.
    """

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
        context_length: int | None = None,
        max_response_len: int = 0,
        context_source: str = "the context length",
        max_length_flag: str = "--rollout-max-prompt-len",
        response_flag: str = "--rollout-max-response-len",
        filter_flag: str | None = "--rollout-filter-long-prompts",
    ):
        if (apply_chat_template or max_length is not None or context_length is not None) and tokenizer is None:
            raise ValueError(
                f"dataset {path!r}: a chat template, a prompt length limit or a context check needs a tokenizer"
            )
        self.path = path
        self.seed = seed
        self.num_filtered = 0
        self.origin_samples: list[Sample] = []
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt data {path!r} does not exist")
        rows: list[tuple[str, str, Any, dict]] = []  # (where, prompt text, label, metadata)
        for lineno, line in _jsonl_lines(path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            except RecursionError:
                raise ValueError(f"{where}: malformed JSON (nested too deeply)") from None
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
                tools = row.get(tool_key) if tool_key else None
                messages = _chat_messages(where, prompt, tools)
                try:
                    text = tokenizer.apply_chat_template(
                        messages,
                        tools=tools,
                        tokenize=False,
                        add_generation_prompt=True,
                        **(apply_chat_template_kwargs or {}),
                    )
                except Exception as e:  # jinja TemplateError, a missing template, bad kwargs: name the line
                    raise ValueError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e
                if not isinstance(text, str):
                    raise ValueError(f"{where}: the chat template returned {type(text).__name__}, expected text")
            elif isinstance(prompt, str):
                text = prompt
            else:
                raise ValueError(
                    f"{where}: prompt under {prompt_key!r} is a {type(prompt).__name__}; "
                    "pass --apply-chat-template for message lists"
                )
            if not str(text).strip():
                raise ValueError(f"{where}: prompt is empty after the chat template")
            rows.append((where, text, label, metadata))

        lengths: list[int | None] = [None] * len(rows)
        if rows and (max_length is not None or context_length is not None):
            # the rollout encodes each prompt the same way (sglang_rollout._prompt_ids)
            lengths = [len(ids) for ids in tokenizer([r[1] for r in rows], add_special_tokens=False)["input_ids"]]
        for (where, text, label, metadata), n in zip(rows, lengths, strict=True):
            problem = None
            if n is not None and max_length is not None and n > max_length:
                problem = f"{where}: prompt has {n} tokens > {max_length_flag} {max_length}"
            elif n is not None and context_length is not None and n + max_response_len >= context_length:
                problem = (
                    f"{where}: prompt has {n} tokens; with {response_flag} {max_response_len} that is "
                    f"{n + max_response_len}, not below the context length {context_length} of {context_source}"
                )
            if problem is not None:
                if not filter_long_prompts:
                    raise ValueError(problem + (f" (pass {filter_flag} to drop such prompts)" if filter_flag else ""))
                self.num_filtered += 1
                continue
            self.origin_samples.append(
                Sample(prompt=text, label=None if label is None else str(label), metadata=dict(metadata))
            )
        if not self.origin_samples:
            raise ValueError(f"prompt data {path!r} holds no usable prompts")
        if self.num_filtered:
            logger.warning(
                "%s: dropped %d prompts longer than %s tokens or not fitting the context with the response",
                path,
                self.num_filtered,
                max_length,
            )
        self.samples = list(self.origin_samples)

    def shuffle(self, epoch_id: int) -> None:
        """Deterministic order for an epoch: a permutation seeded by (seed, epoch)."""
        order = list(range(len(self.origin_samples)))
        random.Random(f"{self.seed}:{epoch_id}").shuffle(order)
        self.samples = [self.origin_samples[i] for i in order]

    def __len__(self) -> int:
        return len(self.samples)


def dataset_from_args(args, path: str, evaluation: bool = False) -> Dataset:
    """The prompt dataset at ``path`` as the flags describe it (``evaluation``: the ``--eval-*`` keys and limits).

    Every prompt is checked against the prompt-length flag and, when the student's context length is
    known (``context_limit``), against the context with room for the longest response.
    """
    max_length = args.eval_max_prompt_len if evaluation else args.rollout_max_prompt_len
    response_len = (args.eval_max_response_len if evaluation else None) or args.rollout_max_response_len or 0
    context_length, context_source = context_limit(args)
    needs_tok = args.apply_chat_template or max_length is not None or context_length is not None
    if needs_tok and args.hf_checkpoint is None:
        raise ValueError("--apply-chat-template / --rollout-max-prompt-len need --hf-checkpoint (tokenizer)")
    return Dataset(
        path,
        tokenizer=load_tokenizer(args.hf_checkpoint) if needs_tok else None,
        max_length=max_length,
        prompt_key=(args.eval_input_key if evaluation else None) or args.input_key,
        label_key=(args.eval_label_key if evaluation else None) or args.label_key,
        metadata_key=args.metadata_key,
        tool_key=args.tool_key,
        apply_chat_template=args.apply_chat_template,
        apply_chat_template_kwargs=args.apply_chat_template_kwargs,
        filter_long_prompts=False if evaluation else args.rollout_filter_long_prompts,
        seed=args.rollout_seed,
        context_length=context_length,
        max_response_len=response_len,
        context_source=context_source,
        max_length_flag="--eval-max-prompt-len" if evaluation else "--rollout-max-prompt-len",
        response_flag=(
            "--eval-max-response-len"
            if evaluation and args.eval_max_response_len is not None
            else "--rollout-max-response-len"
        ),
        filter_flag=None if evaluation else "--rollout-filter-long-prompts",
    )


_EVAL_DATASETS: dict[tuple, Dataset] = {}


def eval_datasets(args) -> dict[str, Dataset]:
    """Every ``--eval-prompt-data`` dataset by name, read and checked in full (cached per process).

    The RolloutManager calls this before any server starts, so a malformed eval file fails at start
    rather than at the first periodic evaluation; the eval rollout then reuses the cached datasets.
    """
    out = {}
    for cfg in getattr(args, "eval_datasets", None) or []:
        key = (
            cfg["name"], cfg["path"], args.hf_checkpoint, args.apply_chat_template,
            json.dumps(args.apply_chat_template_kwargs, sort_keys=True, default=str),
            args.eval_input_key or args.input_key, args.eval_label_key or args.label_key, args.metadata_key,
            args.tool_key, args.eval_max_prompt_len, args.eval_max_response_len, args.rollout_max_response_len,
            args.rollout_max_context_len,
        )  # fmt: skip
        if key not in _EVAL_DATASETS:
            _EVAL_DATASETS[key] = dataset_from_args(args, cfg["path"], evaluation=True)
        out[cfg["name"]] = _EVAL_DATASETS[key]
    return out


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
        if args.rollout_global_dataset and args.prompt_data is not None:
            self.dataset = dataset_from_args(args, args.prompt_data)
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
        return {**{key: getattr(self, key) for key in _POSITION_KEYS}, "metadata": self.metadata}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in _POSITION_KEYS:
            setattr(self, key, int(state.get(key, 0)))  # a key missing from an older state starts at 0
        self.metadata = dict(state.get("metadata", {}))
        if self.dataset is not None and self.args.rollout_shuffle:
            self.dataset.shuffle(self.epoch_id)

    def save(self, rollout_id: int) -> None:
        """Write the position to ``{--save}/rollout/global_dataset_state_dict_{rollout_id}.json`` (atomic)."""
        if not self.args.rollout_global_dataset or self.args.save is None:
            return
        atomic_write_json(_state_path(self.args.save, rollout_id), self.state_dict())

    def load(self, rollout_id: int | None = None) -> None:
        """Restore the position saved for ``rollout_id`` (the latest one when None) under ``--load``."""
        if not self.args.rollout_global_dataset or self.args.load is None:
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
        path = args.buffer_filter_path
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
