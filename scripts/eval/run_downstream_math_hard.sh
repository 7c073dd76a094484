#!/usr/bin/env bash
# MATH-hard (lm-eval's leaderboard_math_hard group, seven subjects) for each checkpoint of MODELS, then the
# summary: the group score and each subject, with the delta vs the base entry.
#
# Usage:
#   MODELS="base_qwen3_1p7b=/m/Qwen3-1.7B tip_r0.03_s2=/runs/tip_merged" bash scripts/eval/run_downstream_math_hard.sh
#
# Knobs (the release's names): TASK (leaderboard_math_hard), BATCH_SIZE (4), RUN_DIR (default OUT_ROOT/math_hard),
# LOG_DIR, DEVICE, TIMEOUT, SEED, DTYPE, LIMIT, DATA_DIR (DATA_DIR/<subject task>/test.jsonl), INCLUDE_PATH,
# SERVER_URL, CHAT, BASE_NAME. Samples are logged (--log-samples), as in the release.
# Writes RUN_DIR/NAME/seed$SEED/ and RUN_DIR/summary/{table3.md,table3.csv,summary.csv}.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib_downstream.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

BATCH_SIZE=${BATCH_SIZE:-4}
TASK=${TASK:-leaderboard_math_hard}
LOG_SAMPLES=${LOG_SAMPLES:-1}
ta_eval_setup math_hard
rc=0
ta_eval_queue "$TASK" || rc=$?
SUBJECTS=()
if [[ "$TASK" == leaderboard_math_hard ]]; then
  for s in algebra counting_and_prob geometry intermediate_algebra num_theory prealgebra precalculus; do
    SUBJECTS+=("leaderboard_math_${s}_hard")
  done
  ta_eval_summary --benchmarks MATH-hard "${SUBJECTS[@]}"
else
  ta_eval_summary
fi
exit "$rc"
