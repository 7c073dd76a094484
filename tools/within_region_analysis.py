"""CLI wrapper: ``python tools/within_region_analysis.py --help`` (installed as ``within_region_analysis``).

Implementation and usage: ``ta_opd.diagnostics.cli.within_region``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.within_region import main

if __name__ == "__main__":
    sys.exit(main())
