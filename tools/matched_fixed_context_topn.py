"""CLI wrapper: ``python tools/matched_fixed_context_topn.py --help`` (installed as ``matched_fixed_context_topn``).

Implementation and usage: ``ta_opd.diagnostics.cli.matched_topn``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ta_opd.diagnostics.cli.matched_topn import main
except ImportError:  # run from a source checkout without `pip install slime-ta-opd`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ta_opd.diagnostics.cli.matched_topn import main

if __name__ == "__main__":
    sys.exit(main())
