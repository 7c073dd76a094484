"""CLI wrapper: ``python tools/convert_torch_dist_to_hf.py --help`` (installed as ``convert_torch_dist_to_hf``).

Implementation and usage: ``slime.backends.megatron_utils.convert_cli`` (extra ``megatron``); see docs/scaling.md.
"""

from __future__ import annotations

import sys

from slime.backends.megatron_utils.convert_cli import torch_dist_to_hf_main

if __name__ == "__main__":
    sys.exit(torch_dist_to_hf_main())
