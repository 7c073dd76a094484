"""TA-OPD flag → ``ta_opd`` config helpers: the drop-in patch file itself, so the two never drift."""

from slime_patch.slime.rollout.tip_compat import *  # noqa: F401,F403
