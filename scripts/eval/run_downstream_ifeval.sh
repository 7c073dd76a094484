#!/usr/bin/env bash
# The ifeval entry of the Table-3 benchmarks: run_downstream_benchmark.sh with BENCHMARK=ifeval (same knobs).
#
# Usage:
#   MODELS="base=/m/Qwen3-1.7B ta_opd_r0.1_s0=/runs/ta_opd_merged" bash scripts/eval/run_downstream_ifeval.sh
set -euo pipefail

BENCHMARK=ifeval exec bash "$(dirname "${BASH_SOURCE[0]}")/run_downstream_benchmark.sh" "$@"
