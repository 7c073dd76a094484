"""Checkpoints: atomic layout, round trip of model/optimizer/RNG, rotation, corrupt ones refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from slime.backends.torch_utils import checkpoint as ckpt
from slime.backends.torch_utils.model import load_hf_model


@pytest.fixture()
def model_and_opt(tiny_student_dir):
    model = load_hf_model(tiny_student_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # one real step so the optimizer has state (exp_avg, exp_avg_sq, step)
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    opt.step()
    return model, opt


def _save(tmp_path, model, opt, rollout_id, tiny_student_dir, keep=None):
    return ckpt.save_checkpoint(
        tmp_path / "save",
        rollout_id,
        model,
        opt,
        trainer_state={"global_step": rollout_id + 1},
        args_snapshot={"lr": 1e-3, "save": str(tmp_path / "save")},
        tokenizer_dir=tiny_student_dir,
        keep_last_n=keep,
    )


def test_round_trip_restores_model_optimizer_rng(tmp_path, model_and_opt, tiny_student_dir):
    model, opt = model_and_opt
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = _save(tmp_path, model, opt, 3, tiny_student_dir)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert path.name == "iter_0000003"
    assert (tmp_path / "save" / ckpt.POINTER).read_text().strip() == "3"
    assert (path / "model" / "config.json").is_file() and (path / "model" / "tokenizer.json").is_file()
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert "optimizer.pt" in manifest["files"] and "model/model.safetensors" in manifest["files"]

    fresh = load_hf_model(tiny_student_dir)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    torch.manual_seed(99)
    found = ckpt.latest_checkpoint(tmp_path / "save")
    state = ckpt.load_checkpoint(found, fresh, fresh_opt)
    assert state["rollout_id"] == 3 and state["global_step"] == 4
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa["state"][k][name]), torch.as_tensor(sb["state"][k][name]))
    # RNG states come back: the same draws as right after the save
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_draws


def test_no_checkpoint_yet_is_a_fresh_start(tmp_path):
    (tmp_path / "empty").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None


def test_rotation_keeps_last_n(tmp_path, model_and_opt, tiny_student_dir):
    model, opt = model_and_opt
    for rid in range(4):
        _save(tmp_path, model, opt, rid, tiny_student_dir, keep=2)
    names = sorted(p.name for p in (tmp_path / "save").iterdir() if p.name.startswith("iter_"))
    assert names == ["iter_0000002", "iter_0000003"]
    assert ckpt.latest_checkpoint(tmp_path / "save").name == "iter_0000003"


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "delete_manifest", "delete_dir"])
def test_corrupt_checkpoint_is_refused(tmp_path, model_and_opt, tiny_student_dir, damage):
    model, opt = model_and_opt
    path = _save(tmp_path, model, opt, 0, tiny_student_dir)
    target = path / "model" / "model.safetensors"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        match = "sha256"
    elif damage == "delete_file":
        (path / "optimizer.pt").unlink()
        match = "missing 'optimizer.pt'"
    elif damage == "delete_manifest":
        (path / ckpt.MANIFEST).unlink()
        match = "partial"
    else:
        import shutil

        shutil.rmtree(path)
        match = "does not exist"
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.latest_checkpoint(tmp_path / "save")


def test_iter_dirs_without_pointer_are_refused(tmp_path):
    (tmp_path / "save" / "iter_0000001").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="no latest_checkpointed_iteration"):
        ckpt.latest_checkpoint(tmp_path / "save")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, model_and_opt, tiny_student_dir, monkeypatch):
    """A write error (e.g. disk full) mid-save: no temp dir left, pointer still names the old checkpoint."""
    model, opt = model_and_opt
    _save(tmp_path, model, opt, 0, tiny_student_dir)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, model, opt, 1, tiny_student_dir)
    root = tmp_path / "save"
    assert sorted(p.name for p in root.iterdir()) == sorted([ckpt.POINTER, "iter_0000000"])
    assert ckpt.latest_checkpoint(root).name == "iter_0000000"


def test_save_hf_weights_is_loadable(tmp_path, model_and_opt, tiny_student_dir):
    model, _ = model_and_opt
    out = ckpt.save_hf_weights(model, tmp_path / "w" / "weight_v000001", tokenizer_dir=tiny_student_dir)
    again = load_hf_model(out)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".")]


def test_checkpoint_without_optimizer_state_loads_model(tmp_path, model_and_opt, tiny_student_dir, caplog):
    """--no-save-optim: no optimizer.pt; the model still loads and AdamW starts fresh (with a warning)."""
    model, _ = model_and_opt
    path = _save(tmp_path, model, None, 0, tiny_student_dir)
    assert not (path / "optimizer.pt").exists()
    fresh = load_hf_model(tiny_student_dir)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "save"), fresh, fresh_opt)
    assert "no optimizer state" in caplog.text and not fresh_opt.state_dict()["state"]
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
