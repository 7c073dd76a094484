"""Rollout plug-in of the cluster tests: the default rollout, held at a chosen step so a test can act mid-step.

With ``<output-dir>/hold_at`` holding a rollout id, that rollout writes ``<output-dir>/held_<id>`` and waits for
``<output-dir>/release_<id>`` before it generates (the step has started: its engines are about to be asked).
"""

from __future__ import annotations

import time
from pathlib import Path

from slime.rollout.sglang_rollout import generate_rollout as default_generate_rollout


def generate_rollout(args, rollout_id, data_source, evaluation=False):
    out = Path(args.output_dir)
    hold = out / "hold_at"
    if not evaluation and hold.exists() and hold.read_text().strip() == str(rollout_id):
        (out / f"held_{rollout_id}").write_text("held")
        release = out / f"release_{rollout_id}"
        deadline = time.monotonic() + 600
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return default_generate_rollout(args, rollout_id, data_source, evaluation=evaluation)
