#!/usr/bin/env bash
# The release's qwen3_4b_to_qwen3_1p7b_gsm8k fixed-context diagnostic driver (gsm8k_4b_to_1p7b): preset over scripts/diagnostics/run_fixed_context.sh.
# Usage: TEACHER_MODEL=/path/teacher STUDENT_HF=/path/student PROMPT_DATA=/path/prompts.jsonl bash scripts/diagnostics/run_4b_to_1p7b_gsm8k_fixed_context_300.sh
# Contexts from GSM8K prompts: PROMPT_DATA (or the release name GSM8K_DATA) = a GSM8K prompt JSONL.
# (unset models: the embedded task at CPU sizes). Preset and variables: scripts/diagnostics/pair_fixed_context.sh.
set -euo pipefail

export PROMPT_DATA=${PROMPT_DATA:-${GSM8K_DATA:-}} # GSM8K_DATA: the release name of the prompt set
PAIR=gsm8k_4b_to_1p7b PAIR_SEED=41717 PAIR_ID=qwen3_4b_to_qwen3_1p7b_gsm8k source "$(dirname "${BASH_SOURCE[0]}")/pair_fixed_context.sh" "$@"
