"""Tiny Qwen-style causal LMs built from a config (no download) and saved as HF checkpoints.

The embedded stack loads these through exactly the code path a real checkpoint takes
(``AutoModelForCausalLM.from_pretrained(dir)``), so nothing downstream special-cases them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from slime.embedded.tokenizer import build_tokenizer, vocab
from ta_opd.atomic_io import atomic_dir

# The model's embedding table is padded past the tokenizer's vocabulary, as real Qwen
# checkpoints are (151,936 rows for a 151,665-token tokenizer): code must not assume they match.
PADDED_VOCAB = 128

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "nano": (32, 2, 4, 2, 64),
    "student": (64, 2, 4, 2, 128),
    "teacher": (128, 4, 4, 2, 256),
}


def tiny_config(size: str = "nano", vocab_size: int = PADDED_VOCAB, max_positions: int = 512):
    """A Qwen3 config of a named tiny size (see ``SIZES``)."""
    from transformers import Qwen3Config

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; expected one of {sorted(SIZES)}")
    if vocab_size < len(vocab()):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(vocab())} tokens")
    hidden, layers, heads, kv_heads, inter = SIZES[size]
    tok_vocab = vocab()
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tok_vocab["<|im_end|>"],
        pad_token_id=tok_vocab["<|endoftext|>"],
        bos_token_id=None,
        torch_dtype="float32",
    )


def build_tiny_model(size: str = "nano", seed: int = 0, **config_kwargs):
    """A randomly initialised tiny Qwen3ForCausalLM (deterministic for a seed)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config(size, **config_kwargs))
    model.eval()
    return model


def save_model(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Save ``model`` (safetensors) plus the embedded tokenizer to ``out_dir``, atomically.

    The directory appears complete or not at all: it is written to a temp dir next to it
    and renamed into place.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is None:
            build_tokenizer(tmp)
        else:
            for name in os.listdir(tokenizer_dir):
                src = Path(tokenizer_dir) / name
                if src.is_file() and ("token" in name or name.endswith(".jinja")):
                    shutil.copy2(src, tmp / name)
    return out


def build_tiny_checkpoint(out_dir: str | os.PathLike, size: str = "nano", seed: int = 0, **config_kwargs) -> Path:
    """Build and save a random tiny checkpoint (model + tokenizer) in one call; returns its path."""
    return save_model(build_tiny_model(size, seed, **config_kwargs), out_dir)
