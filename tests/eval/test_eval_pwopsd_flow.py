"""The PW-OPSD evaluation flow: checkpoint choice, LoRA merge into <run>_merged with .ready_for_eval, the
reference-solution `</think>` handling, the launcher's release names; and the top-k alignment plot."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from slime.eval import alignment, checkpoints
from slime.rollout.self_distillation import reference_solution, teacher_prompt_text
from slime.suite_report.summary import load_suite

REPO = Path(__file__).resolve().parents[2]


def _iter_run(tmp_path: Path, student: Path, rollout_ids: list[int]) -> Path:
    run = tmp_path / "qwen3-1.7b_pwopsd"
    for r in rollout_ids:
        shutil.copytree(student, run / "checkpoints" / f"iter_{r:07d}" / "model")
    return run


def test_checkpoint_choice_counts_steps_and_names_what_exists(tmp_path, tiny_student_dir):
    run = _iter_run(tmp_path, tiny_student_dir, [24, 49, 74, 99, 149])
    step, path = checkpoints.choose_checkpoint(run)  # the release's default: checkpoint 100
    assert step == 100 and path == run / "checkpoints" / "iter_0000099" / "model"
    assert checkpoints.choose_checkpoint(run, "latest")[0] == 150
    with pytest.raises(ValueError, match=r"no checkpoint at step 60; it has steps \[25, 50, 75, 100, 150\]"):
        checkpoints.choose_checkpoint(run, 60)
    with pytest.raises(ValueError, match="expected a step number or 'latest'"):
        checkpoints.choose_checkpoint(run, "best")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpoints.choose_checkpoint(tmp_path / "empty")


def test_trainer_checkpoint_is_copied_with_the_sentinel_last(tmp_path, tiny_student_dir):
    run = _iter_run(tmp_path, tiny_student_dir, [99])
    out = checkpoints.prepare(run)
    assert out == tmp_path / "qwen3-1.7b_pwopsd_merged"
    record = json.loads((out / checkpoints.READY_SENTINEL).read_text())
    assert record["step"] == 100 and record["how"] == "copied"
    assert (out / "model.safetensors").read_bytes() == (tiny_student_dir / "model.safetensors").read_bytes()
    assert checkpoints.prepare(run) == out  # ready: kept as it is
    (out / checkpoints.READY_SENTINEL).unlink()  # an interrupted earlier merge
    with pytest.raises(ValueError, match="exists without .ready_for_eval"):
        checkpoints.prepare(run)
    assert checkpoints.prepare(run, force=True) == out and checkpoints.is_ready(out)


def test_lora_adapter_is_merged_into_its_base(tmp_path, tiny_student_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, config)
    run = tmp_path / "olmo_pwopsd"
    lora.save_pretrained(run / "checkpoint-100")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = lora(ids).logits
    out = checkpoints.prepare(run, 100, base_model=str(tiny_student_dir))
    assert json.loads((out / checkpoints.READY_SENTINEL).read_text())["how"] == "lora-merged"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file()
    assert checkpoints.main([str(run), "--checkpoint", "25"]) == 2


def test_reference_solution_drops_the_reasoning_before_think_end():
    assert reference_solution("<think>\nlong chain\n</think>\n\nso x = \\boxed{3}") == "so x = \\boxed{3}"
    assert reference_solution("a</think>b</think>\nfinal") == "final"  # the last one closes the reasoning
    assert reference_solution("no reasoning {prompt}") == "no reasoning {prompt}"
    assert teacher_prompt_text("Ref: {label}\n{prompt}", "Q", "<think>x</think>A") == "Ref: A\nQ"


def test_launcher_release_names_and_checks(tmp_path):
    env = {**os.environ, "OUTPUT_ROOT": str(tmp_path / "out")}
    launcher = REPO / "scripts" / "run_self_distillation.sh"
    for extra, message in (
        ({"MODEL": "/nonexistent/Qwen3-1.7B"}, "STUDENT_HF=/nonexistent/Qwen3-1.7B: no such directory"),
        ({"PWOPSD_TRAIN_DATASET": "/nonexistent.jsonl"}, "PROMPT_DATA=/nonexistent.jsonl: no such file"),
        ({"SAVE_INTERVAL": "x"}, "SAVE_INTERVAL=x: expected a non-negative integer"),
        ({"PREPARE_EVAL": "2"}, "PREPARE_EVAL=2: expected 0 or 1"),
    ):
        result = subprocess.run(["bash", str(launcher)], env=env | extra, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def _fake_suite(root: Path) -> Path:
    runs = [("10", "pure_opd", "full", "1.0", 0), ("10", "pure_opd", "full", "1.0", 1), ("20", "teachability",
            "dlearn_high", "0.1", 0)]  # fmt: skip
    with open(root / "method_mapping.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["idx", "alias", "mask", "ratio", "seed", "run_dir"])
        for idx, alias, mask, ratio, seed in runs:
            run_dir = f"runs/{idx}_{alias}_r{ratio}_s{seed}"
            writer.writerow([idx, alias, mask, ratio, seed, run_dir])
            (root / run_dir).mkdir(parents=True)
            lines = [{"rollout_id": -1, "eval/heldout/reward_mean": 0.1}]
            lines += [
                {"rollout_id": t, "opd/overlap_ratio": 0.5 + 0.1 * t + 0.05 * seed, "opd/teacher_mass_on_shared": 0.9}
                for t in range(3)
            ]
            (root / run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_topk_alignment_plot_from_logged_metrics(tmp_path):
    suite = _fake_suite(tmp_path)
    series = alignment.alignment_series(load_suite(suite))
    full = series["Full OPD"]
    steps, mean, lo, hi = alignment.band(list(full.values()))
    assert steps == [0, 1, 2]
    assert mean == pytest.approx([0.525, 0.625, 0.725]) and lo == pytest.approx([0.5, 0.6, 0.7])
    assert hi == pytest.approx([0.55, 0.65, 0.75])
    assert alignment.main([str(suite)]) == 0
    png = suite / "plots" / "topk_alignment.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(png.with_suffix(".csv"), newline="")))
    assert len(rows) == 3 * 3 * 2  # runs x steps x the two metrics
    (suite / "runs" / "10_pure_opd_r1.0_s0" / "metrics.jsonl").write_text('{"rollout_id": 0}\n')
    for d in ("10_pure_opd_r1.0_s1", "20_teachability_r0.1_s0"):
        (suite / "runs" / d / "metrics.jsonl").write_text('{"rollout_id": 0}\n')
    assert alignment.main([str(suite)]) == 2
