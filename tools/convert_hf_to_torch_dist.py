"""CLI wrapper: ``python tools/convert_hf_to_torch_dist.py --help`` (installed as ``convert_hf_to_torch_dist``).

Implementation and usage: ``slime.backends.megatron_utils.convert_cli`` (extra ``megatron``); see docs/scaling.md.
"""

from __future__ import annotations

import sys

from slime.backends.megatron_utils.convert_cli import hf_to_torch_dist_main

if __name__ == "__main__":
    sys.exit(hf_to_torch_dist_main())
