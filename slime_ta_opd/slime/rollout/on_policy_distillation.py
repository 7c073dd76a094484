"""OPD reward function + reward post-process: the drop-in patch file itself, so the two never drift."""

from slime_patch.slime.rollout.on_policy_distillation import *  # noqa: F401,F403
