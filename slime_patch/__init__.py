"""Drop-in TA-OPD files for an upstream slime checkout (see README.md and docs/slime_patch.md).

The files under ``slime/`` are copied over a slime tree by ``tools/install_slime_patch.sh``;
this project's own ``slime`` package re-exports them. Not imported by ``ta_opd/__init__.py``.
"""
