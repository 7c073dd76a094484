#!/usr/bin/env bash
# The original TA-OPD release's budget-ratio sweep (same name, variables and defaults), run by
# scripts/train/run_method_suite.sh: one training run per RUN_LIST entry, then the fixed-context evaluation of
# every trained student on shared frozen contexts, the per-selector × budget table and the gain-vs-ratio curve.
#
# Usage:
#   bash scripts/train/run_opd_budget_ratio_sweep.sh                                # embedded task (CPU)
#   RUN_LIST="dlearn_high:0.03:10 q3_highc:0.03:20" COMMON_CONTEXT=/path/contexts.jsonl \
#     BASELINE_METRICS=/path/theta0/token_stats.parquet TEACHER_MODEL=... STUDENT_HF=... PROMPT_DATA=... \
#     bash scripts/train/run_opd_budget_ratio_sweep.sh
#
# Release defaults: RUN_LIST="dlearn_high:0.01:10 dlearn_high:0.05:20 dlearn_high:0.10:30 q3_highc:0.01:40
# q3_highc:0.05:50" (mask:ratio:idx; any release alias or mask name), TAG=budget_ratio_sweep_k16_<SEED_LABEL>,
# SEED_LABEL=seed1, SKIP_EVAL=0; with real models (STUDENT_HF / PROMPT_DATA set) also the release's run sizes:
# NUM_ROLLOUT=50, ROLLOUT_BATCH_SIZE=4, N_SAMPLES_PER_PROMPT=2, GLOBAL_BATCH_SIZE=8, MICRO_BATCH_SIZE=1,
# SAVE_INTERVAL=10, ROLLOUT_MAX_RESPONSE_LEN=64, OPD_TOPK_METRICS_K=16. COMMON_CONTEXT / BASELINE_METRICS reuse
# shared contexts and θ0's scores (built once under $OUTPUT_ROOT/$TAG/fixed_context otherwise). Outputs:
# $OUTPUT_ROOT/$TAG/fixed_context/{budget_table.csv,budget_table.md,gain_vs_ratio.csv,gain_vs_ratio.png}.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

export SEED_LABEL=${SEED_LABEL:-seed1}
export TAG=${TAG:-budget_ratio_sweep_k16_${SEED_LABEL}}
if [[ -z "${METHOD_LIST+x}" ]]; then
  export RUN_LIST=${RUN_LIST-"dlearn_high:0.01:10 dlearn_high:0.05:20 dlearn_high:0.10:30 q3_highc:0.01:40 q3_highc:0.05:50"}
fi
export SKIP_EVAL=${SKIP_EVAL:-0}
if [[ -n "${STUDENT_HF:-}" || -n "${PROMPT_DATA:-}" ]]; then # the release's sizes for real models
  export NUM_ROLLOUT=${NUM_ROLLOUT:-50} ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-4} N_SAMPLES_PER_PROMPT=${N_SAMPLES_PER_PROMPT:-2}
  export GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8} MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1} SAVE_INTERVAL=${SAVE_INTERVAL:-10}
  export ROLLOUT_MAX_RESPONSE_LEN=${ROLLOUT_MAX_RESPONSE_LEN:-64}
fi
export OPD_TOPK_METRICS_K=${OPD_TOPK_METRICS_K:-16}
export OPD_TOKEN_BANK_FORMAT=${OPD_TOKEN_BANK_FORMAT:-csv}
exec bash "$SCRIPT_DIR/run_method_suite.sh" "$@"
