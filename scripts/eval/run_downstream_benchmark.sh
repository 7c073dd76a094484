#!/usr/bin/env bash
# One of the paper's Table-3 benchmarks for each checkpoint of MODELS, then its table:
# BENCHMARK = gpqa_diamond | humaneval | ifeval | math500 | aime (AIME24 + AIME25).
#
# Usage:
#   BENCHMARK=ifeval MODELS="base=/m/Qwen3-1.7B pure_opd=/runs/opd_merged" bash scripts/eval/run_downstream_benchmark.sh
#   (or the wrappers run_downstream_gpqa_diamond.sh, run_downstream_humaneval.sh, run_downstream_ifeval.sh,
#   run_downstream_math500.sh)
#
# lm-eval tasks: gpqa_diamond_cot_zeroshot, humaneval (runs generated code: HF_ALLOW_CODE_EVAL=1 and
# --confirm_run_unsafe_code are set here), ifeval, hendrycks_math500, aime24 + aime25; TASKS overrides. Knobs as
# run_downstream_gsm8k_full.sh (RUN_DIR default OUT_ROOT/<benchmark>, SEED, BATCH_SIZE, DEVICE, DATA_DIR, ...)
# plus GEN_KWARGS (e.g. max_gen_toks=4096). For the 5-seed Table 3, run once per SEED and aggregate EVAL_ROOT
# laid out as <method>/<budget>/seed<N> with aggregate_results (docs/evaluation.md).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib_downstream.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

BENCHMARK=${BENCHMARK:-}
EXTRA=()
case "$BENCHMARK" in
  gpqa_diamond) : "${TASKS:=gpqa_diamond_cot_zeroshot}" ;;
  humaneval)
    : "${TASKS:=humaneval}"
    export HF_ALLOW_CODE_EVAL=1
    EXTRA+=(--confirm-run-unsafe-code)
    ;;
  ifeval) : "${TASKS:=ifeval}" ;;
  math500) : "${TASKS:=hendrycks_math500}" ;;
  aime) : "${TASKS:=aime24,aime25}" ;;
  *) ta_die "BENCHMARK=$BENCHMARK: expected one of gpqa_diamond, humaneval, ifeval, math500, aime" ;;
esac
[[ -n "${GEN_KWARGS:-}" ]] && EXTRA+=(--gen-kwargs "$GEN_KWARGS")
ta_eval_setup "$BENCHMARK"
rc=0
ta_eval_queue "$TASKS" "${EXTRA[@]}" || rc=$?
ta_eval_summary
exit "$rc"
