# Shared helpers of scripts/eval/run_downstream_*.sh (source it; do not run it). Sources scripts/lib/common.sh.
#
# The queue of checkpoints comes from MODELS: "NAME=DIR NAME=DIR ..." (a HF checkpoint directory each; a run
# prepared by prepare_eval_checkpoint is <run>_merged and must hold .ready_for_eval). With SERVER_URL set, every
# entry is evaluated through that SGLang-API server instead (its /v1/completions, or /v1/chat/completions with
# CHAT=1); DIR then names the tokenizer. Each entry writes RUN_DIR/NAME/seed$SEED/ (lm-eval results_*.json and a
# DONE marker; an entry with DONE is skipped, as in the release), and its log to LOG_DIR. INCLUDE_PATH adds a
# directory of task YAMLs; ONLY_INCLUDE_PATH=1 indexes only those (lm-eval's own index takes a minute to build).
# Running again into RUN_DIR continues it; FORCE=1 moves it aside to RUN_DIR.replaced-<date>_<time> first.

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

# ta_eval_setup WHAT: checks and defaults shared by the launchers (WHAT names the default RUN_DIR).
ta_eval_setup() {
  local what=$1
  export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} TOKENIZERS_PARALLELISM=false
  RUN_DIR=${RUN_DIR:-${OUT_ROOT:-$TA_OPD_REPO_ROOT/outputs/downstream_eval}/$what}
  LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
  SEED=${SEED:-0}
  ta_require_uint SEED "$SEED" "$TA_SEED_MAX"
  BATCH_SIZE=${BATCH_SIZE:-1}
  DEVICE=${DEVICE:-cpu}
  DTYPE=${DTYPE:-auto}
  TIMEOUT=${TIMEOUT:-0} # per entry, as timeout(1) reads it (e.g. 150m); 0: no limit
  ta_require_flag CHAT LOG_SAMPLES ONLY_INCLUDE_PATH
  [[ -n "${MODELS:-}" ]] || ta_die "MODELS is empty; set it to 'NAME=DIR ...' (the checkpoints to evaluate)"
  [[ -z "${DATA_DIR:-}" ]] || ta_require_path DATA_DIR "$DATA_DIR" dir
  [[ -z "${INCLUDE_PATH:-}" ]] || ta_require_path INCLUDE_PATH "$INCLUDE_PATH" dir
  local entry name dir
  TA_EVAL_NAMES=()
  declare -gA TA_EVAL_MODELS=()
  for entry in $MODELS; do
    [[ "$entry" == *=* ]] || ta_die "MODELS entry '$entry': expected NAME=DIR"
    name=${entry%%=*}
    dir=${entry#*=}
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || ta_die "MODELS entry '$entry': NAME may hold letters, digits, '.', '_', '-'"
    [[ -z "${TA_EVAL_MODELS[$name]+x}" ]] || ta_die "MODELS: NAME '$name' appears twice"
    ta_require_path "MODELS[$name]" "$dir" dir
    if [[ "$dir" == *_merged && ! -f "$dir/.ready_for_eval" ]]; then
      ta_die "MODELS[$name]=$dir has no .ready_for_eval (prepare_eval_checkpoint has not finished it)"
    fi
    TA_EVAL_MODELS[$name]=$dir
    TA_EVAL_NAMES+=("$name")
  done
  # Re-running continues the queue (entries with DONE are skipped, as in the release); FORCE=1 moves the earlier
  # RUN_DIR aside (never deleted) and starts afresh.
  ta_require_flag FORCE
  if ((FORCE)); then RESUME=0; else RESUME=${RESUME:-1}; fi
  ta_prepare_output_dir "evaluation directory (RUN_DIR)" "$RUN_DIR"
  mkdir -p "$RUN_DIR" "$LOG_DIR"
}

# ta_eval_run_one NAME TASKS [downstream_eval flags...]: one entry of the queue (skipped when DONE).
ta_eval_run_one() {
  local name=$1 tasks=$2 out log model rc=0
  shift 2
  model=${TA_EVAL_MODELS[$name]}
  out=$RUN_DIR/$name/seed$SEED
  log=$LOG_DIR/${name}_seed$SEED.log
  if [[ -f "$out/DONE" ]]; then
    ta_log "SKIP name=$name (done: $out/DONE)"
    return 0
  fi
  local args=(--tasks "$tasks" --output-path "$out" --seed "$SEED" --batch-size "$BATCH_SIZE")
  if [[ -n "${SERVER_URL:-}" ]]; then
    args+=(--server-url "$SERVER_URL" --tokenizer "$model")
    ((CHAT)) && args+=(--chat)
  else
    args+=(--model-dir "$model" --device "$DEVICE" --dtype "$DTYPE")
  fi
  [[ -n "${DATA_DIR:-}" ]] && args+=(--data-dir "$DATA_DIR")
  [[ -n "${INCLUDE_PATH:-}" ]] && args+=(--include-path "$INCLUDE_PATH")
  ((ONLY_INCLUDE_PATH)) && args+=(--only-include-path)
  [[ -n "${NUM_FEWSHOT:-}" ]] && args+=(--num-fewshot "$NUM_FEWSHOT")
  [[ -n "${LIMIT:-}" ]] && args+=(--limit "$LIMIT")
  ((LOG_SAMPLES)) && args+=(--log-samples)
  mkdir -p "$out"
  ta_log "START name=$name model=$model tasks=$tasks seed=$SEED"
  local cmd=("$(ta_python)" -m slime.eval.downstream "${args[@]}" "$@")
  [[ "$TIMEOUT" == 0 ]] || cmd=(timeout "$TIMEOUT" "${cmd[@]}")
  ta_run_tracked "$log" "${cmd[@]}" || rc=$?
  if ((rc == 0)); then
    ta_log "DONE name=$name out=$out"
  else
    ta_log "FAILED name=$name exit=$rc log=$log"
  fi
  return "$rc"
}

# ta_eval_queue TASKS [flags...]: every MODELS entry in order; the failures are counted, the queue goes on.
ta_eval_queue() {
  local name failed=0
  ta_log "QUEUE_START run_dir=$RUN_DIR"
  for name in "${TA_EVAL_NAMES[@]}"; do
    ta_eval_run_one "$name" "$@" || failed=$((failed + 1))
  done
  ta_log "QUEUE_DONE run_dir=$RUN_DIR failed=$failed"
  return "$((failed > 0))"
}

# ta_eval_summary [aggregate_results flags...]: the table of the queue, against BASE_NAME (default: the first entry).
ta_eval_summary() {
  "$(ta_python)" -m slime.eval.aggregate "$RUN_DIR" --base "${BASE_NAME:-${TA_EVAL_NAMES[0]}}" \
    --order "${TA_EVAL_NAMES[@]}" --out-dir "$RUN_DIR/summary" "$@"
}
