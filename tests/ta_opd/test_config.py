"""SelectionConfig / TokenBatch validation and the method-alias table (clear errors, METHOD.md §4–5)."""

from __future__ import annotations

import pytest
import torch
from reference import batch_from_rows

from ta_opd import FORCED_RATIO, METHOD_ALIASES, SELECTORS, SelectionConfig, resolve_alias, select_tokens


def test_defaults_are_method_md():
    cfg = SelectionConfig()
    assert (cfg.mask, cfg.ratio, cfg.seed, cfg.min_keep_per_sample, cfg.gamma) == ("full", 1.0, 42, 1, 0.5)
    assert (cfg.compat_proxy, cfg.prefix_ema_alpha, cfg.normalization) == ("mass", 0.9, "batch_quantile")
    assert (cfg.q_low, cfg.q_high, cfg.topk_k, cfg.ca_softor_variant) == (0.05, 0.95, 16, "code")
    assert (cfg.exact_cmass, cfg.exact_cmass_max_union, cfg.exact_cmass_overflow) == (False, 4096, "fallback")
    assert cfg.validate() is cfg and not cfg.selecting
    assert SelectionConfig(mask="ca_softor", ratio=0.03).selecting


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"mask": "nope"}, r"unknown mask 'nope'.*dlearn_high"),
        ({"mask": "teachability"}, r"alias 'teachability' means mask 'dlearn_high'"),
        ({"mask": "pure_opd"}, r"alias 'pure_opd' means mask 'full'"),
        ({"mask": "ca_softor", "ratio": 0.0}, r"ratio must be > 0 with mask 'ca_softor', got 0.0"),
        ({"mask": "ca_softor", "ratio": -1.0}, r"ratio must be > 0"),
        ({"normalization": "zscore"}, r"unknown normalization 'zscore'.*batch_quantile"),
        ({"compat_proxy": "jaccard"}, r"unknown compat proxy 'jaccard'.*prefix_ema"),
        ({"ca_softor_variant": "blog"}, r"unknown ca_softor variant 'blog'"),
        ({"exact_cmass_overflow": "drop"}, r"unknown exact-cmass overflow rule 'drop'"),
        ({"nonfinite_policy": "ignore"}, r"unknown nonfinite policy 'ignore'"),
        ({"q_low": 0.9, "q_high": 0.1}, r"q_low < q_high.*q_low=0.9"),
        ({"q_low": 0.5, "q_high": 0.5}, r"q_low < q_high"),
        ({"q_low": -0.1}, r"q_low"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"prefix_ema_alpha": 2.0}, r"prefix_ema_alpha"),
        ({"min_keep_per_sample": -1}, r"min_keep_per_sample"),
        ({"mask": "entropy", "ratio": 0.5, "topk_k": 0}, r"topk_k must be >= 1"),
        ({"exact_cmass_max_union": 0}, r"exact_cmass_max_union"),
    ],
)
def test_invalid_config_values(fields, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**fields).validate()


def test_select_tokens_validates_the_config():
    batch = batch_from_rows([{"s": [(1, 0.5)], "t": [(1, 0.5)]}], 1)
    with pytest.raises(ValueError, match="unknown mask"):
        select_tokens(batch, SelectionConfig(mask="teachability", ratio=0.5))


def test_from_mapping():
    cfg = SelectionConfig.from_mapping({"mask": "q3", "ratio": 0.1})
    assert cfg.mask == "q3" and cfg.ratio == 0.1
    with pytest.raises(ValueError, match=r"unknown SelectionConfig fields \['opd_ratio'\]"):
        SelectionConfig.from_mapping({"opd_ratio": 0.1})


def test_alias_table_and_resolve():
    assert METHOD_ALIASES == {
        "pure_opd": "full",
        "teachability": "dlearn_high",
        "teachability_entropy": "ca_softor",
        "entropy": "entropy",
        "tip": "tip",
        "divergence": "divergence",
        "random": "random",
        "sft_teacher": "full",
    }
    assert FORCED_RATIO == {"pure_opd": 1.0, "sft_teacher": 1.0}
    for alias, mask in METHOD_ALIASES.items():
        assert mask in SELECTORS and resolve_alias(alias) == mask
    for mask in SELECTORS.names():
        assert resolve_alias(mask) == mask  # mask names pass through
    with pytest.raises(ValueError, match=r"unknown method alias or mask 'teach'.*aliases.*masks"):
        resolve_alias("teach")


def test_sft_baseline_alias_flags():
    from ta_opd.aliases import method_flags

    assert method_flags("sft_teacher") == (
        "--loss-type", "sft_loss",
        "--custom-generate-function-path", "slime.rollout.sft_baseline.generate_with_teacher",
    )  # fmt: skip
    assert method_flags("teachability") == ()
    with pytest.raises(ValueError, match="unknown method alias 'nope'"):
        method_flags("nope")


# ---------------------------------------------------------------- TokenBatch validation


def _batch():
    return batch_from_rows([{"s": [(1, 0.5), (2, 0.2)], "t": [(1, 0.5), (3, 0.2)]}] * 3, 2)


def test_k_mismatch_between_sides():
    batch = _batch()
    batch.teacher_topk_ids = batch.teacher_topk_ids[:, :1]
    batch.teacher_topk_logp = batch.teacher_topk_logp[:, :1]
    with pytest.raises(ValueError, match="student K=2, teacher K=1"):
        batch.validate()


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("loss_mask", torch.ones(2, dtype=torch.bool), r"loss_mask must have shape \[3\], got \(2,\)"),
        ("teacher_logp", torch.zeros(3, 1), r"teacher_logp must have shape \[3\]"),
        ("student_topk_logp", torch.zeros(3, 3), r"student top-K ids \(3, 2\) and log-probs \(3, 3\)"),
        ("sampled_ids", torch.zeros(4, dtype=torch.long), r"must have shape \[4\], got \(3,\)"),
        ("teacher_logp_on_student_topk", torch.zeros(3, 5), r"teacher_logp_on_student_topk shape"),
        ("sample_index", torch.tensor([0, -1, 0]), r"sample_index and position must be >= 0"),
    ],
)
def test_shape_mismatch(name, value, match):
    batch = _batch()
    setattr(batch, name, value)
    with pytest.raises(ValueError, match=match):
        batch.validate()


def test_dtype_errors():
    batch = _batch()
    batch.loss_mask = batch.loss_mask.long()
    with pytest.raises(TypeError, match="loss_mask must be bool"):
        batch.validate()
    batch = _batch()
    batch.student_topk_ids = batch.student_topk_ids.int()
    with pytest.raises(TypeError, match="student_topk_ids must be int64"):
        batch.validate()


def test_validation_through_select_tokens():
    batch = _batch()
    batch.loss_mask = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_mask"):
        select_tokens(batch, SelectionConfig(mask="ca_softor", ratio=0.5))


def test_ratio_above_one_is_valid_and_means_no_masking():
    # METHOD.md §5: ρ ≥ 1 → no masking (not an error)
    cfg = SelectionConfig(mask="ca_softor", ratio=1.5).validate()
    assert not cfg.selecting
