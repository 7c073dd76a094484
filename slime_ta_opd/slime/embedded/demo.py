"""`make demo`: the method suite on the embedded defaults, on a CPU, in minutes.

1. Builds (once; cached) a teacher and a cold student for the arithmetic task
   (``slime.embedded.assets``), and prints their held-out accuracies.
2. Runs ``scripts/train/run_method_suite.sh``: full OPD, TA-OPD (teachability), random, TIP and
   entropy at a 10 % token budget and the SFT baseline (off-policy SFT on teacher samples), each for
   3 seeds, paired (all methods of a seed see the same prompts in the same order from the same
   student weights), in one process sharing Ray, the engines and the teacher (SHARED_SERVERS=1),
   two runs at a time, each on its own engines, teacher and trainer (SUITE_LANES=2, ``--lanes``).
3. Prints the summary table (accuracy with 95 % CIs, gain vs random, teacher KL, wall time), one
   verdict line per method, the wall time of every run and in all, and where the plots are.

Usage::

    python -m slime.embedded.demo
    python -m slime.embedded.demo --num-rollout 12 --methods "pure_opd teachability random" --seeds "1 2"
    python -m slime.embedded.demo --ratio 0.05 --output-root /tmp/demo

Any environment variable of the launcher (docs/method_suite.md) is passed through.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_METHODS = "pure_opd teachability random tip entropy sft_teacher"
DEFAULT_SEEDS = "1 2 3"


def repo_root() -> Path:
    """The checkout holding scripts/ (the demo runs the same launcher a user would)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "scripts" / "train" / "run_method_suite.sh").is_file():
        raise FileNotFoundError(
            f"scripts/train/run_method_suite.sh not found under {root}; run the demo from a source checkout "
            "(pip install -e .)"
        )
    return root


def method_list(methods: str, ratio: float) -> str:
    """``alias:ratio:idx`` entries, idx 10, 20, ... in the given order (aliases of FORCED_RATIO at theirs)."""
    from ta_opd.aliases import FORCED_RATIO

    aliases = methods.split()
    if not aliases:
        raise ValueError("--methods is empty")
    return " ".join(f"{a}:{FORCED_RATIO.get(a, ratio)}:{10 * (i + 1)}" for i, a in enumerate(aliases))


