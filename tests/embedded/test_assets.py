"""Asset builder: a fast test recipe builds real checkpoints + prompt files, and the cache is reused."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from slime.embedded.assets import (
    FAST_TEST_RECIPE,
    ModelRecipe,
    Recipe,
    _encode_examples,
    build_assets,
    ensure_assets,
)
from slime.embedded.sft import lr_at as _lr_at
from slime.embedded.sft import sft_train
from slime.embedded.task import generate_splits, read_jsonl

TINY = replace(
    FAST_TEST_RECIPE,
    num_train_prompts=16,
    num_eval_prompts=4,
    sft_pool=64,
    # two half-batch gradients per step, dev checks it never passes: the parallel build's second process joins it
    teacher=ModelRecipe(
        "nano", steps=6, lr=5e-3, batch_size=4, grad_shards=2, stop_at_dev_accuracy=1.0, dev_check_every=2
    ),
    # a prefix of a longer schedule with a dev-accuracy stop it cannot reach: checked once, after step 2
    student=ModelRecipe(
        "nano", steps=3, lr=5e-3, batch_size=4, schedule_steps=10, stop_at_dev_accuracy=1.0, dev_check_every=2
    ),
)


def test_encode_examples_masks_only_the_response(tiny_tokenizer_dir):
    from slime.embedded.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    pool, _ = generate_splits(5, 1, seed=0)
    ids, mask = _encode_examples(tok, pool)
    for i, p in enumerate(pool):
        assert tok.decode(ids[i][mask[i]]) == p.chain + "<|im_end|>"
        assert tok.decode(ids[i][: int(mask[i].nonzero()[0])]).endswith("<|im_start|>assistant\n")


def test_lr_schedule_full_and_prefix_by_hand():
    # full schedule: 20 steps, warm-up int(0.1 * 20) = 2 steps, then cosine from 1.0 to 0.1 over 18 steps
    full = ModelRecipe("nano", steps=20, lr=1.0, warmup_frac=0.1, final_lr_frac=0.1)
    assert full.schedule_len == 20 and full.warmup_steps == 2
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 11: 0.55, 19: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 17 / 18))}
    for step, lr in expected.items():
        assert _lr_at(step, full) == pytest.approx(lr)
    assert _lr_at(19, full) == pytest.approx(0.10684, abs=1e-5)  # 0.1 + 0.45 * (1 - cos(pi / 18))

    # a 10-step prefix of that schedule: same LR at every step it takes, stops after step 9 at LR 0.704
    prefix = ModelRecipe("nano", steps=10, lr=1.0, warmup_frac=0.1, final_lr_frac=0.1, schedule_steps=20)
    assert prefix.schedule_len == 20 and prefix.warmup_steps == 2
    assert [_lr_at(s, prefix) for s in range(10)] == [_lr_at(s, full) for s in range(10)]
    assert _lr_at(9, prefix) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 18)))  # 0.70391
    assert prefix.sft_summary()["schedule_steps"] == 20 and prefix.sft_summary()["max_steps"] == 10
    # ...whereas a full 10-step schedule (warm-up 1 step) has annealed by its last step
    short = ModelRecipe("nano", steps=10, lr=1.0, warmup_frac=0.1, final_lr_frac=0.1)
    assert short.warmup_steps == 1 and _lr_at(0, short) == 1.0
    assert _lr_at(9, short) == pytest.approx(0.12714, abs=1e-5)  # 0.1 + 0.45 * (1 + cos(8 pi / 9))

    # schedule_steps=None and schedule_steps=steps are the same schedule (but distinct recipes/hashes)
    same = replace(full, schedule_steps=20)
    assert [_lr_at(s, same) for s in range(20)] == [_lr_at(s, full) for s in range(20)]
    assert replace(Recipe(), student=same).key() != replace(Recipe(), student=full).key()


def test_model_recipe_rejects_bad_schedules():
    with pytest.raises(ValueError, match="schedule_steps .* must be >= steps"):
        ModelRecipe("nano", steps=10, lr=1e-3, schedule_steps=9)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ModelRecipe("nano", steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="warmup_frac"):
        ModelRecipe("nano", steps=10, lr=1e-3, warmup_frac=1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        ModelRecipe("nano", steps=10, lr=0.0)


def test_sft_train_stops_at_steps_of_a_longer_schedule(tiny_tokenizer_dir):
    from slime.embedded.models import build_tiny_model
    from slime.embedded.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    pool, _ = generate_splits(16, 1, seed=0)
    ids, mask = _encode_examples(tok, pool)
    r = ModelRecipe("nano", steps=3, lr=1e-3, batch_size=4, schedule_steps=100)
    losses = sft_train(build_tiny_model("nano", seed=0), ids, mask, r, seed=0)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_sft_train_stops_at_the_first_dev_check_that_reaches_the_target(tiny_tokenizer_dir):
    from slime.embedded.models import build_tiny_model
    from slime.embedded.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    pool, _ = generate_splits(16, 1, seed=0)
    ids, mask = _encode_examples(tok, pool)
    r = ModelRecipe(
        "nano", steps=50, lr=1e-3, batch_size=4, stop_at_dev_accuracy=0.3, dev_check_every=4, dev_check_from=6
    )
    checked: list[int] = []

    def dev_accuracy(model, step):  # 0.1, 0.2, 0.3, ... at the checks after steps 6, 10, 14, ...
        assert model.training
        checked.append(step)
        return 0.1 * len(checked) + 1e-9

    losses = sft_train(build_tiny_model("nano", seed=0), ids, mask, r, seed=0, dev_accuracy=dev_accuracy)
    assert checked == [6, 10, 14] and len(losses) == 14
    with pytest.raises(ValueError, match="no dev_accuracy function"):
        sft_train(build_tiny_model("nano", seed=0), ids, mask, r, seed=0)


@pytest.mark.slow
def test_ensure_assets_builds_once_then_reuses(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = ensure_assets(tmp_path, recipe=TINY)
    assert "building" in capsys.readouterr().err  # progress on stderr: stdout is for --print
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
    for role, r in (("teacher", TINY.teacher), ("student", TINY.student)):
        entry = manifest[role]
        assert entry["steps"] == r.steps and entry["lr_at_stop"] == pytest.approx(_lr_at(r.steps - 1, r))
        assert entry["sft"]["max_steps"] == r.steps and entry["sft"]["schedule_steps"] == r.schedule_len
        assert entry["sft"]["lr"] == r.lr and entry["sft"]["batch_size"] == r.batch_size
        assert entry["sft"]["warmup_steps"] == r.warmup_steps and "cosine" in entry["sft"]["decay"]
        assert math.isfinite(entry["final_sft_loss"]) and math.isfinite(entry["final_sft_loss_mean_last20"])
        assert entry["build_seconds"] >= 0 and entry["cpu_seconds"] >= 0
    for role in ("teacher", "student"):
        assert manifest[role]["stop_reason"].startswith("all steps (dev accuracy never reached")
    assert [step for step, _ in manifest["teacher"]["dev_accuracy_checks"]] == [2, 4]
    assert manifest["teacher"]["sft"]["grad_shards"] == 2 and manifest["student"]["sft"]["grad_shards"] == 1
    assert [step for step, _ in manifest["student"]["dev_accuracy_checks"]] == [2]
    stamp = (a.teacher_dir / "model.safetensors").stat().st_mtime_ns

    b = ensure_assets(tmp_path, recipe=TINY)  # cached: no rebuild
    assert "building" not in capsys.readouterr().err
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


@pytest.mark.slow
def test_parallel_build_makes_the_sequential_pair(tmp_path):
    """The teacher trained in a spawned process next to the student, and joined by this process once the student
    is done (each computing one half of every batch), gives the weights and manifest entries of the sequential
    build, which computes both halves in one process (one torch thread on both sides)."""
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = build_assets(tmp_path / "seq", TINY, parallel=False)
        par = build_assets(tmp_path / "par", TINY, parallel=True)
    finally:
        torch.set_num_threads(threads)
    for role in ("teacher", "student"):
        a, b = (
            load_file(tmp_path / "seq" / role / "model.safetensors"),
            load_file(tmp_path / "par" / role / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
        timings = ("build_seconds", "cpu_seconds", "second_process_from_step")
        same = {k: v for k, v in seq[role].items() if k not in timings}
        assert same == {k: v for k, v in par[role].items() if k not in timings}, role
    assert seq["teacher"]["second_process_from_step"] is None
    # the student's 3 steps end seconds before the spawned teacher has imported torch: it joins at the start
    assert par["teacher"]["second_process_from_step"] is not None
    assert par["teacher"]["steps"] == 6 and len(par["teacher"]["dev_accuracy_checks"]) == 2  # after steps 2 and 4
    assert list(par) == ["recipe", "recipe_key", "builder", "teacher", "student", "build_seconds"]


@pytest.mark.slow
def test_print_writes_only_the_path_on_a_fresh_cache(tmp_path):
    """``--print KEY`` on a cache being built: stdout is the one path a shell script reads, even with the teacher
    trained in a spawned process (whose stdout is this process's), all progress on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "slime.embedded.assets", "--recipe", "fast-test", "--cache-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, "--print", "student_dir"], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and Path(lines[0]).is_dir(), out.stdout
    assert "[assets]" in out.stderr
