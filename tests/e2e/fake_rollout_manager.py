"""A stand-in RolloutManager (same methods) that fabricates rollout data and logs every call to a file.

Lets the training loop, the Ray train group, weight pushes and checkpoint/resume be tested
without the servers; the real RolloutManager is exercised by test_opd_end_to_end.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def fake_rollout(rollout_id: int, n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed * 1000 + rollout_id)
    data = {k: [] for k in ("tokens", "prompt_lengths", "response_lengths", "loss_masks", "teacher_log_probs",
                            "rollout_log_probs", "rewards", "sample_indices")}  # fmt: skip
    for i in range(n):
        p, r = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(3, 8, (1,), generator=g))
        data["tokens"].append(torch.randint(0, 99, (p + r,), generator=g).tolist())
        data["prompt_lengths"].append(p)
        data["response_lengths"].append(r)
        mask = (torch.rand(r, generator=g) < 0.3).int()
        mask[0] = 1
        data["loss_masks"].append(mask.tolist())
        data["teacher_log_probs"].append((-torch.rand(r, generator=g, dtype=torch.float64) * 5).tolist())
        data["rollout_log_probs"].append((-torch.rand(r, generator=g, dtype=torch.float64) * 5).tolist())
        data["rewards"].append(0.0)
        data["sample_indices"].append(rollout_id * n + i)
    kept = sum(sum(m) for m in data["loss_masks"])
    total = sum(data["response_lengths"])
    data["rollout_id"] = rollout_id
    data["metrics"] = {"opd/realised_ratio": kept / total, "rollout/kept_token_ratio": kept / total}
    return data


class FakeRolloutManager:
    def __init__(self, args, pg=None):
        self.args = args
        self.log = Path(os.environ.get("FAKE_RM_LOG") or Path(args.output_dir) / "fake_rm_calls.jsonl")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._event("init")

    def _event(self, name: str, **kw) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"call": name, **kw}) + "\n")

    def server_info(self) -> dict:
        return {}

    def generate(self, rollout_id: int) -> dict:
        self._event("generate", rollout_id=rollout_id)
        self._hold(rollout_id)
        return fake_rollout(rollout_id)

    def _hold(self, rollout_id: int) -> None:
        """Block while ``<output_dir>/hold_at`` names this rollout id, so a test can act at a known point."""
        hold = Path(self.args.output_dir) / "hold_at"
        if not (hold.is_file() and hold.read_text().strip() == str(rollout_id)):
            return
        self._event("hold", rollout_id=rollout_id)
        for _ in range(6000):  # bounded: ten minutes at most
            if not hold.is_file():
                return
            time.sleep(0.1)

    def eval(self, rollout_id: int, log_id: int | None = None) -> dict:
        self._event("eval", rollout_id=rollout_id)
        return {"rollout_id": rollout_id, "metrics": {"eval/score": 0.5}, "data": {}}

    def update_weights_from_disk(self, path: str) -> list:
        ok = (Path(path) / "model.safetensors").is_file() and (Path(path) / "config.json").is_file()
        self._event("update_weights_from_disk", path=path, complete=ok)
        return [{"success": ok}]

    def save(self, rollout_id: int) -> None:
        self._event("save", rollout_id=rollout_id)

    def load(self, rollout_id: int | None = None) -> None:
        self._event("load", rollout_id=rollout_id)

    def get_num_rollout_per_epoch(self) -> int:
        return 3

    def shutdown(self) -> None:
        self._event("shutdown")


def create_fake_rollout_manager(args, pg=None):
    import ray

    actor = ray.remote(FakeRolloutManager).options(num_cpus=0).remote(args, pg)
    ray.get(actor.server_info.remote())
    return actor


def read_calls(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
