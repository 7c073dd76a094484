"""--loss-type wiring of the torch trainer: every ta_opd.sd_losses loss, the trainer-side teacher,
sparse = dense, and the self-distillation teacher (LoRA adapter disabled / frozen copy)."""

from __future__ import annotations

import pytest
import torch

from slime.backends.torch_utils.distill import merged_lora_state_dict
from slime.backends.torch_utils.model import build_response_batch, last_hidden_states
from slime.backends.train_step import micro_batches
from slime.utils.arguments import SD_LOSS_TYPES
from ta_opd.loss_registry import loss_types_needing
from tests.backends.torch_trainer_inputs import fake_rollout, make_trainer, trainer_args


def make_args(student_dir, tmp_path, *extra: str):
    return trainer_args(student_dir, tmp_path, *extra, micro_batch_size=2, lr=1e-2)


def make_rollout(seed: int = 0, n: int = 4, keep: float = 0.4, teacher_prompts: bool = False) -> dict:
    """Random ids and masks, no log-probs; sample 1 has no kept token."""
    return fake_rollout(
        seed, n, keep, min_response=4, min_token_id=3, log_probs=False, teacher_prompts=teacher_prompts
    )


def test_loss_type_choices_come_from_the_registry():
    assert SD_LOSS_TYPES == loss_types_needing("teacher") and "pwopsd" in SD_LOSS_TYPES


