"""slime-ta-opd: a slime-compatible training stack for on-policy distillation with token selection."""

__version__ = "0.1.0"
