"""`make demo` entry point (placeholder until the embedded task lands: builds the tiny assets)."""

import tempfile

from slime.embedded.models import build_tiny_checkpoint
from slime.embedded.tokenizer import describe

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_checkpoint(f"{d}/nano")
        print(f"built a tiny Qwen3 checkpoint at {path}: tokenizer {describe(path)}")
