"""Plug-ins (loaded by dotted path) that inject faults from inside a rollout step."""

from __future__ import annotations

import os
import signal
import time

from slime.rollout.on_policy_distillation import reward_func

# pid of a server to SIGKILL at the first teacher request of the next step (set by the test, which started it)
KILL_AT_NEXT_SCORE: dict[str, int | None] = {"pid": None}
KILLED: list[int] = []


def _wait_dead(pid: int) -> None:
    """Until ``pid`` is gone or a zombie (its parent, the launch handle, reaps it); bounded to 10 s."""
    import psutil

    for _ in range(200):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


async def kill_teacher_then_score(args, sample, **kwargs):
    """The real TA-OPD teacher scoring, after killing the teacher server once (mid-step)."""
    pid = KILL_AT_NEXT_SCORE["pid"]
    if pid is not None:
        KILL_AT_NEXT_SCORE["pid"] = None
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        KILLED.append(pid)
    return await reward_func(args, sample, **kwargs)
