"""The diagnostic CLIs: --help, merge, context export, resumable eval, analysis end to end (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    "export_fixed_context_bank",
    "eval_fixed_context_bank",
    "analyze_fixed_context_gain",
    "matched_fixed_context_topn",
    "support_definition_robustness",
    "merge_token_banks",
    "within_region_analysis",
]


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "usage:" in out.stdout and "Usage:" in out.stdout


def _bank(dir_, raw_topk, steps=(0, 1)):
    from ta_opd.token_bank import TokenBankWriter

    n = 4
    batch = SimpleNamespace(
        sampled_ids=torch.arange(n), sample_index=torch.tensor([0, 0, 1, 1]), position=torch.tensor([0, 1, 0, 1]),
        response_length=torch.full((n,), 2), loss_mask=torch.ones(n, dtype=torch.bool),
        student_logp=torch.zeros(n), teacher_logp=torch.zeros(n),
        student_topk_ids=torch.zeros(n, 1, dtype=torch.long), student_topk_logp=torch.zeros(n, 1),
        teacher_topk_ids=torch.zeros(n, 1, dtype=torch.long), teacher_topk_logp=torch.zeros(n, 1),
    )  # fmt: skip
    result = SimpleNamespace(mask=torch.ones(n, dtype=torch.bool), stats={"cmass": torch.ones(n)}, scores={})
    writer = TokenBankWriter(dir_, fmt="csv", raw_topk=raw_topk)
    for step in steps:
        writer.write_step(step, batch, result, [10 * step, 10 * step + 1])


@pytest.mark.parametrize(
    ("out", "relation"),
    [
        ("run_a/step000000_rank0.csv", "is the input"),  # the input file itself
        ("run_a/merged.csv", "is inside the input"),
        ("link_to_a/merged.csv", "is inside the input"),  # through a symlink
        ("hardlink.csv", "is the input"),  # a hard link to an input file
        (".", "contains the input"),
    ],
)
def test_merge_token_banks_refuses_an_out_that_overlaps_an_input(tmp_path, out, relation):
    from ta_opd.diagnostics.cli.merge_banks import main

    bank_a, bank_b = tmp_path / "run_a", tmp_path / "run_b"
    for bank in (bank_a, bank_b):
        _bank(bank, raw_topk=False, steps=(0,))
    (bank_file,) = bank_a.glob("step*_rank*.csv")
    (tmp_path / "link_to_a").symlink_to(bank_a, target_is_directory=True)
    os.link(bank_file, tmp_path / "hardlink.csv")
    inputs = [str(bank_b), str(bank_file) if out in ("hardlink.csv", "run_a/step000000_rank0.csv") else str(bank_a)]
    if out == "run_a/step000000_rank0.csv":
        out = str(bank_file.relative_to(tmp_path))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        main([*inputs, "--out", str(tmp_path / out)])
    message = str(exc.value)
    assert relation in message and "--out" in message and any(i in message for i in inputs), message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert main([*inputs, "--out", str(tmp_path / "merged.csv")]) == 0  # outside every input: fine


def test_merge_dedupes_and_rejects_mismatched_schemas(tmp_path):
    from ta_opd.diagnostics.cli.merge_banks import main, merge

    _bank(tmp_path / "run_a", raw_topk=False)
    _bank(tmp_path / "run_b", raw_topk=False, steps=(1, 2))
    merged = merge([str(tmp_path / "run_a"), str(tmp_path / "run_b")], None, False)
    assert len(merged) == 16 and set(merged["run"]) == {"run_a", "run_b"}
    # The same run given twice (e.g. a resumed step rewritten): duplicate tokens dropped.
    twice = merge([str(tmp_path / "run_a"), str(tmp_path / "run_a")], ["a", "a"], False)
    assert len(twice) == 8
    _bank(tmp_path / "run_c", raw_topk=True)
    with pytest.raises(ValueError, match="schemas differ"):
        merge([str(tmp_path / "run_a"), str(tmp_path / "run_c")], None, False)
    out = tmp_path / "merged.parquet"
    assert main([str(tmp_path / "run_a"), str(tmp_path / "run_c"), "--allow-missing-columns", "--out", str(out)]) == 0
    assert out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no step"):
        main([str(tmp_path / "empty"), "--out", str(out)])


def test_export_from_student_is_seeded(tmp_path, tiny_student_dir):
    from ta_opd.diagnostics.cli.export_bank import main
    from ta_opd.diagnostics.io import read_jsonl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(5)))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        main(["--student", str(tiny_student_dir), "--prompts", str(prompts), "--out", str(out), "--num-contexts", "4",
              "--response-tokens", "6", "--batch-size", "3", "--seed", "5"])  # fmt: skip
        outs.append(read_jsonl(out))
    assert outs[0] == outs[1] and len(outs[0]) == 4
    assert all(1 <= len(c["response_token_ids"]) <= 6 and c["prompt_token_ids"] for c in outs[0])
    assert [c["context_id"] for c in outs[0]] == [0, 1, 2, 3]


def _contexts(path, n=5):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 99, (4,), generator=gen).tolist()
        response = torch.randint(3, 99, (3 + i,), generator=gen).tolist()
        rows.append({"context_id": i, "prompt_id": f"p{i // 2}", "prompt_token_ids": prompt,
                     "response_token_ids": response})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.slow
def test_eval_is_resumable_and_matches_a_fresh_run(tmp_path, tiny_student_dir, tiny_teacher_dir):
    pytest.importorskip("ta_opd.stats")
    from ta_opd.diagnostics.cli.eval_bank import main
    from ta_opd.diagnostics.io import read_table

    ctx = tmp_path / "contexts.jsonl"
    rows = _contexts(ctx)
    base = ["--contexts", str(ctx), "--teacher", str(tiny_teacher_dir), "--student", f"theta0={tiny_student_dir}",
            "--student", f"tau={tiny_teacher_dir}", "--k", "4", "--support-ks", "2,4", "--contexts-per-chunk", "2",
            "--chunk-tokens", "5", "--format", "csv"]  # fmt: skip
    resumed = tmp_path / "resumed"
    assert main([*base, "--out-dir", str(resumed), "--max-chunks", "1"]) == 0
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["done"] == [0] and not manifest["complete"] and not (resumed / "token_stats.csv").exists()
    assert main([*base, "--out-dir", str(resumed)]) == 0
    assert json.loads((resumed / "manifest.json").read_text())["complete"]
    fresh = tmp_path / "fresh"
    assert main([*base, "--out-dir", str(fresh)]) == 0
    a, b = read_table(resumed / "token_stats.csv"), read_table(fresh / "token_stats.csv")
    assert len(a) == sum(len(r["response_token_ids"]) for r in rows)
    assert a.equals(b)
    # θτ = the teacher itself: KLf is 0 everywhere, so the relative gain is 1.
    assert a["tau.kl_f"].abs().max() < 1e-5 and (a["theta0.kl_f"] > 0).all()
    assert {"theta0.cmass_exact_k4", "theta0.kl_f_union_k4", "theta0.overlap_k2", "topk.student_topk_ids"} <= set(a)
    with pytest.raises(SystemExit, match="other arguments"):
        main([*base[:-2], "--format", "parquet", "--out-dir", str(resumed)])


@pytest.mark.slow
def test_analysis_tools_end_to_end(tmp_path, tiny_student_dir, tiny_teacher_dir):
    pytest.importorskip("ta_opd.api")
    from ta_opd.diagnostics.cli import analyze_gain, eval_bank, matched_topn, support_robustness, within_region

    ctx = tmp_path / "contexts.jsonl"
    _contexts(ctx, n=12)
    ev = tmp_path / "eval"
    eval_bank.main(["--contexts", str(ctx), "--teacher", str(tiny_teacher_dir), "--student",
                    f"theta0={tiny_student_dir}", "--student", f"tau={tiny_teacher_dir}", "--k", "4",
                    "--support-ks", "2,4", "--out-dir", str(ev)])  # fmt: skip
    common = ["--stats", str(ev / "token_stats.parquet"), "--k", "4", "--bootstrap", "50"]
    rep = tmp_path / "report"
    assert analyze_gain.main([*common, "--out-dir", str(rep)]) == 0
    assert matched_topn.main([*common, "--out-dir", str(rep), "--selectors", "teachability,divergence,random"]) == 0
    assert support_robustness.main([*common, "--out-dir", str(rep), "--ks", "2,4"]) == 0
    assert within_region.main([*common, "--out-dir", str(rep)]) == 0
    for name in ("gain_report.md", "ols.csv", "q3_gap.csv", "matching.csv", "matched_topn.csv", "matched_topn.png",
                 "support_robustness.csv", "within_region.csv", "gain_vs_h_d.png", "q3_gap.png"):  # fmt: skip
        assert (rep / name).exists(), name
