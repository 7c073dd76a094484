"""ta_opd: the TA-OPD method library (pure torch). See docs/method.md for every formula.

Public entry point: ``select_tokens(TokenBatch, SelectionConfig, rollout_index) -> SelectionResult``.
"""

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
