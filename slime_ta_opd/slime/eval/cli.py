"""The shared ending of the evaluation command lines that write one output and print its path."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path


def run_printing_path(action: Callable[[argparse.Namespace], Path], args: argparse.Namespace) -> int:
    """Run ``action(args)`` with INFO logging and print the path it returns (exit 0).

    A ``ValueError`` (bad input) is printed as ``error: ...`` on stderr with exit code 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        path = action(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
