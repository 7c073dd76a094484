"""Training-step, checkpoint and metrics-log safety.

Real components at tiny size: the torch trainer on the nano student, real checkpoints on disk, the real
``train.py`` loop in Ray with the stand-in RolloutManager of tests/e2e, real ``flock`` between processes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slime.backends.torch_utils import checkpoint as ckpt
from slime.backends.weight_sync import DistributedWeightSender, TensorWeightSender
from slime.utils.arguments import parse_args
from slime.utils.logging_utils import MetricsLogger, read_metrics
from slime.utils.nonfinite import NonFiniteError
from slime.utils.redact import REDACTED, is_secret_name, redact_secrets
from slime.utils.run_dirs import (
    LOCK_NAME,
    OutputPathError,
    SaveDirLock,
    SaveDirLockedError,
    prepare_run_dirs,
    resolve_load,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
E2E = HERE.parent / "e2e"
API_KEY = "sk-test-7f3a9c2e1d"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the torch trainer's test helpers (fake rollout data, args, a trainer built from the nano student)
_trainer_tests = _load_module("_torch_trainer_helpers", HERE.parent / "backends" / "test_torch_trainer.py")
make_args, make_rollout, make_trainer = (
    _trainer_tests.make_args,
    _trainer_tests.make_rollout,
    _trainer_tests.make_trainer,
)


def _ckpt_listing(save: Path) -> dict[str, bytes]:
    """Every file under ``save`` with its bytes (to prove nothing was touched)."""
    return {str(p.relative_to(save)): p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()}


def _trainer_with_checkpoint(student, tmp_path, *extra):
    """A trainer that trained rollout 0 and saved it (keep-last-n 1), as a run mid-way."""
    save = tmp_path / "ckpt"
    args = make_args(student, tmp_path, "--save", str(save), "--keep-last-n-checkpoints", "1", *extra)
    trainer = make_trainer(args)
    trainer.train(0, make_rollout(20))
    trainer.save_model(0)
    return trainer, save


# ---------------------------------------------------------------------------------------------- item 2: non-finite
def _poison_grads(trainer, value: float) -> None:
    """Every gradient of one parameter becomes ``value`` (the loss stays finite): a non-finite gradient norm."""
    p = next(p for p in trainer.model.parameters() if p.requires_grad)
    p.register_hook(lambda g: torch.full_like(g, value))


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad", "nan_grad_clipped"])
def test_nonfinite_step_stops_without_update_or_save(tiny_student_dir, tmp_path, fault):
    extra = ("--clip-grad", "1.0") if fault == "nan_grad_clipped" else ()
    trainer, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path, *extra)
    if fault == "nan_loss":
        trainer.args.opd_kl_coef = float("nan")  # what `--opd-kl-coef nan` did before it was refused at start
    else:
        _poison_grads(trainer, float("inf") if fault == "inf_grad" else float("nan"))
    before, opt_before, step_before = trainer.state_for_test(), copy.deepcopy(trainer.optimizer.state_dict()), 1
    on_disk = _ckpt_listing(save)
    with pytest.raises(NonFiniteError, match=r"rollout 1 step 0 .*non-finite train/loss=.*the update was not applied"):
        trainer.train(1, make_rollout(21))
    after = trainer.state_for_test()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.global_step == step_before
    assert trainer.optimizer.state_dict()["state"][0]["step"] == opt_before["state"][0]["step"]
    assert _ckpt_listing(save) == on_disk  # the good checkpoint is neither replaced nor rotated away


def test_nonfinite_step_skipped_by_flag(tiny_student_dir, tmp_path, caplog):
    trainer, _ = _trainer_with_checkpoint(tiny_student_dir, tmp_path, "--nonfinite-policy", "skip")
    before = trainer.state_for_test()
    trainer.args.opd_kl_coef = float("nan")
    with caplog.at_level(logging.WARNING, logger="slime.utils.nonfinite"):
        metrics = trainer.train(1, make_rollout(21))
    assert metrics["train/skipped_steps"] == 1.0 and trainer.skipped_steps == 1 and trainer.global_step == 1
    assert "optimizer step skipped (--nonfinite-policy skip)" in caplog.text
    after = trainer.state_for_test()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing left over for the next step
    trainer.args.opd_kl_coef = 1.0  # the next finite step is applied as usual
    metrics = trainer.train(2, make_rollout(22))
    assert metrics["train/skipped_steps"] == 0.0 and trainer.global_step == 2


def test_nonfinite_weights_never_saved_or_pushed(tiny_student_dir, tmp_path):
    """Weights that went NaN/inf (a NaN --lr, an overflowing step) are refused by every save and every push."""
    trainer, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    on_disk = _ckpt_listing(save)
    pushed = trainer.update_weights()  # a good push first: the engines' current weights
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to save checkpoint .*iter_0000001.* holds NaN/inf"):
        trainer.save_model(1)
    assert _ckpt_listing(save) == on_disk and not list(save.glob(".iter_*"))
    with pytest.raises(NonFiniteError, match="refusing to push weights weight_v000002 to the engines"):
        trainer.update_weights()
    assert [p.name for p in (tmp_path / "out" / "weights").iterdir()] == [Path(pushed).name]
    # the tensor modes refuse before any request: these URLs answer nothing, so reaching them would fail otherwise
    named = [("ok", torch.zeros(3)), ("bad", torch.tensor([1.0, float("inf")]))]
    for sender in (TensorWeightSender(["http://127.0.0.1:9"]), DistributedWeightSender(["http://127.0.0.1:9"])):
        with pytest.raises(NonFiniteError, match="weight 'bad' holds NaN/inf"):
            sender.push(named, "weight_v000009")


def test_megatron_save_refuses_nonfinite_weights(tmp_path):
    """The Megatron actor's save guard runs before any collective write (no megatron-core needed to reach it)."""
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor

    actor = object.__new__(MegatronTrainRayActor)
    actor.args = Namespace(save=str(tmp_path / "ckpt"))
    actor.on_gpu = False
    actor.model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        actor.model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to save checkpoint 3 .*weight 'weight' holds NaN/inf"):
        actor.save_model(3)
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------- item 6: --save lock
_HOLDER = textwrap.dedent(
    """
    import sys
    from slime.utils.run_dirs import SaveDirLock
    lock = SaveDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
    lock.release()
    """
)


