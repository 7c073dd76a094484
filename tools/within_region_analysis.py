"""CLI wrapper: ``python tools/within_region_analysis.py --help`` (installed as ``within_region_analysis``).

Implementation and usage: ``ta_opd.diagnostics.cli.within_region``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ta_opd.diagnostics.cli.within_region import main
except ImportError:  # run from a source checkout without `pip install slime-ta-opd`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ta_opd.diagnostics.cli.within_region import main

if __name__ == "__main__":
    sys.exit(main())
