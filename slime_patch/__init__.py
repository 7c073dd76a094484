"""Drop-in TA-OPD files for an upstream slime checkout, and their installer (docs/slime_patch.md).

The files under ``slime/`` mirror upstream slime's paths and are copied over a slime tree by
``installer.py`` (``tools/install_slime_patch.sh``, ``slime-ta-opd-install-patch``). They import only
upstream slime's public names (``slime.utils.types.Sample``, ``slime.utils.misc.load_function``) and
``ta_opd``. This project's ``slime.rollout.on_policy_distillation`` and ``slime.rollout.tip_compat``
re-export them, so the stack runs the same code.
"""
