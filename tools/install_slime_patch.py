"""Install the TA-OPD patch into an upstream slime checkout (runs ``slime_patch/installer.py``; stdlib only).

Usage:
    python tools/install_slime_patch.py SLIME_DIR [--python PY] [--force] [--dry-run] [--no-verify]
    python tools/install_slime_patch.py SLIME_DIR --uninstall [--force] [--dry-run]

Installed as the console script ``slime-ta-opd-install-patch``. See docs/slime_patch.md.
"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    # the installer is one self-contained file: run it from this checkout with any Python, nothing installed
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "slime_patch" / "installer.py"), run_name="__main__")
