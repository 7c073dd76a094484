#!/usr/bin/env bash
# Run a suite of OPD / TA-OPD token selectors, one training run per METHOD_LIST entry and seed, then summarise.
#
# Usage:
#   bash scripts/train/run_method_suite.sh                      # embedded defaults (CPU, minutes)
#   METHOD_LIST="pure_opd:1.0:10 teachability:0.10:20 tip:0.10:30" SEEDS="1 2 3" NUM_ROLLOUT=50 \
#     bash scripts/train/run_method_suite.sh
#   TEACHER_MODEL=/path/to/teacher-hf STUDENT_HF=/path/to/student-hf PROMPT_DATA=/path/to/train.jsonl \
#     bash scripts/train/run_method_suite.sh -- --extra-slime-flag value
#   bash scripts/train/run_method_suite.sh --help
#
# METHOD_LIST: "alias:ratio:idx" entries separated by commas, spaces or newlines. alias is a name of the
# alias table ta_opd.aliases (pure_opd, teachability, teachability_entropy, entropy, tip, divergence,
# random, sft_teacher, the original release's synonyms and every mask name; docs/selectors.md); ratio
# is the global token budget, > 0 (>= 1 keeps every token; names of mask full always use 1.0); idx
# names the run. SEEDS (default: SEED, 1234) lists the seeds: every
# entry runs once per seed, and all entries of one seed use that seed (--seed, and --rollout-seed
# unless ROLLOUT_SEED is set): the same prompts in the same order from the same student weights, so
# methods are compared pairwise. SHARED_SERVERS=1 (the default of the embedded profile) runs every
# entry in one process sharing Ray, the engines and the teacher (python -m slime.suite); SUITE_LANES=N
# (default 1) runs N entries at once there, each lane on its own engines, teacher and trainer;
# SHARED_SERVERS=0 starts one train.py per entry. Every entry and every path is checked before
# anything starts. Outputs: $OUTPUT_ROOT/$SUITE_NAME/{method_mapping.csv,
# runs/<idx>_<alias>_r<ratio>_s<seed>/, summary.csv, summary.md, runs.csv, plots/}.
# Environment variables and defaults: docs/method_suite.md.
#
# Every entry writes its own token bank (<run>/token_bank; OPD_TOKEN_BANK=0: none). SKIP_EVAL=0 (the default of the
# cluster profile and of the release's script names) then scores every trained student on shared frozen contexts
# (COMMON_CONTEXT reuses a context bank, BASELINE_METRICS θ0's scores) and writes the per-selector × budget table
# (fixed_context/budget_table.{csv,md}; ta_opd.diagnostics.cli.suite_eval). RUN_LIST ("mask:ratio:idx" entries, the
# release's budget-sweep list) replaces METHOD_LIST; so does OPD_BUDGET_MASK / OPD_BUDGET_RATIO (one run). The
# original release's variables (TAG, SEED_LABEL, LOG_DIR, PY, OPD_*, GPU and port variables): docs/release_compat.md.
#
# Rerunning an existing suite is refused (it would mix old and new results) unless RESUME=1 (entries
# that finished are skipped, the others resume from their last checkpoint under SAVE_CHECKPOINT=1 /
# SAVE_INTERVAL, or restart with their earlier output moved to replaced/) or FORCE=1 (the old suite
# directory is moved aside to <suite>.replaced-<date>_<time>, never deleted).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"
REPO_ROOT=$TA_OPD_REPO_ROOT

ta_exit_on_help "${BASH_SOURCE[0]}" "$@"
[[ "${1:-}" == "--" ]] && shift
CLI_EXTRA_ARGS=("$@") # anything after "--" goes to train.py, like EXTRA_ARGS

[[ -z "${PYTHON:-}" && -n "${PY:-}" ]] && PYTHON=$PY # PY: the release's name of the interpreter
PYTHON=$(ta_python)
[[ -n "${TAG:-}" && -z "${SUITE_NAME:-}" ]] && SUITE_NAME=$TAG # TAG: the release's name of the suite
SEED_LABEL=${SEED_LABEL:-} # the release's seed label: recorded in method_mapping.csv

# ---------------------------------------------------------------- what to run
# (unset → the default list; set but empty → an error). RUN_LIST (mask:ratio:idx) or OPD_BUDGET_MASK replace it.
if [[ -n "${RUN_LIST+x}" ]]; then
  [[ -z "${METHOD_LIST+x}" ]] || ta_die "METHOD_LIST and RUN_LIST are both set; give one (RUN_LIST: mask:ratio:idx entries)"
  PARSED_METHODS=$(ta_parse_run_list "$RUN_LIST")
