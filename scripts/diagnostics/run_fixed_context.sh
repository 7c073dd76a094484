#!/usr/bin/env bash
# Fixed-context diagnostic (docs/method.md §6), one command:
#   context bank → short OPD run per selector (from θ0) → full-vocabulary eval of θ0 and each θτ
#   against the teacher on the same contexts → gain analysis, matched top-N, support robustness,
#   within-region analysis → OUTPUT_DIR/report/REPORT.md
#
# Usage:
#   bash scripts/diagnostics/run_fixed_context.sh                 # embedded task, CPU, small sizes
#   PROFILE=release TEACHER_MODEL=/path/teacher-hf STUDENT_HF=/path/student-hf PROMPT_DATA=/path/train.jsonl \
#     DEVICE=cuda bash scripts/diagnostics/run_fixed_context.sh    # release sizes (300 contexts × 192 tokens)
#
# Every path and size is an environment variable (defaults below; PROFILE=embedded|release picks the sizes);
# DRY_RUN=1 prints the settings and exits. EMBEDDED_FAST=1: the smallest embedded assets (--recipe fast-test).
# An OUTPUT_DIR that already holds output is refused (its results would mix with the new ones) unless
# RESUME=1 — the same settings (OUTPUT_DIR/settings.txt) continue: steps whose outputs exist are skipped and
# the eval step resumes chunk by chunk; other settings are refused — or FORCE=1, which moves the old
# OUTPUT_DIR aside to OUTPUT_DIR.replaced-<date>_<time>. Only processes this script starts are stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../lib/common.sh
source "${ROOT}/scripts/lib/common.sh"
PYTHON="${PYTHON:-${PY:-python}}" # PY: the release's name of the interpreter
PROFILE="${PROFILE:-embedded}"
export PYTHONPATH="${ROOT}/slime_ta_opd:${ROOT}${PYTHONPATH:+:${PYTHONPATH}}" # the tools import ta_opd and slime

if [[ "${PROFILE}" == "release" ]]; then
  : "${TEACHER_MODEL:?set TEACHER_MODEL (teacher HF checkpoint)}"
  : "${STUDENT_HF:?set STUDENT_HF (student HF checkpoint, θ0)}"
  : "${PROMPT_DATA:?set PROMPT_DATA (prompt JSONL)}"
  NUM_CONTEXTS="${NUM_CONTEXTS:-300}"
  RESPONSE_TOKENS="${RESPONSE_TOKENS:-192}"
  NUM_ROLLOUT="${NUM_ROLLOUT:-20}"
  ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-32}"
  N_SAMPLES_PER_PROMPT="${N_SAMPLES_PER_PROMPT:-4}"
  MAX_RESPONSE_LEN="${MAX_RESPONSE_LEN:-1024}"
  BOOTSTRAP="${BOOTSTRAP:-1000}"
  CONTEXTS_PER_CHUNK="${CONTEXTS_PER_CHUNK:-8}"
  CHUNK_TOKENS="${CHUNK_TOKENS:-512}"
  LR="${LR:-1e-6}"
elif [[ "${PROFILE}" == "embedded" ]]; then
  if [[ -z "${TEACHER_MODEL:-}" || -z "${STUDENT_HF:-}" || -z "${PROMPT_DATA:-}" ]]; then
    ASSET_FLAGS=()
    [[ "${EMBEDDED_FAST:-0}" == "1" ]] && ASSET_FLAGS+=(--recipe fast-test)
    TEACHER_MODEL="${TEACHER_MODEL:-$("${PYTHON}" -m slime.embedded.assets "${ASSET_FLAGS[@]}" --print teacher_dir)}"
    STUDENT_HF="${STUDENT_HF:-$("${PYTHON}" -m slime.embedded.assets "${ASSET_FLAGS[@]}" --print student_dir)}"
    PROMPT_DATA="${PROMPT_DATA:-$("${PYTHON}" -m slime.embedded.assets "${ASSET_FLAGS[@]}" --print train_jsonl)}"
  fi
  NUM_CONTEXTS="${NUM_CONTEXTS:-48}"
  RESPONSE_TOKENS="${RESPONSE_TOKENS:-32}"
  NUM_ROLLOUT="${NUM_ROLLOUT:-6}"
  ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-16}"
  N_SAMPLES_PER_PROMPT="${N_SAMPLES_PER_PROMPT:-2}"
  MAX_RESPONSE_LEN="${MAX_RESPONSE_LEN:-48}"
  BOOTSTRAP="${BOOTSTRAP:-1000}"
  CONTEXTS_PER_CHUNK="${CONTEXTS_PER_CHUNK:-16}"
  CHUNK_TOKENS="${CHUNK_TOKENS:-1024}"
  LR="${LR:-1e-4}"
