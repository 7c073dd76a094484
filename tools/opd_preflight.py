"""CLI wrapper: ``python tools/opd_preflight.py --help`` (installed as ``opd-preflight``).

Implementation and usage: ``slime.preflight.cli``; the checks: ``slime.preflight``; see docs/preflight.md.

Usage:
    python tools/opd_preflight.py --student /ckpt/student --teacher /ckpt/teacher
    python tools/opd_preflight.py --student-url http://127.0.0.1:30000 --teacher-url http://127.0.0.1:30001 \\
        --student /ckpt/student --teacher /ckpt/teacher --warn chat_template
"""

from __future__ import annotations

import sys

from slime.preflight.cli import main

if __name__ == "__main__":
    sys.exit(main())
