"""Start-up validation: what used to fail late (at a step, at the first eval, in a Ray actor) is refused at start.

Flags are checked when they are parsed (every numeric option of the parser, not a list of names);
data files are read in full, every line tokenised once, before any server starts; a bad file or
bank is named with its line. Refusals from ``RolloutManager(args)`` happen before ``_start_servers``,
which the tests replace with a function that fails the test if it is ever reached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from slime.rollout.data_source import Dataset, load_tokenizer
from slime.utils.arguments import get_parser, parse_args
from slime.utils.flag_ranges import FLAG_RANGES, check_numeric_flags

BASE = ["--rollout-batch-size", "1", "--rollout-max-response-len", "4"]


def _float_flags() -> list[str]:
    return [a.option_strings[0] for a in get_parser()._actions if a.option_strings and a.type is float]


# ------------------------------------------------------------------------------------- float flags


@pytest.mark.parametrize("flag", _float_flags())
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite(flag, bad):
    with pytest.raises(ValueError, match=rf"^{flag} must be a finite number.*, got {bad}$"):
        parse_args([*BASE, f"{flag}={bad}"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr=-1e-6"], "--lr must be >= 0, got -1e-06"),
        (["--opd-kl-coef=-1"], "--opd-kl-coef must be >= 0, got -1.0"),
        (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
        (["--adam-eps", "0"], "--adam-eps must be > 0, got 0.0"),
        (["--eval-top-p", "1.5"], "--eval-top-p must be in (0, 1], got 1.5"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
        (["--jsd-beta", "2"], "--jsd-beta must be in [0, 1], got 2.0"),
        (["--eps-clip-c", "0.5"], "--eps-clip-c must be > 1 (the dual-clip bound is a ratio above 1), got 0.5"),
        (["--lr-warmup-iters=-1"], "--lr-warmup-iters must be >= 0, got -1"),
        (["--start-rollout-id=-3"], "--start-rollout-id must be >= 0, got -3"),
        (["--rollout-stop-token-ids=-5"], "--rollout-stop-token-ids must be >= 0, got -5"),
        (
            ["--rollout-top-k", "1" + "0" * 20],
            "--rollout-top-k must be in [-2^63, 2^63) (a 64-bit integer), got 1" + "0" * 20,
        ),
        (["--sglang-router-port", "70000"], "--sglang-router-port must be in [1, 65535], got 70000"),
    ],
    ids=(
        "lr opd_kl_coef adam_beta1 adam_eps eval_top_p lora_dropout jsd_beta eps_clip_c "
        "warmup start_rollout_id stop_token_id top_k_overflow port"
    ).split(),
)
def test_number_flag_out_of_range(argv, message):
    with pytest.raises(ValueError, match=f"^{_re(message)}$"):
        parse_args([*BASE, *argv])


def test_nan_from_yaml_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: .nan\n")
    with pytest.raises(ValueError, match=r"^--lr must be a finite number >= 0, got nan$"):
        parse_args(["--config", str(cfg), *BASE])


def test_a_new_float_flag_is_covered_without_being_listed():
    def provider(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--my-plugin-scale", type=float, default=1.0)

    assert "my_plugin_scale" not in FLAG_RANGES
    with pytest.raises(ValueError, match=r"^--my-plugin-scale must be a finite number, got nan$"):
        parse_args([*BASE, "--my-plugin-scale", "nan"], extra_args_providers=[provider])


def test_every_int_flag_declares_its_range():
    """Int flags have no NaN, so a missing entry would only bound them to int64: each one states its range."""
    ints = {a.dest for a in get_parser()._actions if a.option_strings and a.type is int}
    assert sorted(ints - set(FLAG_RANGES)) == []
    assert sorted(set(FLAG_RANGES) - {a.dest for a in get_parser()._actions}) == []  # no stale entries


def test_check_numeric_flags_accepts_the_defaults():
    parser = get_parser()
    args = parser.parse_args(BASE)
    check_numeric_flags(parser, args)


# ------------------------------------------------------------------------------------- int flags


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--seed", "4294967296"),
        ("--seed", "-1"),
        ("--rollout-seed", str(2**63)),
        ("--opd-budget-mask-seed", "-7"),
    ],
    ids=["seed_2^32", "seed_negative", "rollout_seed_2^63", "mask_seed_negative"],
)
def test_seed_outside_32_bits(flag, value):
    with pytest.raises(ValueError, match=rf"^{flag} must be in \[0, 2\^32\) \(a 32-bit seed\), got {value}$"):
        parse_args([*BASE, f"{flag}={value}"])


def test_flag_refused_by_train_parse_before_anything_starts():
    """train.py parses with ``parse_args``: the refusal is a ValueError before any actor exists."""
    import ray

    with pytest.raises(ValueError, match=r"^--opd-kl-coef must be a finite number >= 0, got nan$"):
        parse_args([*BASE, "--use-opd", "--opd-type", "sglang", "--rm-url", "http://x/generate",
                    "--opd-kl-coef", "nan"])  # fmt: skip
    assert not ray.is_initialized()


def _re(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------- data files


def _write(tmp_path: Path, name: str, lines: list[str | bytes]) -> str:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


def _manager_args(tmp_path: Path, student: Path, *extra: str):
    return parse_args([*BASE, "--hf-checkpoint", str(student), "--output-dir", str(tmp_path / "out"), *extra])


@pytest.fixture
def no_servers(monkeypatch):
    """Fail the test if RolloutManager gets as far as starting a server."""
    from slime.ray.rollout import RolloutManager

    def start(self):
        raise AssertionError("a server was started before the bad input was refused")

    monkeypatch.setattr(RolloutManager, "_start_servers", start)
    return RolloutManager


@pytest.mark.parametrize(
    "raw, offset",
    [(b'{"input": "caf\xe9"}', 14), (b'{"input": "x", "label": "\xff\xfe"}', 25), (b"\x80", 0)],
    ids=["latin1", "stray_ff", "continuation_byte"],
)
def test_non_utf8_prompt_line(tmp_path, raw, offset):
    path = _write(tmp_path, "data.jsonl", ['{"input": "ok"}', raw])
    byte = raw[offset]
    msg = rf"^{path}:2: not valid UTF-8 \(byte 0x{byte:02x} at offset {offset} of the line\); save the file as UTF-8$"
    with pytest.raises(ValueError, match=msg):
        Dataset(path)


def test_utf16_file_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"input": "x"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=rf"^{path}:1: not valid UTF-8 \(byte 0xff at offset 0 .*\(a UTF-16 file\?\)"):
        Dataset(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    path = _write(tmp_path, "data.jsonl", [b'\xef\xbb\xbf{"input": "x"}', '{"input": "y"}'])
    assert [s.prompt for s in Dataset(path).samples] == ["x", "y"]


def test_non_utf8_refused_before_servers_start(tmp_path, tiny_student_dir, no_servers):
    path = _write(tmp_path, "data.jsonl", ['{"input": "ok"}', b'{"input": "\xc3\x28"}'])
    args = _manager_args(tmp_path, tiny_student_dir, "--prompt-data", path)
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xc3 at offset 11"):
        no_servers(args)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (
            [{"content": "x"}],
            r"message 0 must be an object with a string 'role' and a 'content', got \{'content': 'x'\}",
        ),
        ([{"role": "user"}], r"message 0 must be an object with a string 'role' and a 'content'"),
        (["hello"], r"message 0 must be an object with a string 'role' and a 'content', got 'hello'"),
        ([{"role": "user", "content": 3}], r"message 0 \(user\) has content of type int; expected a string"),
        ({"role": "user", "content": "x"}, r"a chat prompt must be a string or a non-empty list of messages"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            r"the chat template failed: TemplateError: Conversation roles must alternate",
        ),
    ],
    ids=["no_role", "no_content", "not_an_object", "content_int", "object_not_list", "template_raises"],
)
def test_chat_template_errors_name_the_line(tmp_path, chat_tokenizer, prompt, message):
    path = _write(tmp_path, "chat.jsonl", ['{"input": "fine"}', json.dumps({"input": prompt})])
    with pytest.raises(ValueError, match=rf"^{path}:2: {message}"):
        Dataset(path, tokenizer=chat_tokenizer, apply_chat_template=True)


def test_missing_chat_template_names_the_line(tmp_path, tiny_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    tokenizer.chat_template = None
    path = _write(tmp_path, "chat.jsonl", ['{"input": "x"}'])
    with pytest.raises(ValueError, match=rf"^{path}:1: the chat template failed: ValueError: .*chat_template"):
        Dataset(path, tokenizer=tokenizer, apply_chat_template=True)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer with a strict template that, like many real ones, insists roles alternate."""
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def test_prompt_not_fitting_the_context_with_the_response(tmp_path, tiny_student_dir):
    """No --rollout-max-prompt-len: the student's context (512 tokens) minus the response is the limit."""
    long = " ".join(["1+1="] * 60)
    path = _write(tmp_path, "data.jsonl", ['{"input": "1+1="}', json.dumps({"input": long})])
    tokenizer = load_tokenizer(str(tiny_student_dir))
    n = len(tokenizer.encode(long, add_special_tokens=False))
    assert n < 512 <= n + 300  # fits alone, not with the response
    msg = (
        rf"^{path}:2: prompt has {n} tokens; with --rollout-max-response-len 300 that is {n + 300}, not below the "
        rf"context length 512 of --hf-checkpoint '{tiny_student_dir}' \(max_position_embeddings\) "
        r"\(pass --rollout-filter-long-prompts to drop such prompts\)$"
    )
    args = parse_args(["--rollout-batch-size", "1", "--rollout-max-response-len", "300", "--hf-checkpoint",
                       str(tiny_student_dir), "--prompt-data", path])  # fmt: skip
    from slime.rollout.data_source import RolloutDataSource

    with pytest.raises(ValueError, match=msg):
        RolloutDataSource(args)
    args.rollout_filter_long_prompts = True
    assert len(RolloutDataSource(args)) == 1  # dropped and counted instead


