"""Secrets out of everything the stack writes: one function, :func:`redact_secrets`, for every dump of the flags.

A flag is a secret when its name (``-`` and ``_`` alike, any case) contains ``api_key``/``apikey``, ``secret``,
``password``/``passwd``, ``private_key`` or ``credential``, or ends in ``token`` (``--api-key``,
``--router-api-key``, ``--hf-token``, ``--wandb-api-key``; not ``--max-tokens-per-gpu`` nor
``--opd-token-bank-dir``). Its value becomes ``"<redacted>"``, and so does every other occurrence of that value
inside any string of the dump (a key passed again inside ``--sglang-extra-args`` or a URL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
_SECRET_PARTS = ("api_key", "apikey", "secret", "password", "passwd", "private_key", "credential")
_SECRET_SUFFIXES = ("token",)


def is_secret_name(name: str) -> bool:
    """Whether a flag / config key named ``name`` holds a secret (rule in the module docstring)."""
    key = re.sub(r"[-.\s]", "_", str(name).lower()).strip("_")
    return any(part in key for part in _SECRET_PARTS) or key.endswith(_SECRET_SUFFIXES)


def _secret_values(obj: Any, found: set[str]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_name(str(k)) and isinstance(v, str | bytes) and v:
                found.add(v.decode(errors="replace") if isinstance(v, bytes) else v)
            else:
                _secret_values(v, found)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            _secret_values(v, found)


def _scrub(obj: Any, values: list[str]) -> Any:
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v not in (None, "") else _scrub(v, values))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_scrub(v, values) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_scrub(v, values) for v in obj)
    if isinstance(obj, str):
        for secret in values:
            obj = obj.replace(secret, REDACTED)
        return obj
    return obj


def redact_secrets(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A copy of ``config`` (a mapping or an ``argparse.Namespace``) safe to write: secret values replaced.

    Nested dicts and lists are walked; other values are returned as they are (not copied)."""
    mapping = vars(config) if not isinstance(config, Mapping) else config
    found: set[str] = set()
    _secret_values(mapping, found)
    values = sorted(found, key=len, reverse=True)  # a longer secret containing a shorter one goes first
    return _scrub(dict(mapping), values)
