"""Install the TA-OPD patch files into an upstream slime checkout (and take them out again).

Usage:
    python tools/install_slime_patch.py SLIME_DIR [--python PY] [--force] [--dry-run] [--no-verify]
    python tools/install_slime_patch.py SLIME_DIR --uninstall [--force] [--dry-run]
    bash tools/install_slime_patch.sh SLIME_DIR ...        (same flags)

What it does, in order:
1. checks SLIME_DIR is a slime checkout (train.py, slime/rollout/, slime/utils/types.py,
   slime/utils/arguments.py);
2. refuses a git checkout with uncommitted changes (other than its own) unless ``--force``;
3. on a reinstall, refuses to overwrite a file it installed earlier that was edited since (its sha256
   differs from the one the manifest recorded for what the installer wrote) unless ``--force``; a
   forced install first copies each edited file to ``SLIME_DIR/.ta_opd_edited/<timestamp>/<path>``;
4. backs up every file it replaces or edits under ``SLIME_DIR/.ta_opd_backup/files/`` with a
   ``manifest.json`` (sha256 of the original and of the installed content); a later install keeps
   the first, original backup;
5. copies ``slime/rollout/on_policy_distillation.py``, ``slime/rollout/tip_compat.py`` and
   ``slime/utils/ta_opd_arguments.py``, and adds the ``add_ta_opd_arguments`` call to
   ``slime/utils/arguments.py`` (the lines of ARGUMENTS_PATCH.md);
6. imports the patched modules with the target's Python (``--python``, SLIME_DIR first on
   PYTHONPATH) and parses the TA-OPD flags;
7. prints each file as new / replaced / edited / updated / unchanged.

``--uninstall`` restores the backups byte for byte and removes the files it added. It refuses to
drop edits made after the install unless ``--force`` (then the edited files are first copied to
``.ta_opd_edited/`` as above), and it refuses the whole uninstall, before touching anything, when
any manifest path is not one of the installer's files, is absolute, has a ``..`` part or resolves
(through symlinks) outside the checkout or its backup directory.
Exit status 0 on success, 1 on an error (printed as one line starting with "error:").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PATCH_ROOT = Path(__file__).resolve().parent  # slime_patch
BACKUP_DIR = ".ta_opd_backup"
# Copies of files edited after an install, taken before a forced (re)install or uninstall overwrites
# them; outside BACKUP_DIR because a successful uninstall removes that directory.
EDITED_DIR = ".ta_opd_edited"
MANIFEST = "manifest.json"
# Files copied verbatim (path inside the slime checkout == path under slime_patch).
PATCH_FILES = (
    "slime/rollout/on_policy_distillation.py",
    "slime/rollout/tip_compat.py",
    "slime/utils/ta_opd_arguments.py",
)
ARGUMENTS_FILE = "slime/utils/arguments.py"
MANAGED_FILES = (*PATCH_FILES, ARGUMENTS_FILE)
REQUIRED_PATHS = ("train.py", "slime/__init__.py", "slime/rollout", "slime/utils/types.py", ARGUMENTS_FILE)
ARGS_MARKER = "# TA-OPD token selection flags (slime-ta-opd patch)"
_ARGS_ANCHOR = re.compile(r"^(?P<indent>[ \t]*)parser = add_on_policy_distillation_arguments\(parser\)[ \t]*\n", re.M)
VERIFY_CODE = """
import argparse
import os
import slime.rollout.on_policy_distillation as opd
import slime.rollout.tip_compat as tip
import slime.utils.ta_opd_arguments as ta_args
import ta_opd
assert callable(opd.reward_func) and callable(opd.post_process_rewards), "patched OPD functions missing"
checkout = os.path.realpath(os.getcwd())
assert os.path.realpath(opd.__file__).startswith(checkout + os.sep), f"slime is {opd.__file__}, not {checkout}'s"
parser = ta_args.add_ta_opd_arguments(argparse.ArgumentParser())
args = parser.parse_args(["--opd-budget-mask", "teachability", "--opd-budget-ratio", "0.1"])
cfg = tip.selection_config_from_args(args)
assert cfg.mask == "dlearn_high", cfg.mask
print("verified:", opd.__file__)
"""


class InstallError(RuntimeError):
    """A refused or failed install/uninstall; the message says why and what to do."""


@dataclass
class Change:
    path: str
    action: str  # new | replaced | edited | updated | unchanged | restored | removed


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_slime_checkout(slime_dir: Path) -> None:
    """Raise ``InstallError`` unless ``slime_dir`` looks like an upstream slime checkout."""
    if not slime_dir.is_dir():
        raise InstallError(f"{slime_dir} is not a directory (expected the root of a slime checkout)")
    missing = [p for p in REQUIRED_PATHS if not (slime_dir / p).exists()]
    if missing:
        raise InstallError(
            f"{slime_dir} is not a slime checkout: missing {', '.join(missing)} "
            "(pass the directory that holds train.py and the slime/ package)"
        )


def _git_dirty_paths(slime_dir: Path) -> list[str] | None:
    """Paths with uncommitted changes, or None when ``slime_dir`` is not a git work tree."""
    try:
        inside = subprocess.run(
            ["git", "-C", str(slime_dir), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return None
    prefix = subprocess.run(
        ["git", "-C", str(slime_dir), "rev-parse", "--show-prefix"], capture_output=True, text=True, check=True
    ).stdout.strip()
    status = subprocess.run(
        ["git", "-C", str(slime_dir), "status", "--porcelain", "--untracked-files=all", "--", "."],
        capture_output=True,
        text=True,
        check=True,
    )
    # porcelain paths are relative to the repository root; make them relative to slime_dir
    paths = [line[3:].strip().strip('"') for line in status.stdout.splitlines() if line.strip()]
    return [p[len(prefix) :] if prefix and p.startswith(prefix) else p for p in paths]


def _load_manifest(slime_dir: Path) -> dict | None:
    """The install manifest, every entry checked (``_check_manifest``); None when there is none."""
    path = slime_dir / BACKUP_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InstallError(f"{path} is not valid JSON ({e}); restore it or remove {BACKUP_DIR}/ by hand") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise InstallError(f"{path} has no 'files' table; restore it or remove {BACKUP_DIR}/ by hand")
    _check_manifest(slime_dir, manifest, path)
    return manifest


def _resolves_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink on it followed, stays inside ``root`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _check_rel(rel: object, what: str) -> str | None:
    """Why ``rel`` is not a safe relative POSIX path (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return f"{what} {rel!r} is not a non-empty string"
    pure = PurePosixPath(rel)
    if pure.is_absolute() or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        return f"{what} {rel!r} is not a relative path"
    if ".." in pure.parts or any(part in ("", ".") for part in rel.split("/")):
        return f"{what} {rel!r} has a '..', '.' or empty part"
    return None


def _check_manifest(slime_dir: Path, manifest: dict, path: Path) -> None:
    """Refuse a manifest any of whose paths could reach outside the checkout (checked before any write).

    Every file is one of the installer's own (``MANAGED_FILES``) and resolves, symlinks followed,
    inside ``slime_dir``; every backup is ``files/<the same path>`` and resolves inside the backup
    directory; the sha256 fields are hex strings. All problems are reported together.
    """
    problems = []
    backup_root = slime_dir / BACKUP_DIR
    for rel, entry in manifest["files"].items():
        bad = _check_rel(rel, "file")
        if bad is None and rel not in MANAGED_FILES:
            bad = f"file {rel!r} is not one the installer manages ({', '.join(MANAGED_FILES)})"
        if bad is None and not _resolves_inside(slime_dir / rel, slime_dir):
            bad = f"file {rel!r} resolves to {(slime_dir / rel).resolve()}, outside {slime_dir}"
        if bad is None and not isinstance(entry, dict):
            bad = f"entry of {rel!r} is not an object"
        if bad is None:
            backup = entry.get("backup")
            if backup is not None:
                bad = _check_rel(backup, f"backup of {rel!r}")
                if bad is None and backup != f"files/{rel}":
                    bad = f"backup of {rel!r} is {backup!r}, expected 'files/{rel}'"
                if bad is None and not _resolves_inside(backup_root / backup, backup_root):
                    bad = f"backup {backup!r} resolves to {(backup_root / backup).resolve()}, outside {backup_root}"
            for key in ("original_sha256", "installed_sha256"):
                value = entry.get(key)
                if bad is None and value is not None and not re.fullmatch(r"[0-9a-f]{64}", str(value)):
                    bad = f"{key} of {rel!r} is {value!r}, not a sha256 hex digest"
            if bad is None and backup is not None and entry.get("original_sha256") is None:
                bad = f"entry of {rel!r} has a backup but no original_sha256"
        if bad is not None:
            problems.append(bad)
    if problems:
        raise InstallError(
            f"{path} is not a manifest this installer wrote: {'; '.join(problems)}; nothing was changed "
            f"(restore the manifest, or restore the files by hand and remove {BACKUP_DIR}/)"
        )


def _edited_since_install(slime_dir: Path, manifest: dict | None, planned: dict[str, bytes] | None) -> list[str]:
    """Files the installer wrote earlier whose content changed since (sha256 != the recorded one).

    A file the manifest does not list is upstream's (or the user's): an install backs it up as the
    original instead. A deleted file and a file that already holds the planned content lose nothing.
    """
    edited = []
    for rel, entry in sorted((manifest or {}).get("files", {}).items()):
        target = slime_dir / rel
        if not target.is_file():
            continue
        current = _sha256(target.read_bytes())
        if current == entry.get("installed_sha256"):
            continue
        if planned is not None and rel in planned and current == _sha256(planned[rel]):
            continue
        edited.append(rel)
    return edited


def _save_edited(slime_dir: Path, rels: list[str], *, dry_run: bool, log) -> Path:
    """Copy ``rels`` to a new ``EDITED_DIR/<timestamp>[-N]/`` (git-ignored); return that directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = slime_dir / EDITED_DIR / stamp
    n = 1
    while dest.exists():
        dest = slime_dir / EDITED_DIR / f"{stamp}-{n}"
        n += 1
    for rel in rels:
        log(f"{'backup':>9}  {rel} -> {dest / rel}" + (" (dry run: not written)" if dry_run else ""))
        if not dry_run:
            _write_atomic(dest / rel, (slime_dir / rel).read_bytes())
    if not dry_run:
        _write_atomic(slime_dir / EDITED_DIR / ".gitignore", b"*\n")  # keeps `git status` of the checkout clean
    return dest


def _refuse_edited(edited: list[str], what: str) -> None:
    raise InstallError(
        f"{', '.join(edited)} {'was' if len(edited) == 1 else 'were'} modified after the installer wrote "
        f"{'it' if len(edited) == 1 else 'them'} "
        f"(sha256 differs from {BACKUP_DIR}/{MANIFEST}); {what} would overwrite those local edits. "
        f"Copy the edits elsewhere (or undo them) and run again, or pass --force: each edited file is then "
        f"copied to {EDITED_DIR}/<timestamp>/<path> in the checkout first"
    )


def _edited_arguments(original: bytes) -> bytes:
    """``arguments.py`` with the ``add_ta_opd_arguments`` call after the OPD flags (ARGUMENTS_PATCH.md)."""
    text = original.decode("utf-8")
    if ARGS_MARKER in text:
        return original
    anchors = list(_ARGS_ANCHOR.finditer(text))
    if len(anchors) != 1:
        raise InstallError(
            f"{ARGUMENTS_FILE}: expected exactly one line 'parser = add_on_policy_distillation_arguments(parser)', "
            f"found {len(anchors)}; add the lines of slime_patch/ARGUMENTS_PATCH.md by hand"
        )
    indent = anchors[0].group("indent")
    addition = (
        f"{indent}{ARGS_MARKER}\n"
        f"{indent}from slime.utils.ta_opd_arguments import add_ta_opd_arguments\n\n"
        f"{indent}parser = add_ta_opd_arguments(parser)\n"
    )
    end = anchors[0].end()
    return (text[:end] + addition + text[end:]).encode("utf-8")


def _planned_contents(slime_dir: Path, manifest: dict | None) -> dict[str, bytes]:
    """Path → content the installed checkout should hold."""
    planned = {rel: (PATCH_ROOT / rel).read_bytes() for rel in PATCH_FILES}
    args_path = slime_dir / ARGUMENTS_FILE
    original_args = args_path.read_bytes()
    entry = (manifest or {}).get("files", {}).get(ARGUMENTS_FILE)
    if entry and entry.get("backup"):
        # Re-derive the edit from the original so a reinstall after an upgrade stays one edit.
        original_args = (slime_dir / BACKUP_DIR / entry["backup"]).read_bytes()
    planned[ARGUMENTS_FILE] = _edited_arguments(original_args)
    return planned


def install(
    slime_dir: Path,
    *,
    python: str = "python3",
    force: bool = False,
    dry_run: bool = False,
    verify: bool = True,
    log=print,
) -> list[Change]:
    """Install the patch into ``slime_dir``; return what changed. Raises ``InstallError``."""
    slime_dir = slime_dir.resolve()
    check_slime_checkout(slime_dir)
    manifest = _load_manifest(slime_dir)
    managed = set(MANAGED_FILES)
    outside = [rel for rel in MANAGED_FILES if not _resolves_inside(slime_dir / rel, slime_dir)]
    if outside:
        raise InstallError(
            f"{', '.join(outside)} resolve(s) outside {slime_dir} through a symlink; "
            "the installer writes only inside the checkout (replace the symlink by the file)"
        )
    dirty = _git_dirty_paths(slime_dir)
    if dirty is None:
        log(f"note: {slime_dir} is not a git checkout; no dirty-tree check")
    else:
        own = (BACKUP_DIR, EDITED_DIR)
        foreign = [p for p in dirty if p not in managed and not p.startswith(own)]
        if manifest is None:
            foreign += [p for p in dirty if p in managed]
        if foreign and not force:
            shown = ", ".join(foreign[:8]) + (" ..." if len(foreign) > 8 else "")
            raise InstallError(f"{slime_dir} has uncommitted changes ({shown}); commit or stash them, or pass --force")
    planned = _planned_contents(slime_dir, manifest)
    # A reinstall over files the installer wrote: the manifest's installed_sha256 tells our content from the
    # user's later edits (git cannot: our own earlier install already shows as a change).
    edited = _edited_since_install(slime_dir, manifest, planned)
    if edited:
        if not force:
            _refuse_edited(edited, "reinstalling")
        _save_edited(slime_dir, edited, dry_run=dry_run, log=log)
    files = dict((manifest or {}).get("files", {}))
    changes: list[Change] = []
    for rel, content in planned.items():
        target = slime_dir / rel
        current = target.read_bytes() if target.exists() else None
        if current == content:
            changes.append(Change(rel, "unchanged"))
            continue
        if rel in files:  # installed before (older patch version): the original backup stays as it is
            action = "updated"
        elif current is None:
            action = "new"
            files[rel] = {"action": "added", "backup": None, "original_sha256": None}
        else:
            action = "edited" if rel == ARGUMENTS_FILE else "replaced"
            backup_rel = f"files/{rel}"
            files[rel] = {"action": action, "backup": backup_rel, "original_sha256": _sha256(current)}
            if not dry_run:
                _write_atomic(slime_dir / BACKUP_DIR / backup_rel, current)
        files[rel]["installed_sha256"] = _sha256(content)
        changes.append(Change(rel, action))
        if not dry_run:
            _write_atomic(target, content)
    if not dry_run:
        backup_root = slime_dir / BACKUP_DIR
        backup_root.mkdir(exist_ok=True)
        _write_atomic(backup_root / ".gitignore", b"*\n")  # keeps `git status` of the checkout clean
        new_manifest = {
            "tool": "slime-ta-opd install_slime_patch",
            "created": (manifest or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,
        }
        _write_atomic(backup_root / MANIFEST, (json.dumps(new_manifest, indent=2, sort_keys=True) + "\n").encode())
    for change in changes:
        log(f"{change.action:>9}  {change.path}")
    if dry_run:
        log("dry run: nothing written")
    elif verify:
        verify_install(slime_dir, python=python, log=log)
    return changes


def verify_install(slime_dir: Path, *, python: str = "python3", log=print) -> None:
    """Import the patched modules with ``python`` (SLIME_DIR first on PYTHONPATH); raise on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(slime_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(
            [python, "-c", VERIFY_CODE], cwd=slime_dir, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as e:
        raise InstallError(f"--python {python!r} not found ({e})") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise InstallError(
            f"installed, but importing the patched modules with {python} failed (is the ta-opd library installed in "
            f"slime's environment: `pip install --no-deps ./packaging/ta-opd` from a slime-ta-opd checkout?): "
            f"{' | '.join(tail)}; `--uninstall` restores the checkout"
        )
    log(proc.stdout.strip())


def uninstall(slime_dir: Path, *, force: bool = False, dry_run: bool = False, log=print) -> list[Change]:
    """Restore every backed-up file byte for byte and remove added files; then drop the backup dir.

    Every check (manifest paths, later edits, backup checksums) runs before the first file is touched,
    so a refused uninstall changes nothing.
    """
    slime_dir = slime_dir.resolve()
    check_slime_checkout(slime_dir)
    manifest = _load_manifest(slime_dir)
    if manifest is None:
        raise InstallError(f"{slime_dir} has no {BACKUP_DIR}/{MANIFEST}: the TA-OPD patch is not installed there")
    entries = sorted(manifest["files"].items())
    originals: dict[str, bytes] = {}
    for rel, entry in entries:
        if entry.get("backup"):
            backup = slime_dir / BACKUP_DIR / entry["backup"]
            if not backup.is_file():
                raise InstallError(f"backup of {rel} ({backup}) is missing; not restoring anything")
            originals[rel] = backup.read_bytes()
            if _sha256(originals[rel]) != entry["original_sha256"]:
                raise InstallError(f"backup of {rel} does not match its recorded sha256; not restoring anything")
    edited = _edited_since_install(slime_dir, manifest, None)
    if edited:
        if not force:
            _refuse_edited(edited, "uninstalling")
        _save_edited(slime_dir, edited, dry_run=dry_run, log=log)
    changes: list[Change] = []
    for rel, _entry in entries:
        target = slime_dir / rel
        if rel in originals:
            changes.append(Change(rel, "restored"))
            if not dry_run:
                _write_atomic(target, originals[rel])
        else:
            changes.append(Change(rel, "removed"))
            if not dry_run:
                target.unlink(missing_ok=True)
    if not dry_run:
        shutil.rmtree(slime_dir / BACKUP_DIR)
    for change in changes:
        log(f"{change.action:>9}  {change.path}")
    if dry_run:
        log("dry run: nothing written")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="install_slime_patch",
        description="Install (or --uninstall) the TA-OPD patch files into an upstream slime checkout.",
    )
    parser.add_argument("slime_dir", type=Path, help="root of the slime checkout (holds train.py and slime/)")
    parser.add_argument("--python", default="python3", help="Python of slime's environment used to verify")
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"proceed on a dirty git checkout, and overwrite installed files edited since the install "
        f"(copied to SLIME_DIR/{EDITED_DIR}/<timestamp>/ first)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    parser.add_argument("--uninstall", action="store_true", help="restore the backed-up files, remove added ones")
    parser.add_argument("--no-verify", action="store_true", help="skip the import check after installing")
    args = parser.parse_args(argv)
    try:
        if args.uninstall:
            uninstall(args.slime_dir, force=args.force, dry_run=args.dry_run)
        else:
            install(
                args.slime_dir, python=args.python, force=args.force, dry_run=args.dry_run, verify=not args.no_verify
            )
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
