#!/usr/bin/env bash
# The body of the release's per-pair fixed-context drivers (run_<teacher>_to_<student>_fixed_context_300.sh):
# their preset (PAIR, PAIR_SEED, PAIR_ID; a prompt set for the GSM8K / held-out pairs) over
# scripts/diagnostics/run_fixed_context.sh. Sourced by those drivers, not run directly.
#
# With TEACHER_MODEL / STUDENT_HF set (the pair's real models) the release's sizes apply (PROFILE=release): 300
# contexts of 192 response tokens, one full-OPD run (METHOD_LIST=pure_opd:1.0) of NUM_ROLLOUT=151 rollouts of
# ROLLOUT_BATCH_SIZE=2 prompts × N_SAMPLES_PER_PROMPT=1, MAX_RESPONSE_LEN=256, SEED=PAIR_SEED; without them the
# embedded task at CPU sizes. OUTPUT_DIR defaults to DIAG_DIR, else $STORY_ROOT/<PAIR>_diag300 (STORY_ROOT default
# $OUTPUT_ROOT/analysis/scale_context_robustness, OUTPUT_ROOT default outputs/). PY names the interpreter.
set -euo pipefail

: "${PAIR:?set by the pair driver}" "${PAIR_SEED:?set by the pair driver}" "${PAIR_ID:?set by the pair driver}"
if [[ -n "${TEACHER_MODEL:-}" || -n "${STUDENT_HF:-}" ]]; then
  export PROFILE=${PROFILE:-release}
fi
if [[ "${PROFILE:-embedded}" == release ]]; then
  export NUM_CONTEXTS=${NUM_CONTEXTS:-300} RESPONSE_TOKENS=${RESPONSE_TOKENS:-192} NUM_ROLLOUT=${NUM_ROLLOUT:-151}
  export ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-2} N_SAMPLES_PER_PROMPT=${N_SAMPLES_PER_PROMPT:-1}
  export MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-256} METHOD_LIST=${METHOD_LIST:-pure_opd:1.0}
fi
export SEED=${SEED:-$PAIR_SEED}
[[ -z "${PY:-}" || -n "${PYTHON:-}" ]] || export PYTHON=$PY
STORY_ROOT=${STORY_ROOT:-${OUTPUT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/outputs}/analysis/scale_context_robustness}
export OUTPUT_DIR=${OUTPUT_DIR:-${DIAG_DIR:-$STORY_ROOT/${PAIR}_diag300}}
echo "[fixed-context] pair $PAIR_ID (seed $SEED): $OUTPUT_DIR" >&2
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_fixed_context.sh" "$@"
