"""TA-OPD flag → ``ta_opd`` config helpers: the drop-in patch file itself, so the two never drift.

This module sits at the path where the patch installs ``slime_patch/slime/rollout/tip_compat.py`` into an upstream
checkout and re-exports that file. With ``slime.rollout.on_policy_distillation`` it is one of the stack's
only two imports of ``slime_patch``.
"""

from slime_patch.slime.rollout.tip_compat import *  # noqa: F401,F403