def test_max_context_len_flag_is_the_limit(tmp_path, tiny_student_dir, no_servers):
    path = _write(tmp_path, "data.jsonl", ['{"input": "1+1="}', '{"input": "1+1=1+1=1+1="}'])
    args = _manager_args(tmp_path, tiny_student_dir, "--prompt-data", path, "--rollout-max-context-len", "12")
    msg = rf"^{path}:2: prompt has 12 tokens; with --rollout-max-response-len 4 that is 16, not below the context "
    with pytest.raises(ValueError, match=msg + r"length 12 of --rollout-max-context-len"):
        no_servers(args)


def test_every_line_is_checked_not_only_the_first_batch(tmp_path, tiny_student_dir, no_servers):
    lines = ['{"input": "1+1="}'] * 999 + ['{"input": "' + "1+1=" * 200 + '"}']
    path = _write(tmp_path, "data.jsonl", lines)
    args = _manager_args(tmp_path, tiny_student_dir, "--prompt-data", path, "--rollout-max-prompt-len", "64")
    with pytest.raises(ValueError, match=rf"^{path}:1000: prompt has 800 tokens > --rollout-max-prompt-len 64"):
        no_servers(args)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"input": "2+2=" "label": "4"}', r"malformed JSON \(Expecting ',' delimiter at column 18\)"),
        ('{"question": "2+2="}', r"missing prompt key 'input' \(--input-key\)"),
        (b'{"input": "\xff"}', r"not valid UTF-8 \(byte 0xff at offset 11 of the line\)"),
        ('{"input": "' + "1+1=" * 200 + '"}', r"prompt has 800 tokens > --eval-max-prompt-len 32$"),
    ],
    ids=["malformed_json", "missing_key", "not_utf8", "too_long"],
)
def test_malformed_eval_file_refused_at_start(tmp_path, tiny_student_dir, no_servers, bad_line, message):
    train = _write(tmp_path, "train.jsonl", ['{"input": "1+1="}'])
    evals = _write(tmp_path, "eval.jsonl", ['{"input": "1+1="}', bad_line])
    args = _manager_args(tmp_path, tiny_student_dir, "--prompt-data", train, "--eval-prompt-data", "math", evals,
                         "--eval-interval", "5", "--eval-max-prompt-len", "32")  # fmt: skip
    with pytest.raises((ValueError, KeyError), match=rf"{evals}:2: {message}"):
        no_servers(args)


