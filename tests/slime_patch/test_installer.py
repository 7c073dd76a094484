"""The patch installer on a temporary fake slime checkout (a minimal git tree)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime_patch import installer

REPO = Path(__file__).resolve().parents[2]

UPSTREAM_OPD = b"""import aiohttp
import torch

from slime.utils.types import Sample


async def reward_func(args, sample, **kwargs):
    raise RuntimeError("upstream reward_func")


def post_process_rewards(args, samples: list[Sample], **kwargs):
    raise RuntimeError("upstream post_process_rewards")
"""

UPSTREAM_ARGUMENTS = b"""import argparse


def get_slime_extra_args_provider(add_custom_arguments=None):
    def add_slime_arguments(parser):
        def add_on_policy_distillation_arguments(parser):
            parser.add_argument("--use-opd", action="store_true", default=False)
            parser.add_argument("--opd-kl-coef", type=float, default=1.0)
            return parser

        parser = add_on_policy_distillation_arguments(parser)
        return parser

    return add_slime_arguments


def parse(argv):
    return get_slime_extra_args_provider()(argparse.ArgumentParser()).parse_args(argv)
"""

UPSTREAM_TYPES = b"""from dataclasses import dataclass, field


@dataclass
class Sample:
    index: int | None = None
    tokens: list = field(default_factory=list)
    response_length: int = 0
    reward: object = None
    loss_mask: list | None = None
    metadata: dict = field(default_factory=dict)
"""


# upstream's plug-in loader (slime/utils/misc.py), the patch's only other upstream import besides Sample
UPSTREAM_MISC = b"""import importlib
from functools import cache


@cache
def load_function(path):
    module_path, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_path), attr)
