#!/usr/bin/env bash
# Held-out task accuracy of a HF checkpoint (or a train.py --save directory), no server needed.
#
# Usage:
#   bash scripts/eval/eval_accuracy.sh MODEL_DIR [EVAL_JSONL] [OUT_JSON]
#   EVAL_TEMPERATURE=1.0 EVAL_SEED=3 bash scripts/eval/eval_accuracy.sh outputs/.../checkpoints
#
# EVAL_JSONL defaults to $EVAL_PROMPT_DATA, else the embedded held-out prompts. Knobs:
# EVAL_TEMPERATURE (0 = greedy), EVAL_SEED, EVAL_BATCH_SIZE, EVAL_MAX_RESPONSE_LEN, EVAL_LIMIT,
# INPUT_KEY, LABEL_KEY. Writes OUT_JSON (default MODEL_DIR/../eval_accuracy.json when given a run's
# checkpoints dir) via tools/eval_task_accuracy.py.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  ta_print_usage "${BASH_SOURCE[0]}"
  [[ $# -lt 1 ]] && exit 2
  exit 0
fi

MODEL=$1
ta_require_path MODEL "$MODEL" dir
EVAL_JSONL=${2:-${EVAL_PROMPT_DATA:-}}
[[ -n "$EVAL_JSONL" ]] || EVAL_JSONL=$(ta_embedded_asset eval_jsonl)
ta_require_path EVAL_JSONL "$EVAL_JSONL" file
OUT_JSON=${3:-}

EVAL_ARGS=(
  --model "$MODEL"
  --data "$EVAL_JSONL"
  --input-key "${INPUT_KEY:-prompt}"
  --label-key "${LABEL_KEY:-label}"
  --temperature "${EVAL_TEMPERATURE:-0.0}"
  --seed "${EVAL_SEED:-0}"
  --batch-size "${EVAL_BATCH_SIZE:-256}"
  --max-new-tokens "${EVAL_MAX_RESPONSE_LEN:-32}"
)
[[ -n "${EVAL_LIMIT:-}" ]] && EVAL_ARGS+=(--limit "$EVAL_LIMIT")
[[ -n "$OUT_JSON" ]] && EVAL_ARGS+=(--out "$OUT_JSON")

export PYTHONPATH="$TA_OPD_REPO_ROOT/slime_ta_opd:$TA_OPD_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" # the tool imports slime
exec "$(ta_python)" "$TA_OPD_REPO_ROOT/tools/eval_task_accuracy.py" "${EVAL_ARGS[@]}"
