#!/usr/bin/env bash
# TA-OPD + Entropy: soft-OR of entropy and learnable disagreement (ca_softor) — one run through scripts/train/run_method_suite.sh.
#
# Usage:
#   bash scripts/train/run_ta_opd_entropy.sh
#   RATIO=0.05 IDX=7 NUM_ROLLOUT=50 bash scripts/train/run_ta_opd_entropy.sh -- --extra-slime-flag value
#
# Every other environment variable of run_method_suite.sh applies (TEACHER_MODEL, STUDENT_HF, ...).
set -euo pipefail
# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
ta_run_single_method teachability_entropy ta_opd_entropy "$@"
