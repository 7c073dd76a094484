"""Weights pushed to a real embedded server over a gloo process group (SGLang's /update_weights_from_distributed)
and as shared tensors (/update_weights_from_tensor).

The trainer side is slime.backends.weight_sync.{Distributed,Tensor}WeightSender in this process; the server is a
separate process on 127.0.0.1. After the push the server answers exactly as after loading the same weights
from disk; bad requests are refused before any broadcast, and the sender does not hang on them.
"""

from __future__ import annotations

import base64
import os
import pickle

import pytest
import requests
import torch

from slime.backends.weight_sync import (
    DistributedWeightSender,
    TensorWeightSender,
    buckets,
    deserialize_named_tensors,
    dtype_name,
    parse_dtype,
    serialize_named_tensors,
    unique_named_tensors,
)

KEY = "sync-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBE = {
    "input_ids": [5, 6, 7, 8, 9, 10, 11],
    "sampling_params": {"max_new_tokens": 0},
    "return_logprob": True,
    "logprob_start_len": 0,
}


def post(server, path, payload, headers=AUTH):
    return requests.post(server.url + path, json=payload, headers=headers, timeout=120)


def scores(server):
    return post(server, "/generate", PROBE).json()["meta_info"]["input_token_logprobs"]


def teacher_scores_from_disk(server, weights_root):
    """The server's scores with the teacher loaded from disk; the student is loaded back afterwards."""
    post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "teacher")})
    from_disk = scores(server)
    post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})
    return from_disk


def teacher_tensors(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir))
    return unique_named_tensors(model.state_dict())


def test_helpers():
    assert dtype_name(torch.bfloat16) == "bfloat16" and parse_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        parse_dtype("float7")
    w = torch.zeros(4, 2)
    tied = {"embed.weight": w, "head.weight": w, "norm.weight": torch.ones(2)}
    assert [n for n, _ in unique_named_tensors(tied)] == ["embed.weight", "norm.weight"]
    sizes = [
        [n for n, _ in b] for b in buckets([("a", torch.zeros(4)), ("b", torch.zeros(4)), ("c", torch.zeros(16))], 32)
    ]
    assert sizes == [["a", "b"], ["c"]]  # 16 + 16 bytes fit in 32; the 64-byte tensor goes alone


def test_push_over_gloo_matches_loading_from_disk(server, weights_root, tiny_teacher_dir):
    before = scores(server)
    from_disk = teacher_scores_from_disk(server, weights_root)
    assert scores(server) == before

    sender = DistributedWeightSender([server.url], backend="gloo", api_key=KEY, buffer_bytes=64 * 1024, timeout_s=60)
    try:
        sent = sender.push(teacher_tensors(tiny_teacher_dir), weight_version="v-test")
        assert sent > 1
        assert scores(server) == from_disk  # bit-identical to the disk path
        info = requests.get(server.url + "/get_model_info", headers=AUTH, timeout=30).json()
        assert info["weight_version"] == "v-test"
        # a second push reuses the group
        post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})
        sender.push(teacher_tensors(tiny_teacher_dir))
        assert scores(server) == from_disk
    finally:
        sender.close()
        post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})


def test_bad_requests_are_refused_without_a_hang(server, tiny_teacher_dir):
    sender = DistributedWeightSender([server.url], backend="gloo", api_key=KEY, timeout_s=60)
    try:
        sender.connect()
        name, tensor = teacher_tensors(tiny_teacher_dir)[0]
        with pytest.raises(RuntimeError, match="unknown tensor 'no.such.weight'"):
            sender.push([("no.such.weight", tensor)])
        sender.connect()
        with pytest.raises(RuntimeError, match=f"shape mismatch for '{name}'"):
            sender.push([(name, torch.zeros(3, 3))])
    finally:
        sender.close()
    r = post(server, "/update_weights_from_distributed", {"names": [name], "dtypes": ["float32"], "shapes": [[1]],
                                                          "group_name": "nobody"})  # fmt: skip
    assert r.status_code == 400 and "no weight-update group 'nobody'" in r.json()["message"]
    r = post(server, "/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float7"], "shapes": [[1]],
                                                          "group_name": "g"})  # fmt: skip
    assert r.status_code == 400 and "unknown dtype 'float7'" in r.json()["message"]
    group = {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2, "group_name": "g"}
    r = post(server, "/init_weights_update_group", {**group, "rank_offset": 0, "backend": "gloo"})
    assert r.status_code == 400 and "rank_offset 0" in r.json()["message"]
    r = post(server, "/init_weights_update_group", {**group, "rank_offset": 1, "backend": "nccl"})
    assert r.status_code == 400 and "gloo groups only" in r.json()["message"]
    assert post(server, "/release_memory_occupation", {}, headers={}).status_code == 401  # the API key is enforced


