"""Layering of the drop-in patch: what its files may import, and who may import them.

The files under slime_patch/slime/ are copied into an upstream slime checkout, so every import (module
level or inside a function) must resolve there: the standard library, torch, aiohttp, ``ta_opd``, another
patch file, or one of the upstream public names below. The installer runs with any Python, so it is
standard library only. In this project only the two modules that re-export the patch files import
``slime_patch``, and ``ta_opd`` never does.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "slime_patch"
PATCH_FILES = sorted((PATCH / "slime").rglob("*.py"))

# upstream slime's public names the patch uses (THUDM/slime: slime/utils/types.py, slime/utils/misc.py)
UPSTREAM_NAMES = {"slime.utils.types": {"Sample"}, "slime.utils.misc": {"load_function"}}
THIRD_PARTY = {"torch", "aiohttp"}  # in every slime environment
STACK_MIRRORS = {"slime/rollout/on_policy_distillation.py", "slime/rollout/tip_compat.py"}


def _imports(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in ``path``; relative ones resolved against
    ``package`` (default: the file's package in this repository)."""
    if package is None:
        package = path.relative_to(REPO).parent.parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def _patch_file(module: str) -> bool:
    """A module file the patch itself installs (``slime.rollout.tip_compat``, ...), by its path in a checkout."""
    return (PATCH / Path(*module.split("."))).with_suffix(".py").is_file()


def _allowed(module: str, names: list[str]) -> bool:
    """Whether ``import module`` / ``from module import names`` resolves in a patched upstream checkout."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in THIRD_PARTY or top == "ta_opd" or _patch_file(module):
        return True
    if not names:
        return False
    # upstream's public names, or patch files imported from their package (from slime.rollout import tip_compat)
    return set(names) <= UPSTREAM_NAMES.get(module, set()) or all(_patch_file(f"{module}.{n}") for n in names)


@pytest.mark.parametrize("path", PATCH_FILES, ids=lambda p: str(p.relative_to(PATCH)))
def test_patch_files_import_only_upstream_names_and_ta_opd(path):
    bad = []
    # resolved as in a checkout: slime_patch/slime/rollout/x.py is slime.rollout.x there
    for module, names, line in _imports(path, path.relative_to(PATCH).parent.parts):
        if not _allowed(module, names):
            bad.append(f"line {line}: {module} {names}")
    assert not bad, f"{path.relative_to(REPO)} imports what upstream slime does not provide: {bad}"


def test_installer_is_standard_library_only():
    imported = {module.split(".")[0] for module, _, _ in _imports(PATCH / "installer.py")}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_only_the_mirror_modules_import_the_patch_and_ta_opd_never_does():
    importers = set()
    for root in (REPO / "slime_ta_opd", REPO / "ta_opd"):
        for path in root.rglob("*.py"):
            if any(module == "slime_patch" or module.startswith("slime_patch.") for module, _, _ in _imports(path)):
                importers.add(str(path.relative_to(REPO)))
    assert importers == {f"slime_ta_opd/{rel}" for rel in STACK_MIRRORS}, importers


def test_import_walk_sees_function_level_and_relative_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import os\nfrom .tip_compat import topk_k\n\n\ndef f():\n    from slime.rollout import sd\n")
    assert sorted(_imports(path, ("slime", "rollout"))) == [
        ("os", [], 1),
        ("slime.rollout", ["sd"], 6),
        ("slime.rollout.tip_compat", ["topk_k"], 2),
    ]


@pytest.mark.parametrize(
    "module, names, allowed",
    [
        ("json", [], True),
        ("torch.nn.functional", [], True),
        ("ta_opd.api", ["select_tokens"], True),
        ("slime.utils.types", ["Sample"], True),
        ("slime.utils.misc", ["load_function"], True),
        ("slime.rollout.tip_compat", ["topk_k"], True),
        ("slime.rollout", ["tip_compat"], True),
        ("slime.rollout.self_distillation", ["privileged_prefill"], False),  # this stack's, not upstream's
        ("slime.rollout", ["self_distillation"], False),
        ("slime.utils.types", ["Sample", "Private"], False),
        ("slime.utils.opd_config", ["validate_ta_opd_args"], False),  # this stack's
        ("slime", [], False),
        ("requests", [], False),
        ("slime_patch.installer", [], False),
    ],
)
def test_allowed_imports(module, names, allowed):
    assert _allowed(module, names) is allowed
