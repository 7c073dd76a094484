"""One OPD step of the Megatron trainer on CPU (gloo) equals the torch backend's step on the same batch."""

from __future__ import annotations

import json
import socket

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core (pip install -e '.[megatron]')")
pytestmark = pytest.mark.megatron

import torch.multiprocessing as mp  # noqa: E402

from tests.backends import megatron_workers as workers  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollout_data(teacher_logp=True):
    gen = torch.Generator().manual_seed(0)
    prompt_lens, resp_lens = [3, 4, 2, 5], [5, 3, 6, 4]
    tokens = [
        torch.randint(0, 100, (p + r,), generator=gen).tolist() for p, r in zip(prompt_lens, resp_lens, strict=True)
    ]
    masks = [[1, 0, 1, 1, 1], [1, 1, 1], [0, 0, 1, 1, 0, 1], [1, 1, 1, 1]]
    data = {
        "tokens": tokens,
        "prompt_lengths": prompt_lens,
        "response_lengths": resp_lens,
        "loss_masks": masks,
        "rewards": [0.0] * 4,
        "rollout_id": 0,
    }
    if teacher_logp:
        data["teacher_log_probs"] = [(-torch.rand(r, generator=gen) * 3).tolist() for r in resp_lens]
    return data


def argv_for(student, tmp_path, *extra):
    return [
        "--hf-checkpoint", str(student),
        "--rollout-batch-size", "4", "--rollout-max-response-len", "8", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--lr", "1e-3", "--clip-grad", "1.0", "--weight-decay", "0.0",
        "--output-dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def torch_step(argv, data):
    from slime.backends.torch_utils.actor import TorchTrainRayActor
    from slime.utils.arguments import parse_args

    actor = TorchTrainRayActor(1, 0)
    actor.init(parse_args(argv))
    metrics = actor.train(0, data)
    return metrics, actor.state_for_test()


def megatron_step(argv, data, tmp_path, world_size=1):
    """One rollout through ``world_size`` spawned trainer ranks (gloo); the metrics and the exported HF weights."""
    data_path = tmp_path / "data.pt"
    torch.save(data, data_path)
    mp.spawn(
        workers.opd_step_worker,
        args=(world_size, free_port(), argv, str(data_path), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    out = json.loads((tmp_path / "metrics.json").read_text())
    from safetensors.torch import load_file

    return out, load_file(str(tmp_path / "hf_after" / "model.safetensors"))


def assert_same_step(torch_metrics, torch_state, mg_out, mg_state):
    mg = mg_out["metrics"]
    print(
        f"loss torch={torch_metrics['train/loss']:.8f} megatron={mg['train/loss']:.8f}; "
        f"grad_norm torch={torch_metrics['train/grad_norm']:.6f} megatron={mg['train/grad_norm']:.6f}"
    )
    assert mg["train/loss"] == pytest.approx(torch_metrics["train/loss"], abs=1e-5)
    assert mg["train/grad_norm"] == pytest.approx(torch_metrics["train/grad_norm"], rel=1e-4)
    assert mg["train/teacher_kl_all"] == pytest.approx(torch_metrics["train/teacher_kl_all"], abs=1e-5)
    for name, value in mg_state.items():
        assert (value - torch_state[name]).abs().max().item() < 1e-4, name


OPD_SGLANG = ("--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:1/generate")


def test_one_opd_step_matches_the_torch_backend_tp1(tiny_student_dir, tmp_path):
    data = rollout_data()
    argv = argv_for(tiny_student_dir, tmp_path, *OPD_SGLANG, "--save", str(tmp_path / "ckpt"))
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), data)
    mg_out, mg_state = megatron_step(argv, data, tmp_path)
    assert_same_step(t_metrics, t_state, mg_out, mg_state)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "0"


PP2 = ("--pipeline-model-parallel-size", "2", "--actor-num-gpus-per-node", "2")


@pytest.mark.parametrize("layout", [(), PP2], ids=["pp1", "pp2"])
def test_in_trainer_teacher_matches_server_scored_teacher(layout, tiny_student_dir, tiny_teacher_dir, tmp_path):
    """--opd-type megatron --opd-teacher-load: the teacher scored inside the trainer (through the pipeline at PP=2,
    then broadcast to every stage) gives the same step as teacher log-probs scored by HF outside it."""
    from transformers import AutoModelForCausalLM

    data = rollout_data(teacher_logp=False)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    scored = []
    with torch.no_grad():
        for toks, p, r in zip(data["tokens"], data["prompt_lengths"], data["response_lengths"], strict=True):
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([toks])).logits[0], -1)
            scored.append(logp[torch.arange(p - 1, p + r - 1), torch.tensor(toks[p:])].tolist())
    t_metrics, t_state = torch_step(
        argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), {**data, "teacher_log_probs": scored}
    )
    argv = argv_for(tiny_student_dir, tmp_path, "--use-opd", "--opd-type", "megatron",
                    "--opd-teacher-load", str(tiny_teacher_dir), *layout)  # fmt: skip
    mg_out, mg_state = megatron_step(argv, data, tmp_path, world_size=2 if layout else 1)
    assert_same_step(t_metrics, t_state, mg_out, mg_state)


@pytest.mark.slow
def test_one_opd_step_tp2_matches_tp1(tiny_student_dir, tmp_path):
    data = rollout_data()
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), data)
    mg_out, mg_state = megatron_step(
        argv_for(tiny_student_dir, tmp_path, *OPD_SGLANG, "--tensor-model-parallel-size", "2",
                 "--actor-num-gpus-per-node", "2"),
        data, tmp_path, world_size=2,
    )  # fmt: skip
    assert_same_step(t_metrics, t_state, mg_out, mg_state)


def test_sft_loss_step_dp2_matches_the_torch_backend(tiny_student_dir, tmp_path):
    """--loss-type sft_loss (sampled-token log-probs only) through the shared step on two data-parallel ranks: the
    torch backend's step, and the loss's metric (train/sd_sft_nll) gathered over both ranks."""
    data = rollout_data()
    sft = ("--loss-type", "sft_loss")
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *sft), data)
    mg_out, mg_state = megatron_step(
        argv_for(tiny_student_dir, tmp_path, *sft, "--actor-num-gpus-per-node", "2"), data, tmp_path, world_size=2
    )
    assert_same_step(t_metrics, t_state, mg_out, mg_state)
    assert mg_out["metrics"]["train/sd_sft_nll"] == pytest.approx(t_metrics["train/sd_sft_nll"], abs=1e-5)
