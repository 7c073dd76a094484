#!/usr/bin/env bash
# Train one self-distillation method (OPSD, PW-OPSD, EOPD or REOPOLD; docs/method.md §7) with the torch trainer.
#
# Usage:
#   bash scripts/run_self_distillation.sh                          # METHOD=pwopsd, embedded defaults (CPU)
#   METHOD=opsd NUM_ROLLOUT=50 bash scripts/run_self_distillation.sh
#   METHOD=reopold STUDENT_HF=/path/to/student-hf PROMPT_DATA=/path/to/train.jsonl \
#     bash scripts/run_self_distillation.sh -- --extra-slime-flag value
#   METHOD=pwopsd OPD_BUDGET_MASK=teachability OPD_BUDGET_RATIO=0.3 bash scripts/run_self_distillation.sh
#   MODEL=/models/Qwen3-1.7B PWOPSD_TRAIN_DATASET=/data/train.jsonl SEED=0 bash scripts/run_self_distillation.sh
#   bash scripts/run_self_distillation.sh --help
#
# METHOD: opsd | pwopsd | eopd | reopold (the --loss-type; hyper-parameters: the parser's defaults,
# docs/method.md §7, overridable through EXTRA_ARGS, e.g. "--pwopsd-w-min 0.1").
# Teacher: TEACHER_MODEL unset → self-distillation (the student's own base weights on the privileged
# prompt "--sd-teacher-prompt-template", SD_TEACHER_PROMPT_TEMPLATE here); TEACHER_MODEL=DIR → that
# fixed teacher, loaded in the trainer, on the student's prompt. LORA_RANK > 0 (default: 8 embedded,
# 64 cluster; LORA_ALPHA = 2 × rank) trains a LoRA adapter and the self-distillation teacher is the
# adapter-disabled model; LORA_RANK=0 trains every weight and keeps a frozen copy as the teacher.
# Token selection: OPD_BUDGET_MASK (default full: no selection) and OPD_BUDGET_RATIO pick a TA-OPD
# selector (a mask name or a method-suite alias); the rollout then scores a teacher server (the same
# teacher, the same privileged prompt) and the loss runs on the selected tokens only.
# Same conventions as scripts/train/run_method_suite.sh: OUTPUT_ROOT, STUDENT_HF, TEACHER_MODEL,
# PROMPT_DATA, EVAL_PROMPT_DATA, NUM_ROLLOUT, SEED, EXTRA_ARGS, PROFILE (embedded | cluster),
# EMBEDDED_RECIPE, ASSETS_CACHE_DIR; the PW-OPSD release's names work too: MODEL (= STUDENT_HF) and
# PWOPSD_TRAIN_DATASET (= PROMPT_DATA). Runs are named {model_tag}_{method} as in the release (MODEL_TAG: the
# student directory's name, lower-cased; "_s<SEED>" is added when SEED is set), or RUN_NAME. A directory that
# already holds a run is refused unless FORCE=1 (moved aside, never deleted).
# Evaluation flow of the release: checkpoints every SAVE_INTERVAL steps (25) under $RUN_DIR/checkpoints, then
# the checkpoint EVAL_CHECKPOINT (100 on a cluster, the last one on the embedded defaults; "latest" or a step)
# is written as the plain HF model $RUN_DIR_merged with a .ready_for_eval sentinel (prepare_eval_checkpoint:
# the LoRA adapter is already merged into the saved weights); PREPARE_EVAL=0 skips it. Evaluate it with
# scripts/eval/run_downstream_*.sh or tools/eval_math.py (docs/evaluation.md).
# Output: $OUTPUT_ROOT/$RUN_NAME/{train_args.txt, train.log, metrics.jsonl, launcher.json, checkpoints/} and
# $OUTPUT_ROOT/${RUN_NAME}_merged/. Every input is checked before anything starts (exit 2 on a bad one).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
REPO_ROOT=$TA_OPD_REPO_ROOT