def test_eval_prompt_not_fitting_the_context(tmp_path, tiny_student_dir, no_servers):
    train = _write(tmp_path, "train.jsonl", ['{"input": "1+1="}'])
    evals = _write(tmp_path, "eval.jsonl", ['{"input": "' + "1+1=" * 120 + '"}'])  # 480 tokens
    args = _manager_args(tmp_path, tiny_student_dir, "--prompt-data", train, "--eval-prompt-data", "math", evals,
                         "--eval-max-response-len", "40")  # fmt: skip
    msg = rf"^{evals}:1: prompt has 480 tokens; with --eval-max-response-len 40 that is 520, not below the context"
    with pytest.raises(ValueError, match=msg):
        no_servers(args)


def test_valid_eval_datasets_are_cached_for_the_eval_rollout(tmp_path, tiny_student_dir):
    from slime.rollout.data_source import eval_datasets

    evals = _write(tmp_path, "eval.jsonl", ['{"input": "1+1=", "label": "2"}'])
    args = parse_args([*BASE, "--hf-checkpoint", str(tiny_student_dir), "--eval-prompt-data", "math", evals,
                       "--label-key", "label"])  # fmt: skip
    first = eval_datasets(args)
    assert list(first) == ["math"] and first["math"].samples[0].label == "2"
    assert eval_datasets(args)["math"] is first["math"]


# ------------------------------------------------------------------------------------- token banks


def _bank_csv(tmp_path: Path) -> Path:
    from ta_opd.token_bank import BANK_REQUIRED_COLUMNS

    header = [*BANK_REQUIRED_COLUMNS, "kl_f_union", "student_topk_ids"]
    row = ["7", "0", "0", "0", "3", "4", "1", "1", "-0.5", "-1.5", "s0", "", "T", "S", "0.25", '"[3, 9]"']
    path = tmp_path / "step0000007_rank000.csv"
    path.write_text(",".join(header) + "\n" + (",".join(row) + "\n") * 3)
    return path


