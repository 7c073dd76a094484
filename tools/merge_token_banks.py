"""CLI wrapper: ``python tools/merge_token_banks.py --help`` (installed as ``merge_token_banks``).

Implementation and usage: ``ta_opd.diagnostics.cli.merge_banks``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.merge_banks import main

if __name__ == "__main__":
    sys.exit(main())