ta_exit_on_help "${BASH_SOURCE[0]}" "$@"
[[ "${1:-}" == "--" ]] && shift
CLI_EXTRA_ARGS=("$@") # anything after "--" goes to train.py, like EXTRA_ARGS

PYTHON=$(ta_python)

# ---------------------------------------------------------------- what to run
METHODS="opsd pwopsd eopd reopold"
METHOD=${METHOD:-pwopsd}
[[ " $METHODS " == *" $METHOD "* ]] || ta_die "METHOD=$METHOD: expected one of: $METHODS"
OPD_BUDGET_MASK=${OPD_BUDGET_MASK:-full}
OPD_BUDGET_RATIO=${OPD_BUDGET_RATIO:-1.0}

# ---------------------------------------------------------------- where things are
SLIME_DIR=${SLIME_DIR:-$REPO_ROOT/slime_ta_opd}
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO_ROOT/outputs/self_distillation}
TEACHER_MODEL=${TEACHER_MODEL:-}
STUDENT_HF=${STUDENT_HF:-${MODEL:-}}                  # MODEL: the release's name
PROMPT_DATA=${PROMPT_DATA:-${PWOPSD_TRAIN_DATASET:-}} # PWOPSD_TRAIN_DATASET: the release's name
EVAL_PROMPT_DATA=${EVAL_PROMPT_DATA:-}
MODEL_SHAPE=${MODEL_SHAPE:-embedded}

ta_require_path SLIME_DIR "$SLIME_DIR" dir
ta_require_path "SLIME_DIR/train.py" "$SLIME_DIR/train.py" file
[[ -f "$REPO_ROOT/scripts/models/$MODEL_SHAPE.sh" ]] || ta_die "MODEL_SHAPE=$MODEL_SHAPE: no scripts/models/$MODEL_SHAPE.sh"
[[ -n "$TEACHER_MODEL" ]] && ta_require_path TEACHER_MODEL "$TEACHER_MODEL" dir
[[ -n "$STUDENT_HF" ]] && ta_require_path STUDENT_HF "$STUDENT_HF" dir
[[ -n "$PROMPT_DATA" ]] && ta_require_path PROMPT_DATA "$PROMPT_DATA" file
[[ -n "$EVAL_PROMPT_DATA" ]] && ta_require_path EVAL_PROMPT_DATA "$EVAL_PROMPT_DATA" file
for name in NUM_ROLLOUT SEED LORA_RANK SAVE_INTERVAL; do
  value=${!name:-}
  [[ -z "$value" || "$value" =~ ^[0-9]+$ ]] || ta_die "$name=$value: expected a non-negative integer"
done
PREPARE_EVAL=${PREPARE_EVAL:-1}
ta_require_flag PREPARE_EVAL FORCE

export PYTHONPATH="$SLIME_DIR:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# Embedded defaults: whatever the user left unset comes from the cached embedded assets.
ta_use_embedded_defaults
ta_require_path STUDENT_HF "$STUDENT_HF" dir
ta_require_path PROMPT_DATA "$PROMPT_DATA" file
MODEL_TAG=${MODEL_TAG:-$(basename "$STUDENT_HF" | tr '[:upper:]' '[:lower:]')}
[[ "$MODEL_TAG" =~ ^[a-z0-9._-]+$ ]] || ta_die "MODEL_TAG=$MODEL_TAG: expected letters, digits, '.', '_', '-' (set MODEL_TAG)"
RUN_NAME=${RUN_NAME:-${MODEL_TAG}_${METHOD}${SEED:+_s$SEED}} # the release's {model_tag}_{method}

# ---------------------------------------------------------------- knobs (embedded defaults | real-model defaults)
if [[ "$PROFILE" == embedded ]]; then
  : "${NUM_ROLLOUT:=24}" "${ROLLOUT_BATCH_SIZE:=32}" "${N_SAMPLES_PER_PROMPT:=2}" "${ROLLOUT_MAX_RESPONSE_LEN:=32}"
  : "${LR:=2e-3}" "${EVAL_INTERVAL:=6}" "${EVAL_MAX_RESPONSE_LEN:=32}" "${LORA_RANK:=8}"
