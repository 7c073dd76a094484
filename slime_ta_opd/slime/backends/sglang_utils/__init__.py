"""Managed real SGLang engines (extra ``sglang``, GPU only): ``engines.launch_sglang_engine_group``.

Importing this package needs nothing beyond the base install; starting engines without the extra raises
:class:`slime.backends.select.MissingExtraError` with the ``pip install`` line.
"""
