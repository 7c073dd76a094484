"""Every example YAML in configs/ parses and validates (with the paths a user would add)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slime.utils.arguments import dump_markdown, parse_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(config, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1=", "label": "2"}\n')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    argv = ["--config", str(config), "--hf-checkpoint", str(ckpt), "--prompt-data", str(prompts)]
    text = config.read_text()
    if "rollout-backend: sglang" in text:
        argv += ["--sglang-router-ip", "127.0.0.1", "--sglang-router-port", "1", "--rm-url", "http://t/generate"]
    else:
        argv += ["--opd-teacher-hf-checkpoint", str(ckpt)]
    if "eval-interval" in text:
        argv += ["--eval-prompt-data", "arith", str(prompts)]
    args = parse_args(argv)
    assert args.use_opd and args.custom_rm_path.endswith("reward_func")


def test_docs_arguments_md_is_current():
    assert (ROOT / "docs" / "arguments.md").read_text() == dump_markdown(), (
        "regenerate: python -m slime.utils.arguments --dump-markdown > docs/arguments.md"
    )
