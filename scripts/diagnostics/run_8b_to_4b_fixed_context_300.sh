#!/usr/bin/env bash
# The release's qwen3_8b_to_qwen3_4b fixed-context diagnostic driver (8b_to_4b): preset over scripts/diagnostics/run_fixed_context.sh.
# Usage: TEACHER_MODEL=/path/teacher STUDENT_HF=/path/student PROMPT_DATA=/path/prompts.jsonl bash scripts/diagnostics/run_8b_to_4b_fixed_context_300.sh
# (unset models: the embedded task at CPU sizes). Preset and variables: scripts/diagnostics/pair_fixed_context.sh.
set -euo pipefail

PAIR=8b_to_4b PAIR_SEED=84317 PAIR_ID=qwen3_8b_to_qwen3_4b source "$(dirname "${BASH_SOURCE[0]}")/pair_fixed_context.sh" "$@"