else
  echo "PROFILE must be embedded or release, got '${PROFILE}'" >&2
  exit 2
fi

OUTPUT_DIR="${OUTPUT_DIR:-${ROOT}/outputs/fixed_context_${PROFILE}}"
DEVICE="${DEVICE:-cpu}"
TOPK="${TOPK:-16}"
SUPPORT_KS="${SUPPORT_KS:-8,16,32}"
EXACT_CMASS="${EXACT_CMASS:-1}"
SEED="${SEED:-0}"
# alias_or_mask:budget_ratio; pure_opd gives a full-OPD θτ for reference.
METHOD_LIST="${METHOD_LIST:-teachability:0.10 divergence:0.10 tip:0.10 entropy:0.10 random:0.10}"
TOPN_SELECTORS="${TOPN_SELECTORS:-teachability,divergence,tip,entropy,random,teachability_entropy}"
TOPN_BUDGETS="${TOPN_BUDGETS:-0.01,0.03,0.10}"
read -r -a TRAIN_EXTRA_ARGS <<< "${TRAIN_EXTRA_ARGS:-}"

# Rerun policy: every setting that shapes an output is recorded; only the same settings may be resumed.
SETTINGS="$(printf '%s\n' "PROFILE=${PROFILE}" "TEACHER_MODEL=${TEACHER_MODEL}" "STUDENT_HF=${STUDENT_HF}" \
  "PROMPT_DATA=${PROMPT_DATA}" "NUM_CONTEXTS=${NUM_CONTEXTS}" "RESPONSE_TOKENS=${RESPONSE_TOKENS}" \
  "NUM_ROLLOUT=${NUM_ROLLOUT}" "ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE}" "N_SAMPLES_PER_PROMPT=${N_SAMPLES_PER_PROMPT}" \
  "MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN}" "LR=${LR}" "SEED=${SEED}" "TOPK=${TOPK}" "EXACT_CMASS=${EXACT_CMASS}" \
  "METHOD_LIST=${METHOD_LIST}" "TRAIN_EXTRA_ARGS=${TRAIN_EXTRA_ARGS[*]}")"
ta_require_flag RESUME FORCE DRY_RUN
if ((DRY_RUN)); then # DRY_RUN=1: the settings this run would use, then exit (nothing built, trained or written)
  printf '%s\n' "${SETTINGS}" "OUTPUT_DIR=${OUTPUT_DIR}"
  exit 0
