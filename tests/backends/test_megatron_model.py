"""Megatron-core GPTModel on CPU over gloo: logits match the HF model at TP=1 and TP=2 (within 1e-4)."""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core (pip install -e '.[megatron]')")
pytestmark = pytest.mark.megatron

import torch.multiprocessing as mp  # noqa: E402

from tests.backends import megatron_workers as workers  # noqa: E402

TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def token_ids(tmp_path_factory):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("ids") / "ids.pt"
    torch.save(ids, path)
    return ids, path


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_hf(tp, tiny_student_dir, token_ids, tmp_path):
    ids, ids_path = token_ids
    mp.spawn(
        workers.logits_worker,
        args=(tp, free_port(), tp, str(tiny_student_dir), str(ids_path), str(tmp_path)),
        nprocs=tp,
        join=True,
    )
    got = torch.load(tmp_path / "megatron.pt")
    ref = hf_logits(tiny_student_dir, ids)
    diff = (got["logits"] - ref).abs().max().item()
    print(f"TP={tp}: max |logits_megatron - logits_hf| = {diff:.3e}")
    assert got["logits"].shape == ref.shape
    assert diff < TOL
    ref_logp = torch.log_softmax(ref[0], -1)[torch.arange(2, 11), ids[0, 3:]]
    assert (got["logp"] - ref_logp).abs().max().item() < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_export_gathers_the_original_hf_tensors(tp, tiny_student_dir, tmp_path):
    from slime.backends.megatron_utils.model import read_hf_state_dict

    mp.spawn(
        workers.export_worker,
        args=(tp, free_port(), tp, str(tiny_student_dir), str(tmp_path)),
        nprocs=tp,
        join=True,
    )
    exported = torch.load(tmp_path / "exported.pt")
    original = read_hf_state_dict(tiny_student_dir)
    assert set(exported) == set(original)
    for name, value in original.items():
        assert torch.equal(exported[name], value), name
