"""CLI wrapper: ``python tools/support_definition_robustness.py --help`` (also ``support_definition_robustness``).

Implementation and usage: ``ta_opd.diagnostics.cli.support_robustness``; see docs/diagnostics.md.
"""

from __future__ import annotations

import sys

from ta_opd.diagnostics.cli.support_robustness import main

if __name__ == "__main__":
    sys.exit(main())
