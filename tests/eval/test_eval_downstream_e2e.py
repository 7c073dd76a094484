"""End to end: lm-eval drives the real embedded server (local-completions) on the tiny fixture tasks, for the base
student and two methods x two seeds, and the results are aggregated into the Table-3 layout.

The checkpoints are the tiny random student (the base, evaluated with two lm-eval seeds) and, per method and seed,
a copy of it with its own seeded weight perturbation (a stand-in for trained runs: training is not tested here).
Needs the optional extra ``eval`` (lm-eval); skipped without it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import torch

pytest.importorskip("lm_eval", reason="needs the optional extra: pip install -e '.[eval]'")
pytest.importorskip("tenacity", reason="needs the optional extra: pip install -e '.[eval]'")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from slime.backends.embedded_sglang.launch import launch_server  # noqa: E402
from slime.eval import aggregate, downstream  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "downstream-e2e-key"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[2]
# (method, budget dir or None); every method is evaluated for seeds 0 and 1 (checkpoint <method>_s<seed>)
ENTRIES = [("base", None), ("pure_opd", "1.0"), ("teachability", "0.10")]
SEEDS = (0, 1)


def _ckpt(method: str, seed: int) -> str:
    return "base" if method == "base" else f"{method}_s{seed}"


def _perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.5) -> Path:
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    noisy = {}
    for name, v in tensors.items():
        noisy[name] = (v + scale * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
    save_file(noisy, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory, tiny_student_dir):
    root = tmp_path_factory.mktemp("eval_weights")
    shutil.copytree(tiny_student_dir, root / "base")
    for i, (method, _) in enumerate(ENTRIES[1:]):
        for seed in SEEDS:
            _perturbed_copy(tiny_student_dir, root / _ckpt(method, seed), seed=10 * i + seed + 1)
    return root


@pytest.fixture(scope="module")
def eval_server(weights_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    handle = launch_server(weights_root / "base", api_key=KEY, extra_args=["--weights-root", str(weights_root)],
                           log_file=str(log))  # fmt: skip
    yield handle
    handle.stop()


def _load(server, path: Path) -> None:
    r = requests.post(server.url + "/update_weights_from_disk", json={"model_path": str(path)}, headers=server.headers)
    assert r.status_code == 200 and r.json()["success"], r.text


def _direct_mc_accuracy(model_dir: Path) -> float:
    """The multiple-choice accuracy computed here with transformers (sum of continuation log-probs, argmax)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (FIXTURES / "data" / "ta_arith_mc" / "test.jsonl").read_text().splitlines()]
    right = 0
    for row in rows:
        ctx = tok.encode(row["prompt"])
        scores = []
        for choice in row["choices"]:
            cont = tok.encode(row["prompt"] + choice)[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            scores.append(float(logp[positions, torch.tensor(cont)].sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return right / len(rows)


def _results(out: Path) -> dict:
    (path,) = sorted(out.glob("results_*.json"))
    return json.loads(path.read_text())["results"]


def test_lm_eval_on_the_embedded_server_then_table3(eval_server, weights_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_API_KEY", KEY)
    eval_root = tmp_path / "eval"
    measured: dict[tuple[str, int], dict] = {}
    for method, budget in ENTRIES:
        for seed in SEEDS:
            _load(eval_server, weights_root / _ckpt(method, seed))
            out = eval_root / method / (budget or "") / f"seed{seed}"
            rc = downstream.main([
                "--server-url", eval_server.url, "--tokenizer", str(weights_root / "base"),
                "--tasks", "ta_arith_gen,ta_arith_mc", "--include-path", str(FIXTURES / "tasks"),
                "--only-include-path", "--data-dir", str(FIXTURES / "data"), "--output-path", str(out),
                "--seed", str(seed), "--max-length", "256",
            ])  # fmt: skip
            assert rc == 0
            assert (out / downstream.DONE_MARKER).is_file()
            measured[(method, seed)] = _results(out)

    # The log-likelihood path (echo + logprobs) gives the accuracy a direct forward pass gives.
    for method, _ in ENTRIES:
        for seed in SEEDS:
            direct = _direct_mc_accuracy(weights_root / _ckpt(method, seed))
            assert measured[(method, seed)]["ta_arith_mc"]["acc,none"] == pytest.approx(direct)
            assert measured[(method, seed)]["ta_arith_gen"]["sample_len"] == 8

    # The same checkpoint through lm-eval's in-process `hf` model scores the same; chat completions generate.
    common = ["--include-path", str(FIXTURES / "tasks"), "--only-include-path", "--data-dir", str(FIXTURES / "data")]
    hf_out, chat_out = tmp_path / "other" / "hf", tmp_path / "other" / "chat"
    rc = downstream.main(["--model-dir", str(weights_root / _ckpt("teachability", 0)), "--tasks", "ta_arith_mc",
                          "--output-path", str(hf_out), "--max-length", "256", *common])  # fmt: skip
    assert rc == 0
    served = measured[("teachability", 0)]["ta_arith_mc"]["acc,none"]
    assert _results(hf_out)["ta_arith_mc"]["acc,none"] == pytest.approx(served)
    rc = downstream.main(["--server-url", eval_server.url, "--chat", "--tasks", "ta_arith_gen", "--limit", "2",
                          "--output-path", str(chat_out), *common])  # fmt: skip
    assert rc == 0 and _results(chat_out)["ta_arith_gen"]["sample_len"] == 2

    summary = tmp_path / "summary"
    assert aggregate.main([str(eval_root), "--out-dir", str(summary)]) == 0
    with open(summary / "table3.csv", newline="") as fh:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(fh)}
    assert list(rows) == [("base", "-"), ("pure_opd", "1.0"), ("teachability", "0.10")]
    base_mc = [100 * measured[("base", s)]["ta_arith_mc"]["acc,none"] for s in SEEDS]
    full_mc = [100 * measured[("pure_opd", s)]["ta_arith_mc"]["acc,none"] for s in SEEDS]
    ta_mc = [100 * measured[("teachability", s)]["ta_arith_mc"]["acc,none"] for s in SEEDS]
    ta_gen = [100 * measured[("teachability", s)]["ta_arith_gen"]["exact_match,final"] for s in SEEDS]
    ta = rows[("teachability", "0.10")]
    assert ta["n_seeds"] == "2"
    assert float(ta["ta_arith_mc_mean"]) == pytest.approx(sum(ta_mc) / 2)
    assert float(ta["ta_arith_mc_std"]) == pytest.approx(abs(ta_mc[0] - ta_mc[1]) / math.sqrt(2))
    assert float(ta["ta_arith_mc_delta_vs_base"]) == pytest.approx(sum(ta_mc) / 2 - sum(base_mc) / 2)
    assert float(ta["ta_arith_mc_delta_vs_full_opd"]) == pytest.approx(sum(ta_mc) / 2 - sum(full_mc) / 2)
    assert float(ta["avg_mean"]) == pytest.approx((sum(ta_mc) / 2 + sum(ta_gen) / 2) / 2)
    md = (summary / "table3.md").read_text()
    assert "| teachability | 0.10 | 2 |" in md and "| ta_arith_gen | ta_arith_mc | Avg |" in md


def test_release_launcher_against_the_server(eval_server, weights_root, tmp_path):
    """run_downstream_gsm8k_full.sh (release name and knobs) on the fixture task; a second call skips (DONE)."""
    _load(eval_server, weights_root / "base")
    env = dict(
        os.environ, SGLANG_API_KEY=KEY, SERVER_URL=eval_server.url, MODELS=f"base_tiny={weights_root / 'base'}",
        TASK="ta_arith_mc", INCLUDE_PATH=str(FIXTURES / "tasks"), ONLY_INCLUDE_PATH="1",
        DATA_DIR=str(FIXTURES / "data"), RUN_DIR=str(tmp_path / "gsm8k_cot_full"), BATCH_SIZE="1",
    )  # fmt: skip
    script = REPO / "scripts" / "eval" / "run_downstream_gsm8k_full.sh"
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0 and "DONE name=base_tiny" in first.stderr, first.stderr[-3000:]
    assert "| base_tiny | - | 1 |" in (tmp_path / "gsm8k_cot_full" / "summary" / "table3.md").read_text()
    assert _results(tmp_path / "gsm8k_cot_full" / "base_tiny" / "seed0")["ta_arith_mc"]["acc,none"] >= 0
    second = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert "SKIP name=base_tiny" in second.stderr
    bad = subprocess.run(["bash", str(script)], env=env | {"MODELS": "x=/does/not/exist"}, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "MODELS[x]=/does/not/exist: no such directory" in bad.stderr