elif [[ -z "${METHOD_LIST+x}" && -n "${OPD_BUDGET_MASK:-}" ]]; then # the release's single-run variables
  PARSED_METHODS=$(ta_parse_run_list "$OPD_BUDGET_MASK:${OPD_BUDGET_RATIO:-1.0}:${IDX:-0}")
else
  METHOD_LIST=${METHOD_LIST-"pure_opd:1.0:10 teachability:0.10:20 teachability_entropy:0.10:30 entropy:0.10:40 tip:0.10:50 divergence:0.10:60 random:0.10:70"}
  PARSED_METHODS=$(ta_parse_method_list "$METHOD_LIST") # validates every entry first (exit 2 on any error)
fi

# Numbers the launcher computes with are checked as text first (bash arithmetic wraps silently at 2^63 and
# evaluates what a variable holds); the values that only go to train.py are checked by its parser below.
SUMMARIZE=${SUMMARIZE:-1}                                                  # 0: no summary.csv/plots at the end
ta_require_flag SAVE_CHECKPOINT CONTINUE_ON_ERROR SUMMARIZE DRY_RUN RESUME FORCE # DRY_RUN=1: validate, start nothing
OPD_TOKEN_BANK=${OPD_TOKEN_BANK:-1} # every entry writes <run>/token_bank
ta_require_flag OPD_TOKEN_BANK OPD_TOKEN_BANK_RAW_TOPK OPD_EXACT_CMASS SAVE_DEBUG_ROLLOUT_DATA DEBUG_ROLLOUT_ONLY COLOCATE
SEED=${SEED:-1234}
ta_require_uint SEED "$SEED" "$TA_SEED_MAX"
SEEDS=${SEEDS:-$SEED} # every METHOD_LIST entry runs once per seed; all entries of one seed share it (paired)
read -r -a SEED_ARRAY <<< "$SEEDS"
((${#SEED_ARRAY[@]})) || ta_die "SEEDS is empty; expected seeds like '1 2 3'"
declare -A SEEN_SEEDS=()
for i in "${!SEED_ARRAY[@]}"; do
  ta_require_uint seed "${SEED_ARRAY[$i]}" "$TA_SEED_MAX" "SEEDS entry ${SEED_ARRAY[$i]}"
  [[ -z "${SEEN_SEEDS[$seed]+x}" ]] || ta_die "SEEDS=$SEEDS: seed $seed is listed twice"
  SEEN_SEEDS[$seed]=1
  SEED_ARRAY[i]=$seed
done
[[ -z "${ROLLOUT_SEED:-}" ]] || ta_require_uint ROLLOUT_SEED "$ROLLOUT_SEED" "$TA_SEED_MAX"
SUITE_LANES=${SUITE_LANES:-1} # SHARED_SERVERS=1: entries running at once, each lane on its own servers
ta_require_uint SUITE_LANES "$SUITE_LANES" 1024
((SUITE_LANES >= 1)) || ta_die "SUITE_LANES=$SUITE_LANES: expected an integer >= 1 (sets of servers running entries at once)"
[[ "${SHARED_SERVERS:-}" != 0 ]] || ((SUITE_LANES == 1)) \
  || ta_die "SUITE_LANES=$SUITE_LANES needs SHARED_SERVERS=1 (lanes run in the one shared-servers process);" \
    "SHARED_SERVERS=0 runs one train.py at a time"
for name in NUM_ROLLOUT SAVE_INTERVAL ROLLOUT_BATCH_SIZE N_SAMPLES_PER_PROMPT GLOBAL_BATCH_SIZE; do
  [[ -z "${!name:-}" ]] || ta_require_uint "$name" "${!name}" 1000000000
done

# ---------------------------------------------------------------- where things are
SLIME_DIR=${SLIME_DIR:-$REPO_ROOT/slime_ta_opd}
MEGATRON_LM_DIR=${MEGATRON_LM_DIR:-} # scale-out only (TRAIN_BACKEND=megatron)
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO_ROOT/outputs/method_suite}
SUITE_NAME=${SUITE_NAME:-suite_$(date +%Y%m%d_%H%M%S)}
TEACHER_MODEL=${TEACHER_MODEL:-}
TEACHER_URL=${TEACHER_URL:-} # a running teacher server (http://HOST:PORT/generate); replaces TEACHER_MODEL
STUDENT_HF=${STUDENT_HF:-}
STUDENT_TORCH_DIST=${STUDENT_TORCH_DIST:-} # scale-out only
PROMPT_DATA=${PROMPT_DATA:-}
EVAL_PROMPT_DATA=${EVAL_PROMPT_DATA:-}
MODEL_SHAPE=${MODEL_SHAPE:-embedded} # scripts/models/$MODEL_SHAPE.sh
TRAIN_BACKEND=${TRAIN_BACKEND:-auto}

ta_require_path SLIME_DIR "$SLIME_DIR" dir
ta_require_path "SLIME_DIR/train.py" "$SLIME_DIR/train.py" file
[[ -f "$REPO_ROOT/scripts/models/$MODEL_SHAPE.sh" ]] \
  || ta_die "MODEL_SHAPE=$MODEL_SHAPE: no scripts/models/$MODEL_SHAPE.sh (have: $(cd "$REPO_ROOT/scripts/models" && ls -- *.sh | sed 's/\.sh$//' | xargs))"
[[ -n "$MEGATRON_LM_DIR" ]] && ta_require_path MEGATRON_LM_DIR "$MEGATRON_LM_DIR" dir
[[ -n "$STUDENT_TORCH_DIST" ]] && ta_require_path STUDENT_TORCH_DIST "$STUDENT_TORCH_DIST" dir
# Paths the user named are checked before the embedded defaults are built (which can take minutes).
[[ -n "$TEACHER_MODEL" ]] && ta_require_path TEACHER_MODEL "$TEACHER_MODEL" dir
[[ -n "$STUDENT_HF" ]] && ta_require_path STUDENT_HF "$STUDENT_HF" dir
[[ -n "$PROMPT_DATA" ]] && ta_require_path PROMPT_DATA "$PROMPT_DATA" file
[[ -n "$EVAL_PROMPT_DATA" ]] && ta_require_path EVAL_PROMPT_DATA "$EVAL_PROMPT_DATA" file
if [[ -n "$TEACHER_URL" && ! "$TEACHER_URL" =~ ^https?:// ]]; then
  ta_die "TEACHER_URL=$TEACHER_URL is not an http(s) URL (expected http://HOST:PORT/generate)"
fi

# Embedded defaults: whatever the user left unset comes from the cached embedded assets.
# PROFILE picks the knob defaults below: "embedded" (tiny CPU models) or "cluster" (real models).
ta_use_embedded_defaults teacher
ta_require_path STUDENT_HF "$STUDENT_HF" dir
ta_require_path PROMPT_DATA "$PROMPT_DATA" file
[[ -z "$TEACHER_URL" ]] && ta_require_path TEACHER_MODEL "$TEACHER_MODEL" dir

# ---------------------------------------------------------------- knobs (embedded defaults | real-model defaults)
if [[ "$PROFILE" == embedded ]]; then
  : "${NUM_ROLLOUT:=24}" "${ROLLOUT_BATCH_SIZE:=32}" "${N_SAMPLES_PER_PROMPT:=2}" "${ROLLOUT_MAX_RESPONSE_LEN:=32}"
  : "${LR:=1e-4}" "${EVAL_INTERVAL:=6}" "${EVAL_MAX_RESPONSE_LEN:=32}"
  : "${ROLLOUT_TEMPERATURE:=1.0}" "${EVAL_TEMPERATURE:=0.0}"
else
  : "${NUM_ROLLOUT:=300}" "${ROLLOUT_BATCH_SIZE:=32}" "${N_SAMPLES_PER_PROMPT:=4}" "${ROLLOUT_MAX_RESPONSE_LEN:=4096}"
  : "${LR:=1e-6}" "${MICRO_BATCH_SIZE:=1}" "${EVAL_INTERVAL:=20}" "${EVAL_MAX_RESPONSE_LEN:=$ROLLOUT_MAX_RESPONSE_LEN}"
  : "${ROLLOUT_TEMPERATURE:=1.0}" "${EVAL_TEMPERATURE:=0.0}"
fi
SKIP_EVAL=${SKIP_EVAL:-$([[ "$PROFILE" == embedded ]] && echo 1 || echo 0)} # 0: fixed-context evaluation after the runs
ta_require_flag SKIP_EVAL
if ((!SKIP_EVAL)); then
  [[ -n "$TEACHER_MODEL" ]] || ta_die "SKIP_EVAL=0 scores the students against TEACHER_MODEL (a checkpoint); TEACHER_URL alone" \
    "cannot be scored on fixed contexts: set TEACHER_MODEL or SKIP_EVAL=1"
  SAVE_CHECKPOINT=1 # the evaluation reads each run's final weights
  [[ -z "${COMMON_CONTEXT:-}" ]] || ta_require_path COMMON_CONTEXT "$COMMON_CONTEXT" file
  [[ -z "${BASELINE_METRICS:-}" ]] || ta_require_path BASELINE_METRICS "$BASELINE_METRICS" file
  if [[ "$PROFILE" == embedded ]]; then
    : "${FC_NUM_CONTEXTS:=32}" "${FC_RESPONSE_TOKENS:=24}"
  else
    : "${FC_NUM_CONTEXTS:=300}" "${FC_RESPONSE_TOKENS:=192}"
  fi
  ta_require_uint FC_NUM_CONTEXTS "$FC_NUM_CONTEXTS" 1000000000
  ta_require_uint FC_RESPONSE_TOKENS "$FC_RESPONSE_TOKENS" 1000000000
  ta_require_uint BOOTSTRAP "${BOOTSTRAP:-1000}" 1000000000
fi
FIXED_ROLLOUT_SEED=${ROLLOUT_SEED:-} # unset: each seed's prompt order is drawn with that seed (the same for all
# methods of the seed); set: one prompt order for every seed
SHARED_SERVERS=${SHARED_SERVERS:-$([[ "$PROFILE" == embedded ]] && echo 1 || echo 0)}
ta_require_flag SHARED_SERVERS
((SUITE_LANES == 1 || SHARED_SERVERS)) || ta_die "SUITE_LANES=$SUITE_LANES needs SHARED_SERVERS=1 (the default of the embedded profile)"
ta_require_uint ROLLOUT_BATCH_SIZE "$ROLLOUT_BATCH_SIZE" 1000000000
ta_require_uint N_SAMPLES_PER_PROMPT "$N_SAMPLES_PER_PROMPT" 1000000000
ta_require_uint NUM_ROLLOUT "$NUM_ROLLOUT" 1000000000
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$((ROLLOUT_BATCH_SIZE * N_SAMPLES_PER_PROMPT))}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-$GLOBAL_BATCH_SIZE} # tiny models: one micro-batch per step
OPD_TOPK_METRICS_K=${OPD_TOPK_METRICS_K:-16}
OPD_KL_COEF=${OPD_KL_COEF:-1.0}
# Loss and LR schedule (docs/training.md); unset: train.py's defaults (policy_loss, constant LR).
# e.g. LOSS_TYPE=jsd JSD_BETA=1: the full-vocabulary reverse KL at the sampled positions, on the kept tokens.
LOSS_TYPE=${LOSS_TYPE:-}
JSD_BETA=${JSD_BETA:-}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-}
LR_DECAY_STYLE=${LR_DECAY_STYLE:-}
MIN_LR=${MIN_LR:-}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-label}
EVAL_RM_PATH=${EVAL_RM_PATH:-slime.embedded.task.reward_func}
NUM_GPUS_PER_NODE=${NUM_GPUS_PER_NODE:-} # unset: the stack decides (CPU-only machines need none)
ROLLOUT_NUM_GPUS=${ROLLOUT_NUM_GPUS:-}
# SAVE_CHECKPOINT=1: save to <run>/checkpoints every SAVE_INTERVAL steps (default NUM_ROLLOUT: the final weights
# only; HF dir under iter_*/model); RESUME=1 resumes an unfinished entry from its newest checkpoint.
SAVE_INTERVAL=${SAVE_INTERVAL:-$NUM_ROLLOUT}
ta_require_uint SAVE_INTERVAL "$SAVE_INTERVAL" 1000000000
((SAVE_INTERVAL > 0)) || ta_die "SAVE_INTERVAL=$SAVE_INTERVAL: expected a positive number of steps"
EXTRA_ARGS=${EXTRA_ARGS:-}
[[ -n "${RAY_ADDRESS:-}" ]] && export RAY_ADDRESS # train.py's ray.init joins that cluster
read -r -a EXTRA_ARGS_ARRAY <<< "$EXTRA_ARGS"

