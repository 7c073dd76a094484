"""Bad inputs are refused with an error naming the value, before work starts, with nothing half-written.

One test per row of the table in docs/reliability.md (the row id is the test id). Each case
raises the documented exception type with the documented message fragment (which names the
offending value); cases that write check that no partial file was left.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

import pytest
import requests
import torch

from slime.backends.embedded_sglang.server import check_bind
from slime.rollout.data_source import Dataset
from slime.rollout.teacher_check import check_same_tokenizer, check_teacher_server_info
from slime.utils.arguments import parse_args
from slime.utils.types import Sample
from slime_patch.slime.rollout import on_policy_distillation as opd
from ta_opd.aliases import resolve_alias
from ta_opd.topk import TokenBatch

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--rollout-batch-size", "1", "--rollout-max-response-len", "4"]
OPD = ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate"]


def _jsonl(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("lines", "label_key", "error", "message"),
    [
        (
            ['{"input": "1+1=", "label": "2"}', '{"input": "2+2=" "label": "4"}'],
            "label",
            ValueError,
            r"^{path}:2: malformed JSON \(Expecting ',' delimiter at column 18\)$",
        ),
        (['["1+1=", "2"]'], None, ValueError, r"^{path}:1: expected a JSON object, got list$"),
        (
            ['{"question": "1+1=", "label": "2"}'],
            "label",
            KeyError,
            r"{path}:1: missing prompt key 'input' \(--input-key\); keys: \['label', 'question'\]",
        ),
        (
            ['{"input": "1+1=", "label": "2"}', '{"input": "2+2="}'],
            "label",
            KeyError,
            r"{path}:2: missing label key 'label' \(--label-key\); keys: \['input'\]",
        ),
        (['{"input": ""}'], None, ValueError, r"^{path}:1: empty prompt under 'input'$"),
    ],
    ids=["malformed_line", "line_not_an_object", "missing_input_key", "missing_label_key", "empty_prompt"],
)
def test_bad_jsonl_line_names_the_file_line_and_key(tmp_path, lines, label_key, error, message):
    path = _jsonl(tmp_path, *lines)
    with pytest.raises(error, match=message.replace("{path}", path)):
        Dataset(path, label_key=label_key)


def test_prompt_longer_than_max_prompt_len(tmp_path, tiny_tokenizer_dir):
    from slime.rollout.data_source import load_tokenizer

    path = _jsonl(tmp_path, '{"input": "1+1=1+1=1+1="}')
    msg = rf"^{path}:1: prompt has 12 tokens > --rollout-max-prompt-len 4 \(pass --rollout-filter-long-prompts"
    with pytest.raises(ValueError, match=msg):
        Dataset(path, tokenizer=load_tokenizer(str(tiny_tokenizer_dir)), max_length=4)


def test_data_cannot_name_plugins(tmp_path):
    """Plug-in paths come only from flags/config: a data row's keys never become code to load."""
    path = _jsonl(tmp_path, '{"input": "x", "custom_rm_path": "os.system", "generate_function_path": "os.system"}')
    sample = Dataset(path).samples[0]
    assert sample.custom_rm_path is None and sample.generate_function_path is None


# ------------------------------------------------------------------------------------- teacher / student


def _other_tokenizer_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_teacher_student_tokenizer_mismatch(tmp_path, tiny_student_dir):
    teacher = _other_tokenizer_copy(Path(tiny_student_dir), tmp_path / "teacher")
    msg = rf"teacher tokenizer '{teacher}' does not match student tokenizer '{tiny_student_dir}': token .* has id"
    with pytest.raises(ValueError, match=msg):
        check_same_tokenizer(tiny_student_dir, teacher)


def test_teacher_server_vocabulary_mismatch(tiny_student_dir):
    msg = "teacher server http://127.0.0.1:1 reports a tokenizer of 50 tokens, the student tokenizer"
    with pytest.raises(ValueError, match=msg):
        check_teacher_server_info(tiny_student_dir, {"tokenizer_vocab_size": 50}, "http://127.0.0.1:1")


def test_tokenizer_mismatch_refused_before_servers_start(tmp_path, tiny_student_dir):
    from slime.ray.rollout import RolloutManager

    teacher = _other_tokenizer_copy(Path(tiny_student_dir), tmp_path / "teacher")
    args = parse_args([*BASE, "--hf-checkpoint", str(tiny_student_dir), "--use-opd", "--opd-type", "sglang",
                       "--opd-teacher-hf-checkpoint", str(teacher)])  # fmt: skip
    with pytest.raises(ValueError, match="does not match student tokenizer"):
        RolloutManager(args)