def test_second_writer_on_save_dir_is_refused_with_holder_pid(tmp_path):
    save = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "slime_ta_opd"), str(ROOT)) if p))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(save)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_flight = save / ".iter_0000004.tmpabc"  # the holder's checkpoint being written
        in_flight.mkdir()
        with pytest.raises(SaveDirLockedError, match=rf"--save '{save}' is in use by another run \(pid {holder.pid},"):
            SaveDirLock(save).acquire()
        assert in_flight.is_dir()  # the refused run swept nothing
        # and save_checkpoint itself never sweeps: only the lock holder does, once
        assert (save / LOCK_NAME).read_text().strip() == str(holder.pid)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with SaveDirLock(save):  # the holder ended: the lock is free, and the leftover temp dir is swept under it
        assert not in_flight.exists()
        assert (save / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_train_refuses_locked_save_before_starting_anything(tiny_student_dir, tmp_path):
    import ray

    train = _load_module("slime_train_entry_safety", ROOT / "slime_ta_opd" / "train.py")
    args = make_args(tiny_student_dir, tmp_path, "--save", str(tmp_path / "ckpt"), "--skip-preflight")
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler: restored below
    try:
        with SaveDirLock(tmp_path / "ckpt"):
            with pytest.raises(SaveDirLockedError, match=f"pid {os.getpid()}"):
                train.train(args)
            assert train.main([*_argv_of(args)]) == 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert not ray.is_initialized()


def _argv_of(args) -> list[str]:
    return [
        "--hf-checkpoint", args.hf_checkpoint, "--rollout-batch-size", "4", "--rollout-max-response-len", "8",
        "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate", "--skip-preflight",
        "--output-dir", args.output_dir, "--save", args.save,
    ]  # fmt: skip


def test_save_checkpoint_does_not_sweep_other_temp_dirs(tiny_student_dir, tmp_path):
    trainer, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    other = save / ".iter_0000009.tmpxyz"
    other.mkdir()
    trainer.save_model(1)
    assert other.is_dir()


# ---------------------------------------------------------------------------------------------- item 7: metrics.jsonl
def _metrics_args(tmp_path):
    return Namespace(output_dir=str(tmp_path / "out"), metrics_path=None, use_tensorboard=False, use_wandb=False)


GOOD = [{"rollout_id": 0, "train/loss": 0.5}, {"rollout_id": 1, "train/loss": 0.25}]


@pytest.mark.parametrize(
    "tail", [b'{"rollout_id": 2, "train/lo', b'{"rollout_id": 2}\x00\x00', b"\xff\xfe{", b"[1, 2"]
)
def test_torn_last_metrics_line_is_dropped_with_warning(tmp_path, caplog, tail):
    path = tmp_path / "out" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD) + tail)
    with caplog.at_level(logging.WARNING, logger="slime.utils.logging_utils"):
        assert [r["rollout_id"] for r in read_metrics(path)] == [0, 1]
        logger = MetricsLogger(_metrics_args(tmp_path))
    assert f"{path}:3: dropping a torn last line" in caplog.text
    assert [r["rollout_id"] for r in logger.records] == [0, 1]
    logger.log(2, {"train/loss": 0.125})
    logger.close()
    assert [r["rollout_id"] for r in read_metrics(path)] == [0, 1, 2]
    assert path.read_text().count("\n") == 3