# shellcheck disable=SC1090
source "$REPO_ROOT/scripts/models/$MODEL_SHAPE.sh"

export PYTHONPATH="$SLIME_DIR:$REPO_ROOT${MEGATRON_LM_DIR:+:$MEGATRON_LM_DIR}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# ---------------------------------------------------------------- flags shared by every entry
CKPT_ARGS=(--hf-checkpoint "$STUDENT_HF")
[[ -n "$STUDENT_TORCH_DIST" ]] && CKPT_ARGS+=(--ref-load "$STUDENT_TORCH_DIST")

ta_set_eval_args # EVAL_ARGS (none without EVAL_PROMPT_DATA)

OPD_ARGS=(
  --use-opd
  --opd-type sglang
  --opd-kl-coef "$OPD_KL_COEF"
  --custom-rm-path slime.rollout.on_policy_distillation.reward_func
  --custom-reward-post-process-path slime.rollout.on_policy_distillation.post_process_rewards
  --opd-topk-metrics-k "$OPD_TOPK_METRICS_K"
)
# the release's OPD_* variables, for every entry (unset: train.py's defaults)
[[ -n "${OPD_BUDGET_GAMMA:-}" ]] && OPD_ARGS+=(--opd-budget-gamma "$OPD_BUDGET_GAMMA")
[[ -n "${OPD_COMPAT_PROXY:-}" ]] && OPD_ARGS+=(--opd-compat-proxy "$OPD_COMPAT_PROXY")
[[ -n "${OPD_METRIC_NORMALIZATION:-}" ]] && OPD_ARGS+=(--opd-metric-normalization "$OPD_METRIC_NORMALIZATION")
if ((OPD_EXACT_CMASS)); then
  OPD_ARGS+=(--opd-exact-cmass)
  [[ -n "${OPD_EXACT_CMASS_MAX_UNION:-}" ]] && OPD_ARGS+=(--opd-exact-cmass-max-union "$OPD_EXACT_CMASS_MAX_UNION")
  [[ -n "${OPD_EXACT_CMASS_OVERFLOW:-}" ]] && OPD_ARGS+=(--opd-exact-cmass-overflow "$OPD_EXACT_CMASS_OVERFLOW")