"""


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fake_slime(tmp_path: Path) -> Path:
    root = tmp_path / "slime-main"
    files = {
        "train.py": b"print('train')\n",
        "slime/__init__.py": b"",
        "slime/rollout/__init__.py": b"",
        "slime/rollout/on_policy_distillation.py": UPSTREAM_OPD,
        "slime/utils/__init__.py": b"",
        "slime/utils/types.py": UPSTREAM_TYPES,
        "slime/utils/misc.py": UPSTREAM_MISC,
        "slime/utils/arguments.py": UPSTREAM_ARGUMENTS,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "upstream")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and not {".git", "__pycache__"} & set(p.relative_to(root).parts)
    }


def test_install_backs_up_verifies_and_uninstall_restores_byte_identical(fake_slime: Path):
    before = _snapshot(fake_slime)
    lines: list[str] = []
    changes = installer.install(fake_slime, python=sys.executable, log=lines.append)
    actions = {c.path: c.action for c in changes}
    assert actions == {
        "slime/rollout/on_policy_distillation.py": "replaced",
        "slime/rollout/tip_compat.py": "new",
        "slime/utils/ta_opd_arguments.py": "new",
        "slime/utils/arguments.py": "edited",
    }
    assert any(line.startswith("verified:") and str(fake_slime) in line for line in lines), lines
    patch_root = REPO / "slime_patch"
    for rel in installer.PATCH_FILES:
        assert (fake_slime / rel).read_bytes() == (patch_root / rel).read_bytes()
    backup = fake_slime / installer.BACKUP_DIR / "files"
    assert (backup / "slime/rollout/on_policy_distillation.py").read_bytes() == UPSTREAM_OPD
    assert (backup / "slime/utils/arguments.py").read_bytes() == UPSTREAM_ARGUMENTS
    assert (fake_slime / installer.BACKUP_DIR / installer.MANIFEST).exists()

    # the edited arguments.py registers the TA-OPD flags (run with the checkout first on the path)
    code = "from slime.utils.arguments import parse; a = parse(['--opd-budget-mask', 'teachability']); " \
           "print(a.opd_budget_mask, a.opd_topk_metrics_k, a.opd_kl_coef)"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake_slime), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=fake_slime, capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    assert out.stdout.split() == ["teachability", "16", "1.0"]
    # the backup dir keeps `git status` of the checkout to the patched files
    status = _git(fake_slime, "status", "--porcelain", "--untracked-files=all")
    assert installer.BACKUP_DIR not in status

    # idempotent: a second run changes nothing and keeps the original backup
    again = installer.install(fake_slime, python=sys.executable, log=lambda _: None)
    assert {c.action for c in again} == {"unchanged"}
    assert (backup / "slime/rollout/on_policy_distillation.py").read_bytes() == UPSTREAM_OPD
    assert (fake_slime / "slime/utils/arguments.py").read_text().count(installer.ARGS_MARKER) == 1

    restored = installer.uninstall(fake_slime, log=lambda _: None)
    assert {c.path: c.action for c in restored} == {
        "slime/rollout/on_policy_distillation.py": "restored",
        "slime/rollout/tip_compat.py": "removed",
        "slime/utils/ta_opd_arguments.py": "removed",
        "slime/utils/arguments.py": "restored",
    }
    assert _snapshot(fake_slime) == before
    assert _git(fake_slime, "status", "--porcelain", "--untracked-files=all") == ""


def test_bad_target_is_rejected_with_a_clear_message(tmp_path: Path, capsys):
    (tmp_path / "notslime").mkdir()
    with pytest.raises(installer.InstallError, match="not a slime checkout: missing train.py"):
        installer.install(tmp_path / "notslime")
    assert installer.main([str(tmp_path / "notslime")]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(installer.InstallError, match="not a directory"):
        installer.install(tmp_path / "missing")


def test_dirty_target_is_refused_unless_forced(fake_slime: Path):
    (fake_slime / "train.py").write_text("print('local edit')\n")
    with pytest.raises(installer.InstallError, match="uncommitted changes.*train.py.*--force"):
        installer.install(fake_slime, verify=False)
    assert not (fake_slime / installer.BACKUP_DIR).exists()
    assert (fake_slime / "slime/rollout/on_policy_distillation.py").read_bytes() == UPSTREAM_OPD
    installer.install(fake_slime, verify=False, force=True, log=lambda _: None)
    assert (fake_slime / "slime/rollout/tip_compat.py").exists()


def test_dry_run_writes_nothing_and_uninstall_needs_an_install(fake_slime: Path):
    before = _snapshot(fake_slime)
    changes = installer.install(fake_slime, dry_run=True, log=lambda _: None)
    assert {c.action for c in changes} == {"replaced", "new", "edited"}
    assert _snapshot(fake_slime) == before
    with pytest.raises(installer.InstallError, match="not installed"):
        installer.uninstall(fake_slime)


def test_uninstall_refuses_to_drop_later_edits(fake_slime: Path):
    installer.install(fake_slime, verify=False, log=lambda _: None)
    path = fake_slime / "slime/rollout/tip_compat.py"
    path.write_text(path.read_text() + "# user edit\n")
    with pytest.raises(installer.InstallError, match="tip_compat.py was modified"):
        installer.uninstall(fake_slime)
    installer.uninstall(fake_slime, force=True, log=lambda _: None)
    assert (fake_slime / "slime/rollout/on_policy_distillation.py").read_bytes() == UPSTREAM_OPD


def test_missing_arguments_anchor_is_a_clear_error(fake_slime: Path):
    (fake_slime / "slime/utils/arguments.py").write_text("def f():\n    pass\n")
    _git(fake_slime, "commit", "-qam", "other arguments")
    with pytest.raises(installer.InstallError, match="ARGUMENTS_PATCH.md"):
        installer.install(fake_slime, verify=False)
    assert not (fake_slime / "slime/rollout/tip_compat.py").exists()


def test_shell_wrapper_and_failed_verification(fake_slime: Path):
    sh = REPO / "tools" / "install_slime_patch.sh"
    proc = subprocess.run(["bash", str(sh), str(fake_slime), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout and "replaced  slime/rollout/on_policy_distillation.py" in proc.stdout
    proc = subprocess.run(["bash", str(sh), str(fake_slime / "slime")], capture_output=True, text=True)
    assert proc.returncode == 1 and "not a slime checkout" in proc.stderr
    with pytest.raises(installer.InstallError, match="no-such-python.*not found"):
        installer.install(fake_slime, python=str(fake_slime / "no-such-python"), log=lambda _: None)
    installer.uninstall(fake_slime, log=lambda _: None)
    # a Python that cannot import ta_opd (isolated mode here): the install says so; uninstall undoes it
    bare = fake_slime.parent / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(installer.InstallError, match="importing the patched modules"):
        installer.install(fake_slime, python=str(bare), log=lambda _: None)
    installer.uninstall(fake_slime, log=lambda _: None)
    assert _git(fake_slime, "status", "--porcelain", "--untracked-files=all") == ""


# ---------------------------------------------------------------- local edits and manifest safety (--no-verify)


def _install(root: Path, *flags: str) -> int:
    return installer.main([str(root), "--no-verify", *flags])


@pytest.mark.parametrize(
    "edited",
    [["slime/utils/arguments.py"], ["slime/rollout/on_policy_distillation.py", "slime/rollout/tip_compat.py"]],
)
def test_reinstall_refuses_to_overwrite_local_edits_and_force_backs_them_up(fake_slime, capsys, edited):
    assert _install(fake_slime) == 0
    for rel in edited:
        (fake_slime / rel).write_text((fake_slime / rel).read_text() + "# my local edit\n")
    before = _snapshot(fake_slime)
    capsys.readouterr()
    assert _install(fake_slime) == 1
    err = capsys.readouterr().err
    assert all(rel in err for rel in edited) and "--force" in err and "modified after the installer wrote" in err
    assert _snapshot(fake_slime) == before  # nothing written, dry run included
    assert _install(fake_slime, "--dry-run") == 1
    assert _snapshot(fake_slime) == before

    assert _install(fake_slime, "--force") == 0
    out = capsys.readouterr().out
    saved = sorted(d for d in (fake_slime / installer.EDITED_DIR).iterdir() if d.is_dir())
    assert len(saved) == 1 and str(saved[0]) in out
    for rel in edited:
        assert (saved[0] / rel).read_text().endswith("# my local edit\n")  # the edit survives, next to the checkout
        assert "# my local edit" not in (fake_slime / rel).read_text()
    assert _git(fake_slime, "status", "--porcelain", "--untracked-files=all", "--", installer.EDITED_DIR) == ""
    # the copies survive an uninstall (which removes the install backup directory)
    assert installer.main([str(fake_slime), "--uninstall"]) == 0
    assert (saved[0] / edited[0]).exists()
    assert (fake_slime / "slime/utils/arguments.py").read_bytes() == UPSTREAM_ARGUMENTS


def test_first_install_and_patch_updates_are_not_local_edits(fake_slime):
    # first install over upstream files: the originals are the backup, no --force needed
    assert _install(fake_slime) == 0
    # an older patch version installed earlier (its content recorded in the manifest): a plain update
    manifest_path = fake_slime / installer.BACKUP_DIR / installer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    old = b"# tip_compat of an older patch version\n"
    (fake_slime / "slime/rollout/tip_compat.py").write_bytes(old)
    manifest["files"]["slime/rollout/tip_compat.py"]["installed_sha256"] = hashlib.sha256(old).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    changes = installer.install(fake_slime, verify=False, log=lambda _: None)
    assert {c.path: c.action for c in changes}["slime/rollout/tip_compat.py"] == "updated"
    assert not (fake_slime / installer.EDITED_DIR).exists()


def test_uninstall_force_backs_up_edits_and_a_refusal_changes_nothing(fake_slime, capsys):
    assert _install(fake_slime) == 0
    (fake_slime / "slime/utils/ta_opd_arguments.py").write_text("# rewritten by the user\n")
    before = _snapshot(fake_slime)
    assert installer.main([str(fake_slime), "--uninstall"]) == 1
    assert "ta_opd_arguments.py was modified" in capsys.readouterr().err
    assert _snapshot(fake_slime) == before  # files sorted before it were not restored either
    assert installer.main([str(fake_slime), "--uninstall", "--force"]) == 0
    (saved,) = (d for d in (fake_slime / installer.EDITED_DIR).iterdir() if d.is_dir())
    assert (saved / "slime/utils/ta_opd_arguments.py").read_text() == "# rewritten by the user\n"
    assert not (fake_slime / "slime/utils/ta_opd_arguments.py").exists()


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
    fake_slime, capsys, entry, message
):
    victim = fake_slime.parent / "victim.txt"
    victim.write_text("not yours\n")
    assert _install(fake_slime) == 0
    manifest_path = fake_slime / installer.BACKUP_DIR / installer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].update({k.format(victim=victim): v for k, v in entry.items()})
    manifest_path.write_text(json.dumps(manifest))
    before = _snapshot(fake_slime)
    capsys.readouterr()
    assert installer.main([str(fake_slime), "--uninstall", "--force"]) == 1
    err = capsys.readouterr().err
    assert message in err and "nothing was changed" in err, err
    assert victim.read_text() == "not yours\n"
    assert _snapshot(fake_slime) == before
    assert _install(fake_slime) == 1  # the install reads the same manifest: refused too


def test_uninstall_refuses_a_manifest_file_that_is_a_symlink_out_of_the_checkout(fake_slime, capsys):
    victim = fake_slime.parent / "victim.py"
    victim.write_text("keep me\n")
    assert _install(fake_slime) == 0
    link = fake_slime / "slime/rollout/tip_compat.py"
    link.unlink()
    link.symlink_to(victim)
    assert installer.main([str(fake_slime), "--uninstall", "--force"]) == 1
    assert "outside" in capsys.readouterr().err
    assert victim.read_text() == "keep me\n" and link.is_symlink()
