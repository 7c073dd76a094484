"""Run a Python server module with its API key taken from the environment instead of the command line.

Usage::

    SLIME_LAUNCH_API_KEY=KEY python -m slime.backends.sglang_utils.keyed_launch sglang.launch_server ARGS...
    SLIME_LAUNCH_API_KEY=KEY python -m slime.backends.sglang_utils.keyed_launch sglang_router.launch_router ARGS...

SGLang's ``launch_server`` and the sglang-router's ``launch_router`` take the key only as ``--api-key KEY``, and
a command line is readable by every user of the machine (``/proc/PID/cmdline``, ``ps``). This wrapper pops the
key from its environment (readable by the owner only), appends ``--api-key KEY`` to ``sys.argv`` inside the
process and runs the module as ``__main__``: the module parses the key as usual, and the kernel's copy of the
command line never holds it.
"""

from __future__ import annotations

import os
import runpy
import sys

KEY_ENV = "SLIME_LAUNCH_API_KEY"


def main() -> None:
    if len(sys.argv) < 2:
        print(f"usage: {KEY_ENV}=KEY python -m {__spec__.name if __spec__ else __name__} MODULE [ARGS...]",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    module, rest = sys.argv[1], sys.argv[2:]
    key = os.environ.pop(KEY_ENV, None)
    sys.argv = [module, *rest, *(["--api-key", key] if key else [])]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