else
  # the release: LoRA r=64 α=128, lr 5e-6, batch 32, 150 steps
  : "${NUM_ROLLOUT:=150}" "${ROLLOUT_BATCH_SIZE:=32}" "${N_SAMPLES_PER_PROMPT:=1}" "${ROLLOUT_MAX_RESPONSE_LEN:=4096}"
  : "${LR:=5e-6}" "${MICRO_BATCH_SIZE:=1}" "${EVAL_INTERVAL:=25}" "${EVAL_MAX_RESPONSE_LEN:=$ROLLOUT_MAX_RESPONSE_LEN}"
  : "${LORA_RANK:=64}"
fi
LORA_ALPHA=${LORA_ALPHA:-$((2 * LORA_RANK))}
SEED=${SEED:-1234}
SAVE_INTERVAL=${SAVE_INTERVAL:-25} # the release's periodic saves
((SAVE_INTERVAL > 0)) || ta_die "SAVE_INTERVAL=0: expected a positive number of steps between checkpoints"
if [[ "$PROFILE" == embedded ]]; then EVAL_CHECKPOINT=${EVAL_CHECKPOINT:-latest}; else EVAL_CHECKPOINT=${EVAL_CHECKPOINT:-100}; fi
[[ "$EVAL_CHECKPOINT" == latest || "$EVAL_CHECKPOINT" =~ ^[1-9][0-9]*$ ]] \
  || ta_die "EVAL_CHECKPOINT=$EVAL_CHECKPOINT: expected a step number (e.g. 100) or 'latest'"
ROLLOUT_SEED=${ROLLOUT_SEED:-42}
ROLLOUT_TEMPERATURE=${ROLLOUT_TEMPERATURE:-1.0}
EVAL_TEMPERATURE=${EVAL_TEMPERATURE:-0.0}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$((ROLLOUT_BATCH_SIZE * N_SAMPLES_PER_PROMPT))}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-$GLOBAL_BATCH_SIZE}
OPD_TOPK_METRICS_K=${OPD_TOPK_METRICS_K:-16}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-label}
EVAL_RM_PATH=${EVAL_RM_PATH:-slime.embedded.task.reward_func}
TRAIN_RM_PATH=${TRAIN_RM_PATH:-$EVAL_RM_PATH} # reward of the training rollouts when OPD_BUDGET_MASK=full
SD_TEACHER_PROMPT_TEMPLATE=${SD_TEACHER_PROMPT_TEMPLATE:-} # unset: the parser's default
EXTRA_ARGS=${EXTRA_ARGS:-}
read -r -a EXTRA_ARGS_ARRAY <<< "$EXTRA_ARGS"

# shellcheck disable=SC1090
source "$REPO_ROOT/scripts/models/$MODEL_SHAPE.sh"

# ---------------------------------------------------------------- flags
CKPT_ARGS=(--hf-checkpoint "$STUDENT_HF")

ta_set_rollout_args # ROLLOUT_ARGS

EVAL_ARGS=()
if [[ "$EVAL_INTERVAL" != 0 ]]; then ta_set_eval_args; fi # EVAL_ARGS; EVAL_INTERVAL=0: no held-out evaluation

SD_ARGS=(--loss-type "$METHOD")
if [[ -z "$TEACHER_MODEL" ]]; then
  SD_ARGS+=(--self-distillation)
  [[ -n "$SD_TEACHER_PROMPT_TEMPLATE" ]] && SD_ARGS+=(--sd-teacher-prompt-template "$SD_TEACHER_PROMPT_TEMPLATE")
  SCORING_TEACHER=$STUDENT_HF # the base weights; the privileged prompt is added by the reward function
else
  SD_ARGS+=(--opd-teacher-hf-checkpoint "$TEACHER_MODEL")
  SCORING_TEACHER=$TEACHER_MODEL