fi
((RESUME && FORCE)) && ta_die "RESUME=1 and FORCE=1 together: RESUME continues ${OUTPUT_DIR}, FORCE starts afresh; pick one"
[[ ! -e "${OUTPUT_DIR}" || -d "${OUTPUT_DIR}" ]] || ta_die "OUTPUT_DIR=${OUTPUT_DIR} exists and is not a directory"
if [[ -d "${OUTPUT_DIR}" && -n "$(ls -A "${OUTPUT_DIR}")" ]]; then
  if ((FORCE)); then
    ta_log "FORCE=1: moved the earlier OUTPUT_DIR to $(ta_move_aside "${OUTPUT_DIR}"); starting fresh"
  elif ((RESUME)); then
    [[ -f "${OUTPUT_DIR}/settings.txt" ]] \
      || ta_die "RESUME=1: OUTPUT_DIR=${OUTPUT_DIR} has no settings.txt, so its outputs cannot be shown to come from" \
        "these settings; FORCE=1 moves it aside and starts fresh"
    if ! printf '%s\n' "${SETTINGS}" | cmp -s - "${OUTPUT_DIR}/settings.txt"; then
      ta_die "RESUME=1: OUTPUT_DIR=${OUTPUT_DIR} was made with other settings ($(printf '%s\n' "${SETTINGS}" \
        | diff "${OUTPUT_DIR}/settings.txt" - | sed -n 's/^> //p' | paste -sd ' ')); resuming would mix their" \
        "outputs. Restore those settings, FORCE=1 (moves it aside), or another OUTPUT_DIR"
    fi
    ta_log "RESUME=1: continuing ${OUTPUT_DIR}"
  else
    ta_die "OUTPUT_DIR=${OUTPUT_DIR} already holds outputs of an earlier run; running again would mix them with the" \
      "new ones. RESUME=1 continues it (same settings only), FORCE=1 moves it aside to" \
      "${OUTPUT_DIR}.replaced-<date>_<time> and starts fresh; or choose another OUTPUT_DIR"
  fi
fi
mkdir -p "${OUTPUT_DIR}"
printf '%s\n' "${SETTINGS}" > "${OUTPUT_DIR}/settings.txt"
CONTEXTS="${OUTPUT_DIR}/contexts.jsonl"
EVAL_DIR="${OUTPUT_DIR}/eval"
REPORT_DIR="${OUTPUT_DIR}/report"

