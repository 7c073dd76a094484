"""Pipeline parallelism (PP=2, two gloo ranks on CPU) of the Megatron trainer against PP=1, HF and the torch backend.

- logits through Megatron's 1F1B schedule equal the HF model's (within 1e-4);
- the actor's old log-probs reach every pipeline stage and equal HF's;
- one OPD step (loss, gradient norm, updated weights exported to HF names) equals the torch backend's step
  (the in-trainer teacher at PP=2: ``test_megatron_trainer.py``);
- data parallel: DP=2 and DP=2 × PP=2 steps equal the torch backend's single-rank step;
- a TP=1, PP=2 ``torch_dist`` checkpoint loads back into fresh models at PP=2 and at PP=1;
- context parallelism is refused with the value and the reason.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core (pip install -e '.[megatron]')")
pytestmark = pytest.mark.megatron

import torch.multiprocessing as mp  # noqa: E402

from tests.backends import megatron_workers as workers  # noqa: E402
from tests.backends.test_megatron_model import hf_logits  # noqa: E402
from tests.backends.test_megatron_trainer import (  # noqa: E402
    OPD_SGLANG,
    PP2,
    argv_for,
    assert_same_step,
    free_port,
    megatron_step,
    rollout_data,
    torch_step,
)

TOL = 1e-4


def hf_response_log_probs(hf_dir, data):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for toks, p, r in zip(data["tokens"], data["prompt_lengths"], data["response_lengths"], strict=True):
            logp = torch.log_softmax(model(input_ids=torch.tensor([toks])).logits[0], -1)
            out.append(logp[torch.arange(p - 1, p + r - 1), torch.tensor(toks[p:])])
    return out


def test_pp2_logits_match_hf(tiny_student_dir, tmp_path):
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    mp.spawn(
        workers.pp_logits_worker,
        args=(2, free_port(), 2, str(tiny_student_dir), str(tmp_path / "ids.pt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    got = torch.load(tmp_path / "megatron.pt")["logits"]
    ref = hf_logits(tiny_student_dir, ids)
    diff = (got - ref).abs().max().item()
    print(f"PP=2: max |logits_megatron - logits_hf| = {diff:.3e}")
    assert got.shape == ref.shape
    assert diff < TOL


def test_pp2_opd_step_matches_the_torch_backend(tiny_student_dir, tmp_path):
    """Old log-probs on both stages, then one step (2 micro-batches through 1F1B, tied head split over stages)."""
    data = rollout_data()
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), data)
    argv = argv_for(tiny_student_dir, tmp_path, *OPD_SGLANG, *PP2, "--save", str(tmp_path / "ckpt"))
    mg_out, mg_state = megatron_step(argv, data, tmp_path, world_size=2)
    assert_same_step(t_metrics, t_state, mg_out, mg_state)
    # log-probs before and after the step, on both stages, against HF with the weights the step exported
    # (after: the last stage's head is its own copy of the tied embedding, updated by the summed gradient)
    for when, hf_dir in (("", tiny_student_dir), ("_after", tmp_path / "hf_after")):
        ref_logp = hf_response_log_probs(hf_dir, data)
        for rank in range(2):
            got = torch.load(tmp_path / f"logp{when}_rank{rank}.pt")
            assert len(got) == len(ref_logp)
            for g, r in zip(got, ref_logp, strict=True):
                assert (g - r.double()).abs().max().item() < TOL, (when, rank)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "0"


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,world",
    [
        (("--actor-num-gpus-per-node", "2"), 2),
        (("--pipeline-model-parallel-size", "2", "--actor-num-gpus-per-node", "4"), 4),
    ],
    ids=["dp2", "dp2xpp2"],
)
def test_data_parallel_step_matches_the_torch_backend(layout, world, tiny_student_dir, tmp_path):
    """DP=2 (each rank one micro-batch of the global batch; gradients averaged over DP) and DP=2 × PP=2 give the
    single-rank torch step: same loss, gradient norm and updated weights."""
    data = rollout_data()
    t_metrics, t_state = torch_step(argv_for(tiny_student_dir, tmp_path / "t", *OPD_SGLANG), data)
    mg_out, mg_state = megatron_step(argv_for(tiny_student_dir, tmp_path, *OPD_SGLANG, *layout), data, tmp_path, world)
    assert_same_step(t_metrics, t_state, mg_out, mg_state)


def test_pp2_checkpoint_round_trip(tiny_student_dir, tmp_path):
    """Saved at TP=1, PP=2; loaded into random-weight models at PP=2 and at PP=1: the HF tensors come back."""
    from slime.backends.megatron_utils.model import read_hf_state_dict

    mp.spawn(
        workers.checkpoint_roundtrip_worker,
        args=(2, free_port(), free_port(), 1, 2, str(tiny_student_dir), str(tmp_path / "ckpt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    original = read_hf_state_dict(tiny_student_dir)
    for layout in ("tp1_pp2", "tp1_pp1"):
        got = torch.load(tmp_path / f"roundtrip_{layout}.pt")
        assert got["state"]["rollout_id"] == 3
        assert set(got["hf"]) == set(original), layout
        for name, value in original.items():
            assert torch.equal(got["hf"][name], value), (layout, name)


def test_context_parallel_is_refused_with_the_value(tiny_student_dir, tmp_path, monkeypatch):
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.utils.arguments import parse_args

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.setenv(key, "0")  # the actor writes them; restored after the test
    argv = argv_for(tiny_student_dir, tmp_path, "--context-parallel-size", "2", "--actor-num-gpus-per-node", "2")
    with pytest.raises(NotImplementedError, match="--context-parallel-size 2.*Transformer Engine"):
        MegatronTrainRayActor(2, 0).init(parse_args(argv))
