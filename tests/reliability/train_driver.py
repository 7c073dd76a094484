"""``train.py``'s loop with the stand-in RolloutManager of tests/e2e, as a process a test can SIGKILL.

Usage: PYTHONPATH=tests/e2e:... python tests/reliability/train_driver.py [train.py flags]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    from fake_rollout_manager import create_fake_rollout_manager

    from slime.utils.arguments import parse_args

    spec = importlib.util.spec_from_file_location("slime_train_entry", ROOT / "slime_ta_opd" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.create_rollout_manager = create_fake_rollout_manager
    train.train(parse_args(sys.argv[1:]))


if __name__ == "__main__":
    main()