def run_times(suite_dir: Path) -> list[tuple[str, float | None, int | None]]:
    """(run, wall seconds, exit code) of every run of the suite, from its launcher.json (None: did not run)."""
    out = []
    for run in sorted((suite_dir / "runs").glob("*")):
        path = run / "launcher.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        out.append((run.name, info.get("wall_seconds"), info.get("exit_code")))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=os.environ.get("DEMO_METHODS", DEFAULT_METHODS))
    parser.add_argument("--ratio", type=float, default=0.10, help="token budget of every selector")
    parser.add_argument("--num-rollout", type=int, default=None, help="rollouts per method (default 25)")
    parser.add_argument("--seeds", default=None, help=f"SEEDS of the launcher (default {DEFAULT_SEEDS!r})")
    parser.add_argument("--output-root", default=None, help="default: <repo>/outputs/demo")
    parser.add_argument("--cache-dir", default=None, help="asset cache (default $SLIME_TA_OPD_CACHE or ~/.cache/...)")
    parser.add_argument("--seed", type=int, default=None, help="one seed only (SEEDS=SEED)")
    parser.add_argument(
        "--lanes", type=int, default=None, help="runs at once, each on its own servers (SUITE_LANES; default 2)"
    )
    ns = parser.parse_args(argv)

    from slime.embedded.assets import ensure_assets

    t0 = time.perf_counter()
    root = repo_root()
    print("== 1/3 teacher and student (cached after the first run)", flush=True)
    assets = ensure_assets(ns.cache_dir)
    info = assets.as_dict()
    for role in ("teacher", "student"):
        r = info[role]
        print(
            f"   {role}: {r['size']} ({r['params']:,} parameters), held-out greedy accuracy "
            f"{r['heldout_accuracy_greedy']:.1%}   e.g. {r['example']['prompt']} {r['example']['response']}"
        )

    env = dict(os.environ)
    env.setdefault("METHOD_LIST", method_list(ns.methods, ns.ratio))
    env.setdefault("OUTPUT_ROOT", ns.output_root or str(root / "outputs" / "demo"))
    env.setdefault("SUITE_NAME", time.strftime("demo_%Y%m%d_%H%M%S"))
    env.setdefault("TEACHER_MODEL", str(assets.teacher_dir))
    env.setdefault("STUDENT_HF", str(assets.student_dir))
    env.setdefault("PROMPT_DATA", str(assets.train_jsonl))
    env.setdefault("EVAL_PROMPT_DATA", str(assets.eval_jsonl))
    env.setdefault("PROFILE", "embedded")
    # Several processes (engine, teacher, trainer) share the cores: one thread each avoids
    # OpenMP threads spinning against each other, which slows tiny models by an order of magnitude.
    env.setdefault("OMP_NUM_THREADS", "1")
    # The recipe that moves the cold student (measured with a standalone loop over LR x steps x batch, 3 seeds):
    # 25 steps of 128 prompts x 1 sample, the full-vocabulary reverse KL at the sampled positions (on the kept
    # tokens), LR 2e-3 with a 10-step warm-up and linear decay to 0.1x; held-out accuracy before and after.
    for key, value in (
        ("NUM_ROLLOUT", "25"), ("ROLLOUT_BATCH_SIZE", "128"), ("N_SAMPLES_PER_PROMPT", "1"),
        ("LOSS_TYPE", "jsd"), ("JSD_BETA", "1"),
        ("LR", "2e-3"), ("LR_WARMUP_ITERS", "10"), ("LR_DECAY_STYLE", "linear"), ("MIN_LR", "2e-4"),
        ("EVAL_INTERVAL", "25"),
    ):  # fmt: skip
        env.setdefault(key, value)
    env.setdefault("CONTINUE_ON_ERROR", "1")  # one failed run still leaves the others' table
    env.setdefault("SEEDS", DEFAULT_SEEDS)  # paired: every method once per seed
    env.setdefault("SHARED_SERVERS", "1")  # one Ray session, one set of engines and one teacher for every run
    # the comparison reads the evaluations, not the token banks; writing a bank (57 columns per token as CSV) is
    # about a third of the rollout side's CPU per step here. OPD_TOKEN_BANK=1 keeps them (docs/method_suite.md).
    env.setdefault("OPD_TOKEN_BANK", "0")
    # two runs at once (each lane its own engines, teacher and trainer): one run leaves a core idle most of the time
    env.setdefault("SUITE_LANES", "2")
    if ns.num_rollout is not None:
        env["NUM_ROLLOUT"] = str(ns.num_rollout)
        if "LR_WARMUP_ITERS" not in os.environ:  # the warm-up must end before the decay does: half a short run
            env["LR_WARMUP_ITERS"] = str(min(10, ns.num_rollout // 2))
    if ns.seeds is not None:
        env["SEEDS"] = ns.seeds
    if ns.seed is not None:
        env["SEEDS"] = str(ns.seed)
    if ns.lanes is not None:
        env["SUITE_LANES"] = str(ns.lanes)
    suite_dir = Path(env["OUTPUT_ROOT"]) / env["SUITE_NAME"]
    n_runs = len(env["METHOD_LIST"].split()) * len(env["SEEDS"].split())
    print(f"== 2/3 method suite: {n_runs} runs -> {suite_dir}", flush=True)
    print(f"   METHOD_LIST={env['METHOD_LIST']} SEEDS={env['SEEDS']}", flush=True)
    t_suite = time.perf_counter()
    rc = subprocess.call(["bash", str(root / "scripts" / "train" / "run_method_suite.sh")], env=env)
    t_end = time.perf_counter()
    print(f"== 3/3 results ({t_end - t0:.0f} s in all: suite {t_end - t_suite:.0f} s)", flush=True)
    times = run_times(suite_dir) if (suite_dir / "runs").is_dir() else []
    for name, wall, code in times:
        state = "not run" if wall is None else f"{wall:.0f} s" + ("" if code == 0 else f" (exit {code})")
        print(f"   {name}: {state}")
    summary = suite_dir / "summary.md"
    if summary.is_file():  # the table and the verdict lines come last
        for name in ("summary.csv", "runs.csv", "plots/curves.png", "plots/accuracy_vs_budget.png"):
            if (suite_dir / name).is_file():
                print(f"   {name}: {suite_dir / name}")
        print(summary.read_text(), end="")
    if rc != 0:
        print(f"the suite failed (exit {rc}); logs: {suite_dir}/runs/*/train.log", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