def _scored_sample(index: int, teacher_lp: list[float], k: int = 2, student_top_len: int | None = None) -> Sample:
    """A sample with a teacher answer in SGLang's layout (prompt [1, 2], response = len(teacher_lp) tokens)."""
    response = [10 + j for j in range(len(teacher_lp))]
    tops = [[[-0.1 - i, 30 + i, None] for i in range(k)] for _ in response]
    answer = {
        "meta_info": {
            "input_token_logprobs": [[None, 2, None]]
            + [[lp, t, None] for lp, t in zip(teacher_lp, response, strict=True)],
            "input_top_logprobs": [None] + tops,
        }
    }
    n_top = len(response) if student_top_len is None else student_top_len
    return Sample(
        index=index, tokens=[1, 2, *response], response_length=len(response), reward=answer,
        rollout_log_probs=[-1.0] * len(response), metadata={"student_top_logprobs": tops[:1] * n_top},
    )  # fmt: skip


def _opd_args(**kw) -> Namespace:
    from slime_patch.slime.utils.ta_opd_arguments import add_ta_opd_arguments

    args = add_ta_opd_arguments(ArgumentParser()).parse_args([])
    for key, value in {
        "use_opd": True,
        "opd_type": "sglang",
        "reward_key": None,
        "opd_topk_metrics_k": 2,
        **kw,
    }.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("n_top", [2, 4], ids=["short", "long"])
def test_topk_length_mismatch_in_samples(n_top):
    samples = [_scored_sample(0, [-1.0, -2.0, -3.0], student_top_len=n_top)]
    if n_top < 3:
        msg = (
            r"sample 0: --opd-budget-mask entropy needs metadata\['student_top_logprobs'\] .* covering all 3 response"
        )
    else:
        msg = r"sample 0: metadata\['student_top_logprobs'\] has 4 entries, expected one per response token \(3\)"
    with pytest.raises(ValueError, match=msg):
        opd.post_process_rewards(_opd_args(opd_budget_mask="entropy", opd_budget_ratio=0.5), samples)


