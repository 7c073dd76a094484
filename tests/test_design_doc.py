"""docs/design.md's module index is generated from the code: it must name exactly what exists."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _design_index():
    spec = importlib.util.spec_from_file_location("design_index", ROOT / "docs" / "design_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_design_md_module_index_is_current():
    index = _design_index()
    assert index.main(["--check"]) == 0, "docs/design.md is stale: run `python docs/design_index.py`"


def test_index_lists_every_module_once():
    index = _design_index()
    text = index.render()
    for package, base in index.PACKAGES:
        if not base.is_dir():
            continue
        for path in base.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = index._module_name(package, base, path)
            assert text.count(f"| `{name}` |") == 1, name


def test_markers_are_required(tmp_path):
    index = _design_index()
    try:
        index.updated("# no markers here\n")
    except ValueError as exc:
        assert "GENERATED MODULE INDEX" in str(exc)
    else:
        raise AssertionError("a design.md without markers must be refused")
