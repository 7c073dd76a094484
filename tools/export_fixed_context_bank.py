"""CLI wrapper: ``python tools/export_fixed_context_bank.py --help`` (installed as ``export_fixed_context_bank``).

Implementation and usage: ``ta_opd.diagnostics.cli.export_bank``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.export_bank import main

if __name__ == "__main__":
    sys.exit(main())