def test_topk_length_mismatch_in_token_batch():
    with pytest.raises(ValueError, match=r"^sample 0: teacher log-probs has 2 entries, response has 3 tokens$"):
        TokenBatch.from_sample_lists([[]], [[]], [[1, 2, 3]], None, [[-1.0, -1.0]], [[1, 1, 1]], 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_teacher_logprob_with_selection(bad):
    samples = [_scored_sample(0, [-1.0, bad, -3.0]), _scored_sample(1, [-1.0, -2.0])]
    msg = rf"1 valid token\(s\) have a non-finite sampled-token log-prob: sample 0 position 1 \(teacher {bad}"
    with pytest.raises(ValueError, match=msg):
        opd.post_process_rewards(_opd_args(opd_budget_mask="entropy", opd_budget_ratio=0.5), samples)
    assert all(s.loss_mask is None or sum(s.loss_mask) == s.response_length for s in samples)  # nothing selected


def test_nonfinite_teacher_logprob_full_opd_without_topk():
    samples = [_scored_sample(4, [-1.0, math.nan])]
    msg = r"1 valid token\(s\) have a non-finite teacher log-prob: sample 4 position 1 \(teacher nan\)"
    with pytest.raises(ValueError, match=msg):
        opd.post_process_rewards(_opd_args(opd_topk_metrics_k=0), samples)


def test_nonfinite_logprob_from_a_real_http_answer():
    """JSON ``NaN`` from a server parses to float('nan'): it reaches the same check, never the loss."""
    answer = json.loads(
        '{"meta_info": {"input_token_logprobs": [[null, 2, null], [-1.0, 10, null], [NaN, 11, null]]}}'
    )
    sample = Sample(index=0, tokens=[1, 2, 10, 11], response_length=2, reward=answer)
    with pytest.raises(ValueError, match=r"sample 0 position 1 \(teacher nan\)"):
        opd.post_process_rewards(_opd_args(opd_topk_metrics_k=0), [sample])


# ------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--opd-budget-ratio", "0", "--opd-budget-mask", "tip"],
            r"--opd-budget-ratio must be > 0 with --opd-budget-mask 'tip' \(.*\), got 0.0",
        ),
        (["--opd-budget-ratio", "-0.1", "--opd-budget-mask", "tip"], r"--opd-budget-ratio must be > 0 .* got -0.1"),
        (["--opd-budget-ratio", "nan"], r"--opd-budget-ratio must be a finite number, got nan"),
    ],
    ids=["ratio_0", "ratio_negative", "ratio_nan"],
)
def test_ratio_out_of_range(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args([*BASE, *OPD, *argv])


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--opd-budget-mask", "teachabilty"),
        ("--opd-compat-proxy", "massive"),
        ("--opd-metric-normalization", "zscore2"),
    ],
    ids=["mask", "proxy", "normalisation"],
)
def test_unknown_choice_flags(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([*BASE, *OPD, flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: invalid choice: '{value}' (choose from" in capsys.readouterr().err


def test_unknown_alias_in_python():
    with pytest.raises(ValueError, match=r"^unknown method alias or mask 'teachabilty'; aliases: \["):
        resolve_alias("teachabilty")


def test_budget_mask_without_opd():
    with pytest.raises(ValueError, match=r"^--opd-budget-mask dlearn_high needs --use-opd"):
        parse_args([*BASE, "--opd-budget-mask", "teachability", "--opd-budget-ratio", "0.2"])


def _method_list(value: str) -> subprocess.CompletedProcess:
    script = f'source "{ROOT}/scripts/lib/common.sh"; ta_parse_method_list "$METHOD_LIST"'
    env = {**os.environ, "METHOD_LIST": value, "PYTHON": sys.executable}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize(
    "value, message",
    [
        ("teachabilty:0.1:20", "error: METHOD_LIST: entry 'teachabilty:0.1:20': unknown alias 'teachabilty' (known:"),
        ("tip:0:20", "error: METHOD_LIST: entry 'tip:0:20': ratio must be > 0 with mask 'tip'"),
        ("tip:0.1:20 random:0.1:20", "error: METHOD_LIST: entry 'random:0.1:20': duplicate idx 20"),
        ("tip-0.1-20", "error: METHOD_LIST: malformed entry 'tip-0.1-20' (expected alias:ratio:idx"),
        ("tip:0.1", "error: METHOD_LIST: malformed entry 'tip:0.1' (expected alias:ratio:idx"),
        ("  ", "METHOD_LIST is empty"),
    ],
    ids=["bad_alias", "ratio_0", "duplicate_idx", "malformed", "missing_idx", "empty"],
)
def test_method_list_errors(value, message):
    out = _method_list(value)
    assert out.returncode == 2, out
    assert message in out.stderr and out.stdout == ""


def test_method_list_reports_every_error_at_once():
    out = _method_list("tip:0:1 nope:0.1:2 random:0.1:1")
    assert out.returncode == 2 and out.stderr.count("error: METHOD_LIST:") == 2  # ratio 0 and the unknown alias


# ------------------------------------------------------------------------------------- files


def test_token_bank_dir_not_writable(tmp_path):
    from ta_opd.token_bank import TokenBankWriter

    (tmp_path / "file").write_text("")
    bank = tmp_path / "file" / "bank"  # a path below a regular file can never be created (even as root)
    with pytest.raises(ValueError, match=rf"^token bank directory '{bank}' is not writable: "):
        TokenBankWriter(bank)


def test_token_bank_dir_refused_before_servers_start(tmp_path, tiny_student_dir):
    from slime.ray.rollout import RolloutManager

    (tmp_path / "file").write_text("")
    args = parse_args([*BASE, *OPD, "--hf-checkpoint", str(tiny_student_dir),
                       "--opd-token-bank-dir", str(tmp_path / "file" / "bank")])  # fmt: skip
    with pytest.raises(ValueError, match="is not writable"):
        RolloutManager(args)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_token_bank(tmp_path, monkeypatch):
    from ta_opd import token_bank
    from ta_opd.api import select_tokens
    from ta_opd.config import SelectionConfig

    writer = token_bank.TokenBankWriter(tmp_path / "bank")
    samples = [_scored_sample(0, [-1.0, -2.0, -3.0])]
    tops = samples[0].metadata["student_top_logprobs"]
    batch = TokenBatch.from_sample_lists([tops], [tops], [[10, 11, 12]], [[-1.0] * 3], [[-1.0, -2.0, -3.0]],
                                         [[1, 1, 1]], 2)  # fmt: skip
    result = select_tokens(batch, SelectionConfig(topk_k=2))
    monkeypatch.setitem(token_bank._WRITERS, "csv", _enospc)
    with pytest.raises(
        OSError, match=r"token bank: could not write .*step\d+_rank\d+\.csv .*; no partial file was left"
    ) as info:
        writer.write_step(0, batch, result, [0])
    assert info.value.errno == errno.ENOSPC
    assert list((tmp_path / "bank").iterdir()) == []  # no temp file, no partial file


def test_disk_full_while_writing_checkpoint(tmp_path, monkeypatch, tiny_student_dir):
    from transformers import AutoModelForCausalLM

    from slime.backends.torch_utils import checkpoint as ckpt

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.save_checkpoint(tmp_path, 0, model, opt, {"global_step": 1}, {})
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(ckpt.torch, "save", _enospc)
    with pytest.raises(OSError, match="No space left on device") as info:
        ckpt.save_checkpoint(tmp_path, 1, model, opt, {"global_step": 2}, {})
    assert info.value.errno == errno.ENOSPC
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == before == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    )
    assert ckpt.latest_checkpoint(tmp_path).name == "iter_0000000"  # still verifies


@pytest.mark.parametrize("damage", ["truncate", "no_manifest"])
def test_corrupt_or_partial_checkpoint(tmp_path, tiny_student_dir, damage):
    from transformers import AutoModelForCausalLM

    from slime.backends.torch_utils import checkpoint as ckpt

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    path = ckpt.save_checkpoint(tmp_path, 3, model, None, {}, {})
    if damage == "truncate":
        rng = path / "rng.pt"
        rng.write_bytes(rng.read_bytes()[:100])
        msg = rf"checkpoint '{path}': 'rng.pt' has 100 bytes, manifest says \d+ \(truncated\?\)"
    else:
        (path / "manifest.json").unlink()
        msg = rf"checkpoint '{path}' has no manifest.json: it is partial \(interrupted write\?\)"
    with pytest.raises(ckpt.CheckpointError, match=msg):
        ckpt.latest_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------- servers


def test_public_bind_without_api_key():
    with pytest.raises(ValueError, match=r"^refusing to bind non-loopback host '0.0.0.0' without --api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")  # allowed with a key (not bound here)
    check_bind("127.0.0.1", None)


def _raw_request(url: str, head: str) -> str:
    host, port = url.split("://")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode())
        answer = b""
        while True:  # read until the server closes or the declared body has arrived
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in answer[:head_end].split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(answer) >= head_end + 4 + length:
                    break
        return answer.decode(errors="replace")


@pytest.mark.slow
def test_server_refusals(teacher_server):
    url, auth = teacher_server.url, teacher_server.headers
    ok = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}

    r = requests.post(url + "/generate", json=ok, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "Unauthorized: missing or wrong 'Authorization: Bearer <api key>' header"
    assert requests.post(url + "/generate", json=ok, timeout=30).status_code == 401  # no key at all

    # a declared body over the cap is refused before it is read
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n"
    answer = _raw_request(url, head)
    assert answer.startswith("HTTP/1.1 413") and "request body of 1073741824 bytes exceeds --max-body-bytes" in answer

    big = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 10**6}}
    r = requests.post(url + "/generate", json=big, headers=auth, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "sampling_params.max_new_tokens=1000000 exceeds the server cap 32768"

    long_prompt = {"input_ids": [1] * 5000, "sampling_params": {"max_new_tokens": 1}}
    r = requests.post(url + "/generate", json=long_prompt, headers=auth, timeout=30)
    assert (
        r.status_code == 400
        and r.json()["error"]["message"]
        == "prompt 0: the input (5000 tokens) is longer than the model's context length (512 tokens)"
    )

    empty = {"input_ids": [], "sampling_params": {"max_new_tokens": 1}}
    r = requests.post(url + "/generate", json=empty, headers=auth, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "prompt 0 is empty: at least one input token is required"

    for bad_path in ("../../../etc", "/etc", "/"):
        r = requests.post(url + "/update_weights_from_disk", json={"model_path": bad_path}, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["success"] is False
        assert "outside --weights-root" in r.json()["message"], r.json()
