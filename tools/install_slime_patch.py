"""Install the TA-OPD patch into an upstream slime checkout (thin CLI over ``slime_patch.installer``).

Usage:
    python tools/install_slime_patch.py SLIME_DIR [--python PY] [--force] [--dry-run] [--no-verify]
    python tools/install_slime_patch.py SLIME_DIR --uninstall [--force] [--dry-run]

See docs/slime_patch.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from slime_patch.installer import main
except ImportError:  # run from a source checkout without `pip install slime-ta-opd`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slime_patch.installer import main

if __name__ == "__main__":
    sys.exit(main())
