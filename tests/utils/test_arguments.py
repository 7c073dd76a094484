"""The flat parser: upstream names and defaults, YAML overrides, clear errors for contradictions."""

from __future__ import annotations

import pytest

from slime.utils.arguments import dump_markdown, get_parser, parse_args
from ta_opd.config import MASKS, SelectionConfig, options

BASE = ["--rollout-batch-size", "2", "--rollout-max-response-len", "16"]


def test_defaults_match_upstream_and_method():
    args = parse_args(BASE)
    assert args.rollout_function_path == "slime.rollout.sglang_rollout.generate_rollout"
    assert args.data_source_path == "slime.rollout.data_source.RolloutDataSourceWithBuffer"
    assert args.eval_function_path == args.rollout_function_path
    assert (args.n_samples_per_prompt, args.micro_batch_size, args.seed, args.rollout_seed) == (1, 1, 1234, 42)
    assert (args.eps_clip, args.eps_clip_high, args.opd_kl_coef, args.lr) == (0.2, 0.28, 1.0, 1e-6)
    assert args.input_key == "input" and args.label_key is None and args.metadata_key == "metadata"
    assert args.advantage_estimator == "grpo" and args.loss_type == "policy_loss"
    # docs/method.md defaults of the TA-OPD flags
    assert args.opd_topk_metrics_k == 16
    assert args.opd_budget_mask == "full" and args.opd_budget_ratio == 1.0
    assert (args.opd_budget_mask_seed, args.opd_budget_min_keep_per_sample, args.opd_budget_gamma) == (42, 1, 0.5)
    assert args.opd_compat_proxy == "mass" and args.opd_compat_prefix_ema_alpha == 0.9
    assert (args.opd_metric_normalization, args.opd_metric_q_low, args.opd_metric_q_high) == (
        "batch_quantile",
        0.05,
        0.95,
    )
    assert args.opd_exact_cmass is False and args.opd_exact_cmass_max_union == 4096
    assert args.opd_exact_cmass_overflow == "fallback"
    # derived
    assert args.global_batch_size == 2 and args.over_sampling_batch_size == 2 and args.rollout_num_engines == 1
    assert args.metrics_path.endswith("metrics.jsonl")


def test_flag_round_trip(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    argv = BASE + [
        "--n-samples-per-prompt", "4",
        "--global-batch-size", "4",
        "--micro-batch-size", "2",
        "--rollout-stop", "a", "b",
        "--rollout-stop-token-ids", "3", "5",
        "--use-opd", "--opd-type", "sglang",
        "--opd-teacher-hf-checkpoint", str(teacher),
        "--opd-budget-mask", "dlearn_high", "--opd-budget-ratio", "0.1",
        "--opd-exact-cmass", "--opd-token-bank-format", "jsonl",
        "--advantage-estimator", "reinforce_plus_plus",
    ]  # fmt: skip
    args = parse_args(argv)
    assert args.n_samples_per_prompt == 4 and args.global_batch_size == 4 and args.micro_batch_size == 2
    assert args.rollout_stop == ["a", "b"] and args.rollout_stop_token_ids == [3, 5]
    assert args.opd_budget_mask == "dlearn_high" and args.opd_budget_ratio == 0.1 and args.opd_exact_cmass
    # OPD sglang fills the upstream OPD plug-ins when none are given
    assert args.custom_rm_path == "slime.rollout.on_policy_distillation.reward_func"
    assert args.custom_reward_post_process_path == "slime.rollout.on_policy_distillation.post_process_rewards"


def test_method_alias_resolves_to_mask(tmp_path):
    args = parse_args(
        BASE
        + ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://x/generate", "--opd-budget-mask", "teachability"]
    )
    assert args.opd_budget_mask == "dlearn_high"
    choices = next(a.choices for a in get_parser()._actions if a.dest == "opd_budget_mask")
    assert set(MASKS) <= set(choices) and {"teachability", "none", "q3_teachability_low"} <= set(choices)
    assert "sft_teacher" not in choices  # a launcher method (it sets the loss), not a mask


def test_every_ta_opd_flag_default_is_the_selection_config_field():
    # one definition: the flag of each SelectionConfig field takes its default, choices and help from the field
    actions = {a.option_strings[0]: a for a in get_parser()._actions if a.option_strings}
    defaults = parse_args(BASE)
    flagged = [(f, opt) for f, opt in options() if opt.flag]
    assert len(flagged) == 14
    for f, opt in flagged:
        action = actions[opt.flag]
        assert action.default == f.default and type(action.default) is type(f.default), opt.flag
        assert getattr(defaults, action.dest) == getattr(SelectionConfig(), f.name), opt.flag
        assert action.help == opt.help, opt.flag
        if opt.choices is not None and f.name != "mask":
            assert list(action.choices) == list(opt.choices), opt.flag


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--opd-budget-mask", "tip", "--opd-budget-ratio", "-0.5"], r"^--opd-budget-ratio must be > 0 with"),
        (["--opd-budget-mask-seed", "-1"], r"^--opd-budget-mask-seed must be in \[0, 2\^32\)"),
        (["--opd-budget-gamma", "1.5"], r"^--opd-budget-gamma must be in \[0, 1\], got 1.5"),
        (["--opd-exact-cmass-max-union", "0"], r"^--opd-exact-cmass-max-union must be >= 1, got 0"),
        (
            ["--opd-budget-mask", "tip", "--opd-budget-ratio", "0.1", "--opd-topk-metrics-k", "0"],
            r"^--opd-topk-metrics-k must be >= 1 with --opd-budget-mask 'tip', got 0",
        ),
    ],
)
def test_ta_opd_flag_values_are_checked_by_the_config(argv, message):
    opd = ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://x/generate"]
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + opd + argv)