CHILD_PID=""
cleanup() {
  if [[ -n "${CHILD_PID}" ]] && kill -0 "${CHILD_PID}" 2>/dev/null; then
    kill "${CHILD_PID}" 2>/dev/null || true
    wait "${CHILD_PID}" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

run() {  # run a child in the background so that the trap can stop exactly it
  echo "+ $*" >&2
  "$@" &
  CHILD_PID=$!
  wait "${CHILD_PID}"
  CHILD_PID=""
}

echo "[fixed-context] profile=${PROFILE} teacher=${TEACHER_MODEL} student=${STUDENT_HF} out=${OUTPUT_DIR}" >&2

# 1. Context bank: frozen student rollouts (prompt + first RESPONSE_TOKENS response tokens).
if [[ ! -s "${CONTEXTS}" ]]; then
  run "${PYTHON}" "${ROOT}/tools/export_fixed_context_bank.py" --student "${STUDENT_HF}" --prompts "${PROMPT_DATA}" \
    --out "${CONTEXTS}" --num-contexts "${NUM_CONTEXTS}" --response-tokens "${RESPONSE_TOKENS}" \
    --seed "${SEED}" --shuffle-prompts --device "${DEVICE}"
fi

# 2. One short OPD run per selector, each from θ0; θτ = the final HF weights.
EXACT_ARGS=()
[[ "${EXACT_CMASS}" == "1" ]] && EXACT_ARGS+=(--opd-exact-cmass)
STUDENT_ARGS=(--student "theta0=${STUDENT_HF}")
for item in ${METHOD_LIST}; do
  method="${item%%:*}"
  ratio="${item##*:}"
  mask="$("${PYTHON}" -c "from ta_opd.aliases import resolve_alias; print(resolve_alias('${method}'))")"
  run_dir="${OUTPUT_DIR}/runs/${method}"
  ckpt="${run_dir}/ckpt"
  if [[ ! -f "${ckpt}/latest_checkpointed_iteration.txt" ]]; then
    TRAIN_ARGS=(
      --hf-checkpoint "${STUDENT_HF}" --prompt-data "${PROMPT_DATA}" --input-key prompt --apply-chat-template
      --num-rollout "${NUM_ROLLOUT}" --rollout-batch-size "${ROLLOUT_BATCH_SIZE}"
      --n-samples-per-prompt "${N_SAMPLES_PER_PROMPT}" --rollout-max-response-len "${MAX_RESPONSE_LEN}"
      --rollout-seed "${SEED}" --seed "${SEED}" --lr "${LR}"
    )
    OPD_ARGS=(
      --use-opd --opd-type sglang --opd-teacher-hf-checkpoint "${TEACHER_MODEL}" --opd-kl-coef 1.0
      --opd-budget-mask "${mask}" --opd-budget-ratio "${ratio}" --opd-topk-metrics-k "${TOPK}" "${EXACT_ARGS[@]}"
    )
    SAVE_ARGS=(--save "${ckpt}" --save-interval "${NUM_ROLLOUT}" --no-save-optim --output-dir "${run_dir}")
    run "${PYTHON}" "${ROOT}/slime_ta_opd/train.py" "${TRAIN_ARGS[@]}" "${OPD_ARGS[@]}" "${SAVE_ARGS[@]}" \
      "${TRAIN_EXTRA_ARGS[@]}"
  fi
  iter="$(tr -d '[:space:]' < "${ckpt}/latest_checkpointed_iteration.txt")"
  final="${ckpt}/$(printf 'iter_%07d' "${iter}")/model"
  [[ -d "${final}" ]] || { echo "no final HF weights at ${final}" >&2; exit 1; }
  STUDENT_ARGS+=(--student "${method}=${final}")
done

# 3. Full-vocabulary fixed-context evaluation of θ0 and every θτ against the teacher (resumable).
run "${PYTHON}" "${ROOT}/tools/eval_fixed_context_bank.py" --contexts "${CONTEXTS}" --teacher "${TEACHER_MODEL}" \
  "${STUDENT_ARGS[@]}" --out-dir "${EVAL_DIR}" --k "${TOPK}" --support-ks "${SUPPORT_KS}" \
  --contexts-per-chunk "${CONTEXTS_PER_CHUNK}" --chunk-tokens "${CHUNK_TOKENS}" --device "${DEVICE}"

# 4. Analysis and report.
STATS="${EVAL_DIR}/token_stats.parquet"
COMMON=(--stats "${STATS}" --out-dir "${REPORT_DIR}" --k "${TOPK}" --bootstrap "${BOOTSTRAP}" --seed "${SEED}")
[[ "${EXACT_CMASS}" == "1" ]] || COMMON+=(--no-exact-c)
run "${PYTHON}" "${ROOT}/tools/analyze_fixed_context_gain.py" "${COMMON[@]}"
run "${PYTHON}" "${ROOT}/tools/matched_fixed_context_topn.py" "${COMMON[@]}" --selectors "${TOPN_SELECTORS}" \
  --budgets "${TOPN_BUDGETS}"
run "${PYTHON}" "${ROOT}/tools/support_definition_robustness.py" "${COMMON[@]}" --ks "${SUPPORT_KS}"
run "${PYTHON}" "${ROOT}/tools/within_region_analysis.py" "${COMMON[@]}"

{
  echo "# Fixed-context diagnostic report (${PROFILE})"
  echo
  echo "Teacher \`${TEACHER_MODEL}\`, θ0 \`${STUDENT_HF}\`; $(wc -l < "${CONTEXTS}") contexts × ≤ ${RESPONSE_TOKENS} tokens;"
  echo "runs: ${METHOD_LIST} (${NUM_ROLLOUT} rollouts each); K = ${TOPK}; exact C = ${EXACT_CMASS}."
  echo
  for part in matched_topn.md gain_report.md support_robustness.md within_region.md; do
    sed -e 's/^## /### /' -e 's/^# /## /' "${REPORT_DIR}/${part}"
    echo
  done
} > "${REPORT_DIR}/REPORT.md.tmp"
mv "${REPORT_DIR}/REPORT.md.tmp" "${REPORT_DIR}/REPORT.md"
echo "[fixed-context] report: ${REPORT_DIR}/REPORT.md" >&2
