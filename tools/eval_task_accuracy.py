"""CLI wrapper: ``python tools/eval_task_accuracy.py --help`` (installed as ``eval_task_accuracy``).

Implementation and usage: ``slime.embedded.evaluate``; see docs/method_suite.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from slime.embedded.evaluate import main
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slime_ta_opd"))
    from slime.embedded.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
