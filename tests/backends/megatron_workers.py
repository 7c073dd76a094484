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


def pp_logits_worker(rank: int, world_size: int, port: int, pp: int, hf_dir: str, ids_path: str, out_dir: str) -> None:
    """Full logits of the ids in ``ids_path`` through Megatron's pipeline schedule (forward only, TP=1)."""
    init_rank(rank, world_size, port, pp=pp)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from slime.backends.megatron_utils.model import destroy_parallel, forward_logits, load_gpt_from_hf

    ids = torch.load(ids_path)
    model, _ = load_gpt_from_hf(hf_dir)
    model.eval()

    def keep_logits(logits):  # on the last stage: (loss, token count, what the schedule collects)
        return logits.sum() * 0, torch.zeros((), dtype=torch.int), logits

    def forward_step(data_iterator, model):
        return forward_logits(model, next(data_iterator)), keep_logits

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(ids.split(1)),  # one sample per micro-batch: the pipeline holds several at once
            model=model,
            num_microbatches=ids.shape[0],
            seq_length=ids.shape[1],
            micro_batch_size=1,
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage():
        torch.save({"logits": torch.cat(outputs)}, Path(out_dir) / "megatron.pt")
    destroy_parallel()


def checkpoint_roundtrip_worker(
    rank: int, world_size: int, port: int, port_pp1: int, tp: int, pp: int, hf_dir: str, ckpt_dir: str, out_dir: str
) -> None:
    """HF → Megatron at (TP, PP) → ``torch_dist`` iter 3 → a freshly initialised model at (TP, PP) → HF names;
    then rank 0 alone (a new world of one, TP=PP=1) loads the same directory into a fresh model → HF names."""
    from slime.backends.megatron_utils import checkpoint as ckpt
    from slime.backends.megatron_utils.config import shape_from_hf_config
    from slime.backends.megatron_utils.model import (
        build_gpt_model,
        destroy_parallel,
        load_gpt_from_hf,
        read_hf_config,
    )

    def load_fresh_and_export(tag: str) -> None:
        shape = shape_from_hf_config(read_hf_config(hf_dir))
        fresh = build_gpt_model(shape)  # random weights
        state = ckpt.load_torch_dist(fresh, ckpt_dir)
        hf = ckpt.gather_hf_state_dict(fresh, shape)
        if rank == 0:
            torch.save({"hf": hf, "state": state}, Path(out_dir) / f"roundtrip_{tag}.pt")

    init_rank(rank, world_size, port, tp=tp, pp=pp)
    model, _ = load_gpt_from_hf(hf_dir)
    ckpt.save_torch_dist(model, ckpt_dir, 3, trainer_state={"rollout_id": 3})
    load_fresh_and_export(f"tp{tp}_pp{pp}")
    destroy_parallel()
    if rank == 0:
        init_rank(0, 1, port_pp1)
        load_fresh_and_export("tp1_pp1")
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
    """One rollout of Megatron training through ``MegatronTrainRayActor`` (TP and PP from ``argv``)."""
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.backends.megatron_utils.model import destroy_parallel
    from slime.utils.arguments import parse_args

    args = parse_args(argv)
    actor = MegatronTrainRayActor(world_size, rank, "127.0.0.1", port)
    actor.init(args, with_opd_teacher=args.use_opd and args.opd_type == "megatron")
    data = torch.load(data_path)
    # the old log-probs of the first step, as every rank sees them (PP: broadcast from the last stage)
    torch.save(actor.compute_log_probs(data), Path(out_dir) / f"logp_rank{rank}.pt")
    metrics = actor.train(0, data)
    # and after the step: with PP and a tied head they use the last stage's copy of the updated embedding
    torch.save(actor.compute_log_probs(data), Path(out_dir) / f"logp_after_rank{rank}.pt")
    hf = actor.save_hf(Path(out_dir) / "hf_after")
    saved = actor.save_model(0) if args.save else None
    if rank == 0:
        write_json(str(Path(out_dir) / "metrics.json"), {"metrics": metrics, "hf": hf, "saved": saved})
    destroy_parallel()
