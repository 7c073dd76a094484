"""CLI wrapper: ``python tools/summarize_suite.py --help`` (installed as ``summarize_suite``).

Implementation: ``slime.suite_report.cli``; usage: ``slime.suite_report.summary``; see docs/method_suite.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from slime.suite_report.cli import main
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slime_ta_opd"))
    from slime.suite_report.cli import main

if __name__ == "__main__":
    sys.exit(main())
