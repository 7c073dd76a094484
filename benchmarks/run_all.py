"""Run every benchmarks/bench_*.py module's ``run()``, each in its own subprocess, and summarise.

Usage::

    python benchmarks/run_all.py [--only NAME[,NAME]] [--quick] [--out benchmarks/results.json]

Each module runs in a fresh Python process (so peak-memory numbers are not polluted by the
previous benchmark); the child calls ``run(**kwargs)`` and reports the returned dict plus its
``ru_maxrss``. ``--quick`` passes the module's ``QUICK_KWARGS`` (or the small sizes listed in
``QUICK_DEFAULTS`` here for modules without one). The summary prints every number whose key
mentions a ratio or a speed-up, then one table of the headline ratios: each module's ``run()``
may return a ``"ratios"`` dict of stable names (``STABLE_RATIOS`` below, e.g.
``sparse_head_time_vs_dense``). All results go to ``--out`` as JSON, written atomically, with the
headline ratios under a top-level ``"ratios"`` object. With ``--only``, the other modules' results
already in ``--out`` (from a run of the same ``--quick`` setting) are kept and their ratios stay in
the table. A failing benchmark is reported (with its stderr tail) and makes the exit status 1; the
others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RATIO_WORDS = ("ratio", "speedup", "share")  # share: a fraction of a step (bench_train_step)

# The headline ratios (the names), in the order of the summary table; a module's run() returns
# those it measures in result["ratios"]. Any other name found there is listed after these.
STABLE_RATIOS = (
    "opd_step_tokens_per_s_vs_trl",
    "teacher_scoring_time_prefix_reuse_vs_off",
    "sparse_head_time_vs_dense",
    "sparse_head_memory_vs_dense",
    "post_process_vs_per_token_reference",
)

# Small sizes for modules that do not define QUICK_KWARGS themselves.
QUICK_DEFAULTS: dict[str, dict] = {
    "bench_rollout": {"prompts": 8, "new_tokens": 16, "naive_prompts": 2},
    "bench_chunked_loss": {"tokens": 256, "vocab": 32_768},
}


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(name: str, quick: bool, out: str) -> None:
    """Runs inside the subprocess: import the module, call run(), write {result, rss} to ``out``."""
    sys.path.insert(0, str(ROOT))
    module = _load(name)
    kwargs = {}
    if quick:
        kwargs = dict(getattr(module, "QUICK_KWARGS", QUICK_DEFAULTS.get(name, {})))
    t0 = time.perf_counter()
    result = module.run(**kwargs)
    payload = {
        "result": result,
        "kwargs": kwargs,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(out).write_text(json.dumps(payload, default=str))


def ratios(result: object, prefix: str = "") -> dict[str, float]:
    """Every numeric entry whose key mentions a ratio/speed-up, flattened as dotted paths."""
    found: dict[str, float] = {}
    if isinstance(result, dict):
        for key, value in result.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                found.update(ratios(value, path))
            elif (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and any(w in str(key) for w in RATIO_WORDS)
                and not str(key).startswith("target")
            ):
                found[path] = float(value)
    return found


def headline_ratios(results: dict[str, dict]) -> dict[str, dict]:
    """``{name: {"value", "benchmark"}}`` from each successful result's ``"ratios"`` dict, stable names first."""
    found: dict[str, dict] = {}
    for bench, r in results.items():
        values = r.get("result", {}).get("ratios") if r.get("ok") and isinstance(r.get("result"), dict) else None
        for key, value in (values or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[str(key)] = {"value": float(value), "benchmark": bench}
    order = [k for k in STABLE_RATIOS if k in found] + sorted(k for k in found if k not in STABLE_RATIOS)
    return {k: found[k] for k in order}


def ratio_table(table: dict[str, dict]) -> str:
    width = max([len(k) for k in (*STABLE_RATIOS, *table)])
    lines = [f"{'ratio':<{width}}  {'value':>9}  benchmark"]
    for key in (*STABLE_RATIOS, *(k for k in table if k not in STABLE_RATIOS)):
        row = table.get(key)
        value, bench = (f"{row['value']:9.3f}", row["benchmark"]) if row else (f"{'-':>9}", "(not run)")
        lines.append(f"{key:<{width}}  {value}  {bench}")
    return "\n".join(lines)


def run_one(name: str, quick: bool, tmp_dir: Path) -> dict:
    out = tmp_dir / f"{name}.json"
    env = dict(os.environ)
    # the two source roots (ta_opd/ and slime_ta_opd/slime), whatever the install state of the package
    paths = [str(ROOT), str(ROOT / "slime_ta_opd"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        return {"ok": False, "wall_s": wall, "error": proc.stderr[-3000:]}
    payload = json.loads(out.read_text())
    payload.update(ok=True, process_wall_s=wall)
    return payload


def _previous(path: Path, quick: bool) -> dict[str, dict]:
    """The per-module results of an earlier run written to ``path`` with the same ``--quick`` setting."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("quick") != quick or not isinstance(old.get("benchmarks"), dict):
        return {}
    return old["benchmarks"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated module names (bench_selectors or selectors)")
    p.add_argument("--quick", action="store_true", help="small sizes (each module's QUICK_KWARGS)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, a.quick, a.child_out)
        return 0
    names = discover()
    if a.only:
        wanted = {w if w.startswith("bench_") else f"bench_{w}" for w in a.only.split(",") if w}
        unknown = sorted(wanted - set(names))
        if unknown:
            p.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in wanted]
    tmp_dir = Path(a.out).resolve().parent / ".bench_tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in names:
        print(f"== {name} ...", flush=True)
        results[name] = run_one(name, a.quick, tmp_dir)
        r = results[name]
        if r["ok"]:
            print(f"   done in {r['process_wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        else:
            print(f"   FAILED after {r['wall_s']:.1f} s:\n{r['error']}", flush=True)
    for f in tmp_dir.glob("*.json"):
        f.unlink()
    tmp_dir.rmdir()

    print("\nsummary (every ratio / speed-up reported):")
    for name, r in results.items():
        if not r["ok"]:
            print(f"  {name}: FAILED")
            continue
        for path, value in ratios(r["result"]).items():
            print(f"  {name}: {path} = {value:.3g}")
    if a.only:
        results = {**_previous(Path(a.out), a.quick), **results}
    headline = headline_ratios(results)
    print("\nheadline ratios:")
    print(ratio_table(headline))
    summary = {
        "quick": a.quick,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ratios": {k: v["value"] for k, v in headline.items()},
        "ratio_sources": {k: v["benchmark"] for k, v in headline.items()},
        "benchmarks": results,
    }
    from ta_opd.atomic_io import atomic_write_text  # here: the parent process needs no torch before

    out = atomic_write_text(a.out, json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
