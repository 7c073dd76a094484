"""Downstream evaluation (lm-evaluation-harness), multi-seed aggregation and the release's evaluation flows.

* ``slime.eval.downstream`` — one lm-eval run of a HF checkpoint or an SGLang-API server (``downstream_eval``);
* ``slime.eval.aggregate`` — mean ± std over seeds, deltas, the Table-3 and PW-OPSD tables
  (``aggregate_results``);
* ``slime.eval.checkpoints`` — the checkpoint to evaluate, LoRA merge into ``<run>_merged`` with a
  ``.ready_for_eval`` sentinel (``prepare_eval_checkpoint``);
* ``slime.eval.alignment`` — the student/teacher top-k alignment over training (``plot_topk_alignment``).

See docs/evaluation.md.
"""