def test_complete_last_line_without_newline_keeps_appends_apart(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]))
    logger = MetricsLogger(_metrics_args(tmp_path))
    logger.log(2, {"train/loss": 0.125})
    assert [r["rollout_id"] for r in read_metrics(path)] == [0, 1, 2]


@pytest.mark.parametrize("bad", ['{"rollout_id": 1, "train/lo', "[1, 2]", "\x00\x00"])
def test_damaged_middle_metrics_line_is_an_error_naming_file_and_line(tmp_path, bad):
    path = tmp_path / "out" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(GOOD[0]) + "\n" + bad + "\n" + json.dumps(GOOD[1]) + "\n")
    for read in (lambda: read_metrics(path), lambda: MetricsLogger(_metrics_args(tmp_path))):
        with pytest.raises(ValueError, match=rf"{path}:2: not a metrics record"):
            read()
    assert path.read_text().count("\n") == 3  # left as it was


# ---------------------------------------------------------------------------------------------- item 9: output paths
@pytest.mark.parametrize(
    "flag, make",
    [
        ("--save", lambda t: ["--save", str(t / "afile" / "ckpt")]),
        ("--save", lambda t: ["--save", str(t / "afile")]),
        ("--output-dir", lambda t: ["--output-dir", str(t / "afile" / "out")]),
        ("--metrics-path", lambda t: ["--metrics-path", str(t / "adir")]),
        ("--metrics-path", lambda t: ["--metrics-path", str(t / "afile" / "m.jsonl")]),
        ("--save", lambda t: ["--save", "/proc/slime-cannot-write-here/ckpt"]),
    ],
)
def test_unwritable_output_paths_refused_before_anything_starts(tiny_student_dir, tmp_path, flag, make):
    import ray

    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "adir").mkdir()
    train = _load_module("slime_train_entry_safety", ROOT / "slime_ta_opd" / "train.py")
    args = make_args(tiny_student_dir, tmp_path, "--skip-preflight", *make(tmp_path))
    with pytest.raises(OutputPathError, match=rf"^{flag}"):
        train.train(args)
    assert not ray.is_initialized()


def test_token_bank_dir_under_a_file_is_refused(tiny_student_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    args = make_args(tiny_student_dir, tmp_path, "--opd-token-bank-dir", str(tmp_path / "afile" / "bank"))
    with pytest.raises(OutputPathError, match=r"--opd-token-bank-dir .*is under .*afile.*which is a file"):
        prepare_run_dirs(args)


# ---------------------------------------------------------------------------------------------- item 10: --load
def test_load_of_one_iter_dir_loads_exactly_that_checkpoint(tiny_student_dir, tmp_path):
    trainer, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    trainer.args.keep_last_n_checkpoints = None
    weights_0 = trainer.state_for_test()
    trainer.train(1, make_rollout(21))
    trainer.save_model(1)  # the pointer now names iter 1
    resumed = make_trainer(make_args(tiny_student_dir, tmp_path / "b", "--load", str(save / "iter_0000000")))
    assert resumed.loaded_from == str(save / "iter_0000000") and resumed.last_rollout_id == 0
    got = resumed.state_for_test()
    assert all(torch.equal(weights_0[k], got[k]) for k in weights_0)


@pytest.mark.parametrize("case", ["file", "empty_dir", "unrelated_dir", "iter_dirs_without_pointer", "damaged_iter"])
def test_load_that_cannot_be_loaded_is_refused_not_trained_from_scratch(tiny_student_dir, tmp_path, case):
    target = tmp_path / "load"
    if case == "file":
        target.write_text("not a checkpoint")
        error, match = ValueError, "is a file: expected a checkpoint directory"
    elif case in ("empty_dir", "unrelated_dir"):
        target.mkdir()
        if case == "unrelated_dir":
            (target / "notes.txt").write_text("hello")
        error, match = ValueError, "holds no checkpoint .* refusing to train from scratch"
    elif case == "iter_dirs_without_pointer":
        (target / "iter_0000003").mkdir(parents=True)
        error, match = ValueError, "holds iter_0000003 but no latest_checkpointed_iteration.txt"
    else:
        _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path / "a")
        target = save / "iter_0000000"
        (target / "rng.pt").write_bytes(b"garbage")
        error, match = ckpt.CheckpointError, "rng.pt"
    args = make_args(tiny_student_dir, tmp_path, "--load", str(target), "--save", str(tmp_path / "save"))
    with pytest.raises(error, match=match):
        make_trainer(args)
    if case != "damaged_iter":  # refused at start-up too, before any actor or server
        with pytest.raises(error, match=match):
            prepare_run_dirs(args)


