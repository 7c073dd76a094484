"""GPU-only checks of the scale-out path (skipped without CUDA; megatron / sglang extras needed).

Run on a GPU machine: ``pip install -e '.[megatron,sglang]' && pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.megatron
def test_megatron_gpu_opd_step_matches_torch_backend(tiny_student_dir, tmp_path):
    """Megatron DDP + Megatron's Adam (CUDA) against the torch backend on the same batch, TP=1."""
    pytest.importorskip("megatron.core")
    import torch.multiprocessing as mp

    from tests.backends import megatron_workers as workers
    from tests.backends.test_megatron_trainer import OPD_SGLANG, argv_for, assert_same_step, rollout_data, torch_step

    data = rollout_data()
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), data)
    data_path = tmp_path / "data.pt"
    torch.save(data, data_path)
    argv = argv_for(tiny_student_dir, tmp_path, *OPD_SGLANG, "--actor-num-gpus-per-node", "1")
    mp.spawn(workers.opd_step_worker, args=(1, free_port(), argv, str(data_path), str(tmp_path)), nprocs=1, join=True)
    import json

    from safetensors.torch import load_file

    out = json.loads((tmp_path / "metrics.json").read_text())
    mg_state = load_file(str(tmp_path / "hf_after" / "model.safetensors"))
    # Megatron's Adam keeps fp32 main params; same math, so the tolerance of the CPU test holds
    assert_same_step(t_metrics, t_state, out, mg_state)


def test_managed_sglang_engine_serves_and_reloads(tiny_student_dir, tmp_path):
    """One real SGLang engine: /generate answers, /update_weights_from_disk succeeds, a killed engine restarts."""
    pytest.importorskip("sglang")
    from argparse import Namespace

    import requests

    from slime.backends.sglang_utils.engines import launch_sglang_engine_group

    args = Namespace(hf_checkpoint=str(tiny_student_dir), rollout_num_gpus=1, rollout_num_gpus_per_engine=1,
                     api_key=None, colocate=False, offload=False)  # fmt: skip
    group = launch_sglang_engine_group(args, log_dir=str(tmp_path))
    try:
        answer = requests.post(
            f"{group.url}/generate",
            json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}, "return_logprob": True},
            timeout=120,
        ).json()
        assert len(answer["meta_info"]["output_token_logprobs"]) <= 4
        group.update_weights_from_disk(str(tiny_student_dir))
        group.engines[0].process.kill()
        group.engines[0].process.wait()
        assert group.check_and_restart() == [group.engines[0].url]
    finally:
        group.stop()


def _pushed_and_from_disk_scores(student_dir, teacher_dir, log_dir, push, colocate=False):
    """One real SGLang engine on the student: the teacher's scores after loading it from disk, and after
    ``push(engine_urls, teacher_model)`` (the teacher in its checkpoint's dtype, on CPU)."""
    pytest.importorskip("sglang")
    from argparse import Namespace

    import requests
    from transformers import AutoModelForCausalLM

    from slime.backends.sglang_utils.engines import launch_sglang_engine_group

    args = Namespace(hf_checkpoint=str(student_dir), rollout_num_gpus=1, rollout_num_gpus_per_engine=1,
                     api_key=None, colocate=colocate, offload=False)  # fmt: skip
    group = launch_sglang_engine_group(args, log_dir=str(log_dir))
    probe = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
             "logprob_start_len": 0}  # fmt: skip

    def scores():
        answer = requests.post(f"{group.url}/generate", json=probe, timeout=120).json()
        return [e[0] for e in answer["meta_info"]["input_token_logprobs"][1:]]

    try:
        group.update_weights_from_disk(str(teacher_dir))
        from_disk = scores()
        group.update_weights_from_disk(str(student_dir))
        push(group.engine_urls, AutoModelForCausalLM.from_pretrained(str(teacher_dir)))
        return scores(), from_disk
    finally:
        group.stop()


def test_sglang_engine_receives_weights_over_nccl(tiny_student_dir, tiny_teacher_dir, tmp_path):
    """--weight-update-mode distributed against real SGLang: NCCL group, then the teacher's weights by broadcast
    score exactly as the teacher loaded from disk (the same tensors reach the same model dtype either way)."""
    from slime.backends.weight_sync import DistributedWeightSender, unique_named_tensors

    def push(urls, teacher):
        sender = DistributedWeightSender(urls, backend="nccl", device="cuda:0")
        sender.push(unique_named_tensors(teacher.state_dict()))
        sender.close()

    pushed, from_disk = _pushed_and_from_disk_scores(tiny_student_dir, tiny_teacher_dir, tmp_path, push)
    assert pushed == pytest.approx(from_disk, abs=1e-6)


def test_sglang_engine_receives_weights_as_cuda_ipc_tensors(tiny_student_dir, tiny_teacher_dir, tmp_path):
    """--weight-update-mode tensor against real SGLang on the same GPU: /update_weights_from_tensor with CUDA IPC
    handles gives the scores of the teacher loaded from disk."""
    from slime.backends.weight_sync import TensorWeightSender, unique_named_tensors

    def push(urls, teacher):
        TensorWeightSender(urls).push(unique_named_tensors(teacher.to("cuda:0").state_dict()))

    pushed, from_disk = _pushed_and_from_disk_scores(tiny_student_dir, tiny_teacher_dir, tmp_path, push, True)
    assert pushed == pytest.approx(from_disk, abs=1e-6)
