"""Tools and launchers that must not lose or mix data (issue 17, items 4, 5, 14 and 16).

The slime patch installer on a real (tiny) git checkout; the suite launchers run for real through bash, with
a stand-in train.py (SLIME_DIR) that parses its flags with the stack's parser and writes metrics and checkpoints
the way the real one does; merge_token_banks and eval_fixed_context_bank on real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from ta_opd.slime_patch import installer

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "train" / "run_method_suite.sh"
SWEEP = REPO / "scripts" / "train" / "run_budget_sweep.sh"

# ---------------------------------------------------------------------------------------------- installer

UPSTREAM_ARGUMENTS = b"""import argparse


def get_slime_extra_args_provider(add_custom_arguments=None):
    def add_slime_arguments(parser):
        def add_on_policy_distillation_arguments(parser):
            parser.add_argument("--use-opd", action="store_true", default=False)
            return parser

        parser = add_on_policy_distillation_arguments(parser)
        return parser

    return add_slime_arguments
"""
UPSTREAM_OPD = b"async def reward_func(args, sample, **kwargs):\n    raise RuntimeError('upstream')\n"


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def slime_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "slime"
    files = {
        "train.py": b"print('train')\n",
        "slime/__init__.py": b"",
        "slime/rollout/__init__.py": b"",
        "slime/rollout/on_policy_distillation.py": UPSTREAM_OPD,
        "slime/utils/__init__.py": b"",
        "slime/utils/types.py": b"class Sample:\n    pass\n",
        "slime/utils/arguments.py": UPSTREAM_ARGUMENTS,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "upstream")
    return root


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and ".git" not in p.relative_to(root).parts
    }


def _install(root: Path, *flags: str) -> int:
    return installer.main([str(root), "--no-verify", *flags])


@pytest.mark.parametrize(
    "edited",
    [["slime/utils/arguments.py"], ["slime/rollout/on_policy_distillation.py", "slime/rollout/tip_compat.py"]],
)
def test_reinstall_refuses_to_overwrite_local_edits_and_force_backs_them_up(slime_checkout, capsys, edited):
    assert _install(slime_checkout) == 0
    for rel in edited:
        (slime_checkout / rel).write_text((slime_checkout / rel).read_text() + "# my local edit\n")
    before = _tree(slime_checkout)
    capsys.readouterr()
    assert _install(slime_checkout) == 1
    err = capsys.readouterr().err
    assert all(rel in err for rel in edited) and "--force" in err and "modified after the installer wrote" in err
    assert _tree(slime_checkout) == before  # nothing written, dry run included
    assert _install(slime_checkout, "--dry-run") == 1
    assert _tree(slime_checkout) == before

    assert _install(slime_checkout, "--force") == 0
    out = capsys.readouterr().out
    saved = sorted(d for d in (slime_checkout / installer.EDITED_DIR).iterdir() if d.is_dir())
    assert len(saved) == 1 and str(saved[0]) in out
    for rel in edited:
        assert (saved[0] / rel).read_text().endswith("# my local edit\n")  # the edit survives, next to the checkout
        assert "# my local edit" not in (slime_checkout / rel).read_text()
    assert _git(slime_checkout, "status", "--porcelain", "--untracked-files=all", "--", installer.EDITED_DIR) == ""
    # the copies survive an uninstall (which removes the install backup directory)
    assert installer.main([str(slime_checkout), "--uninstall"]) == 0
    assert (saved[0] / edited[0]).exists()
    assert (slime_checkout / "slime/utils/arguments.py").read_bytes() == UPSTREAM_ARGUMENTS


def test_first_install_and_patch_updates_are_not_local_edits(slime_checkout):
    # first install over upstream files: the originals are the backup, no --force needed
    assert _install(slime_checkout) == 0
    # an older patch version installed earlier (its content recorded in the manifest): a plain update
    manifest_path = slime_checkout / installer.BACKUP_DIR / installer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    old = b"# tip_compat of an older patch version\n"
    (slime_checkout / "slime/rollout/tip_compat.py").write_bytes(old)
    manifest["files"]["slime/rollout/tip_compat.py"]["installed_sha256"] = hashlib.sha256(old).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    changes = installer.install(slime_checkout, verify=False, log=lambda _: None)
    assert {c.path: c.action for c in changes}["slime/rollout/tip_compat.py"] == "updated"
    assert not (slime_checkout / installer.EDITED_DIR).exists()


def test_uninstall_force_backs_up_edits_and_a_refusal_changes_nothing(slime_checkout, capsys):
    assert _install(slime_checkout) == 0
    (slime_checkout / "slime/utils/ta_opd_arguments.py").write_text("# rewritten by the user\n")
    before = _tree(slime_checkout)
    assert installer.main([str(slime_checkout), "--uninstall"]) == 1
    assert "ta_opd_arguments.py was modified" in capsys.readouterr().err
    assert _tree(slime_checkout) == before  # files sorted before it were not restored either
    assert installer.main([str(slime_checkout), "--uninstall", "--force"]) == 0
    (saved,) = (d for d in (slime_checkout / installer.EDITED_DIR).iterdir() if d.is_dir())
    assert (saved / "slime/utils/ta_opd_arguments.py").read_text() == "# rewritten by the user\n"
    assert not (slime_checkout / "slime/utils/ta_opd_arguments.py").exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"../victim.txt": {"action": "added", "backup": None}}, "'..'"),
        ({"slime/../../victim.txt": {"action": "added", "backup": None}}, "'..'"),
        ({"{victim}": {"action": "added", "backup": None}}, "not a relative path"),
        ({"train.py": {"action": "added", "backup": None}}, "not one the installer manages"),
        ({"./slime/rollout/tip_compat.py": {"action": "added", "backup": None}}, "'.'"),
        (
            {
                "slime/rollout/tip_compat.py": {
                    "action": "replaced",
                    "backup": "../../victim.txt",
                    "original_sha256": "0" * 64,
                }
            },
            "'..'",
        ),  # fmt: skip
        (
            {
                "slime/rollout/tip_compat.py": {
                    "action": "replaced",
                    "backup": "files/train.py",
                    "original_sha256": "0" * 64,
                }
            },
            "expected 'files/",
        ),  # fmt: skip
        ({"slime/rollout/tip_compat.py": "added"}, "not an object"),
    ],
)
def test_uninstall_refuses_a_manifest_path_outside_the_checkout_before_deleting_anything(
    slime_checkout, capsys, entry, message
):
    victim = slime_checkout.parent / "victim.txt"
    victim.write_text("not yours\n")
    assert _install(slime_checkout) == 0
    manifest_path = slime_checkout / installer.BACKUP_DIR / installer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].update({k.format(victim=victim): v for k, v in entry.items()})
    manifest_path.write_text(json.dumps(manifest))
    before = _tree(slime_checkout)
    capsys.readouterr()
    assert installer.main([str(slime_checkout), "--uninstall", "--force"]) == 1
    err = capsys.readouterr().err
    assert message in err and "nothing was changed" in err, err
    assert victim.read_text() == "not yours\n"
    assert _tree(slime_checkout) == before
    assert _install(slime_checkout) == 1  # the install reads the same manifest: refused too


def test_uninstall_refuses_a_manifest_file_that_is_a_symlink_out_of_the_checkout(slime_checkout, capsys):
    victim = slime_checkout.parent / "victim.py"
    victim.write_text("keep me\n")
    assert _install(slime_checkout) == 0
    link = slime_checkout / "slime/rollout/tip_compat.py"
    link.unlink()
    link.symlink_to(victim)
    assert installer.main([str(slime_checkout), "--uninstall", "--force"]) == 1
    assert "outside" in capsys.readouterr().err
    assert victim.read_text() == "keep me\n" and link.is_symlink()


# ---------------------------------------------------------------------------------------------- merge_token_banks


def _bank(dir_: Path) -> Path:
    from types import SimpleNamespace

    import torch

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
    TokenBankWriter(dir_, fmt="csv", raw_topk=False).write_step(0, batch, result, [0, 1])
    return dir_


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

    bank_a, bank_b = _bank(tmp_path / "run_a"), _bank(tmp_path / "run_b")
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


# ------------------------------------------------------------------------------------- eval_fixed_context_bank


def test_resumed_fixed_context_eval_refuses_changed_weights_at_the_same_path(
    tmp_path, tiny_student_dir, tiny_teacher_dir
):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ta_opd.diagnostics.cli.eval_bank import main

    gen = torch.Generator().manual_seed(0)
    rows = [{"context_id": i, "prompt_token_ids": torch.randint(3, 60, (4,), generator=gen).tolist(),
             "response_token_ids": torch.randint(3, 60, (3,), generator=gen).tolist()} for i in range(4)]  # fmt: skip
    ctx = tmp_path / "contexts.jsonl"
    ctx.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tau = tmp_path / "run" / "hf_final"
    shutil.copytree(tiny_student_dir, tau)
    out = tmp_path / "eval"
    base = ["--contexts", str(ctx), "--teacher", str(tiny_teacher_dir), "--student", f"theta0={tiny_student_dir}",
            "--student", f"tau={tau}", "--k", "2", "--support-ks", "2", "--contexts-per-chunk", "2",
            "--format", "csv", "--out-dir", str(out)]  # fmt: skip
    assert main([*base, "--max-chunks", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == [0] and set(manifest["config"]["weights_sha256"]) == {
        "teacher", "student theta0", "student tau"}  # fmt: skip

    # θτ retrained into the same directory: different weights, same path
    (weights,) = tau.glob("*.safetensors")
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert "weights of student tau" in str(exc.value) and "--overwrite" in str(exc.value), exc.value
    assert json.loads((out / "manifest.json").read_text())["done"] == [0]  # nothing mixed in
    assert main([*base, "--overwrite"]) == 0  # start fresh on the new weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == [0, 1]
    assert main(base) == 0  # unchanged weights resume (digests reused from the manifest's stat cache)
