"""Token bank writer: round trip in every format, clear errors, no partial file on disk-full."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from types import SimpleNamespace

import pytest
import torch

from ta_opd import token_bank
from ta_opd.token_bank import TokenBankWriter, read_token_bank_file


@dataclasses.dataclass
class FakeStats:
    kl_f_union: torch.Tensor
    cmass: torch.Tensor
    reach_t1: torch.Tensor
    cmass_exact: torch.Tensor | None = None


@dataclasses.dataclass
class FakeFeatures:
    h: torch.Tensor
    q3: torch.Tensor


def fake_step():
    n = 5
    batch = SimpleNamespace(
        sampled_ids=torch.tensor([3, 4, 5, 6, 7]),
        sample_index=torch.tensor([0, 0, 0, 1, 1]),
        position=torch.tensor([0, 1, 2, 0, 1]),
        response_length=torch.tensor([3, 3, 3, 2, 2]),
        loss_mask=torch.tensor([True, True, False, True, True]),
        student_logp=torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5]),
        teacher_logp=torch.tensor([-1.1, -1.2, -1.3, -1.4, -1.5]),
        student_topk_ids=torch.tensor([[3, 9]] * 4 + [[7, -1]]),
        student_topk_logp=torch.tensor([[-0.1, -2.0]] * 4 + [[-0.5, -math.inf]]),
        teacher_topk_ids=torch.tensor([[9, 3]] * n),
        teacher_topk_logp=torch.tensor([[-0.5, -1.0]] * n),
    )
    result = SimpleNamespace(
        mask=torch.tensor([True, False, False, True, False]),
        stats=FakeStats(torch.arange(n) * 0.5, torch.full((n,), 0.25), torch.tensor([1, 0, 1, 0, 1]).bool()),
        features=FakeFeatures(torch.linspace(0, 1, n), torch.tensor([0, 1, 0, 1, 0]).bool()),
        scores={"dlearn_high": torch.arange(n, dtype=torch.float32), "random": torch.ones(n)},
        metrics={"keep_ratio": 0.4},
    )
    return batch, result


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_round_trip(tmp_path, fmt):
    batch, result = fake_step()
    writer = TokenBankWriter(tmp_path / "bank", fmt=fmt, raw_topk=True, pair_id="4b-1.7b", teacher_name="T",
                             student_name="S", rank=2)  # fmt: skip
    path = writer.write_step(7, batch, result, ["s10", "s11"])
    assert path.name == f"step0000007_rank002.{fmt}"
    cols = read_token_bank_file(path)
    as_float = lambda name: [float(v) for v in cols[name]]  # noqa: E731
    assert [int(v) for v in cols["rollout_id"]] == [7] * 5
    assert cols["sample_id"] == ["s10", "s10", "s10", "s11", "s11"]
    assert [int(v) for v in cols["position"]] == [0, 1, 2, 0, 1]
    assert [int(v) for v in cols["sampled_id"]] == [3, 4, 5, 6, 7]
    assert [int(v) for v in cols["loss_mask"]] == [1, 1, 0, 1, 1]
    assert [int(v) for v in cols["kept"]] == [1, 0, 0, 1, 0]
    assert as_float("kl_f_union") == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    assert [int(v) for v in cols["reach_t1"]] == [1, 0, 1, 0, 1]
    assert "cmass_exact" not in cols  # None statistics are omitted
    assert as_float("score_dlearn_high") == pytest.approx([0, 1, 2, 3, 4])
    assert as_float("feat_h") == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert as_float("student_logp") == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
    assert cols["student_topk_ids"][4] == [7]  # padding dropped
    assert cols["student_topk_logp"][0] == pytest.approx([-0.1, -2.0])
    assert cols["pair_id"] == ["4b-1.7b"] * 5 and cols["teacher_name"] == ["T"] * 5
    assert [p.name for p in (tmp_path / "bank").iterdir()] == [path.name]  # no temp/probe files left


def test_contexts_sidecar(tmp_path):
    batch, result = fake_step()
    writer = TokenBankWriter(tmp_path, fmt="jsonl")
    writer.write_step(0, batch, result, [10, 11], prompt_token_ids=[[1, 2], [1, 2, 3]], prompt_ids=["p0", "p1"])
    lines = [json.loads(x) for x in (tmp_path / "contexts_step0000000_rank000.jsonl").read_text().splitlines()]
    assert lines[0]["response_token_ids"] == [3, 4, 5] and lines[1]["prompt_token_ids"] == [1, 2, 3]
    assert lines[1]["prompt_id"] == "p1"


def test_not_writable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        TokenBankWriter(blocker / "bank")
    with pytest.raises(ValueError, match="format"):
        TokenBankWriter(tmp_path, fmt="xlsx")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch, fmt):
    batch, result = fake_step()
    writer = TokenBankWriter(tmp_path, fmt=fmt)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_bank.os, "fsync", full)
    with pytest.raises(OSError, match="could not write .*step0000003_rank000") as info:
        writer.write_step(3, batch, result, [0, 1])
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_mismatched_mask_is_an_error(tmp_path):
    batch, result = fake_step()
    result.mask = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask has 4 rows"):
        TokenBankWriter(tmp_path).write_step(0, batch, result, [0, 1])


def _real_step(seed=3, mask="dlearn_high", ratio=0.3):
    import reference as ref

    from ta_opd import SelectionConfig, select_tokens

    batch = ref.random_batch(seed, max_samples=4, max_len=12, k=4)
    return batch, select_tokens(batch, SelectionConfig(mask=mask, ratio=ratio))


def test_every_selector_score_is_written():
    """result.scores is computed lazily (a Mapping, not a dict): every registered selector gets its column."""
    from ta_opd.selectors import SELECTORS

    batch, result = _real_step()
    writer = TokenBankWriter.__new__(TokenBankWriter)  # columns only: no directory needed
    writer.rank, writer.raw_topk, writer.pair_id, writer.teacher_name, writer.student_name = 0, False, None, None, None
    n_samples = int(batch.sample_index.max()) + 1
    cols = writer.step_columns(0, batch, result, list(range(n_samples)))
    for name in SELECTORS.names():
        assert f"score_{name}" in cols, name
        assert torch.equal(torch.as_tensor(cols[f"score_{name}"]), result.scores[name].double())
    assert {"feat_h", "feat_d", "feat_c", "feat_d_learn", "feat_is_q3", "quadrant"} <= set(cols)
    q3 = [q == token_bank.Q3_LABEL for q in cols["quadrant"]]
    assert q3 == [bool(v) for v in cols["feat_is_q3"]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_release_layout_files_columns_and_round_trip(tmp_path, fmt):
    batch, result = _real_step()
    n_samples = int(batch.sample_index.max()) + 1
    writer = TokenBankWriter(tmp_path, fmt=fmt, layout="release", owner="run-a", budget_method="dlearn_high",
                             budget_ratio=0.3, seed=7, config={"opd_budget_mask": "dlearn_high"})  # fmt: skip
    for step in (0, 1):
        path = writer.write_step(step, batch, result, list(range(n_samples)))
    assert path.name == f"rollout_000001.{fmt}"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bank_owner.json", "config.json", f"rollout_000000.{fmt}", f"rollout_000001.{fmt}", "summary.csv"]
    if fmt == "csv":
        header = path.read_text().splitlines()[0].split(",")
    else:
        header = list(json.loads(path.read_text().splitlines()[0]))
    release_cols = (
        "Hs_topk_norm",
        "KLf_union",
        "Cmass",
        "H_norm",
        "D_norm",
        "C_norm",
        "Dlearn",
        "tip_score",
        "ca_softor_score",
        "quadrant",
        "budget_keep",
        "tok_pos",
        "token_id",
        "loss_mask_original",
    )
    for col in release_cols:
        assert col in header, col
    assert "score_dlearn_high" in header  # our own columns follow under their names
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("rollout_id,num_tokens,num_valid_tokens,num_kept_tokens,keep_ratio")
    assert len(summary) == 3
    valid = batch.loss_mask.bool()
    kept = result.mask.bool() & valid
    assert float(summary[1].split(",")[4]) == pytest.approx(int(kept.sum()) / int(valid.sum()))
    assert json.loads((tmp_path / "config.json").read_text())["opd_budget_mask"] == "dlearn_high"
    # read back under the native names
    cols = read_token_bank_file(path)
    assert [int(v) for v in cols["kept"]] == result.mask.long().tolist()
    assert [int(v) for v in cols["position"]] == batch.position.tolist()
    assert cols["kl_f_union"] == pytest.approx(result.stats.kl_f_union.tolist(), nan_ok=True)
    assert cols["score_tip"] == pytest.approx(result.scores["tip"].tolist())
    assert cols["budget_score"] == pytest.approx(result.scores["dlearn_high"].tolist())
    with pytest.raises(ValueError, match="not parquet"):
        TokenBankWriter(tmp_path / "p", fmt="parquet", layout="release")
    with pytest.raises(ValueError, match="layout"):
        TokenBankWriter(tmp_path / "p", layout="upstream")


def test_a_bank_directory_of_another_run_is_refused_never_overwritten(tmp_path):
    batch, result = fake_step()
    bank = tmp_path / "bank"
    TokenBankWriter(bank, owner="/runs/a").write_step(0, batch, result, [0, 1])
    before = (bank / "step0000000_rank000.csv").read_bytes()
    with pytest.raises(token_bank.TokenBankError, match=r"another run \(/runs/a\).*\(/runs/b\).*own bank"):
        TokenBankWriter(bank, owner="/runs/b")
    assert (bank / "step0000000_rank000.csv").read_bytes() == before
    # the same run (a resume) writes on
    TokenBankWriter(bank, owner="/runs/a").write_step(1, batch, result, [0, 1])
    # files of an unknown run (no owner record): refused, whoever asks
    legacy = tmp_path / "legacy"
    TokenBankWriter(legacy).write_step(0, batch, result, [0, 1])
    for owner in (None, "/runs/a"):
        with pytest.raises(token_bank.TokenBankError, match="unknown run .*step0000000_rank000.csv"):
            TokenBankWriter(legacy, owner=owner)


def test_from_args_gives_the_run_its_bank(tmp_path):
    args = SimpleNamespace(opd_token_bank_dir=str(tmp_path / "run1" / "token_bank"), opd_token_bank_format="jsonl",
                           opd_token_bank_layout="release", output_dir=str(tmp_path / "run1"), opd_budget_mask="tip",
                           opd_budget_ratio=0.1, seed=3)  # fmt: skip
    writer = TokenBankWriter.from_args(args)
    assert (writer.fmt, writer.layout, writer.budget_method, writer.seed) == ("jsonl", "release", "tip", 3)
    assert token_bank.bank_owner(args.opd_token_bank_dir) == str((tmp_path / "run1").resolve())
