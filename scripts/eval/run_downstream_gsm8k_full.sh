#!/usr/bin/env bash
# GSM8K (full test set) through lm-eval's gsm8k_cot, for each checkpoint of MODELS, then the summary table.
#
# Usage:
#   MODELS="base_qwen3_1p7b=/m/Qwen3-1.7B ta_opd_r0.1_s0=/runs/ta_opd_merged" \
#     bash scripts/eval/run_downstream_gsm8k_full.sh
#   SERVER_URL=http://127.0.0.1:30000 MODELS="student=/path/to/tokenizer_dir" bash scripts/eval/run_downstream_gsm8k_full.sh
#
# Knobs (the release's names): RUN_DIR (default OUT_ROOT/gsm8k_cot_full, OUT_ROOT default outputs/downstream_eval),
# LOG_DIR, BATCH_SIZE (8), DEVICE (cpu; cuda:0 on a GPU), TIMEOUT (per entry, e.g. 150m), TASK (gsm8k_cot), SEED,
# DTYPE, NUM_FEWSHOT, LIMIT, LOG_SAMPLES, DATA_DIR (local data: DATA_DIR/gsm8k_cot/{train,test}.jsonl),
# INCLUDE_PATH, SERVER_URL, CHAT, BASE_NAME (the delta reference; default the first entry).
# Offline: HF_DATASETS_OFFLINE=1 unless set (the data come from the datasets cache or DATA_DIR).
# Writes RUN_DIR/NAME/seed$SEED/results_*.json and RUN_DIR/summary/{table3.md,table3.csv,summary.csv}.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib_downstream.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

BATCH_SIZE=${BATCH_SIZE:-8}
TASK=${TASK:-gsm8k_cot}
ta_eval_setup gsm8k_cot_full
rc=0
ta_eval_queue "$TASK" || rc=$?
ta_eval_summary
exit "$rc"
