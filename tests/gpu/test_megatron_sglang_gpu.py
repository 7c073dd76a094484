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


def test_sglang_engine_receives_weights_over_nccl(tiny_student_dir, tiny_teacher_dir, tmp_path):
    """--weight-update-mode distributed against real SGLang: NCCL group, then the teacher's weights by broadcast
    score exactly as the teacher loaded from disk."""
    pytest.importorskip("sglang")
    from argparse import Namespace

    import requests
    from transformers import AutoModelForCausalLM

    from slime.backends.sglang_utils.engines import launch_sglang_engine_group
    from slime.backends.weight_sync import DistributedWeightSender, unique_named_tensors

    args = Namespace(hf_checkpoint=str(tiny_student_dir), rollout_num_gpus=1, rollout_num_gpus_per_engine=1,
                     api_key=None, colocate=False, offload=False)  # fmt: skip
    group = launch_sglang_engine_group(args, log_dir=str(tmp_path))
    probe = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
             "logprob_start_len": 0}  # fmt: skip

    def scores():
        return requests.post(f"{group.url}/generate", json=probe, timeout=120).json()["meta_info"][
            "input_token_logprobs"
        ]

    try:
        group.update_weights_from_disk(str(tiny_teacher_dir))
        from_disk = scores()
        group.update_weights_from_disk(str(tiny_student_dir))
        teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir))  # the checkpoint's own dtype
        sender = DistributedWeightSender(group.engine_urls, backend="nccl", device="cuda:0")
        sender.push(unique_named_tensors(teacher.state_dict()))
        pushed = scores()
        sender.close()
        # the same tensors reach the same model dtype either way
        assert [e[0] for e in pushed[1:]] == pytest.approx([e[0] for e in from_disk[1:]], abs=1e-6)
    finally:
        group.stop()


def test_sglang_engine_receives_weights_as_cuda_ipc_tensors(tiny_student_dir, tiny_teacher_dir, tmp_path):
    """--weight-update-mode tensor against real SGLang on the same GPU: /update_weights_from_tensor with CUDA IPC
    handles gives the scores of the teacher loaded from disk."""
    pytest.importorskip("sglang")
    from argparse import Namespace

    import requests
    from transformers import AutoModelForCausalLM

    from slime.backends.sglang_utils.engines import launch_sglang_engine_group
    from slime.backends.weight_sync import TensorWeightSender, unique_named_tensors

    args = Namespace(hf_checkpoint=str(tiny_student_dir), rollout_num_gpus=1, rollout_num_gpus_per_engine=1,
                     api_key=None, colocate=True, offload=False)  # fmt: skip
    group = launch_sglang_engine_group(args, log_dir=str(tmp_path))
    probe = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
             "logprob_start_len": 0}  # fmt: skip

    def scores():
        return requests.post(f"{group.url}/generate", json=probe, timeout=120).json()["meta_info"][
            "input_token_logprobs"
        ]

    try:
        group.update_weights_from_disk(str(tiny_teacher_dir))
        from_disk = scores()
        group.update_weights_from_disk(str(tiny_student_dir))
        teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).to("cuda:0")
        TensorWeightSender(group.engine_urls).push(unique_named_tensors(teacher.state_dict()))
        assert [e[0] for e in scores()[1:]] == pytest.approx([e[0] for e in from_disk[1:]], abs=1e-6)
    finally:
        group.stop()
