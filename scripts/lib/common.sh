# Shared bash helpers of the launchers in scripts/train and scripts/eval (source it; do not run it).
#
#   source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
#
# Every function fails with a message on stderr and a non-zero status; the callers run under
# `set -euo pipefail`, so a failed check stops the launcher before anything starts.

# Command substitutions inherit `set -e`, so a failed check inside $(...) still stops the caller.
shopt -s inherit_errexit

# Repository root (the directory holding scripts/), whatever the caller's working directory.
TA_OPD_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export TA_OPD_REPO_ROOT

ta_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ta_die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# ta_require_path NAME PATH KIND: PATH must exist (KIND: file | dir | any), else a clear error naming NAME.
ta_require_path() {
  local name=$1 path=$2 kind=${3:-any}
  [[ -n "$path" ]] || ta_die "$name is empty; set it to an existing ${kind/any/path}"
  case "$kind" in
    file) [[ -f "$path" ]] || ta_die "$name=$path: no such file" ;;
    dir) [[ -d "$path" ]] || ta_die "$name=$path: no such directory" ;;
    *) [[ -e "$path" ]] || ta_die "$name=$path: no such file or directory" ;;
  esac
}

# ta_require_uint NAME VALUE [MAX] [WHAT]: VALUE must be a plain decimal integer in [0, MAX] (default 2^31 - 1),
# checked as text before any arithmetic, so a huge value cannot wrap around in bash's 64-bit arithmetic and
# nothing in it is evaluated (bash arithmetic would run a command substitution hidden in a variable).
# WHAT (default "NAME=VALUE") names the offending input in the error.
ta_require_uint() {
  local name=$1 value=$2 max=${3:-2147483647} what=${4:-"$1=$2"} digits
  [[ "$value" =~ ^[0-9]+$ ]] || ta_die "$what: expected a non-negative integer in [0, $max]"
  digits=${value#"${value%%[!0]*}"} # leading zeros off (bash would read them as octal)
  digits=${digits:-0}
  if ((${#digits} > ${#max})) || { ((${#digits} == ${#max})) && [[ "$digits" > "$max" ]]; }; then
    ta_die "$what: $value is out of range (expected an integer in [0, $max])"
  fi
  printf -v "$name" '%s' "$digits"
}

# ta_require_flag NAME...: each named variable (unset means 0) must be 0 or 1; it is set to that value.
ta_require_flag() {
  local name
  for name in "$@"; do
    case "${!name:-0}" in
      0 | 1) printf -v "$name" '%s' "${!name:-0}" ;;
      *) ta_die "$name=${!name}: expected 0 or 1" ;;
    esac
  done
}

# Seeds are 32-bit (numpy, torch.manual_seed on every device); launchers check SEED / SEEDS against this.
TA_SEED_MAX=4294967295
# Written into a run directory when its train.py exited 0: RESUME=1 skips that entry.
TA_COMPLETE_MARKER=complete.json

# ta_dir_started DIR: true when DIR holds output of a run that started (a train.log, metrics.jsonl, launcher.json,
# complete marker, checkpoints/, eval_accuracy.json or summary.csv anywhere below it). A DRY_RUN leaves only
# method_mapping.csv and train_args.txt, which is not "started".
ta_dir_started() {
  [[ -d "$1" ]] || return 1
  [[ -n "$(find "$1" \( -name train.log -o -name metrics.jsonl -o -name launcher.json -o -name "$TA_COMPLETE_MARKER" \
    -o -name checkpoints -o -name eval_accuracy.json -o -name summary.csv \) -print -quit)" ]]
}

# ta_move_aside PATH: rename PATH to PATH.replaced-<date>_<time>[-N] (never deleted); prints the new path.
ta_move_aside() {
  local path=$1 aside n=1
  aside="$path.replaced-$(date +%Y%m%d_%H%M%S)"
  while [[ -e "$aside" ]]; do
    aside="$path.replaced-$(date +%Y%m%d_%H%M%S)-$n"
    n=$((n + 1))
  done
  mv -- "$path" "$aside" || ta_die "cannot move $path aside to $aside"
  printf '%s' "$aside"
}

# ta_prepare_output_dir WHAT DIR: the rerun policy of every launcher that writes a suite (or sweep, or diagnostic)
# directory, applied before anything is written:
#   DIR absent, or nothing started in it (ta_dir_started)  -> a fresh run;
#   started and RESUME=1 -> continue it (TA_RESUMING=1; the launcher skips finished entries and resumes the rest);
#   started and FORCE=1  -> DIR is moved aside to DIR.replaced-<date>_<time> (never deleted), then a fresh run;
#   started otherwise    -> exit 2: running again into DIR would mix the old results with the new ones.
# RESUME and FORCE must be 0 or 1 and not both 1. WHAT names DIR in messages ("suite directory (SUITE_NAME=x)").
ta_prepare_output_dir() {
  local what=$1 dir=$2 aside
  ta_require_flag RESUME FORCE
  ((RESUME && FORCE)) && ta_die "RESUME=1 and FORCE=1 together: RESUME continues $dir, FORCE starts afresh; pick one"
  TA_RESUMING=0
  [[ ! -e "$dir" || -d "$dir" ]] || ta_die "$what $dir exists and is not a directory"
  if ! ta_dir_started "$dir"; then
    return 0
  fi
  if ((RESUME)); then
    TA_RESUMING=1
    ta_log "RESUME=1: continuing $what $dir"
  elif ((FORCE)); then
    aside=$(ta_move_aside "$dir")
    ta_log "FORCE=1: moved the earlier $what to $aside; starting fresh in $dir"
  else
    ta_die "$what $dir already holds results of an earlier run; running again would mix them with the new ones." \
      "RESUME=1 continues it (finished entries skipped, the others resumed from their last checkpoint or" \
      "restarted), FORCE=1 moves it aside to $dir.replaced-<date>_<time> and starts fresh; or choose another name"
  fi
}

# ta_python: the interpreter the launchers use ($PYTHON, else python3, else python).
ta_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s' "$PYTHON"
  elif command -v python3 > /dev/null 2>&1; then
    printf 'python3'
  else
    printf 'python'
  fi
}

# ta_entry_list WHAT LIST: check every "name:ratio:idx" entry of LIST (separated by commas, spaces or newlines) with
# python -m ta_opd.aliases (the one alias table and SelectionConfig's own checks: nothing is re-checked here), then
# print one line per entry: "idx name mask ratio [flag ...]" (the ratio of a name meaning mask `full` is forced to
# 1.0; the flags are the name's extra train.py flags, ta_opd.aliases.METHOD_FLAGS). idx names the run
# (runs/<idx>_<name>_r<ratio>_s<seed>); it does not change the seed: every method of one seed trains with that seed
# (paired runs). Errors (all found, then exit 2): malformed entry, unknown name, ratio refused by
# SelectionConfig.validate (<= 0 with a mask), idx outside [0, 2^32 - 1], duplicate idx.
ta_entry_list() {
  PYTHONPATH="$TA_OPD_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$(ta_python)" -m ta_opd.aliases "$1" -- "$2" || exit 2
}

# ta_parse_method_list "LIST": a method suite's METHOD_LIST (aliases, synonyms or mask names), see ta_entry_list.
ta_parse_method_list() { ta_entry_list parse-method-list "$1"; }

# ta_parse_run_list "LIST": the budget sweep's RUN_LIST, the release's "mask:ratio:idx" entries (any name of the
# alias table), see ta_entry_list.
ta_parse_run_list() { ta_entry_list parse-run-list "$1"; }

# ta_embedded_asset KEY: a path of the cached embedded assets (built on first use; progress on stderr).
ta_embedded_asset() {
  "$(ta_python)" -m slime.embedded.assets --print "$1" --recipe "${EMBEDDED_RECIPE:-demo}" \
    ${ASSETS_CACHE_DIR:+--cache-dir "$ASSETS_CACHE_DIR"}
}

# ta_run_tracked LOG CMD...: run CMD in the background with output appended to LOG and echoed, wait for it,
# and on INT/TERM stop exactly that process (by pid) before exiting. Returns CMD's exit status.
ta_run_tracked() {
  local log=$1
  shift
  "$@" > >(tee -a "$log") 2>&1 &
  TA_CHILD_PID=$!
  trap 'ta_stop_child; exit 130' INT TERM
  local rc=0
  wait "$TA_CHILD_PID" || rc=$?
  trap - INT TERM
  TA_CHILD_PID=
  return "$rc"
}

ta_stop_child() {
  if [[ -n "${TA_CHILD_PID:-}" ]] && kill -0 "$TA_CHILD_PID" 2> /dev/null; then
    ta_log "stopping pid $TA_CHILD_PID"
    kill -TERM "$TA_CHILD_PID" 2> /dev/null || true
    wait "$TA_CHILD_PID" 2> /dev/null || true
  fi
}

# ta_exit_on_help FILE ARGS...: when ARGS start with -h or --help, print FILE's header comment (line 2 up to the
# `set -euo pipefail` line, without the "# ") and exit 0. Launchers call it with "${BASH_SOURCE[0]}" "$@".
ta_exit_on_help() {
  local file=$1
  shift
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    ta_print_usage "$file"
    exit 0
  fi
}

# ta_print_usage FILE: FILE's header comment, the usage text of every launcher.
ta_print_usage() { sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'; }

# ta_run_single_method ALIAS NAME ARGS...: the body of the one-method launchers (scripts/train/run_<NAME>.sh):
# one run of method-suite alias ALIAS through run_method_suite.sh, which replaces this shell (exec).
#   RATIO (default 0.10; pure_opd always 1.0: full OPD keeps every token), IDX (default 0) make the
#   METHOD_LIST entry "ALIAS:RATIO:IDX"; SUITE_NAME defaults to NAME_<date>_<time>; ARGS go to
#   run_method_suite.sh; -h/--help prints the calling launcher's header comment.
ta_run_single_method() {
  local alias=$1 name=$2
  shift 2
  ta_exit_on_help "${BASH_SOURCE[1]}" "$@"
  if [[ "$alias" == pure_opd ]]; then
    RATIO=1.0
  else
    RATIO=${RATIO:-0.10}
  fi
  IDX=${IDX:-0}
  [[ "$IDX" =~ ^[0-9]+$ ]] || ta_die "IDX=$IDX: expected a non-negative integer (it names the run)"
  METHOD_LIST="$alias:$RATIO:$IDX" SUITE_NAME=${SUITE_NAME:-${name}_$(date +%Y%m%d_%H%M%S)} \
    exec bash "$TA_OPD_REPO_ROOT/scripts/train/run_method_suite.sh" "$@"
}

# ta_set_rollout_args: ROLLOUT_ARGS, the rollout flags of train.py, from PROMPT_DATA, INPUT_KEY, LABEL_KEY,
# ROLLOUT_SEED, NUM_ROLLOUT, ROLLOUT_BATCH_SIZE, N_SAMPLES_PER_PROMPT, ROLLOUT_MAX_RESPONSE_LEN,
# ROLLOUT_TEMPERATURE, GLOBAL_BATCH_SIZE and SGLANG_BATCH_REQUESTS (default 1: the per-sample /generate requests
# in flight together go out as batched SGLang requests, --sglang-batch-requests; 0 sends one request per sample).
ta_set_rollout_args() {
  local batch=${SGLANG_BATCH_REQUESTS:-1}
  [[ "$batch" == 0 || "$batch" == 1 ]] || ta_die "SGLANG_BATCH_REQUESTS=$batch: expected 0 or 1"
  ROLLOUT_ARGS=(
    --prompt-data "$PROMPT_DATA"
    --input-key "$INPUT_KEY"
    --label-key "$LABEL_KEY"
    --apply-chat-template
    --rollout-shuffle
    --rollout-seed "$ROLLOUT_SEED"
    --num-rollout "$NUM_ROLLOUT"
    --rollout-batch-size "$ROLLOUT_BATCH_SIZE"
    --n-samples-per-prompt "$N_SAMPLES_PER_PROMPT"
    --rollout-max-response-len "$ROLLOUT_MAX_RESPONSE_LEN"
    --rollout-temperature "$ROLLOUT_TEMPERATURE"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
    "$( ((batch)) && echo --sglang-batch-requests || echo --no-sglang-batch-requests)"
  )
}

# ta_set_eval_args: EVAL_ARGS, the held-out evaluation flags of train.py (none when EVAL_PROMPT_DATA is empty),
# from EVAL_PROMPT_DATA, EVAL_INTERVAL, EVAL_RM_PATH, EVAL_TEMPERATURE and EVAL_MAX_RESPONSE_LEN.
ta_set_eval_args() {
  EVAL_ARGS=()
  [[ -n "$EVAL_PROMPT_DATA" ]] || return 0
  EVAL_ARGS=(
    --eval-prompt-data heldout "$EVAL_PROMPT_DATA"
    --eval-interval "$EVAL_INTERVAL"
    --eval-custom-rm-path "$EVAL_RM_PATH"
    --eval-temperature "$EVAL_TEMPERATURE"
    --eval-max-response-len "$EVAL_MAX_RESPONSE_LEN"
    --n-samples-per-eval-prompt 1
  )
}

# ta_use_embedded_defaults [teacher]: PROFILE (default: embedded when neither STUDENT_HF nor PROMPT_DATA is set,
# else cluster; anything else is an error), then whatever of STUDENT_HF, PROMPT_DATA and EVAL_PROMPT_DATA is
# unset comes from the cached embedded assets; with "teacher", TEACHER_MODEL too when neither it nor TEACHER_URL
# is set. EVAL_PROMPT_DATA alone never triggers the build.
ta_use_embedded_defaults() {
  local teacher=0
  if [[ "${1:-}" == teacher && -z "$TEACHER_MODEL" && -z "${TEACHER_URL:-}" ]]; then
    teacher=1
  fi
  PROFILE=${PROFILE:-$([[ -z "$STUDENT_HF" && -z "$PROMPT_DATA" ]] && echo embedded || echo cluster)}
  [[ "$PROFILE" == embedded || "$PROFILE" == cluster ]] || ta_die "PROFILE=$PROFILE: expected embedded or cluster"
  if [[ -z "$STUDENT_HF" || -z "$PROMPT_DATA" ]] || ((teacher)); then
    ta_log "using the embedded defaults for what is unset (building them once if needed)"
    [[ -n "$STUDENT_HF" ]] || STUDENT_HF=$(ta_embedded_asset student_dir)
    if ((teacher)); then TEACHER_MODEL=$(ta_embedded_asset teacher_dir); fi
    [[ -n "$PROMPT_DATA" ]] || PROMPT_DATA=$(ta_embedded_asset train_jsonl)
    [[ -n "$EVAL_PROMPT_DATA" ]] || EVAL_PROMPT_DATA=$(ta_embedded_asset eval_jsonl)
  fi
}

# ta_check_train_args FILE...: parse each train_args.txt (one train.py argument per line) with the stack's own
# parser, so an unknown flag, a bad value or a missing file is caught before anything starts. Every bad file is
# named on stderr ("error: FILE: ..."); the status is non-zero when any is bad.
ta_check_train_args() {
  "$(ta_python)" - "$@" << 'PY'
import sys
from pathlib import Path

from slime.utils.arguments import parse_args

bad = 0
for path in sys.argv[1:]:
    try:
        parse_args(Path(path).read_text().splitlines())
    except (SystemExit, Exception) as e:  # argparse exits; validation raises
        bad += 1
        print(f"error: {path}: {type(e).__name__}: {e}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

# ta_seconds_between START END: END - START (both `date +%s.%N`), one decimal.
ta_seconds_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
