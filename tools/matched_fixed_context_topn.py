"""CLI wrapper: ``python tools/matched_fixed_context_topn.py --help`` (installed as ``matched_fixed_context_topn``).

Implementation and usage: ``ta_opd.diagnostics.cli.matched_topn``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.matched_topn import main

if __name__ == "__main__":
    sys.exit(main())
