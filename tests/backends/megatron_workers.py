"""Worker functions of the Megatron CPU tests, run in spawned processes (one per rank, gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def init_rank(rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from slime.backends.megatron_utils.model import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=0)


def logits_worker(rank: int, world_size: int, port: int, tp: int, hf_dir: str, ids_path: str, out_dir: str) -> None:
    """Megatron logits (TP shards gathered) and sampled-token log-probs for the ids in ``ids_path``."""
    init_rank(rank, world_size, port, tp=tp)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from slime.backends.megatron_utils.model import destroy_parallel, forward_logits, load_gpt_from_hf
    from slime.backends.torch_utils.model import build_response_batch

    ids = torch.load(ids_path)
    model, _ = load_gpt_from_hf(hf_dir)
    model.eval()
    with torch.no_grad():
        local = forward_logits(model, ids)  # [B, T, V/TP]
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)
        from slime.backends.megatron_utils.model import sampled_token_log_probs

        batch = build_response_batch([ids[0].tolist()], [3], [ids.shape[1] - 3])
        logp = sampled_token_log_probs(model, batch)
    if rank == 0:
        torch.save({"logits": full, "logp": logp}, Path(out_dir) / "megatron.pt")
    destroy_parallel()


def export_worker(rank: int, world_size: int, port: int, tp: int, hf_dir: str, out_dir: str) -> None:
    """Load HF → Megatron at TP, gather back to HF names on rank 0 and save them."""
    init_rank(rank, world_size, port, tp=tp)
    from slime.backends.megatron_utils.checkpoint import gather_hf_state_dict
    from slime.backends.megatron_utils.model import destroy_parallel, load_gpt_from_hf

    model, shape = load_gpt_from_hf(hf_dir)
    hf = gather_hf_state_dict(model, shape)
    if rank == 0:
        torch.save(hf, Path(out_dir) / "exported.pt")
    destroy_parallel()


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload))


def opd_step_worker(rank: int, world_size: int, port: int, argv: list[str], data_path: str, out_dir: str) -> None:
    """One rollout of Megatron training through ``MegatronTrainRayActor`` (TP from ``argv``)."""
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.backends.megatron_utils.model import destroy_parallel
    from slime.utils.arguments import parse_args

    args = parse_args(argv)
    actor = MegatronTrainRayActor(world_size, rank, "127.0.0.1", port)
    actor.init(args, with_opd_teacher=args.use_opd and args.opd_type == "megatron")
    data = torch.load(data_path)
    metrics = actor.train(0, data)
    hf = actor.save_hf(Path(out_dir) / "hf_after")
    saved = actor.save_model(0) if args.save else None
    if rank == 0:
        write_json(str(Path(out_dir) / "metrics.json"), {"metrics": metrics, "hf": hf, "saved": saved})
    destroy_parallel()
