"""An offline, character-level HF fast tokenizer for the embedded task.

Built from code (no download): every printable ASCII character is one token, plus a few
special tokens in Qwen's naming so chat templates look like the real thing. The result is a
directory that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline.

Usage::

    from slime.embedded.tokenizer import build_tokenizer
    tok = build_tokenizer("/tmp/tok")      # writes tokenizer.json + configs, returns the tokenizer
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Order matters: ids are assigned in this order and are part of every cached checkpoint.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen-style ChatML template (the same shape as Qwen2/Qwen3's, without tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocab() -> dict[str, int]:
    """Token string -> id for the embedded tokenizer (specials first, then characters)."""
    tokens = SPECIAL_TOKENS + PRINTABLE
    return {tok: i for i, tok in enumerate(tokens)}


def _build_backend() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=PAD_TOKEN))
    # Split into single characters; specials are matched first because they are added tokens.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_tokenizer(out_dir: str | os.PathLike, chat_template: str = CHAT_TEMPLATE):
    """Write the tokenizer files to ``out_dir`` (atomically) and return the loaded HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fast.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), out / name)
    return load_tokenizer(out)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer directory offline (never touches the network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
