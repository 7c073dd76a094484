"""ta_opd: the TA-OPD method library (pure torch). See docs/method.md for every formula.

Public entry point: ``select_tokens(TokenBatch, SelectionConfig, rollout_index) -> SelectionResult``.

The names below are loaded on first use, so that ``import ta_opd.config`` or ``python -m ta_opd.aliases``
(the launchers' checks) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FORCED_RATIO": "ta_opd.aliases",
    "METHOD_ALIASES": "ta_opd.aliases",
    "resolve_alias": "ta_opd.aliases",
    "SelectionResult": "ta_opd.api",
    "select_tokens": "ta_opd.api",
    "BudgetResult": "ta_opd.budget",
    "apply_global_budget": "ta_opd.budget",
    "SelectionConfig": "ta_opd.config",
    "agg_loss": "ta_opd.losses",
    "opd_advantages": "ta_opd.losses",
    "ppo_clip_policy_loss": "ta_opd.losses",
    "selection_metrics": "ta_opd.metrics",
    "NORMALIZERS": "ta_opd.normalize",
    "normalize": "ta_opd.normalize",
    "SELECTORS": "ta_opd.selectors",
    "Features": "ta_opd.selectors",
    "compute_features": "ta_opd.selectors",
    "selector_scores": "ta_opd.selectors",
    "TokenStats": "ta_opd.stats",
    "compute_token_stats": "ta_opd.stats",
    "TokenBatch": "ta_opd.topk",
    "pack_topk": "ta_opd.topk",
}

__all__ = [
    "FORCED_RATIO",
    "METHOD_ALIASES",
    "NORMALIZERS",
    "SELECTORS",
    "BudgetResult",
    "Features",
    "SelectionConfig",
    "SelectionResult",
    "TokenBatch",
    "TokenStats",
    "agg_loss",
    "apply_global_budget",
    "compute_features",
    "compute_token_stats",
    "normalize",
    "opd_advantages",
    "pack_topk",
    "ppo_clip_policy_loss",
    "resolve_alias",
    "select_tokens",
    "selection_metrics",
    "selector_scores",
]

if TYPE_CHECKING:
    from ta_opd.aliases import FORCED_RATIO, METHOD_ALIASES, resolve_alias
    from ta_opd.api import SelectionResult, select_tokens
    from ta_opd.budget import BudgetResult, apply_global_budget
    from ta_opd.config import SelectionConfig
    from ta_opd.losses import agg_loss, opd_advantages, ppo_clip_policy_loss
    from ta_opd.metrics import selection_metrics
    from ta_opd.normalize import NORMALIZERS, normalize
    from ta_opd.selectors import SELECTORS, Features, compute_features, selector_scores
    from ta_opd.stats import TokenStats, compute_token_stats
    from ta_opd.topk import TokenBatch, pack_topk


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ta_opd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
