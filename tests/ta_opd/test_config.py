"""SelectionConfig / TokenBatch validation (clear errors, docs/method.md §4–5); aliases: test_aliases.py."""

from __future__ import annotations

import pytest
import torch
from reference import batch_from_rows

from ta_opd import SelectionConfig, select_tokens
from ta_opd.config import MASKS, NORMALIZATIONS, options


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
        ({"mask": "teachability"}, r"unknown mask 'teachability'.*a method alias .* ta_opd.aliases.resolve_alias"),
        ({"mask": "ca_softor", "ratio": 0.0}, r"ratio must be > 0 with mask 'ca_softor' \(.*\), got 0.0"),
        ({"mask": "ca_softor", "ratio": -1.0}, r"ratio must be > 0"),
        ({"mask": "ca_softor", "ratio": float("nan")}, r"ratio must be a finite number, got nan"),
        ({"ratio": float("inf")}, r"ratio must be a finite number, got inf"),
        ({"ratio": "0.1"}, r"ratio must be a number, got '0.1'"),
        ({"normalization": "zscore"}, r"unknown normalization 'zscore'.*batch_quantile"),
        ({"compat_proxy": "jaccard"}, r"unknown compat_proxy 'jaccard'.*prefix_ema"),
        ({"ca_softor_variant": "blog"}, r"unknown ca_softor_variant 'blog'"),
        ({"exact_cmass_overflow": "drop"}, r"unknown exact_cmass_overflow 'drop'"),
        ({"nonfinite_policy": "ignore"}, r"unknown nonfinite_policy 'ignore'"),
        ({"exact_cmass": 1}, r"exact_cmass must be true or false, got 1"),
        ({"seed": -1}, r"seed must be in \[0, 2\^32\) \(a 32-bit seed\), got -1"),
        ({"seed": 2**32}, r"seed must be in \[0, 2\^32\)"),
        ({"topk_k": 2.0}, r"topk_k must be an integer, got 2.0"),
        ({"min_keep_per_sample": True}, r"min_keep_per_sample must be an integer, got True"),
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


def test_numpy_scalars_are_numbers():
    import numpy as np

    cfg = SelectionConfig(mask="tip", ratio=np.float32(0.5), seed=np.int64(3), topk_k=np.int32(4)).validate()
    assert cfg.selecting


def test_messages_name_the_callers_names():
    # the stack passes its flags: the same check, in the user's terms
    names = {"ratio": "--opd-budget-ratio", "mask": "--opd-budget-mask", "q_low": "--opd-metric-q-low"}
    with pytest.raises(ValueError, match=r"^--opd-budget-ratio must be > 0 with --opd-budget-mask 'tip'"):
        SelectionConfig(mask="tip", ratio=0.0).validate(names)
    with pytest.raises(ValueError, match=r"^--opd-metric-q-low must be in \[0, 1\], got 1.5"):
        SelectionConfig(q_low=1.5).validate(names)


@pytest.mark.parametrize("ratio", [1e-9, 0.5, 1.0, 1.5, 7])
def test_any_positive_ratio_is_valid_with_a_mask(ratio):
    # docs/method.md §5: ρ > 0 with a mask; ρ ≥ 1 keeps every valid token (no masking)
    cfg = SelectionConfig(mask="tip", ratio=ratio).validate()
    assert cfg.selecting == (ratio < 1)


@pytest.mark.parametrize("ratio", [0.0, -3.0])
def test_full_ignores_the_ratio(ratio):
    assert not SelectionConfig(mask="full", ratio=ratio).validate().selecting


def test_every_field_declares_its_option():
    # one definition per option: default, flag, help, and choices or a range for every non-bool field
    flags = set()
    for f, opt in options():
        assert opt.help.strip(), f.name
        if opt.flag is not None:
            assert opt.flag.startswith("--opd-") and opt.flag not in flags, f.name
            flags.add(opt.flag)
        if isinstance(f.default, str):
            assert opt.choices and f.default in opt.choices, f.name
        elif isinstance(f.default, int | float) and not isinstance(f.default, bool) and opt.range is not None:
            assert opt.range.contains(f.default), f.name
    assert SelectionConfig().validate() == SelectionConfig()


def test_registries_implement_exactly_the_declared_names():
    from ta_opd.normalize import NORMALIZERS
    from ta_opd.selectors import SELECTORS, _register

    assert SELECTORS.names() == list(MASKS)
    assert NORMALIZERS.names() == list(NORMALIZATIONS)
    with pytest.raises(ValueError, match=r"selector 'mine' is not declared in ta_opd.config.MASKS"):
        _register("mine", lambda f, cfg, r: f.h, "mine")


def test_config_imports_nothing_of_the_package():
    # the registries and the alias table sit above the config: it is a leaf (tests/test_import_graph.py)
    import ast
    from pathlib import Path

    import ta_opd.config

    tree = ast.parse(Path(ta_opd.config.__file__).read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("ta_opd")]


def test_select_tokens_validates_the_config():
    batch = batch_from_rows([{"s": [(1, 0.5)], "t": [(1, 0.5)]}], 1)
    with pytest.raises(ValueError, match="unknown mask"):
        select_tokens(batch, SelectionConfig(mask="teachability", ratio=0.5))


def test_from_mapping():
    cfg = SelectionConfig.from_mapping({"mask": "q3", "ratio": 0.1})
    assert cfg.mask == "q3" and cfg.ratio == 0.1
    with pytest.raises(ValueError, match=r"unknown SelectionConfig fields \['opd_ratio'\]"):
        SelectionConfig.from_mapping({"opd_ratio": 0.1})


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
    # docs/method.md §5: ρ ≥ 1 → no masking (not an error)
    cfg = SelectionConfig(mask="ca_softor", ratio=1.5).validate()
    assert not cfg.selecting
