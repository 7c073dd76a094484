"""Asset builder: a fast test recipe builds real checkpoints + prompt files, and the cache is reused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from slime.embedded.assets import FAST_TEST_RECIPE, ModelRecipe, _encode_examples, ensure_assets
from slime.embedded.task import generate_splits, read_jsonl

TINY = replace(
    FAST_TEST_RECIPE,
    num_train_prompts=16,
    num_eval_prompts=4,
    sft_pool=64,
    teacher=ModelRecipe("nano", steps=3, lr=5e-3, batch_size=4),
    student=ModelRecipe("nano", steps=2, lr=5e-3, batch_size=4),
)


def test_encode_examples_masks_only_the_response(tiny_tokenizer_dir):
    from slime.embedded.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    pool, _ = generate_splits(5, 1, seed=0)
    ids, mask = _encode_examples(tok, pool)
    for i, p in enumerate(pool):
        assert tok.decode(ids[i][mask[i]]) == p.chain + "<|im_end|>"
        assert tok.decode(ids[i][: int(mask[i].nonzero()[0])]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_ensure_assets_builds_once_then_reuses(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = ensure_assets(tmp_path, recipe=TINY)
    assert "building" in capsys.readouterr().out
    for d in (a.teacher_dir, a.student_dir):
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert model.config.vocab_size == 128 and tok.eos_token == "<|im_end|>"
    train, held_out = read_jsonl(a.train_jsonl), read_jsonl(a.eval_jsonl)
    assert len(train) == 16 and len(held_out) == 4
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    manifest = json.loads((a.teacher_dir.parent / "manifest.json").read_text())
    assert manifest["recipe_key"] == TINY.key() == a.teacher_dir.parent.name
    assert 0.0 <= manifest["teacher"]["heldout_accuracy_greedy"] <= 1.0
    stamp = (a.teacher_dir / "model.safetensors").stat().st_mtime_ns

    b = ensure_assets(tmp_path, recipe=TINY)  # cached: no rebuild
    assert "building" not in capsys.readouterr().out
    assert b == a and (b.teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.tmp*"))  # no temp dir left behind

    # same seed -> same weights (deterministic build); --force rebuilds in place
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(a.student_dir).state_dict().items()}
    c = ensure_assets(tmp_path, force=True, recipe=TINY)
    after = AutoModelForCausalLM.from_pretrained(c.student_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # another recipe -> another cache directory
    d = ensure_assets(tmp_path, recipe=replace(TINY, seed=1))
    assert d.teacher_dir.parent != a.teacher_dir.parent