fi
((LORA_RANK > 0)) && SD_ARGS+=(--lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA")

# Without selection the rollout's reward is the task's own (training accuracy in rollout/raw_reward_mean;
# the SD losses do not read it).
SELECT_ARGS=(--custom-rm-path "$TRAIN_RM_PATH")
if [[ "$OPD_BUDGET_MASK" != full ]]; then # token selection needs both top-K lists: a scoring teacher server
  SELECT_ARGS=(
    --use-opd --opd-type sglang
    --custom-rm-path slime.rollout.on_policy_distillation.reward_func
    --custom-reward-post-process-path slime.rollout.on_policy_distillation.post_process_rewards
    --opd-topk-metrics-k "$OPD_TOPK_METRICS_K"
    --opd-budget-mask "$OPD_BUDGET_MASK"
    --opd-budget-ratio "$OPD_BUDGET_RATIO"
  )
  [[ -z "$TEACHER_MODEL" ]] && SELECT_ARGS+=(--opd-teacher-hf-checkpoint "$SCORING_TEACHER")
fi

TRAIN_ARGS=(--train-backend torch --lr "$LR" --micro-batch-size "$MICRO_BATCH_SIZE" --seed "$SEED")

RUN_DIR="$OUTPUT_ROOT/$RUN_NAME"
MERGED_DIR="${RUN_DIR}_merged"
RESUME=0 ta_prepare_output_dir "run directory (RUN_NAME=$RUN_NAME)" "$RUN_DIR"
if [[ -e "$MERGED_DIR" ]]; then
  ((FORCE)) || ta_die "$MERGED_DIR exists (an earlier run's evaluation model); FORCE=1 moves it aside"
  ta_log "FORCE=1: moved the earlier $MERGED_DIR to $(ta_move_aside "$MERGED_DIR")"
fi
CKPT_ARGS+=(--save "$RUN_DIR/checkpoints" --save-interval "$SAVE_INTERVAL")
mkdir -p "$RUN_DIR"
ARGS=(
  "${CKPT_ARGS[@]}" "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}" "${SD_ARGS[@]}" "${SELECT_ARGS[@]}"
  "${TRAIN_ARGS[@]}" --output-dir "$RUN_DIR" "${EXTRA_ARGS_ARRAY[@]}" "${CLI_EXTRA_ARGS[@]}"
)
printf '%s\n' "${ARGS[@]}" > "$RUN_DIR/train_args.txt" # one argument per line: the exact command, reusable

# Parse the flags with the stack's own parser (unknown flag, bad value, missing file) before starting.
ta_check_train_args "$RUN_DIR/train_args.txt" || ta_die "the train.py flags are invalid (see above); nothing was started"

ta_log "$METHOD: $RUN_DIR (teacher: ${TEACHER_MODEL:-self, base weights of $STUDENT_HF}; mask $OPD_BUDGET_MASK)"
start=$(date +%s.%N)
rc=0
ta_run_tracked "$RUN_DIR/train.log" "$PYTHON" "$SLIME_DIR/train.py" "${ARGS[@]}" || rc=$?
end=$(date +%s.%N)
printf '{"method": "%s", "exit_code": %d, "wall_seconds": %s}\n' \
  "$METHOD" "$rc" "$(ta_seconds_between "$start" "$end")" > "$RUN_DIR/launcher.json"
((rc == 0)) || ta_die "$METHOD failed (exit $rc); log: $RUN_DIR/train.log"
ta_log "done: $RUN_DIR/metrics.jsonl"
if ((PREPARE_EVAL)); then
  "$PYTHON" -m slime.eval.checkpoints "$RUN_DIR" --checkpoint "$EVAL_CHECKPOINT" --out "$MERGED_DIR" \
    || ta_die "could not prepare $MERGED_DIR for evaluation (checkpoints: $RUN_DIR/checkpoints)"
  ta_log "ready for evaluation: $MERGED_DIR (checkpoint $EVAL_CHECKPOINT)"
fi