def test_load_equal_to_save_without_checkpoint_is_a_fresh_start(tiny_student_dir, tmp_path):
    save = tmp_path / "ckpt"
    for exists in (False, True):
        if exists:
            save.mkdir()
        assert resolve_load(save, save) is None
    trainer = make_trainer(make_args(tiny_student_dir, tmp_path, "--load", str(save), "--save", str(save)))
    assert trainer.loaded_from is None and trainer.global_step == 0


def test_megatron_load_rule_accepts_iter_dir_and_refuses_others(tmp_path):
    from slime.backends.megatron_utils import checkpoint as mckpt

    root = tmp_path / "dist"
    (root / "iter_0000005").mkdir(parents=True)
    (root / "iter_0000005" / ".metadata").write_bytes(b"")
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    assert mckpt.checkpoint_to_load(root, None) == root / "iter_0000005"
    assert mckpt.checkpoint_to_load(root / "iter_0000005", None) == root / "iter_0000005"
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(FileNotFoundError, match="names iteration 7"):
        mckpt.checkpoint_to_load(root, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        mckpt.checkpoint_to_load(tmp_path / "empty", tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------- item 11: manifest
def _rewrite_manifest(ckpt_dir: Path, edit) -> None:
    path = ckpt_dir / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def test_unlisted_shard_is_refused_and_never_loaded(tiny_student_dir, tmp_path):
    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    it = save / "iter_0000000"
    weights = load_file(it / "model" / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(it / "model" / "zz-extra.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"holds \['model/zz-extra.safetensors'\] not listed"):
        make_trainer(make_args(tiny_student_dir, tmp_path / "b", "--load", str(save)))


def test_optimizer_dropped_from_manifest_is_refused(tiny_student_dir, tmp_path):
    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    it = save / "iter_0000000"

    def drop(m):
        del m["files"]["optimizer.pt"]
        return m

    _rewrite_manifest(it, drop)
    with pytest.raises(ckpt.CheckpointError, match=r"holds \['optimizer.pt'\] not listed"):
        make_trainer(make_args(tiny_student_dir, tmp_path / "b", "--load", str(save)))


def _without_files(m):
    del m["files"]
    return m


def _entry(value):
    def edit(m):
        m["files"]["rng.pt"] = value
        return m

    return edit


def _path_entry(rel):
    def edit(m):
        m["files"][rel] = m["files"]["rng.pt"]
        return m

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: [m], "expected a JSON object, got list"),
        (lambda m: "files", "expected a JSON object, got str"),
        (_without_files, "'files' must be a non-empty object"),
        (lambda m: {**m, "files": []}, "'files' must be a non-empty object"),
        (lambda m: {**m, "format_version": "1"}, "format_version '1', expected 1"),
        (_entry("abc"), "entry 'rng.pt' must be an object with 'size'"),
        (_entry({"sha256": "0" * 64}), "entry 'rng.pt' must be an object with 'size'"),
        (_entry({"size": "12", "sha256": "0" * 64}), "entry 'rng.pt' must be an object with 'size'"),
        (_entry({"size": 12, "sha256": 5}), "entry 'rng.pt' must be an object with 'size'"),
        (_path_entry("../outside.pt"), "entry '../outside.pt' is not a relative path inside"),
        (_path_entry("/etc/passwd"), "entry '/etc/passwd' is not a relative path inside"),
    ],
)
def test_manifest_of_wrong_shape_is_a_checkpoint_error(tiny_student_dir, tmp_path, edit, match):
    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    it = save / "iter_0000000"
    _rewrite_manifest(it, edit)
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        ckpt.checkpoint_to_load(save, None)
    assert "manifest" in str(info.value) or "iter_0000000" in str(info.value)


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{", b"[" * 100000])
def test_unreadable_manifest_is_a_checkpoint_error_naming_it(tiny_student_dir, tmp_path, raw):
    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    (save / "iter_0000000" / ckpt.MANIFEST).write_bytes(raw)
    with pytest.raises(ckpt.CheckpointError, match=r"manifest.json'?: unreadable manifest"):
        ckpt.checkpoint_to_load(save, None)


def test_trainer_state_of_wrong_shape_is_a_checkpoint_error(tiny_student_dir, tmp_path):
    import hashlib

    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path)
    it = save / "iter_0000000"
    body = b'{"rollout_id": "zero"}'
    (it / "trainer_state.json").write_bytes(body)

    def relist(m):  # a consistent manifest: the shape check, not the sha256, must catch it
        m["files"]["trainer_state.json"] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        return m

    _rewrite_manifest(it, relist)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json'?: expected an object with integers"):
        make_trainer(make_args(tiny_student_dir, tmp_path / "b", "--load", str(save)))


# ---------------------------------------------------------------------------------------------- item 12: secrets
def test_secret_names_rule():
    for name in ("api_key", "router_api_key", "--router-api-key", "hf_token", "wandb_api_key", "client_secret",
                 "db_password", "AUTH_TOKEN", "private_key_path"):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("max_tokens_per_gpu", "opd_token_bank_dir", "input_key", "rollout_stop_token_ids", "seed"):
        assert not is_secret_name(name), name
    out = redact_secrets(
        {
            "api_key": API_KEY,
            "router_api_key": None,
            "sglang_extra": {"hf_token": "t0k"},
            "cmd": f"--api-key {API_KEY}",
        }
    )
    assert out == {"api_key": REDACTED, "router_api_key": None, "sglang_extra": {"hf_token": REDACTED},
                   "cmd": f"--api-key {REDACTED}"}  # fmt: skip


def test_arguments_cli_prints_no_secret(capsys):
    from slime.utils.arguments import main as arguments_main

    argv = [
        "--api-key",
        API_KEY,
        "--rollout-batch-size",
        "2",
        "--rollout-max-response-len",
        "4",
        "--hf-checkpoint",
        "x",
    ]
    assert arguments_main(argv) == 0
    out = capsys.readouterr().out
    assert API_KEY not in out and f"api_key = {REDACTED!r}" in out


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_checkpoint_args_json_holds_no_secret(tiny_student_dir, tmp_path):
    _, save = _trainer_with_checkpoint(tiny_student_dir, tmp_path, "--api-key", API_KEY)
    assert _files_holding(tmp_path, API_KEY) == []
    snapshot = json.loads((save / "iter_0000000" / "args.json").read_text())
    assert snapshot["api_key"] == REDACTED


# ---------------------------------------------------------------------------------------------- the real loop
@pytest.fixture
def train_module(monkeypatch):
    monkeypatch.syspath_prepend(str(E2E))
    from fake_rollout_manager import create_fake_rollout_manager

    module = _load_module("slime_train_entry_safety_loop", ROOT / "slime_ta_opd" / "train.py")
    monkeypatch.setattr(module, "create_rollout_manager", create_fake_rollout_manager)
    return module


def _loop_args(student, tmp_path, *extra):
    return parse_args(
        [
            "--hf-checkpoint", str(student), "--rollout-batch-size", "4", "--rollout-max-response-len", "8",
            "--micro-batch-size", "2", "--lr", "1e-3", "--api-key", API_KEY,
            "--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:9/generate", "--skip-preflight",
            "--output-dir", str(tmp_path / "out"), "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
            "--save-interval", "1", "--keep-last-n-checkpoints", "1",
            *extra,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_loop_nan_weights_stop_run_and_keep_good_checkpoint(tmp_path, ray_local, train_module, tiny_student_dir):
    """The reported run: a step that makes the weights NaN must not be saved over the good checkpoint (keep-last-n
    1), nor pushed to the engines; the run stops with the error. Also: nothing written holds the API key."""
    train_module.train(_loop_args(tiny_student_dir, tmp_path, "--num-rollout", "1"))
    good = _ckpt_listing(tmp_path / "ckpt")
    assert "iter_0000000/manifest.json" in good

    args = _loop_args(tiny_student_dir, tmp_path, "--num-rollout", "3")
    args.lr = float("inf")  # refused at start-up now; here it stands for any step whose update overflows
    with pytest.raises(NonFiniteError, match="refusing to save checkpoint .*iter_0000001"):
        train_module.train(args)
    assert _ckpt_listing(tmp_path / "ckpt") == good
    ckpt.verify_checkpoint(tmp_path / "ckpt" / "iter_0000000")
    for pushed in (tmp_path / "out" / "weights").iterdir():  # only finite weights ever reached the engines
        assert all(bool(torch.isfinite(t).all()) for t in load_file(pushed / "model.safetensors").values())
    assert _files_holding(tmp_path, API_KEY) == []
