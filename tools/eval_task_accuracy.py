"""CLI wrapper: ``python tools/eval_task_accuracy.py --help`` (installed as ``eval_task_accuracy``).

Implementation and usage: ``slime.embedded.evaluate``; see docs/method_suite.md.
"""

from __future__ import annotations

import sys

from slime.embedded.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
