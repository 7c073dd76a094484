"""CLI wrapper: ``python tools/analyze_fixed_context_gain.py --help`` (installed as ``analyze_fixed_context_gain``).

Implementation and usage: ``ta_opd.diagnostics.cli.analyze_gain``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.analyze_gain import main

if __name__ == "__main__":
    sys.exit(main())
