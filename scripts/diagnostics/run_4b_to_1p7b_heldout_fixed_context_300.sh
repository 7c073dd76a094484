#!/usr/bin/env bash
# The release's qwen3_4b_to_qwen3_1p7b_heldout fixed-context diagnostic driver (heldout_4b_to_1p7b): preset over scripts/diagnostics/run_fixed_context.sh.
# Usage: TEACHER_MODEL=/path/teacher STUDENT_HF=/path/student PROMPT_DATA=/path/prompts.jsonl bash scripts/diagnostics/run_4b_to_1p7b_heldout_fixed_context_300.sh
# Contexts from held-out prompts: PROMPT_DATA (or the release name HELDOUT_DATA) = prompts not used in training.
# (unset models: the embedded task at CPU sizes). Preset and variables: scripts/diagnostics/pair_fixed_context.sh.
set -euo pipefail

export PROMPT_DATA=${PROMPT_DATA:-${HELDOUT_DATA:-}} # HELDOUT_DATA: the release name of the prompt set
PAIR=heldout_4b_to_1p7b PAIR_SEED=41717 PAIR_ID=qwen3_4b_to_qwen3_1p7b_heldout source "$(dirname "${BASH_SOURCE[0]}")/pair_fixed_context.sh" "$@"
