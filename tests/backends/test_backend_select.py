"""Backend choice: embedded defaults without GPUs, scale-out pieces with GPUs, install hints for missing extras."""

from __future__ import annotations

from argparse import Namespace

import pytest

from slime.backends import select
from slime.backends.select import (
    MissingExtraError,
    choose_rollout_backend,
    choose_train_backend,
    install_hint,
    resolve_backends,
)


@pytest.mark.parametrize(
    ("requested", "gpu", "megatron", "expected"),
    [
        ("auto", False, False, "torch"),
        ("auto", False, True, "torch"),
        ("auto", True, True, "megatron"),
        ("auto", True, False, "torch"),
        ("torch", True, True, "torch"),
        ("megatron", True, True, "megatron"),
    ],
)
def test_train_backend_table(requested, gpu, megatron, expected):
    assert choose_train_backend(requested, gpu, megatron) == expected


def test_forced_megatron_without_extra_gives_install_hint():
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[megatron\]'"):
        choose_train_backend("megatron", has_gpu=True, has_megatron=False)


def test_forced_megatron_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA"):
        choose_train_backend("megatron", has_gpu=False, has_megatron=True)


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="auto"):
        choose_train_backend("deepspeed", True, True)


@pytest.mark.parametrize(
    ("requested", "gpu", "sglang", "external", "expected"),
    [
        ("auto", False, False, False, "embedded"),
        ("auto", False, True, False, "embedded"),
        ("auto", True, True, False, "sglang"),
        ("auto", True, False, False, "embedded"),
        ("auto", False, False, True, "external"),
        ("sglang", False, False, True, "external"),
        ("sglang", True, True, False, "sglang"),
        ("embedded", True, True, False, "embedded"),
        ("embedded", True, True, True, "embedded"),
    ],
)
def test_rollout_backend_table(requested, gpu, sglang, external, expected):
    assert choose_rollout_backend(requested, gpu, sglang, external) == expected


def test_forced_sglang_without_extra_gives_install_hint():
    with pytest.raises(MissingExtraError, match=r"\[sglang\]"):
        choose_rollout_backend("sglang", has_gpu=True, has_sglang=False, external_router=False)


def test_forced_sglang_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="need CUDA"):
        choose_rollout_backend("sglang", has_gpu=False, has_sglang=True, external_router=False)


def test_install_hint_names_the_extra():
    assert "megatron.core" in install_hint("megatron")
    assert "slime-ta-opd[sglang]" in install_hint("sglang")


def test_resolve_backends_from_flags_on_this_machine(monkeypatch):
    monkeypatch.setattr(select, "extra_available", lambda extra: False)
    args = Namespace(train_backend="auto", rollout_backend="auto", sglang_router_ip=None, sglang_router_port=None)
    assert resolve_backends(args, has_gpu=False) == select.BackendChoice("torch", "embedded")
    args.sglang_router_ip, args.sglang_router_port = "10.0.0.1", 30000
    assert resolve_backends(args, has_gpu=False).rollout == "external"
    args.train_backend = "megatron"
    with pytest.raises(MissingExtraError):
        resolve_backends(args, has_gpu=True)


def test_train_actor_class_defaults_to_torch_without_gpu():
    from slime.backends.torch_utils.actor import TorchTrainRayActor

    args = Namespace(train_backend="auto")
    assert select.train_actor_class(args, has_gpu=False) is TorchTrainRayActor


def test_extra_available_does_not_raise_for_missing_packages():
    from slime.backends import extras

    assert select.extra_available("megatron") in (True, False)
    extras.EXTRAS["nope"] = ("no_such_pkg.sub", "nothing")
    try:
        assert extras.extra_available("nope") is False
        with pytest.raises(extras.MissingExtraError, match="pip install"):
            extras.require_extra("nope")
    finally:
        del extras.EXTRAS["nope"]