def test_release_and_resume_memory(server, weights_root, tiny_teacher_dir):
    before = scores(server)
    assert post(server, "/release_memory_occupation", {}).json()["success"] is True
    r = post(server, "/generate", PROBE)
    assert r.status_code >= 400 and "released" in r.text
    assert post(server, "/resume_memory_occupation", {}).json()["success"] is True
    r = post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})
    assert r.json()["success"] is True
    assert scores(server) == before


def test_tensor_payload_round_trip_and_refusals():
    import torch.multiprocessing as mp

    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        named = [("a", torch.arange(6.0).reshape(2, 3).share_memory_()), ("b", torch.ones(2, dtype=torch.bfloat16))]
        back = deserialize_named_tensors(serialize_named_tensors(named))
    finally:
        mp.set_sharing_strategy(strategy)
    assert [n for n, _ in back] == ["a", "b"]
    assert torch.equal(back[0][1], named[0][1]) and back[1][1].dtype is torch.bfloat16

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = base64.b64encode(pickle.dumps([("a", Evil())])).decode()
    with pytest.raises(ValueError, match="system is not allowed in a weight payload"):
        deserialize_named_tensors(evil)
    with pytest.raises(ValueError, match="must be a list of \\(name, tensor\\) pairs"):
        deserialize_named_tensors(base64.b64encode(pickle.dumps({"a": 1})).decode())
    with pytest.raises(ValueError, match="could not be read"):
        deserialize_named_tensors("not base64 !")


def test_push_as_shared_tensors_matches_loading_from_disk(server, weights_root, tiny_teacher_dir):
    before = scores(server)
    from_disk = teacher_scores_from_disk(server, weights_root)
    assert scores(server) == before

    sender = TensorWeightSender([server.url], api_key=KEY, buffer_bytes=64 * 1024, timeout_s=60)
    teacher = teacher_tensors(tiny_teacher_dir)
    ptrs = [t.untyped_storage().data_ptr() for _, t in teacher]
    try:
        assert sender.push(teacher, weight_version="v-tensor") == len(teacher) > 1
        assert scores(server) == from_disk  # bit-identical to the disk path
        info = requests.get(server.url + "/get_model_info", headers=AUTH, timeout=30).json()
        assert info["weight_version"] == "v-tensor"
        assert [t.untyped_storage().data_ptr() for _, t in teacher] == ptrs  # the sender's own storage stayed put
        name, tensor = teacher[0]
        with pytest.raises(RuntimeError, match="unknown tensor 'no.such.weight'"):
            sender.push([("no.such.weight", tensor)])
        with pytest.raises(RuntimeError, match=f"shape mismatch for '{name}'"):
            sender.push([(name, torch.zeros(3, 3))])
        assert scores(server) == from_disk  # a refused push changed nothing
    finally:
        post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})
    r = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": []})
    assert r.status_code == 400 and "non-empty list of base64 strings" in r.json()["message"]
    r = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": ["eA=="], "load_format": "x"})
    assert r.status_code == 400 and "load_format 'x'" in r.json()["message"]
    evil = base64.b64encode(pickle.dumps([("a", os.getpid)])).decode()
    r = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [evil]})
    assert r.status_code == 400 and "is not allowed in a weight payload" in r.json()["message"]
    assert scores(server) == before


def test_a_restarted_engine_gets_a_new_group(server, weights_root, tiny_teacher_dir):
    """After an engine restart (the RolloutManager's count grows) the next push makes a new group first."""
    from_disk = teacher_scores_from_disk(server, weights_root)
    restarts = [0]
    sender = DistributedWeightSender(
        [server.url], backend="gloo", api_key=KEY, timeout_s=60, restart_count=lambda: restarts[0]
    )
    try:
        sender.push(teacher_tensors(tiny_teacher_dir))
        assert scores(server) == from_disk
        server.restart()  # same port, initial weights, no group
        restarts[0] += 1
        assert scores(server) != from_disk
        sender.push(teacher_tensors(tiny_teacher_dir))
        assert sender.group_name == "slime_weight_update_2"
        assert scores(server) == from_disk
    finally:
        sender.close()
        post(server, "/update_weights_from_disk", {"model_path": str(weights_root / "student")})


def test_group_master_is_loopback_for_local_engines_else_the_node_ip(monkeypatch):
    import ray

    from slime.backends.weight_sync import _group_master_address

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.2")
    assert _group_master_address(["http://127.0.0.1:3000", "http://localhost:3001"]) == "127.0.0.1"
    assert _group_master_address(["http://127.0.0.1:3000", "http://192.0.2.7:3001"]) == "192.0.2.2"