def _damage(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def test_token_bank_csv_reads_typed_cells(tmp_path):
    from ta_opd.token_bank import read_token_bank_file

    cols = read_token_bank_file(_bank_csv(tmp_path))
    assert cols["sampled_id"] == [4, 4, 4] and cols["kl_f_union"] == [0.25] * 3
    assert cols["student_topk_ids"][0] == [3, 9] and cols["sample_id"] == ["s0"] * 3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _damage(p, 3, "-0.5", "abc"), r":3: column 'student_logp': 'abc' is not a number$"),
        (lambda p: _damage(p, 2, ",4,", ",4.5,"), r":2: column 'sampled_id': '4.5' is not an integer$"),
        (
            lambda p: p.write_text(p.read_text()[:-25]),
            r":4: row has 10 cells, the header has 16 \(truncated or damaged row\)$",
        ),
        (lambda p: _damage(p, 4, '"[3, 9]"', '"[3, 9"'), r":4: column 'student_topk_ids': not a JSON list"),
        (lambda p: _damage(p, 1, "teacher_logp,", ""), r": token bank lacks column\(s\) \['teacher_logp'\]; "),
        (lambda p: p.write_bytes(p.read_bytes().replace(b"s0", b"s\xff", 2)), r":2: not valid UTF-8 \(byte 0xff\)$"),
        (lambda p: p.write_text(""), r": empty token bank file \(no header / no rows\)$"),
    ],
    ids=["non_numeric", "non_integer", "truncated_row", "bad_topk_json", "missing_column", "not_utf8", "empty"],
)
def test_damaged_token_bank_csv(tmp_path, damage, message):
    from ta_opd.token_bank import TokenBankError, read_token_bank_file

    path = _bank_csv(tmp_path)
    damage(path)
    with pytest.raises(TokenBankError, match=f"^{path}{message}"):
        read_token_bank_file(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"rollout_id": 1', r":2: not valid JSON \(Expecting ',' delimiter at column 17\)$"),
        ("[1, 2]", r":2: expected a JSON object, got list$"),
        ("RECORD_WITHOUT_KL", r":2: keys differ from line 1: lacks \['kl_f_union'\], extra \[\]$"),
        ("RECORD_TEXT_ID", r":2: column 'position': 'x' is not an integer$"),
    ],
    ids=["truncated_line", "not_an_object", "missing_key", "non_numeric"],
)
def test_damaged_token_bank_jsonl(tmp_path, line, message):
    from ta_opd.token_bank import BANK_REQUIRED_COLUMNS, TokenBankError, read_token_bank_file

    record = {name: 0 for name in BANK_REQUIRED_COLUMNS} | {"sample_id": "s0", "kl_f_union": None}
    if line == "RECORD_WITHOUT_KL":
        line = json.dumps({k: v for k, v in record.items() if k != "kl_f_union"})
    elif line == "RECORD_TEXT_ID":
        line = json.dumps(record | {"position": "x"})
    path = tmp_path / "step0000000_rank000.jsonl"
    path.write_text(json.dumps(record) + "\n" + line + "\n")
    with pytest.raises(TokenBankError, match=f"^{path}{message}"):
        read_token_bank_file(path)


def test_damaged_bank_named_by_merge_token_banks(tmp_path):
    from ta_opd.diagnostics.cli import merge_banks

    path = _bank_csv(tmp_path)
    _damage(path, 3, "-0.5", "abc")
    with pytest.raises(SystemExit, match=rf"^merge_token_banks: {path}:3: column 'student_logp': 'abc' is not a"):
        merge_banks.main([str(path), "--out", str(tmp_path / "merged.csv")])


def test_damaged_stats_table_names_file_and_line(tmp_path):
    import pandas as pd

    from ta_opd.diagnostics.io import read_table, require_numeric_columns

    path = tmp_path / "token_stats.csv"
    pd.DataFrame({"prompt_id": ["p0", "p1"], "base.kl_f": [0.5, "oops"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=rf"^{path}: line 3: column 'base.kl_f': 'oops' is not a number$"):
        require_numeric_columns(read_table(path), path, ["base.kl_f"])
    with pytest.raises(ValueError, match=rf"^{path}: table lacks column\(s\) \['run.kl_f'\]$"):
        require_numeric_columns(read_table(path), path, ["run.kl_f"])
    path.write_text('prompt_id,base.kl_f\n"p0,0.5\n')  # an unterminated quote
    with pytest.raises(ValueError, match=rf"^{path}: damaged csv table \(ParserError: "):
        read_table(path)
