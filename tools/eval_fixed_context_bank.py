"""CLI wrapper: ``python tools/eval_fixed_context_bank.py --help`` (installed as ``eval_fixed_context_bank``).

Implementation and usage: ``ta_opd.diagnostics.cli.eval_bank``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ta_opd.diagnostics.cli.eval_bank import main
except ImportError:  # run from a source checkout without `pip install slime-ta-opd`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ta_opd.diagnostics.cli.eval_bank import main

if __name__ == "__main__":
    sys.exit(main())