fi
BANK_ARGS=()
if ((OPD_TOKEN_BANK)); then
  BANK_ARGS=(--opd-token-bank-format "${OPD_TOKEN_BANK_FORMAT:-csv}" --opd-token-bank-layout "${OPD_TOKEN_BANK_LAYOUT:-native}")
  ((OPD_TOKEN_BANK_RAW_TOPK)) && BANK_ARGS+=(--opd-token-bank-raw-topk)
  [[ -n "${OPD_TOKEN_BANK_PAIR_ID:-}" ]] && BANK_ARGS+=(--opd-token-bank-pair-id "$OPD_TOKEN_BANK_PAIR_ID")
fi
((DEBUG_ROLLOUT_ONLY)) && OPD_ARGS+=(--debug-rollout-only)
if [[ -n "${OPD_TOKEN_BANK_DIR:-}" ]] && (($(wc -l <<< "$PARSED_METHODS") * ${#SEED_ARRAY[@]} > 1)); then
  ta_die "OPD_TOKEN_BANK_DIR=$OPD_TOKEN_BANK_DIR names one bank for several runs (each would overwrite the last);" \
    "unset it: every entry writes <run>/token_bank"
fi
# a bank directory shared by every entry would be overwritten run after run: each entry has its own <run>/token_bank
for arg in "${EXTRA_ARGS_ARRAY[@]}" "${CLI_EXTRA_ARGS[@]}"; do
  [[ "$arg" == --opd-token-bank-dir* ]] && ta_die "--opd-token-bank-dir in the train.py flags would give every entry one" \
    "bank directory (each run would overwrite the last); the suite writes <run>/token_bank per entry (OPD_TOKEN_BANK=1)"
done
if [[ -n "$TEACHER_URL" ]]; then
  OPD_ARGS+=(--rm-url "$TEACHER_URL")
else
  OPD_ARGS+=(--opd-teacher-hf-checkpoint "$TEACHER_MODEL")
fi

TRAIN_ARGS=(
  --train-backend "$TRAIN_BACKEND"
  --lr "$LR"
  --micro-batch-size "$MICRO_BATCH_SIZE"
)
[[ -n "$LOSS_TYPE" ]] && TRAIN_ARGS+=(--loss-type "$LOSS_TYPE") # an alias's own --loss-type (sft_teacher) comes later and wins
[[ -n "$JSD_BETA" ]] && TRAIN_ARGS+=(--jsd-beta "$JSD_BETA")
[[ -n "$LR_WARMUP_ITERS" ]] && TRAIN_ARGS+=(--lr-warmup-iters "$LR_WARMUP_ITERS")
[[ -n "$LR_DECAY_STYLE" ]] && TRAIN_ARGS+=(--lr-decay-style "$LR_DECAY_STYLE")
[[ -n "$MIN_LR" ]] && TRAIN_ARGS+=(--min-lr "$MIN_LR")

CLUSTER_ARGS=()
if [[ -n "$NUM_GPUS_PER_NODE" ]]; then
  CLUSTER_ARGS+=(--actor-num-nodes 1 --actor-num-gpus-per-node "$NUM_GPUS_PER_NODE" --num-gpus-per-node "$NUM_GPUS_PER_NODE")
fi
[[ -n "$ROLLOUT_NUM_GPUS" ]] && CLUSTER_ARGS+=(--rollout-num-gpus "$ROLLOUT_NUM_GPUS")
# the release's GPU variables: ACTOR_NUM_GPUS_PER_NODE, COLOCATE, RAY_GPUS (the training's visible GPUs), EVAL_GPUS
[[ -n "${ACTOR_NUM_GPUS_PER_NODE:-}" ]] && CLUSTER_ARGS+=(--actor-num-gpus-per-node "$ACTOR_NUM_GPUS_PER_NODE")
((COLOCATE)) && CLUSTER_ARGS+=(--colocate)
for name in TEACHER_GPU TEACHER_PORT TEACHER_NCCL_PORT RAY_PORT RAY_DASHBOARD_PORT ALLOW_GLOBAL_RAY_STOP; do
  [[ -z "${!name:-}" ]] || ta_log "$name=${!name}: not needed here (the run starts its teacher, engines and Ray on free" \
    "ports and stops only what it started); TEACHER_URL names a running teacher"
done

# ---------------------------------------------------------------- per-entry argument files, checked together
SUITE_DIR="$OUTPUT_ROOT/$SUITE_NAME"
ta_prepare_output_dir "suite directory (SUITE_NAME=$SUITE_NAME)" "$SUITE_DIR" # refuse / RESUME / FORCE
mkdir -p "$SUITE_DIR/runs"
if [[ -n "${LOG_DIR:-}" ]]; then # the release's log directory: <LOG_DIR>/<suite>.log + driver logs
  mkdir -p "$LOG_DIR"
  exec > >(tee -a "$LOG_DIR/$SUITE_NAME.log") 2>&1
fi
RUN_NAMES=()
ARG_FILES=()
MAPPING=("method,mask,ratio,idx,notes,alias,seed,seed_label,run_dir") # the release's columns first, then ours
declare -A PLAN=() # name -> skip | resume | restart | fresh
for seed in "${SEED_ARRAY[@]}"; do
ROLLOUT_SEED=${FIXED_ROLLOUT_SEED:-$seed}
ta_set_rollout_args # ROLLOUT_ARGS (this seed's prompt order)
while read -r idx alias mask ratio flags; do
  name="${idx}_${alias}_r${ratio}_s${seed}"
  run_dir="$SUITE_DIR/runs/$name"
  read -r -a alias_flags <<< "$flags" # the alias's own train.py flags (ta_opd.aliases.METHOD_FLAGS)
  args=(
    "${CKPT_ARGS[@]}" "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}" "${OPD_ARGS[@]}"
    --opd-budget-mask "$mask"
    --opd-budget-ratio "$ratio"
    --opd-budget-mask-seed "${OPD_BUDGET_MASK_SEED:-$seed}"
    "${TRAIN_ARGS[@]}" "${CLUSTER_ARGS[@]}"
    "${alias_flags[@]}" # after TRAIN_ARGS: an alias's own --loss-type wins over LOSS_TYPE
    --seed "$seed"
    --output-dir "$run_dir"
  )
  ((SAVE_CHECKPOINT)) && args+=(--save "$run_dir/checkpoints" --save-interval "$SAVE_INTERVAL" --no-save-optim)
  ((OPD_TOKEN_BANK)) && args+=(--opd-token-bank-dir "${OPD_TOKEN_BANK_DIR:-$run_dir/token_bank}" "${BANK_ARGS[@]}")
  ((SAVE_DEBUG_ROLLOUT_DATA)) && args+=(--save-debug-rollout-data "$run_dir/debug_rollout_data/{rollout_id}.pt")
  args+=("${EXTRA_ARGS_ARRAY[@]}" "${CLI_EXTRA_ARGS[@]}")
  PLAN[$name]=fresh
  if ((TA_RESUMING)) && ta_dir_started "$run_dir"; then
    # A resumed entry must be the same run: other flags would blend two configurations in one metrics.jsonl.
    if ! printf '%s\n' "${args[@]}" | cmp -s - "$run_dir/train_args.txt"; then
      ta_die "RESUME=1: entry '$alias:$ratio:$idx' seed $seed ($run_dir) was started with other train.py flags" \
        "(compare $run_dir/train_args.txt with this launch's settings); resuming would mix two configurations." \
        "Restore the same settings, or FORCE=1 for a fresh suite"
    fi
    if [[ -f "$run_dir/$TA_COMPLETE_MARKER" ]]; then
      PLAN[$name]=skip
    elif [[ -f "$run_dir/checkpoints/latest_checkpointed_iteration.txt" ]]; then
      PLAN[$name]=resume
    else
      PLAN[$name]=restart
    fi
  fi
  mkdir -p "$run_dir"
  printf '%s\n' "${args[@]}" > "$run_dir/train_args.txt" # one argument per line: the exact command, reusable
  RUN_NAMES+=("$name")
  ARG_FILES+=("$run_dir/train_args.txt")
  case $mask in # the release's notes column
    full) notes="full OPD; no budget loss mask; top-k metrics may still be logged" ;;
    ca_softor) notes="soft-OR of normalized entropy and Dlearn" ;;
    split_budget_ca) notes="budget split by OPD_BUDGET_GAMMA between entropy and teachability" ;;
    *) notes="" ;;
  esac
  MAPPING+=("$alias,$mask,$ratio,$idx,$notes,$alias,$seed,$SEED_LABEL,runs/$name")
