#!/usr/bin/env bash
# TA-OPD: learnable disagreement (dlearn_high) — one run through scripts/train/run_method_suite.sh.
#
# Usage:
#   bash scripts/train/run_ta_opd.sh
#   RATIO=0.05 IDX=7 NUM_ROLLOUT=50 bash scripts/train/run_ta_opd.sh -- --extra-slime-flag value
#
# Every other environment variable of run_method_suite.sh applies (TEACHER_MODEL, STUDENT_HF, ...).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
RATIO=${RATIO:-0.10}
IDX=${IDX:-0}
METHOD_LIST="teachability:$RATIO:$IDX" SUITE_NAME=${SUITE_NAME:-ta_opd_$(date +%Y%m%d_%H%M%S)} \
  exec bash "$SCRIPT_DIR/run_method_suite.sh" "$@"
