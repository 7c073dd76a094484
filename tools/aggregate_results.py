"""CLI wrapper: ``python tools/aggregate_results.py --help`` (installed as ``aggregate_results``).

Mean ± sample std over seeds, deltas vs the base student and full OPD, the Table-3 and PW-OPSD tables of
downstream results. Implementation, input layout and usage: ``slime.eval.aggregate``; see docs/evaluation.md.
"""

from __future__ import annotations

import sys

from slime.eval.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
