"""The TA-OPD flags (docs/method.md §2-5) for an upstream slime checkout.

Upstream's ``slime/utils/arguments.py`` calls ``add_ta_opd_arguments(parser)`` right after
``add_on_policy_distillation_arguments`` (the installer adds those lines; ARGUMENTS_PATCH.md shows
them). The ``--opd-*`` flags are ``ta_opd.flags``' (generated from ``SelectionConfig``'s fields: the
same definitions, defaults and choices this project's stack registers); this module adds the patch's
plug-in ``--custom-teacher-prefill-function-path``. The defaults leave upstream OPD unchanged. A flag
the parser already has (a later upstream version, or a second call) is left as it is.
"""

from __future__ import annotations

import argparse

from ta_opd import flags

__all__ = ["TEACHER_PREFILL_FLAG", "add_ta_opd_arguments"]

TEACHER_PREFILL_FLAG = "--custom-teacher-prefill-function-path"


def add_ta_opd_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every TA-OPD flag of docs/slime_interfaces.md and the prefill hook on ``parser``; return it."""
    flags.add_ta_opd_arguments(parser)
    try:
        parser.add_argument(
            TEACHER_PREFILL_FLAG,
            type=str,
            default=None,
            help="(args, sample, payload) -> payload: rewrites the OPD reward function's teacher prefill "
            "request (e.g. the slime-ta-opd stack's self-distillation prompt).",
        )
    except argparse.ArgumentError:
        pass  # already registered by this parser: keep its definition
    return parser