done <<< "$PARSED_METHODS"
done

# Parse every entry's flags with the stack's own parser (unknown flag, bad value, missing file) before any run.
ta_check_train_args "${ARG_FILES[@]}" || ta_die "the train.py flags of an entry are invalid (see above); nothing was started"

# ---------------------------------------------------------------- method_mapping.csv
printf '%s\n' "${MAPPING[@]}" > "$SUITE_DIR/method_mapping.csv.tmp"
mv "$SUITE_DIR/method_mapping.csv.tmp" "$SUITE_DIR/method_mapping.csv"
ta_log "suite $SUITE_DIR: ${#RUN_NAMES[@]} run(s) (seeds: ${SEED_ARRAY[*]}; shared servers: $SHARED_SERVERS; lanes: $SUITE_LANES); mapping in method_mapping.csv"
if ((TA_RESUMING)); then
  for name in "${RUN_NAMES[@]}"; do
    case ${PLAN[$name]} in
      skip) ta_log "  $name: finished ($TA_COMPLETE_MARKER): skipped" ;;
      resume) ta_log "  $name: resumes from checkpoint $(tr -d '[:space:]' < "$SUITE_DIR/runs/$name/checkpoints/latest_checkpointed_iteration.txt")" ;;
      restart) ta_log "  $name: no checkpoint: restarts (earlier output moved to $SUITE_DIR/replaced/)" ;;
      fresh) ta_log "  $name: not started yet" ;;
    esac
  done
