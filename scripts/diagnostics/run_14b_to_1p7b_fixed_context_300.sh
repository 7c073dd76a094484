#!/usr/bin/env bash
# The release's qwen3_14b_to_qwen3_1p7b fixed-context diagnostic driver (14b_to_1p7b): preset over scripts/diagnostics/run_fixed_context.sh.
# Usage: TEACHER_MODEL=/path/teacher STUDENT_HF=/path/student PROMPT_DATA=/path/prompts.jsonl bash scripts/diagnostics/run_14b_to_1p7b_fixed_context_300.sh
# (unset models: the embedded task at CPU sizes). Preset and variables: scripts/diagnostics/pair_fixed_context.sh.
set -euo pipefail

PAIR=14b_to_1p7b PAIR_SEED=14317 PAIR_ID=qwen3_14b_to_qwen3_1p7b source "$(dirname "${BASH_SOURCE[0]}")/pair_fixed_context.sh" "$@"
