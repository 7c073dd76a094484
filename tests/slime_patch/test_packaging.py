"""The `ta-opd` distribution (packaging/ta-opd) ships `ta_opd` alone: no top-level `slime` to shadow upstream's.

A fresh venv gets a stand-in upstream `slime` (as slime's Dockerfile installs the real one), then the `ta-opd`
wheel built from this checkout; from a directory outside the checkout, `import slime` must still be the stand-in
and `import ta_opd` the installed library. Offline: wheels are built by this interpreter's setuptools
(`--no-build-isolation`) and installed with `--no-deps --no-index`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two wheel builds, a venv and a torch import: tens of seconds

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # no PYTHONPATH into the checkout
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _wheel(project: Path, out: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "-w", str(out), str(project)])
    (wheel,) = out.glob("*.whl")
    return wheel


def _standin_upstream_slime(root: Path) -> Path:
    """A minimal upstream-slime-shaped project: `slime.utils.types.Sample` and a marker."""
    (root / "slime" / "utils").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "slime"
            version = "0.0.1"

            [tool.setuptools.packages.find]
            include = ["slime", "slime.*"]
            """
        )
    )
    (root / "slime" / "__init__.py").write_text('STANDIN = "upstream slime"\n')
    (root / "slime" / "utils" / "__init__.py").write_text("")
    (root / "slime" / "utils" / "types.py").write_text("class Sample:\n    pass\n")
    return root


def _ta_opd_source(root: Path) -> Path:
    """packaging/ta-opd and ta_opd/ copied with their relative layout, so the build leaves the checkout untouched."""
    project = root / "packaging" / "ta-opd"
    project.mkdir(parents=True)
    shutil.copy2(REPO / "packaging" / "ta-opd" / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(REPO / "ta_opd", root / "ta_opd", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    return project


PROBE = textwrap.dedent(
    """\
    import importlib.machinery, importlib.metadata, json, sys
    import slime, ta_opd
    from ta_opd import select_tokens
    record = importlib.metadata.distribution("ta-opd").files
    first_slime = next(p for p in sys.path if importlib.machinery.PathFinder.find_spec("slime", [p]))
    print(json.dumps({
        "slime_file": slime.__file__, "standin": getattr(slime, "STANDIN", None), "ta_opd_file": ta_opd.__file__,
        "top_level": sorted({str(f).split("/")[0] for f in record}), "first_slime_dir": first_slime,
    }))
    """
)


def test_ta_opd_distribution_does_not_shadow_upstream_slime(tmp_path):
    wheels = tmp_path / "wheels"
    standin = _wheel(_standin_upstream_slime(tmp_path / "upstream"), wheels / "standin")
    ta_opd_wheel = _wheel(_ta_opd_source(tmp_path / "src"), wheels / "ta_opd")
    assert ta_opd_wheel.name.startswith("ta_opd-")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    _run([*install, str(standin)])
    _run([*install, str(ta_opd_wheel)])
    # torch and numpy (ta_opd's dependencies) from this interpreter: a plain path line, so no .pth file of that
    # directory runs (an editable install of this checkout there stays inactive) and the venv's own packages
    # come first on sys.path
    import torch

    (site / "zz_torch_from_host.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = json.loads(_run([str(python), "-I", "-c", PROBE], cwd=outside).stdout.strip().splitlines()[-1])
    assert probe["standin"] == "upstream slime"
    assert Path(probe["slime_file"]).resolve() == (site / "slime" / "__init__.py").resolve()
    assert Path(probe["first_slime_dir"]).resolve() == site.resolve()
    assert Path(probe["ta_opd_file"]).resolve() == (site / "ta_opd" / "__init__.py").resolve()
    # what the distribution installed: the library and its metadata, no `slime` (nor anything else)
    assert [name for name in probe["top_level"] if not name.endswith(".dist-info")] == ["ta_opd"], probe["top_level"]
