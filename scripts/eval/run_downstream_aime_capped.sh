#!/usr/bin/env bash
# AIME24 and AIME25 with generation capped at 4,096 tokens (max_gen_toks), for each checkpoint of MODELS, then the
# delta-vs-base table (exact match per task and its difference to the base entry).
#
# Usage:
#   MODELS="base_qwen3_1p7b=/m/Qwen3-1.7B dlearn_high_r0.03_s2=/runs/dlearn_merged" \
#     bash scripts/eval/run_downstream_aime_capped.sh
#
# Knobs (the release's names): GPU_ID (CUDA_VISIBLE_DEVICES when set), RUN_DIR (default OUT_ROOT/aime24_25_capped4096),
# MAX_GEN_TOKS (4096), TASKS (aime24,aime25), LOG_DIR, BATCH_SIZE (1), DEVICE, TIMEOUT (e.g. 240m), SEED, DTYPE,
# LIMIT, DATA_DIR (DATA_DIR/aime24/test.jsonl ...), INCLUDE_PATH, SERVER_URL, CHAT, BASE_NAME (default the first).
# Writes RUN_DIR/NAME/seed$SEED/ and RUN_DIR/summary/{table3.md,table3.csv,summary.csv} (per task:
# <task>_mean and <task>_delta_vs_base).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib_downstream.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

[[ -z "${GPU_ID:-}" ]] || export CUDA_VISIBLE_DEVICES=$GPU_ID
MAX_GEN_TOKS=${MAX_GEN_TOKS:-4096}
ta_require_uint MAX_GEN_TOKS "$MAX_GEN_TOKS"
TASKS=${TASKS:-aime24,aime25}
ta_eval_setup aime24_25_capped4096
rc=0
ta_eval_queue "$TASKS" --gen-kwargs "max_gen_toks=$MAX_GEN_TOKS" || rc=$?
ta_eval_summary
exit "$rc"
