"""CLI wrapper: ``python tools/analyze_fixed_context_gain.py --help`` (installed as ``analyze_fixed_context_gain``).

Implementation and usage: ``ta_opd.diagnostics.cli.analyze_gain``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ta_opd.diagnostics.cli.analyze_gain import main
except ImportError:  # run from a source checkout without `pip install slime-ta-opd`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ta_opd.diagnostics.cli.analyze_gain import main

if __name__ == "__main__":
    sys.exit(main())
