"""HF ↔ Megatron conversion: pure state-dict functions, and the torch_dist round trip through the tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core (pip install -e '.[megatron]')")
pytestmark = pytest.mark.megatron

from slime.backends.megatron_utils import convert  # noqa: E402
from slime.backends.megatron_utils.config import shape_from_hf_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def random_hf_state(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def qwen3():
    from slime.embedded.models import tiny_config

    config = tiny_config("nano")
    return config, shape_from_hf_config(config), random_hf_state(config)


def qwen2_untied():
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    return config, shape_from_hf_config(config), random_hf_state(config)


def _drop_tied_head(hf, shape):
    return {k: v for k, v in hf.items() if not (shape.tie_word_embeddings and k == "lm_head.weight")}


def test_shape_reads_the_qwen3_facts(qwen3):
    _, shape, _ = qwen3
    assert (shape.qk_layernorm, shape.qkv_bias, shape.tie_word_embeddings) == (True, False, True)
    assert (shape.num_query_groups, shape.heads_per_group, shape.head_dim) == (2, 2, 8)


def test_qkv_interleaving_per_query_group(qwen3):
    _, shape, hf = qwen3
    mg = convert.hf_to_megatron(hf, shape)
    qkv = mg["decoder.layers.0.self_attention.linear_qkv.weight"]
    d, h = shape.head_dim, shape.heads_per_group
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    k = hf["model.layers.0.self_attn.k_proj.weight"]
    v = hf["model.layers.0.self_attn.v_proj.weight"]
    block = (h + 2) * d
    # group 1: its two query heads (heads 2, 3), then its key head, then its value head
    g1 = qkv[block : 2 * block]
    assert torch.equal(g1[: h * d], q[h * d : 2 * h * d])
    assert torch.equal(g1[h * d : h * d + d], k[d : 2 * d])
    assert torch.equal(g1[h * d + d :], v[d : 2 * d])


def test_gated_mlp_is_gate_then_up(qwen3):
    _, shape, hf = qwen3
    fc1 = convert.hf_to_megatron(hf, shape)["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: shape.ffn_hidden_size], hf["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(fc1[shape.ffn_hidden_size :], hf["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_round_trip_is_exact_through_tp_and_pp(family, qwen3):
    _, shape, hf = qwen3 if family == "qwen3" else qwen2_untied()
    full = convert.hf_to_megatron(hf, shape)
    for tp in (1, 2):
        merged_tp = convert.merge_tp([convert.shard_tp(full, tp, r) for r in range(tp)])
        assert all(torch.equal(a, full[k]) for k, a in merged_tp.items())
    stages = [convert.pp_stage(full, shape, 2, r) for r in range(2)]
    assert "embedding.word_embeddings.weight" not in stages[1]
    assert "decoder.layers.0.mlp.linear_fc2.weight" in stages[1]  # local layer id on stage 1
    merged = convert.pp_merge(stages, shape)
    assert set(merged) == set(full)
    back = convert.megatron_to_hf(convert.from_te_names(convert.to_te_names(merged)), shape)
    expected = _drop_tied_head(hf, shape)
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k


def test_tp_shard_shapes_follow_column_and_row_parallel(qwen3):
    _, shape, hf = qwen3
    full = convert.hf_to_megatron(hf, shape)
    shard = convert.shard_tp(full, 2, 1)
    name = "decoder.layers.0."
    assert (
        shard[name + "self_attention.linear_qkv.weight"].shape[0]
        == full[name + "self_attention.linear_qkv.weight"].shape[0] // 2
    )
    assert (
        shard[name + "self_attention.linear_proj.weight"].shape[1] == shape.num_attention_heads * shape.head_dim // 2
    )
    assert shard[name + "mlp.linear_fc2.weight"].shape[1] == shape.ffn_hidden_size // 2
    assert shard["embedding.word_embeddings.weight"].shape[0] == shape.vocab_size // 2
    gate_r1 = hf["model.layers.0.mlp.gate_proj.weight"].chunk(2)[1]
    assert torch.equal(shard[name + "mlp.linear_fc1.weight"][: shape.ffn_hidden_size // 2], gate_r1)


def test_unsupported_configs_are_refused():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="rope scaling"):
        shape_from_hf_config(
            LlamaConfig(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": 8192,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                }
            )
        )
    _, shape, _ = qwen2_untied()
    with pytest.raises(ValueError, match="does not divide"):
        shape.check_parallel(tp_size=4)


def test_unknown_hf_keys_are_an_error(qwen3):
    _, shape, hf = qwen3
    with pytest.raises(ValueError, match="does not know"):
        convert.hf_to_megatron({**hf, "model.layers.0.extra.weight": torch.zeros(1)}, shape)


def _tool(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], capture_output=True, text=True, timeout=600
    )


def test_tools_round_trip_hf_torch_dist_hf_is_byte_equal(tiny_student_dir, tmp_path):
    from safetensors.torch import load_file

    dist_dir, hf_out = tmp_path / "torch_dist", tmp_path / "hf_back"
    r = _tool("convert_hf_to_torch_dist", "--hf-checkpoint", str(tiny_student_dir), "--save", str(dist_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (dist_dir / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (dist_dir / "iter_0000000" / ".metadata").is_file()
    r = _tool("convert_torch_dist_to_hf", "--input-dir", str(dist_dir), "--output-dir", str(hf_out))
    assert r.returncode == 0, r.stderr[-3000:]
    original = load_file(str(tiny_student_dir / "model.safetensors"))
    back = load_file(str(hf_out / "model.safetensors"))
    assert set(back) == set(original)
    for k, v in original.items():
        assert v.dtype == back[k].dtype and torch.equal(v.view(torch.uint8), back[k].view(torch.uint8)), k
    assert (hf_out / "config.json").is_file() and (hf_out / "tokenizer.json").is_file()


def test_tool_help_runs_without_a_model():
    r = _tool("convert_hf_to_torch_dist", "--help")
    assert r.returncode == 0 and "--hf-checkpoint" in r.stdout


def test_model_shape_flags_are_checked_against_the_hf_config(qwen3):
    from slime.backends.megatron_utils.config import check_shape_flags
    from slime.utils.arguments import parse_args

    _, shape, _ = qwen3
    base = ["--rollout-batch-size", "1", "--rollout-max-response-len", "4"]
    ok = parse_args(base + ["--num-layers", "2", "--hidden-size", "32", "--qk-layernorm", "--swiglu"])
    check_shape_flags(ok, shape)
    bad = parse_args(base + ["--num-layers", "36", "--untie-embeddings-and-output-weights"])
    with pytest.raises(ValueError, match="--num-layers 36.*untie"):
        check_shape_flags(bad, shape)
