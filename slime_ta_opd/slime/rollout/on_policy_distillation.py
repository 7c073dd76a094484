"""OPD reward function + reward post-process: the drop-in patch file itself, so the two never drift.

This module sits at the path where the patch installs ``slime_patch/slime/rollout/on_policy_distillation.py``
into an upstream checkout and re-exports that file. With ``slime.rollout.tip_compat`` it is one of the stack's
only two imports of ``slime_patch``.
"""

from slime_patch.slime.rollout.on_policy_distillation import *  # noqa: F401,F403
