"""Fixed-context diagnostic math (docs/method.md §6): full-vocabulary statistics, gain analysis.

``fullvocab`` — per-token statistics from full logits (chunked); ``gain`` — gain, bins,
bootstrap, matching, OLS; ``selection`` — selector scores and top-N via ``ta_opd`` (the
training code path); ``io`` — atomic table/JSONL I/O; ``cli`` — the command-line tools
(``tools/*.py`` are thin wrappers over them).
"""
