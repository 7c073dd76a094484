"""CLI wrapper: ``python tools/eval_fixed_context_bank.py --help`` (installed as ``eval_fixed_context_bank``).

Implementation and usage: ``ta_opd.diagnostics.cli.eval_bank``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.eval_bank import main

if __name__ == "__main__":
    sys.exit(main())
