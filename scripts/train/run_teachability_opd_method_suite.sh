#!/usr/bin/env bash
# The original TA-OPD release's method-suite entry point (same name, variables and defaults), run by
# scripts/train/run_method_suite.sh.
#
# Usage:
#   bash scripts/train/run_teachability_opd_method_suite.sh                       # embedded task (CPU)
#   METHOD_LIST="pure_opd:1.0:10,teachability:0.10:20" TAG=my_suite SEED_LABEL=seed2 SEED=2 \
#     TEACHER_MODEL=/path/teacher-hf STUDENT_HF=/path/student-hf PROMPT_DATA=/path/train.jsonl \
#     bash scripts/train/run_teachability_opd_method_suite.sh
#
# Release defaults: METHOD_LIST="pure_opd:1.0:10 teachability:0.10:20 entropy:0.10:30 teachability_entropy:0.10:40
# tip:0.10:50" (entries method:ratio:idx, separated by commas, spaces or newlines; any release alias or mask name),
# TAG=teachability_method_suite_k16_<SEED_LABEL> (the suite's name), SEED_LABEL=seed1, OPD_TOPK_METRICS_K=16,
# OPD_TOKEN_BANK_FORMAT=csv, SKIP_EVAL=0 (fixed-context evaluation of every trained student and the budget table).
# Every method runs with the same seed (SEED, default 1234): a paired comparison; idx names the run. Outputs under
# $OUTPUT_ROOT/$TAG: method_mapping.csv (method,mask,ratio,idx,notes,...), runs/<idx>_<method>_r<ratio>_s<seed>/
# (token_bank/, checkpoints/, fixed_context/), fixed_context/budget_table.{csv,md}. Every other variable:
# docs/method_suite.md and docs/release_compat.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

export SEED_LABEL=${SEED_LABEL:-seed1}
export TAG=${TAG:-teachability_method_suite_k16_${SEED_LABEL}}
if [[ -z "${RUN_LIST+x}" ]]; then
  export METHOD_LIST=${METHOD_LIST-"pure_opd:1.0:10 teachability:0.10:20 entropy:0.10:30 teachability_entropy:0.10:40 tip:0.10:50"}
fi
export OPD_TOPK_METRICS_K=${OPD_TOPK_METRICS_K:-16}
export OPD_TOKEN_BANK_FORMAT=${OPD_TOKEN_BANK_FORMAT:-csv}
export SKIP_EVAL=${SKIP_EVAL:-0}
exec bash "$SCRIPT_DIR/run_method_suite.sh" "$@"
