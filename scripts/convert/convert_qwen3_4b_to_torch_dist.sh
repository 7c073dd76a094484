#!/usr/bin/env bash
# The release's Qwen3-4B HF -> torch_dist conversion (same name and variables): convert_hf_to_torch_dist.sh with
# MODEL_NAME=Qwen3-4B; its header lists the variables (HF_MODEL, SAVE_DIR, FORCE, CHECK_ONLY, DTYPE).
#
# Usage:
#   HF_MODEL=/path/Qwen3-4B SAVE_DIR=/path/Qwen3-4B_torch_dist bash scripts/convert/convert_qwen3_4b_to_torch_dist.sh
set -euo pipefail
# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"
MODEL_NAME=Qwen3-4B exec bash "$(dirname "${BASH_SOURCE[0]}")/convert_hf_to_torch_dist.sh" "$@"