fi
FC_ARGS=() # the fixed-context evaluation after the runs (SKIP_EVAL=0)
if ((!SKIP_EVAL)); then
  FC_ARGS=(--suite-dir "$SUITE_DIR" --teacher "$TEACHER_MODEL" --student "$STUDENT_HF" --prompts "$PROMPT_DATA"
    --num-contexts "$FC_NUM_CONTEXTS" --response-tokens "$FC_RESPONSE_TOKENS" --k "$OPD_TOPK_METRICS_K"
    --bootstrap "${BOOTSTRAP:-1000}" --seed "${SEED_ARRAY[0]}" --device "${FC_DEVICE:-cpu}")
  [[ -n "${COMMON_CONTEXT:-}" ]] && FC_ARGS+=(--contexts "$COMMON_CONTEXT")
  [[ -n "${BASELINE_METRICS:-}" ]] && FC_ARGS+=(--baseline-metrics "$BASELINE_METRICS")
  if [[ -n "${EVAL_GPUS:-}" ]]; then # the release's two eval GPUs: the student on the first, the teacher on the last
    n_eval_gpus=$(tr ',' '\n' <<< "$EVAL_GPUS" | grep -c .)
    FC_ARGS+=(--student-device cuda:0 --teacher-device "cuda:$((n_eval_gpus - 1))")
  fi
  printf '%s\n' "${FC_ARGS[@]}" > "$SUITE_DIR/fixed_context_args.txt"
  ta_log "fixed-context evaluation after the runs (SKIP_EVAL=0): $SUITE_DIR/fixed_context/ (args in fixed_context_args.txt)"
