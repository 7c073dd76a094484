"""Contract tests of the patch's ``post_process_rewards`` against this project's ``slime`` (no network)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from patch_helpers import make_batch, make_sample, opd_args

import slime.rollout.on_policy_distillation as project_opd
import slime.rollout.tip_compat as project_tip
import slime_patch.slime.rollout.on_policy_distillation as patch_opd
import slime_patch.slime.rollout.tip_compat as patch_tip
from ta_opd.api import select_tokens
from ta_opd.topk import TokenBatch

SELECTORS = ["full", "dlearn_high", "ca_softor", "entropy", "tip", "divergence", "random"]


def _reference(samples, cfg, rollout_id):
    """ta_opd.select_tokens on the same lists, built here independently of the patch."""
    lengths = [s.response_length for s in samples]
    batch = TokenBatch.from_sample_lists(
        [s.metadata["student_top_logprobs"] for s in samples],
        [s.reward["meta_info"]["input_top_logprobs"][-n:] for s, n in zip(samples, lengths, strict=True)],
        [s.tokens[-n:] for s, n in zip(samples, lengths, strict=True)],
        [s.rollout_log_probs for s in samples],
        [
            [e[0] for e in s.reward["meta_info"]["input_token_logprobs"][-n:]]
            for s, n in zip(samples, lengths, strict=True)
        ],
        [list(s.loss_mask) for s in samples],
        cfg.topk_k,
    )
    return select_tokens(batch, cfg, rollout_id)


def test_project_module_is_the_patch_module():
    assert project_opd.reward_func is patch_opd.reward_func
    assert project_opd.post_process_rewards is patch_opd.post_process_rewards
    assert project_tip.selection_config_from_args is patch_tip.selection_config_from_args
    assert project_tip.normalize_mask_name is patch_tip.normalize_mask_name


def test_teacher_log_probs_alignment_hand_case():
    # tokens 0..4; prompt = [11, 12, 13], response = [14, 15]. A full-prompt answer (logprob_start_len 0):
    # entry i is log p(token i | tokens < i), entry 0 is None. The response's are entries 3 and 4.
    sample = make_sample(0, prompt_len=3, response_len=2, k=0, seed=0, with_teacher=False)
    sample.tokens = [11, 12, 13, 14, 15]
    sample.reward = {
        "meta_info": {
            "input_token_logprobs": [
                [None, 11, None],
                [-0.1, 12, None],
                [-0.2, 13, None],
                [-0.3, 14, None],
                [-0.4, 15, None],
            ],
        }
    }
    args = opd_args(opd_topk_metrics_k=0)
    raw, rewards = patch_opd.post_process_rewards(args, [sample])
    assert raw == [0.0] and rewards == [0.0]
    assert sample.teacher_log_probs.dtype == torch.float32
    assert sample.teacher_log_probs.tolist() == pytest.approx([-0.3, -0.4])
    # The same tokens scored from the last prompt token on (the patch's own request) give the same values.
    sample.reward = {"meta_info": {"input_token_logprobs": [[-0.2, 13, None], [-0.3, 14, None], [-0.4, 15, None]]}}
    patch_opd.post_process_rewards(args, [sample])
    assert sample.teacher_log_probs.tolist() == pytest.approx([-0.3, -0.4])


def test_misaligned_teacher_answer_is_an_error():
    sample = make_sample(3, prompt_len=3, response_len=2, k=0, seed=0, with_teacher=False)
    sample.tokens = [11, 12, 13, 14, 15]
    sample.reward = {"meta_info": {"input_token_logprobs": [[-0.2, 13, None], [-0.3, 14, None], [-0.4, 99, None]]}}
    with pytest.raises(ValueError, match="sample 3.*misaligned"):
        patch_opd.post_process_rewards(opd_args(opd_topk_metrics_k=0), [sample])
    sample.reward = {"meta_info": {"input_token_logprobs": [[-0.4, 15, None]]}}
    with pytest.raises(ValueError, match="sample 3.*response length 2"):
        patch_opd.post_process_rewards(opd_args(opd_topk_metrics_k=0), [sample])
    sample.reward = 1.0
    with pytest.raises(ValueError, match="sample 3.*teacher's /generate answer"):
        patch_opd.post_process_rewards(opd_args(opd_topk_metrics_k=0), [sample])


@pytest.mark.parametrize("mask", SELECTORS)
def test_masks_equal_ta_opd_on_the_same_tensors(mask):
    samples = make_batch()
    samples[1].loss_mask[2] = 0  # e.g. a tool token: never supervised
    ratio = 1.0 if mask == "full" else 0.1
    args = opd_args(opd_budget_mask=mask, opd_budget_ratio=ratio)
    cfg = patch_tip.selection_config_from_args(args)
    expected = _reference(copy.deepcopy(samples), cfg, rollout_id=7)

    raw, rewards = patch_opd.post_process_rewards(args, samples, rollout_id=7)

    got = torch.tensor([v for s in samples for v in s.loss_mask], dtype=torch.bool)
    assert torch.equal(got, torch.as_tensor(expected.mask, dtype=torch.bool))
    assert all(isinstance(v, int) for s in samples for v in s.loss_mask)
    assert samples[1].loss_mask[2] == 0
    n_valid = sum(sum(s.loss_mask) for s in make_batch()) - 1
    if mask == "full":
        assert int(got.sum()) == n_valid
    else:  # global budget ceil(0.1 N) plus at most min-keep 1 per sample
        assert math.ceil(0.1 * n_valid) <= int(got.sum()) <= math.ceil(0.1 * n_valid) + len(samples)
        assert all(sum(s.loss_mask) >= 1 for s in samples)
    metrics = samples[0].metadata["opd_step_metrics"]
    http = {f"opd/teacher_http_{k}" for k in ("requests", "retries", "failures")}  # the teacher requests' counters
    assert metrics and set(metrics) == set(expected.metrics) | http
    assert all(isinstance(v, float) for v in metrics.values())
    for name, value in expected.metrics.items():
        assert metrics[name] == pytest.approx(float(value), nan_ok=True)
    assert raw == [0.0] * 4 and rewards == [0.0] * 4


def test_release_alias_selects_like_its_mask():
    a, b = make_batch(), make_batch()
    patch_opd.post_process_rewards(opd_args(opd_budget_mask="teachability", opd_budget_ratio=0.1), a, rollout_id=0)
    patch_opd.post_process_rewards(opd_args(opd_budget_mask="dlearn_high", opd_budget_ratio=0.1), b, rollout_id=0)
    assert [s.loss_mask for s in a] == [s.loss_mask for s in b]
    assert patch_tip.normalize_mask_name("Dlearn-High") == "dlearn_high"
    assert patch_tip.normalize_mask_name("pure_opd") == "full"


def test_samples_keep_order_and_fields():
    samples = make_batch()
    before = [copy.deepcopy(s) for s in samples]
    ids = [id(s) for s in samples]
    patch_opd.post_process_rewards(opd_args(opd_budget_mask="dlearn_high", opd_budget_ratio=0.2), samples)
    assert [id(s) for s in samples] == ids
    changed = {"teacher_log_probs", "loss_mask", "metadata"}
    for old, new in zip(before, samples, strict=True):
        for name in old.__dataclass_fields__:
            if name not in changed:
                assert getattr(old, name) == getattr(new, name), name
        extra = {k: v for k, v in new.metadata.items() if k != "opd_step_metrics"}
        assert extra == old.metadata
        assert len(new.loss_mask) == new.response_length
        assert new.teacher_log_probs.shape == (new.response_length,)
    assert "opd_step_metrics" in samples[0].metadata
    assert all("opd_step_metrics" not in s.metadata for s in samples[1:])


def test_removed_sample_is_never_selected():
    samples = make_batch()
    samples[2].remove_sample = True
    patch_opd.post_process_rewards(opd_args(opd_budget_mask="entropy", opd_budget_ratio=0.5), samples)
    assert sum(samples[2].loss_mask) == 0
    assert all(sum(s.loss_mask) > 0 for i, s in enumerate(samples) if i != 2)


def test_selector_without_top_k_is_an_error_naming_the_sample():
    samples = make_batch()
    del samples[2].metadata["student_top_logprobs"]
    with pytest.raises(ValueError, match="sample 2.*student_top_logprobs"):
        patch_opd.post_process_rewards(opd_args(opd_budget_mask="dlearn_high", opd_budget_ratio=0.1), samples)
    samples = make_batch()
    samples[1].metadata["student_top_logprobs"] = samples[1].metadata["student_top_logprobs"][:-1]
    with pytest.raises(ValueError, match="sample 1"):
        patch_opd.post_process_rewards(opd_args(opd_budget_mask="tip", opd_budget_ratio=0.1), samples)
    samples = make_batch()
    samples[0].reward["meta_info"]["input_top_logprobs"] = []
    with pytest.raises(ValueError, match="sample 0.*input_top_logprobs"):
        patch_opd.post_process_rewards(opd_args(opd_budget_mask="entropy", opd_budget_ratio=0.1), samples)


def test_full_without_top_k_behaves_like_upstream():
    samples = make_batch(with_student_topk=False)
    masks = [list(s.loss_mask) for s in samples]
    raw, rewards = patch_opd.post_process_rewards(opd_args(), samples)
    assert [s.loss_mask for s in samples] == masks
    assert all(s.teacher_log_probs.shape == (s.response_length,) for s in samples)
    assert samples[0].metadata["opd_step_metrics"] == {
        "opd/teacher_http_requests": 0.0,
        "opd/teacher_http_retries": 0.0,
        "opd/teacher_http_failures": 0.0,
    }
    assert raw == rewards == [0.0] * len(samples)


def test_config_from_partial_args_uses_method_defaults():
    import argparse

    cfg = patch_tip.selection_config_from_args(argparse.Namespace(opd_budget_mask="tip", opd_budget_ratio=0.05))
    assert (cfg.mask, cfg.ratio, cfg.topk_k, cfg.seed, cfg.min_keep_per_sample) == ("tip", 0.05, 16, 42, 1)
    assert (cfg.normalization, cfg.q_low, cfg.q_high, cfg.compat_proxy) == ("batch_quantile", 0.05, 0.95, "mass")
    cfg = patch_tip.selection_config_from_args(argparse.Namespace())
    assert cfg.mask == "full"


def test_ta_opd_arguments_registers_every_contract_flag():
    import argparse

    from slime_patch.slime.utils.ta_opd_arguments import add_ta_opd_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--opd-topk-metrics-k", type=int, default=8)  # a checkout that already has one flag
    add_ta_opd_arguments(parser)
    add_ta_opd_arguments(parser)  # idempotent
    args = parser.parse_args(["--opd-budget-mask", "teachability_entropy", "--opd-exact-cmass"])
    flags = [
        "opd_topk_metrics_k", "opd_budget_mask", "opd_budget_ratio", "opd_budget_mask_seed",
        "opd_budget_min_keep_per_sample", "opd_budget_gamma", "opd_compat_proxy", "opd_compat_prefix_ema_alpha",
        "opd_metric_normalization", "opd_metric_q_low", "opd_metric_q_high", "opd_exact_cmass",
        "opd_exact_cmass_max_union", "opd_exact_cmass_overflow", "opd_token_bank_dir", "opd_token_bank_format",
        "opd_token_bank_raw_topk", "opd_token_bank_pair_id", "opd_teacher_name", "opd_student_name",
    ]  # fmt: skip
    assert all(hasattr(args, f) for f in flags)
    assert args.opd_topk_metrics_k == 8 and args.opd_exact_cmass
    assert patch_tip.selection_config_from_args(args).mask == "ca_softor"
    defaults = add_ta_opd_arguments(argparse.ArgumentParser()).parse_args([])
    assert (defaults.opd_budget_mask, defaults.opd_budget_ratio, defaults.opd_topk_metrics_k) == ("full", 1.0, 16)
    assert (defaults.opd_exact_cmass_max_union, defaults.opd_exact_cmass_overflow) == (4096, "fallback")
    with pytest.raises(SystemExit):
        add_ta_opd_arguments(argparse.ArgumentParser()).parse_args(["--opd-budget-mask", "nope"])


def test_token_bank_is_written_when_configured(tmp_path):
    samples = make_batch()
    args = opd_args(opd_budget_mask="dlearn_high", opd_budget_ratio=0.1, opd_token_bank_dir=str(tmp_path / "bank"),
                    opd_token_bank_format="jsonl", opd_teacher_name="t", opd_student_name="s")  # fmt: skip
    patch_opd.post_process_rewards(args, samples, rollout_id=3)
    files = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert any(name.endswith(".jsonl") and "contexts" not in name for name in files), files
    assert any("contexts" in name for name in files), files
