#!/usr/bin/env bash
# HF -> torch_dist conversion of one checkpoint, run by convert_hf_to_torch_dist; the release's per-model scripts
# (convert_qwen3_1_7b_to_torch_dist.sh, convert_qwen3_4b_to_torch_dist.sh) call it with MODEL_NAME set.
# (slime.backends.megatron_utils.convert_cli; extra megatron; docs/scaling.md).
#
# Usage:
#   HF_MODEL=/path/model SAVE_DIR=/path/model_torch_dist bash scripts/convert/convert_hf_to_torch_dist.sh
#
# HF_MODEL: the HF checkpoint; SAVE_DIR: the torch_dist output (an existing one is refused unless FORCE=1, which moves
# it aside to SAVE_DIR.bak.<date>_<time>); CHECK_ONLY=1 checks the inputs and that the converter imports, then exits;
# DTYPE (default: the checkpoint's own); MODEL_NAME names the model in messages. The release's NPROC_PER_NODE, MASTER_PORT, MEGATRON_LM_DIR and
# EXTRA_MEGATRON_ARGS are not needed (one process converts; no Megatron-LM checkout) and are ignored.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"
ta_exit_on_help "${BASH_SOURCE[0]}" "$@"
[[ -z "${PYTHON:-}" && -n "${PY:-}" ]] && PYTHON=$PY
ta_require_flag FORCE CHECK_ONLY
: "${HF_MODEL:?set HF_MODEL to the HF checkpoint directory of ${MODEL_NAME:-the model}}"
: "${SAVE_DIR:?set SAVE_DIR to the torch_dist output directory}"
ta_require_path HF_MODEL "$HF_MODEL" dir
if [[ -e "$SAVE_DIR" ]]; then
  ((FORCE)) || ta_die "SAVE_DIR=$SAVE_DIR already exists; FORCE=1 moves it aside and converts again"
  backup="$SAVE_DIR.bak.$(date +%Y%m%d_%H%M%S)"
  ta_log "SAVE_DIR exists: moving it to $backup"
  mv -- "$SAVE_DIR" "$backup"
fi
export PYTHONPATH="$TA_OPD_REPO_ROOT/slime_ta_opd:$TA_OPD_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$(ta_python)" -c "import slime.backends.megatron_utils.convert_cli" \
  || ta_die "the converter does not import (pip install -e '.[megatron]')"
if ((CHECK_ONLY)); then
  ta_log "CHECK_ONLY=1: inputs and converter checked; nothing converted"
  exit 0
fi
"$(ta_python)" -m slime.backends.megatron_utils.convert_cli --hf-checkpoint "$HF_MODEL" \
  --save "$SAVE_DIR" ${DTYPE:+--dtype "$DTYPE"}
ta_log "converted: $SAVE_DIR ($(cat "$SAVE_DIR/latest_checkpointed_iteration.txt" 2> /dev/null || echo '?'))"
