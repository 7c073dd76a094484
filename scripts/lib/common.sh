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

# ta_alias_table: "alias mask" lines from ta_opd.aliases.METHOD_ALIASES (the one table; never retyped here).
ta_alias_table() {
  # The module is loaded from its file: it needs nothing else, and importing the package would load torch
  # (seconds) just to read a dict.
  "$(ta_python)" -c '
import importlib.util, os
spec = importlib.util.find_spec("ta_opd")
path = os.path.join(list(spec.submodule_search_locations)[0], "aliases.py")
mod_spec = importlib.util.spec_from_file_location("_ta_opd_aliases", path)
mod = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(mod)
print("\n".join(f"{k} {v}" for k, v in mod.METHOD_ALIASES.items()))' \
    || ta_die "cannot read ta_opd.aliases.METHOD_ALIASES (is the project installed? pip install -e .)"
}

# ta_parse_method_list "LIST": validate every "alias:ratio:idx" entry, then print one line per entry:
#   "idx alias mask ratio"   (pure_opd's ratio is forced to 1.0)
# Errors (all found, then exit 2): malformed entry, unknown alias, ratio outside (0, 1], duplicate idx.
ta_parse_method_list() {
  local list=$1 table entry alias ratio idx mask errors=() out=() seen=" " entries=()
  [[ -n "${list//[[:space:]]/}" ]] || ta_die "METHOD_LIST is empty; expected entries like 'pure_opd:1.0:10 teachability:0.10:20'"
  table=$(ta_alias_table) || exit 2
  declare -A masks=()
  while read -r alias mask; do [[ -n "$alias" ]] && masks[$alias]=$mask; done <<< "$table"
  read -r -a entries <<< "$list" # word split without glob expansion
  for entry in "${entries[@]}"; do
    if [[ ! "$entry" =~ ^([A-Za-z0-9_]+):([0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?):([0-9]+)$ ]]; then
      errors+=("malformed entry '$entry' (expected alias:ratio:idx, e.g. teachability:0.10:20)")
      continue
    fi
    alias=${BASH_REMATCH[1]}
    ratio=${BASH_REMATCH[2]}
    idx=$((10#${BASH_REMATCH[4]}))
    if [[ -z "${masks[$alias]+x}" ]]; then
      errors+=("entry '$entry': unknown alias '$alias' (known: $(printf '%s ' "${!masks[@]}" | tr ' ' '\n' | sort | xargs))")
      continue
    fi
    mask=${masks[$alias]}
    if [[ "$mask" == "full" ]]; then
      ratio=1.0 # full OPD keeps every token whatever ratio the entry names
    elif ! awk -v r="$ratio" 'BEGIN { exit !(r > 0 && r <= 1) }'; then
      errors+=("entry '$entry': ratio $ratio is outside (0, 1]")
      continue
    fi
    if [[ "$seen" == *" $idx "* ]]; then
      errors+=("entry '$entry': duplicate idx $idx (each entry needs its own idx: it names the run and offsets the seed)")
      continue
    fi
    seen+="$idx "
    out+=("$idx $alias $mask $ratio")
  done
  if ((${#errors[@]})); then
    printf 'error: METHOD_LIST: %s\n' "${errors[@]}" >&2
    exit 2
  fi
  printf '%s\n' "${out[@]}"
}

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