def test_ratio_above_one_with_a_mask_keeps_every_token():
    # docs/method.md §5: ρ ≥ 1 means no masking, as in the release (not an error)
    opd = ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://x/generate"]
    args = parse_args(BASE + opd + ["--opd-budget-mask", "tip", "--opd-budget-ratio", "1.5"])
    assert args.opd_budget_ratio == 1.5


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--no-such-flag", "1"])
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--rollout-batch-size is required"),
        (["--opd-budget-mask", "dlearn_high"], "needs --use-opd"),
        (["--use-opd"], "--opd-type"),
        (["--use-opd", "--opd-type", "megatron"], "--opd-teacher-load"),
        (["--use-opd", "--opd-type", "sglang"], "--rm-url"),
        (
            [
                "--use-opd",
                "--opd-type",
                "sglang",
                "--rm-url",
                "u",
                "--opd-budget-mask",
                "tip",
                "--opd-budget-ratio",
                "0",
            ],
            "--opd-budget-ratio must be > 0",
        ),
        (["--opd-type", "sglang"], "--use-opd is not"),
        (
            ["--n-samples-per-prompt", "2", "--global-batch-size", "4", "--micro-batch-size", "3"],
            "--micro-batch-size 3 must divide",
        ),
        (["--global-batch-size", "3"], "must divide rollout_batch_size"),
        (["--num-steps-per-rollout", "2", "--global-batch-size", "2"], "contradicts --num-steps-per-rollout"),
        (["--colocate", "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "4"], "--colocate"),
        (["--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"], "must divide --rollout-num-gpus 3"),
        (["--load", "/nonexistent/ckpt"], "--load"),
        (["--rollout-temperature", "0"], "--rollout-temperature"),
        (["--loss-type", "custom_loss"], "--custom-loss-function-path"),
        (["--eval-interval", "2"], "--eval-prompt-data"),
        (["--opd-metric-q-low", "0.9", "--opd-metric-q-high", "0.1"], "q-low"),
    ],
)
def test_contradictions_raise_clear_errors(extra, message):
    argv = (BASE if "--rollout-batch-size is required" not in message else ["--rollout-max-response-len", "4"]) + extra
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("-", r"\-").replace(".", r"\.")):
        parse_args(argv)


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "rollout-batch-size: 8\n"
        "rollout_max_response_len: 32\n"
        "n-samples-per-prompt: 2\n"
        "rollout-stop: stop1\n"
        "disable-rewards-normalization: true\n"
        "lr: 1\n"
        "use-opd: false\n"
    )
    args = parse_args(["--config", str(cfg), "--n-samples-per-prompt", "4"])
    assert args.rollout_batch_size == 8 and args.rollout_max_response_len == 32
    assert args.n_samples_per_prompt == 4  # command line wins
    assert args.rollout_stop == ["stop1"] and args.rewards_normalization is False
    assert args.lr == 1.0 and isinstance(args.lr, float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not-a-flag: 1\n", "unknown key"),
        ("opd-budget-mask: nonsense\n", "not in"),
        ("use-opd: 3\n", "true/false"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_yaml_errors(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(cfg)] + BASE)


def test_markdown_dump_lists_every_flag():
    md = dump_markdown()
    for action in get_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and action.dest != "help":
                assert f"`{opt}`" in md


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], 0.7),  # unset: follows the rollout temperature
        (["--sd-temperature", "0.7"], 0.7),
        (
            ["--sd-temperature", "1.0"],
            "--sd-temperature 1.0 != --rollout-temperature 0.7 with --use-opd --loss-type jsd",
        ),
        (["--loss-type", "opsd"], None),  # the self-distillation losses keep their own τ_d (default 1.1 in the loss)
        (["--loss-type", "opsd", "--sd-temperature", "1.1"], 1.1),
    ],
)
def test_opd_jsd_compares_distributions_at_the_rollout_temperature(tmp_path, extra, expected):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    argv = BASE + ["--rollout-temperature", "0.7", "--use-opd", "--opd-type", "sglang",
                   "--opd-teacher-hf-checkpoint", str(teacher), "--loss-type", "jsd", *extra]  # fmt: skip
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected.replace(".", r"\.").replace("-", r"\-")):
            parse_args(argv)
    else:
        args = parse_args(argv)
        assert args.sd_temperature == expected and args.opd_teacher_temperature == 0.7


def test_jsd_without_opd_keeps_its_own_temperature(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    args = parse_args(BASE + ["--rollout-temperature", "0.7", "--opd-teacher-hf-checkpoint", str(teacher),
                              "--loss-type", "jsd", "--sd-temperature", "1.0"])  # fmt: skip
    assert args.sd_temperature == 1.0