fi
if ((DRY_RUN)); then
  ta_log "DRY_RUN=1: every entry validated; commands in $SUITE_DIR/runs/*/train_args.txt; nothing started"
  exit 0
fi
[[ -n "${RAY_GPUS:-}" ]] && export CUDA_VISIBLE_DEVICES=$RAY_GPUS # the release's training GPUs

# ---------------------------------------------------------------- run every entry
# Before any entry runs: an entry restarted without a checkpoint keeps its earlier attempt aside, and a post-hoc
# evaluation of an earlier, unfinished attempt no longer describes this run's weights.
for name in "${RUN_NAMES[@]}"; do
  run_dir="$SUITE_DIR/runs/$name"
  if [[ ${PLAN[$name]} == restart ]]; then
    mkdir -p "$SUITE_DIR/replaced"
    aside=$(ta_move_aside "$run_dir")
    mv -- "$aside" "$SUITE_DIR/replaced/"
    mkdir -p "$run_dir"
    cp -- "$SUITE_DIR/replaced/$(basename "$aside")/train_args.txt" "$run_dir/train_args.txt"
  fi
  [[ -f "$run_dir/eval_accuracy.json" ]] && mv -- "$run_dir/eval_accuracy.json" "$run_dir/eval_accuracy.json.stale"