def test_sd_loss_needs_a_teacher(tiny_student_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher in the trainer"):
        make_args(tiny_student_dir, tmp_path, "--loss-type", "opsd")


@pytest.mark.parametrize("loss_type", sorted(SD_LOSS_TYPES))
def test_each_loss_type_one_step(loss_type, tiny_student_dir, tiny_teacher_dir, tmp_path):
    """One trainer step: finite loss; d loss / d hidden is non-zero at kept response rows only."""
    args = make_args(
        tiny_student_dir, tmp_path, "--loss-type", loss_type, "--opd-teacher-hf-checkpoint", str(tiny_teacher_dir),
        "--sd-topk", "4", "--eopd-entropy-gate", "0.0",
    )  # fmt: skip
    trainer = make_trainer(args)
    data = make_rollout(0)
    # gradient of the loss with respect to every final hidden state, through the trainer's own loss call
    captured = {}
    import slime.backends.torch_utils.distill as distill

    real = distill.last_hidden_states

    def spy(model, ids):
        h = real(model, ids)
        if h.requires_grad:
            h.retain_grad()
            captured.setdefault("h", []).append(h)
        return h

    distill.last_hidden_states = spy
    try:
        before = trainer.state_for_test()
        metrics = trainer.train(0, data)
    finally:
        distill.last_hidden_states = real
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["train/sd_teacher_rkl"] > 0
    mbs = micro_batches(list(range(4)), 2)
    for h, mb in zip(captured["h"], mbs, strict=True):
        batch = build_response_batch(
            [data["tokens"][i] for i in mb], [data["prompt_lengths"][i] for i in mb],
            [data["response_lengths"][i] for i in mb],
        )  # fmt: skip
        kept = torch.cat([torch.tensor(data["loss_masks"][i], dtype=torch.bool) for i in mb])
        grad = h.grad if h.grad is not None else torch.zeros_like(h)
        row_norm = grad.norm(dim=-1)  # [B, T]
        at_kept = row_norm[batch.row[kept], batch.pred_pos[kept]]
        others = row_norm.clone()
        others[batch.row[kept], batch.pred_pos[kept]] = 0
        assert float(others.abs().max()) == 0.0, "gradient outside the kept tokens"
        if bool(kept.any()) and loss_type != "reopold":  # REOPOLD's mask M may drop a kept token
            assert bool((at_kept > 0).all())
    after = trainer.state_for_test()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sparse_chunked_equals_dense_opsd(tiny_student_dir, tiny_teacher_dir, tmp_path):
    """OPSD in float64: the chunked kept-rows path gives the dense [N, V] reference's loss and gradients."""
    results = []
    for extra in ((), ("--no-sparse-lm-head",)):
        args = make_args(
            tiny_student_dir, tmp_path, "--loss-type", "opsd", "--opd-teacher-hf-checkpoint", str(tiny_teacher_dir),
            "--sd-chunk-size", "3", "--lr", "0", *extra,
        )  # fmt: skip
        trainer = make_trainer(args)
        metrics = trainer.train(0, make_rollout(1))
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((metrics["train/loss"], grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-12)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10, rtol=0, msg=name)


def _base_hidden(student_dir, ids):
    from slime.backends.torch_utils.model import load_hf_model

    base = load_hf_model(student_dir, dtype="float64")
    with torch.no_grad():
        return last_hidden_states(base.eval(), ids)


def test_self_distillation_lora_teacher_is_the_adapter_disabled_base(tiny_student_dir, tmp_path):
    args = make_args(
        tiny_student_dir, tmp_path, "--loss-type", "opsd", "--self-distillation", "--label-key", "label",
        "--lora-rank", "4", "--lr", "5e-2",
    )  # fmt: skip
    trainer = make_trainer(args)
    teacher = trainer.distill.teacher
    assert teacher.mode == "self-lora" and teacher.model is trainer.model  # no second copy of the weights
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < n_params // 2  # only the adapter trains
    data = make_rollout(2, teacher_prompts=True)
    for rollout_id in range(2):
        metrics = trainer.train(rollout_id, data)
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ids = torch.tensor([data["sd_teacher_prompt_tokens"][0] + data["tokens"][0][data["prompt_lengths"][0] :]])
    base = _base_hidden(tiny_student_dir, ids)
    torch.testing.assert_close(teacher.hidden(ids), base, atol=1e-12, rtol=0)  # teacher = base weights
    with torch.no_grad():
        student = last_hidden_states(trainer.model, ids)
    assert float((student - base).abs().max()) > 1e-6  # the student moved
    # the merged export (what the engines load) equals the adapted student
    merged = merged_lora_state_dict(trainer.distill.peft_model)
    from slime.backends.torch_utils.model import load_hf_model

    export = load_hf_model(tiny_student_dir, dtype="float64")
    missing, unexpected = export.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is saved once
    export.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(last_hidden_states(export.eval(), ids), student, atol=1e-10, rtol=0)


def test_self_distillation_without_lora_keeps_a_frozen_copy(tiny_student_dir, tmp_path):
    args = make_args(
        tiny_student_dir, tmp_path, "--loss-type", "pwopsd", "--self-distillation", "--label-key", "label",
    )  # fmt: skip
    trainer = make_trainer(args)
    teacher = trainer.distill.teacher
    assert teacher.mode == "self-frozen" and teacher.model is not trainer.model
    assert not any(p.requires_grad for p in teacher.model.parameters())
    trainer.train(0, make_rollout(3, teacher_prompts=True))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(teacher.hidden(ids), _base_hidden(tiny_student_dir, ids), atol=1e-12, rtol=0)


def test_privileged_prompt_text_and_prefill():
    from types import SimpleNamespace

    from slime.rollout.self_distillation import privileged_prefill, teacher_prompt_text
    from slime.utils.types import Sample

    assert teacher_prompt_text("A {label} B {prompt}", "p{label}", "x{prompt}") == "A x{prompt} B p{label}"
    with pytest.raises(ValueError, match="must contain"):
        teacher_prompt_text("{prompt}", "p", "l")
    sample = Sample(prompt="2+3=", label="5", tokens=[1, 2, 3, 40, 41], response_length=2)
    sample.metadata["sd_teacher_prompt_ids"] = [9, 9, 9, 9]
    payload = privileged_prefill(SimpleNamespace(), sample, {"input_ids": [1, 2, 3, 40, 41]})
    assert payload["input_ids"] == [9, 9, 9, 9, 40, 41] and payload["logprob_start_len"] == 3


def test_sft_loss_is_the_kept_token_nll(tiny_student_dir, tmp_path):
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--loss-type", "sft_loss", "--lr", "0"))
    data = make_rollout(4)
    old = trainer.compute_log_probs(data)  # rollout temperature 1: the same log-probs as the loss
    expected = sum(
        float(-o[torch.tensor(m, dtype=torch.bool)].mean())
        for o, m in zip(old, data["loss_masks"], strict=True)
        if any(m)
    ) / len(old)
    assert trainer.train(0, data)["train/loss"] == pytest.approx(expected, abs=1e-10)
