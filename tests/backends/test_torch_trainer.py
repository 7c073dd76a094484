"""The torch trainer's OPD step: reductions, micro-batch invariance, sparse = dense, kept tokens only, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from slime.backends.torch_utils.actor import TorchTrainRayActor
from tests.backends.torch_trainer_inputs import fake_rollout, make_trainer, trainer_args

OPD_FLAGS = ("--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate")


def make_args(student_dir, tmp_path, *extra: str):
    return trainer_args(student_dir, tmp_path, *OPD_FLAGS, *extra)


make_rollout = fake_rollout


def grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_loss_by_hand_per_sample_mean(tiny_student_dir, tmp_path):
    """At ratio 1 the PPO-clip loss is -A; default reduction: Σ_i mean_{kept}(-A_i) / B (docs/method.md §1)."""
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path))
    data = make_rollout(0)
    old = trainer.compute_log_probs(data)
    expected = 0.0
    for o, t, m in zip(old, data["teacher_log_probs"], data["loss_masks"], strict=True):
        m = torch.tensor(m, dtype=torch.bool)
        adv = 1.0 * (torch.tensor(t, dtype=torch.float64) - o)
        expected += float((-adv[m]).mean()) if bool(m.any()) else 0.0
    expected /= len(old)
    metrics = trainer.train(0, data)
    assert metrics["train/loss"] == pytest.approx(expected, abs=1e-9)
    kept = sum(sum(m) for m in data["loss_masks"])
    assert metrics["train/kept_tokens"] == kept
    assert metrics["train/clipfrac"] == 0.0  # ratio is exactly 1 on the first pass
    diff = torch.cat(
        [o - torch.tensor(t, dtype=torch.float64) for o, t in zip(old, data["teacher_log_probs"], strict=True)]
    )
    mask = torch.cat([torch.tensor(m, dtype=torch.bool) for m in data["loss_masks"]])
    assert metrics["train/teacher_kl_all"] == pytest.approx(float(diff.mean()), abs=1e-12)
    assert metrics["train/teacher_kl_kept"] == pytest.approx(float(diff[mask].mean()), abs=1e-12)
    assert metrics["train/grad_norm"] > 0


def test_loss_by_hand_global_token_mean(tiny_student_dir, tmp_path):
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--calculate-per-token-loss"))
    data = make_rollout(1)
    old = trainer.compute_log_probs(data)
    adv = torch.cat(
        [torch.tensor(t, dtype=torch.float64) - o for o, t in zip(old, data["teacher_log_probs"], strict=True)]
    )
    mask = torch.cat([torch.tensor(m, dtype=torch.bool) for m in data["loss_masks"]])
    assert trainer.train(0, data)["train/loss"] == pytest.approx(float((-adv[mask]).mean()), abs=1e-9)


@pytest.mark.parametrize("per_token", [False, True])
def test_micro_batch_size_does_not_change_gradients(tiny_student_dir, tmp_path, per_token):
    extra = ("--calculate-per-token-loss",) if per_token else ()
    data = make_rollout(2)
    results = []
    for mbs in ("4", "1"):  # the whole step in one micro-batch vs one sample each
        trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", mbs, *extra))
        metrics = trainer.train(0, copy.deepcopy(data))
        results.append((metrics, grads(trainer), trainer.state_for_test()))
    for metrics, g, params in results[1:]:
        assert metrics["train/loss"] == pytest.approx(results[0][0]["train/loss"], abs=1e-12)
        assert_grads_close(g, results[0][1], atol=1e-10)
        assert_grads_close(params, results[0][2], atol=1e-8)


def test_sparse_lm_head_gradients_equal_dense(tiny_student_dir, tmp_path):
    data = make_rollout(3)
    sparse = make_trainer(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", "2"))
    dense = make_trainer(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", "2", "--no-sparse-lm-head"))
    assert sparse.sparse and not dense.sparse
    ms, md = sparse.train(0, copy.deepcopy(data)), dense.train(0, copy.deepcopy(data))
    assert ms["train/loss"] == pytest.approx(md["train/loss"], abs=1e-10)
    assert_grads_close(grads(sparse), grads(dense), atol=1e-10)


@pytest.mark.parametrize("sparse", [True, False])
def test_unkept_tokens_contribute_no_gradient(tiny_student_dir, tmp_path, sparse):
    """Changing the teacher log-prob (hence the advantage) of loss_mask=0 tokens leaves gradients unchanged."""
    extra = () if sparse else ("--no-sparse-lm-head",)
    data = make_rollout(4)
    perturbed = copy.deepcopy(data)
    for t, m in zip(perturbed["teacher_log_probs"], perturbed["loss_masks"], strict=True):
        for j, keep in enumerate(m):
            if not keep:
                t[j] -= 50.0
    out = []
    for d in (data, perturbed):
        trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", "2", *extra))
        out.append((trainer.train(0, d), grads(trainer)))
    assert out[0][0]["train/loss"] == out[1][0]["train/loss"]
    assert_grads_close(out[0][1], out[1][1], atol=0.0)
    # while perturbing a kept token does change them
    kept = copy.deepcopy(data)
    kept["teacher_log_probs"][0][data["loss_masks"][0].index(1)] -= 50.0
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", "2", *extra))
    trainer.train(0, kept)
    changed = grads(trainer)
    assert any(not torch.allclose(changed[n], out[0][1][n]) for n in changed)


def test_all_masked_rollout_gives_zero_loss_and_no_update(tiny_student_dir, tmp_path):
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path))
    before = trainer.state_for_test()
    data = make_rollout(5)
    data["loss_masks"] = [[0] * r for r in data["response_lengths"]]
    metrics = trainer.train(0, data)
    assert metrics["train/loss"] == 0.0 and metrics["train/kept_tokens"] == 0 and metrics["train/grad_norm"] == 0.0
    after = trainer.state_for_test()
    # AdamW with no gradient: parameters untouched except by nothing (grad None → skipped)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_multiple_steps_per_rollout(tiny_student_dir, tmp_path):
    args = make_args(tiny_student_dir, tmp_path, "--num-steps-per-rollout", "2")
    assert args.global_batch_size == 2
    trainer = make_trainer(args)
    metrics = trainer.train(0, make_rollout(6))
    assert trainer.global_step == 2 and metrics["train/step"] == 2.0
    # the second step sees a policy that moved, so PPO ratios differ from 1 somewhere
    assert metrics["train/samples"] == 2.0


def test_rejects_bad_rollout_data(tiny_student_dir, tmp_path):
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path))
    bad = make_rollout(7)
    bad["teacher_log_probs"][2] = bad["teacher_log_probs"][2][:-1]
    with pytest.raises(ValueError, match="sample 2: teacher_log_probs has"):
        trainer.train(0, bad)
    nan = make_rollout(7)
    nan["teacher_log_probs"][1][0] = float("nan")
    with pytest.raises(ValueError, match="sample 1: teacher_log_probs holds non-finite"):
        trainer.train(0, nan)


def test_resume_is_bit_identical_on_cpu(tiny_student_dir, tmp_path):
    """Train r0, checkpoint, train r1 == load the checkpoint in a new trainer, train r1."""
    save = tmp_path / "ckpt"
    extra = ("--save", str(save), "--load", str(save), "--micro-batch-size", "2")
    r0, r1 = make_rollout(10), make_rollout(11)
    first = make_trainer(make_args(tiny_student_dir, tmp_path, *extra))
    first.train(0, copy.deepcopy(r0))
    first.save_model(0)
    m_uninterrupted = first.train(1, copy.deepcopy(r1))
    params_uninterrupted = first.state_for_test()

    resumed = make_trainer(make_args(tiny_student_dir, tmp_path, *extra))
    assert resumed.loaded_from is not None and resumed.last_rollout_id == 0 and resumed.global_step == 1
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 1
    m_resumed = resumed.train(1, copy.deepcopy(r1))
    assert m_resumed["train/loss"] == m_uninterrupted["train/loss"]
    assert m_resumed["train/grad_norm"] == m_uninterrupted["train/grad_norm"]
    params_resumed = resumed.state_for_test()
    assert all(torch.equal(params_uninterrupted[k], params_resumed[k]) for k in params_uninterrupted)


def test_weight_push_keeps_only_latest_dir(tiny_student_dir, tmp_path):
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path))
    first = trainer.update_weights()
    second = trainer.update_weights()
    assert first != second and second.endswith("weight_v000002")
    root = tmp_path / "out" / "weights"
    assert sorted(p.name for p in root.iterdir()) == ["weight_v000002"]
    assert (root / "weight_v000002" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_gpu_step_matches_cpu(tiny_student_dir, tmp_path):
    data = make_rollout(12)
    out = []
    for use_gpu in (False, True):
        trainer = TorchTrainRayActor(1, 0)
        trainer.use_gpu = use_gpu
        trainer.init(make_args(tiny_student_dir, tmp_path, "--micro-batch-size", "2"))
        assert trainer.device.type == ("cuda" if use_gpu else "cpu")
        out.append((trainer.train(0, copy.deepcopy(data)), {k: v.cpu() for k, v in grads(trainer).items()}))
    assert out[0][0]["train/loss"] == pytest.approx(out[1][0]["train/loss"], abs=1e-9)
    assert_grads_close(out[0][1], out[1][1], atol=1e-9)


def test_bf16_step_is_finite(tiny_student_dir, tmp_path):
    args = make_args(tiny_student_dir, tmp_path, "--bf16")
    args.train_dtype = None  # --bf16 picks bfloat16 parameters
    trainer = make_trainer(args)
    assert next(trainer.model.parameters()).dtype == torch.bfloat16 and trainer.sparse
    metrics = trainer.train(0, make_rollout(13))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("train/"))
