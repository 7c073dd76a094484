#!/usr/bin/env bash
# Budget sweep: every method in METHODS at every ratio in BUDGETS (plus one Full OPD reference),
# then a held-out evaluation of each final checkpoint, then one summary table and plots.
#
# Usage:
#   bash scripts/train/run_budget_sweep.sh                                    # embedded defaults
#   METHODS="teachability tip random" BUDGETS="0.02 0.05 0.1 0.2" NUM_ROLLOUT=30 \
#     bash scripts/train/run_budget_sweep.sh
#
# Each budget is one suite (scripts/train/run_method_suite.sh, same environment variables) under
# $OUTPUT_ROOT/$SWEEP_NAME/budget_<ratio>; a method keeps its idx (10, 20, ...) and so its seed
# across budgets. INCLUDE_FULL_OPD=0 skips the reference run. Every entry of every budget is
# validated before anything starts. Outputs: $OUTPUT_ROOT/$SWEEP_NAME/{summary.csv, summary.md, plots/}.
# An existing sweep is refused unless RESUME=1 (every suite resumes: finished entries skipped, finished
# evaluations kept) or FORCE=1 (the old sweep directory is moved aside to <sweep>.replaced-<date>_<time>).
# SKIP_EVAL=0 (the default with real models) also scores every trained student on one set of shared frozen contexts
# (built by the first suite, or COMMON_CONTEXT; θ0 scored once, or BASELINE_METRICS) and writes the per-selector ×
# budget table and the gain-vs-ratio curve: $OUTPUT_ROOT/$SWEEP_NAME/fixed_context/{budget_table.csv,budget_table.md,
# gain_vs_ratio.csv,gain_vs_ratio.png}. The release's sweep (RUN_LIST): scripts/train/run_opd_budget_ratio_sweep.sh.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
source "$SCRIPT_DIR/../lib/common.sh"
REPO_ROOT=$TA_OPD_REPO_ROOT

ta_exit_on_help "${BASH_SOURCE[0]}" "$@"

METHODS=${METHODS-"teachability teachability_entropy entropy tip divergence random"}
BUDGETS=${BUDGETS-"0.05 0.1 0.2"}
INCLUDE_FULL_OPD=${INCLUDE_FULL_OPD:-1}
ta_require_flag INCLUDE_FULL_OPD RESUME FORCE
OUTPUT_ROOT=${OUTPUT_ROOT:-$REPO_ROOT/outputs/budget_sweep}
SWEEP_NAME=${SWEEP_NAME:-sweep_$(date +%Y%m%d_%H%M%S)}
SWEEP_DIR="$OUTPUT_ROOT/$SWEEP_NAME"

read -r -a METHOD_ARRAY <<< "$METHODS"
read -r -a BUDGET_ARRAY <<< "$BUDGETS"
((${#METHOD_ARRAY[@]})) || ta_die "METHODS is empty; expected aliases like 'teachability tip random'"
((${#BUDGET_ARRAY[@]})) || ta_die "BUDGETS is empty; expected ratios > 0 like '0.05 0.1'"

# One METHOD_LIST per budget, all validated before anything runs.
declare -A LISTS=()
for budget in "${BUDGET_ARRAY[@]}"; do
  list=""
  i=0
  for method in "${METHOD_ARRAY[@]}"; do
    i=$((i + 1))
    [[ "$method" == pure_opd ]] && ta_die "METHODS: pure_opd has no budget; it runs once as the reference (INCLUDE_FULL_OPD=1)"
    list+="$method:$budget:$((10 * i)) "
  done
  ta_parse_method_list "$list" > /dev/null
  LISTS[$budget]=$list
done

ta_prepare_output_dir "sweep directory (SWEEP_NAME=$SWEEP_NAME)" "$SWEEP_DIR" # refuse / RESUME / FORCE

SKIP_EVAL=${SKIP_EVAL:-$([[ -z "${STUDENT_HF:-}" && -z "${PROMPT_DATA:-}" ]] && echo 1 || echo 0)}
ta_require_flag SKIP_EVAL
SUITES=()
run_suite() { # run_suite NAME METHOD_LIST (a fresh sweep has fresh suites; RESUME=1 resumes each)
  SUITES+=("$SWEEP_DIR/$1")
  OUTPUT_ROOT=$SWEEP_DIR SUITE_NAME=$1 METHOD_LIST=$2 SAVE_CHECKPOINT=1 SUMMARIZE=0 RESUME=$TA_RESUMING FORCE=0 \
    SKIP_EVAL=$SKIP_EVAL bash "$SCRIPT_DIR/run_method_suite.sh"
  if ((!SKIP_EVAL)); then # every later suite reuses the first suite's contexts and θ0 scores
    export COMMON_CONTEXT=${COMMON_CONTEXT:-$SWEEP_DIR/$1/fixed_context/contexts.jsonl}
    export BASELINE_METRICS=${BASELINE_METRICS:-$SWEEP_DIR/$1/fixed_context/theta0/token_stats.parquet}
  fi
}

if ((INCLUDE_FULL_OPD)); then
  run_suite full_opd "pure_opd:1.0:0"
fi
for budget in "${BUDGET_ARRAY[@]}"; do
  run_suite "budget_$budget" "${LISTS[$budget]}"
done

# Post-hoc evaluation of every final checkpoint (greedy, on the held-out prompts).
EVAL_DATA=${EVAL_PROMPT_DATA:-}
[[ -n "$EVAL_DATA" ]] || EVAL_DATA=$(ta_embedded_asset eval_jsonl)
for suite in "${SUITES[@]}"; do
  # the suite's own entries (method_mapping.csv), not whatever else lies under runs/
  mapfile -t run_dirs < <(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "run_dir") c = i; next } { print $c }' \
    "$suite/method_mapping.csv")
  for rel in "${run_dirs[@]}"; do
    run_dir="$suite/$rel"
    if [[ -f "$run_dir/eval_accuracy.json" && -f "$run_dir/$TA_COMPLETE_MARKER" \
      && "$run_dir/eval_accuracy.json" -nt "$run_dir/$TA_COMPLETE_MARKER" ]]; then
      ta_log "$run_dir already evaluated after it finished; kept"
    elif [[ -f "$run_dir/checkpoints/latest_checkpointed_iteration.txt" ]]; then
      ta_log "evaluating $run_dir"
      bash "$REPO_ROOT/scripts/eval/eval_accuracy.sh" "$run_dir/checkpoints" "$EVAL_DATA" "$run_dir/eval_accuracy.json"
    else
      ta_log "no checkpoint in $run_dir; skipped"
    fi
  done
done

suite_args=()
for suite in "${SUITES[@]}"; do suite_args+=(--suite-dir "$suite"); done
"$(ta_python)" "$REPO_ROOT/tools/summarize_suite.py" "${suite_args[@]}" --out-dir "$SWEEP_DIR"
if ((!SKIP_EVAL)) && [[ "${DRY_RUN:-0}" != 1 ]]; then # one table and the curve over every suite of the sweep
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$(ta_python)" -m ta_opd.diagnostics.cli.suite_eval table \
    "${suite_args[@]}" --out-dir "$SWEEP_DIR/fixed_context" --curve --bootstrap "${BOOTSTRAP:-1000}"
fi
ta_log "sweep done: $SWEEP_DIR"
