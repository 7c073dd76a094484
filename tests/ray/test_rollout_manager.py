"""RolloutManager in real Ray: 2 embedded engines behind a real sglang-router plus a teacher server."""

from __future__ import annotations

import json

import pytest

from slime.utils.arguments import parse_args


@pytest.mark.slow
def test_rollout_manager_produces_rollout_data(tmp_path, ray_local, tiny_student_dir, tiny_teacher_dir):
    from slime.ray.rollout import create_rollout_manager

    ray = ray_local
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+2=", "label": str(i + 2)}) + "\n" for i in range(3)))
    args = parse_args(
        [
            "--hf-checkpoint", str(tiny_student_dir), "--prompt-data", str(prompts),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "5",
            "--rollout-num-engines", "2", "--api-key", "secret",
            "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(tiny_teacher_dir),
            "--opd-topk-metrics-k", "3",
            "--custom-rm-path", "opd_stub_plugins.teacher_rm",
            "--custom-reward-post-process-path", "opd_stub_plugins.keep_even_positions",
            "--save", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    manager = create_rollout_manager(args)
    try:
        info = ray.get(manager.server_info.remote())
        assert len(info["engine_urls"]) == 2 and info["router_url"] not in info["engine_urls"]
        assert info["rm_url"] == f"{info['teacher_url']}/generate"
        assert all(v is True for v in ray.get(manager.health.remote()).values())

        data = ray.get(manager.generate.remote(0, return_samples=True))
        n = 4
        keys = ["tokens", "response_lengths", "prompt_lengths", "loss_masks", "rewards", "rollout_log_probs"]
        keys += ["teacher_log_probs", "sample_indices", "rollout_ids", "rollout_mask_sums", "truncated"]
        for key in keys:
            assert len(data[key]) == n, key
        assert data["rollout_id"] == 0 and data["sample_indices"] == [0, 1, 2, 3]
        for i in range(n):
            r = data["response_lengths"][i]
            assert data["prompt_lengths"][i] + r == len(data["tokens"][i])
            assert len(data["loss_masks"][i]) == len(data["rollout_log_probs"][i]) == len(data["teacher_log_probs"][i])
            assert data["loss_masks"][i] == [1 - (j % 2) for j in range(r)]
            assert len(data["samples"][i]["metadata"]["student_top_logprobs"]) == r
        assert data["rewards"] == [0.0] * n
        m = data["metrics"]
        assert 0 < m["opd/realised_keep_ratio"] <= 1 and m["rollout/kept_token_ratio"] == m["opd/realised_keep_ratio"]
        assert "rollout/teacher_kl_sampled" in m and m["rollout/num_samples"] == 4

        # weights pushed to every engine directly (same checkpoint: a reload must succeed)
        answers = ray.get(manager.update_weights_from_disk.remote(str(tiny_student_dir)))
        assert len(answers) == 2 and all(a["success"] for a in answers)

        # data-source position survives save/load: the next step continues after 2 prompts
        ray.get(manager.save.remote(0))
        data1 = ray.get(manager.generate.remote(1))
        assert data1["sample_indices"] == [4, 5, 6, 7]
    finally:
        ray.get(manager.shutdown.remote())
        ray.kill(manager)


def test_rollout_manager_errors_before_starting_servers(tmp_path):
    from slime.ray.rollout import RolloutManager

    args = parse_args(["--rollout-batch-size", "1", "--rollout-max-response-len", "2", "--rm-type", "exact_match",
                       "--rollout-backend", "sglang"])  # fmt: skip
    # real SGLang engines are managed only with the `sglang` extra; without it the error says how to install it
    try:
        import sglang  # noqa: F401

        pytest.skip("sglang is installed: --rollout-backend sglang would start real engines")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"needs the optional extra 'sglang'.*pip install"):
        RolloutManager(args)