done

FAILED=()
if ((SHARED_SERVERS)); then
  # One process: Ray, the engines, the router and the teacher start once; each entry resets the trainer to the
  # student checkpoint with a fresh optimizer and pushes those weights to the engines (slime/suite.py).
  plan_file="$SUITE_DIR/suite_plan.tsv"
  for name in "${RUN_NAMES[@]}"; do printf '%s\t%s\t%s\n' "$name" "${PLAN[$name]}" "$SUITE_DIR/runs/$name"; done \
    > "$plan_file"
  ta_log "shared servers: every entry in one process (python -m slime.suite); log: $SUITE_DIR/suite.log"
  rc=0
  ta_run_tracked "$SUITE_DIR/suite.log" "$PYTHON" -m slime.suite --plan "$plan_file" \
    --continue-on-error "$CONTINUE_ON_ERROR" --lanes "$SUITE_LANES" || rc=$?
  ((rc == 130)) && exit 130
  for name in "${RUN_NAMES[@]}"; do # the driver writes launcher.json and complete.json per entry
    [[ ${PLAN[$name]} == skip || -f "$SUITE_DIR/runs/$name/$TA_COMPLETE_MARKER" ]] || FAILED+=("$name")
  done
  ((rc == 0 || ${#FAILED[@]})) || FAILED+=("suite driver (exit $rc)")
else
  n=0
  for name in "${RUN_NAMES[@]}"; do
    n=$((n + 1))
    run_dir="$SUITE_DIR/runs/$name"
    mapfile -t args < "$run_dir/train_args.txt"
    case ${PLAN[$name]} in
      skip)
        ta_log "[$n/${#RUN_NAMES[@]}] $name: already finished; skipped"
        continue
        ;;
      resume) args+=(--load "$run_dir/checkpoints") ;; # train.py continues after the newest checkpoint
    esac
    ta_log "[$n/${#RUN_NAMES[@]}] $name (${PLAN[$name]})"
    start=$(date +%s.%N)
    rc=0
    [[ -n "${LOG_DIR:-}" ]] && ln -sf "$run_dir/train.log" "$LOG_DIR/${name}_driver.log"
    ta_run_tracked "$run_dir/train.log" "$PYTHON" "$SLIME_DIR/train.py" "${args[@]}" || rc=$?
    end=$(date +%s.%N)
    printf '{"name": "%s", "exit_code": %d, "start": %s, "end": %s, "wall_seconds": %s}\n' \
      "$name" "$rc" "$start" "$end" "$(ta_seconds_between "$start" "$end")" \
      > "$run_dir/launcher.json"
    if ((rc == 0)); then # the entry is complete: RESUME=1 skips it
      printf '{"name": "%s", "finished": "%s"}\n' "$name" "$(date +%Y-%m-%dT%H:%M:%S)" > "$run_dir/$TA_COMPLETE_MARKER.tmp"
      mv -- "$run_dir/$TA_COMPLETE_MARKER.tmp" "$run_dir/$TA_COMPLETE_MARKER"
    fi
    if ((rc != 0)); then
      FAILED+=("$name")
      ta_log "run $name failed (exit $rc); log: $run_dir/train.log"
      ((rc == 130)) && exit 130
      ((CONTINUE_ON_ERROR)) || break
    fi
  done
fi

if ((SUMMARIZE)); then
  "$PYTHON" "$REPO_ROOT/tools/summarize_suite.py" --suite-dir "$SUITE_DIR" || ta_log "summary failed"
fi
if ((!SKIP_EVAL)); then
  ta_log "fixed-context evaluation: shared contexts, θ0 once, then every finished entry"
  rc=0
  [[ -n "${EVAL_GPUS:-}" ]] && export CUDA_VISIBLE_DEVICES=$EVAL_GPUS # the release's eval GPUs
  ta_run_tracked "$SUITE_DIR/fixed_context.log" "$PYTHON" -m ta_opd.diagnostics.cli.suite_eval run "${FC_ARGS[@]}" || rc=$?
  ((rc == 130)) && exit 130
  ((rc == 0)) && ta_log "budget table: $SUITE_DIR/fixed_context/budget_table.md" || FAILED+=("fixed-context evaluation (exit $rc)")
fi
if ((${#FAILED[@]})); then
  ta_die "failed run(s): ${FAILED[*]}"
fi
ta_log "suite done: $SUITE_DIR"
