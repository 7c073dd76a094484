"""Chunked vs naive full-vocabulary loss (OPSD, docs/method.md §7) at Qwen3's vocabulary.

Usage::

    python benchmarks/bench_chunked_loss.py [--tokens 1024] [--hidden 256] [--vocab 151936]
        [--chunk-size 0 (auto)] [--variants naive,fused[,recompute]] [--out results.json]

Every variant computes the OPSD loss (temperature 1.1, per-term clip 0.05, token mean) of a
student `LMHeadInput(hidden [T, H], weight [V, H])` against a teacher with the same LM head
(self-distillation), forward + backward to hidden and weight, CPU float32:

* ``naive``: `chunk_size=0`, the whole `[T, V]` logits and their intermediates at once;
* ``fused``: `ta_opd.chunked.chunked_loss` (the default of `ta_opd.sd_losses` for an LM-head
  input): chunks of rows, gradients computed in the forward pass, nothing recomputed;
* ``recompute``: `chunked_token_values` (one `torch.utils.checkpoint` per chunk) + `agg_loss`.

Memory is measured honestly: each variant runs in a fresh subprocess; we read the process's
resident set size after building the inputs (`psutil`), run one forward + backward, and read
the OS high-water mark `ru_maxrss` (Linux, KiB). The reported peak is `ru_maxrss` − RSS after
set-up, i.e. the extra memory the loss needed (inputs, weights and the weight gradient are
the same in every variant; the [V, H] weight gradient is part of the extra in every variant).
Time is the wall clock of that one forward + backward after a small warm-up call.
Targets: fused peak <= 0.25x naive, fused time <= 1.3x naive.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "fused", "recompute")


def _child(variant: str, tokens: int, hidden: int, vocab: int, chunk_size: int, seed: int) -> dict:
    import psutil
    import torch

    from ta_opd.chunked import LMHeadInput, auto_chunk_size, chunked_token_values
    from ta_opd.losses import agg_loss
    from ta_opd.sd_kernels import opsd_token
    from ta_opd.sd_losses import opsd_loss

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    h_student = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    h_teacher = torch.randn(tokens, hidden, generator=g)
    mask = torch.ones(tokens, dtype=torch.bool)
    rows = chunk_size or auto_chunk_size(vocab)

    def step(n: int) -> tuple[float, float]:
        student = LMHeadInput(h_student[:n], weight)
        teacher = LMHeadInput(h_teacher[:n], weight.detach())
        if variant == "naive":
            loss = opsd_loss(student, teacher, mask[:n], chunk_size=0).loss
        elif variant == "fused":
            loss = opsd_loss(student, teacher, mask[:n], chunk_size=rows).loss
        else:
            from functools import partial

            fn = partial(opsd_token, temperature=1.1, clip=0.05)
            loss = agg_loss(chunked_token_values(fn, student, teacher, {}, rows), mask[:n], "token-mean")
        gh, gw = torch.autograd.grad(loss, (h_student, weight))
        return float(loss), float(gw.norm())

    step(4)  # warm-up (kernels, allocator) on a few rows
    rss_setup = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    loss, grad_norm = step(tokens)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": variant,
        "seconds": seconds,
        "rss_setup_mb": rss_setup / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_extra_mb": (peak - rss_setup) / 2**20,
        "loss": loss,
        "grad_weight_norm": grad_norm,
        "chunk_rows": rows,
    }


def run(
    tokens: int = 1024,
    hidden: int = 256,
    vocab: int = 151_936,
    chunk_size: int = 0,
    variants: tuple[str, ...] = ("naive", "fused"),
    seed: int = 0,
) -> dict:
    """Run each variant in a fresh subprocess; returns per-variant numbers and fused/naive ratios."""
    results: dict[str, dict] = {}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--tokens", str(tokens)]
        cmd += ["--hidden", str(hidden), "--vocab", str(vocab), "--chunk-size", str(chunk_size), "--seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-2000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict = {
        "benchmark": "chunked_loss",
        "loss": "opsd",
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "dtype": "float32",
        "device": "cpu",
        "memory_method": "fresh subprocess per variant; ru_maxrss minus psutil RSS after set-up",
        "variants": results,
    }
    if "naive" in results:
        base = results["naive"]
        for name, res in results.items():
            if name == "naive":
                continue
            out[f"{name}_peak_ratio"] = res["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
            out[f"{name}_time_ratio"] = res["seconds"] / max(base["seconds"], 1e-9)
            out[f"{name}_loss_abs_diff"] = abs(res["loss"] - base["loss"])
        if "fused" in results:
            out["target_peak_ratio"] = 0.25
            out["target_time_ratio"] = 1.3
            out["meets_targets"] = bool(out["fused_peak_ratio"] <= 0.25 and out["fused_time_ratio"] <= 1.3)
    return out


def _table(res: dict) -> str:
    lines = [
        f"chunked vs naive OPSD loss, T={res['tokens']} H={res['hidden']} V={res['vocab']} (CPU float32, fwd+bwd)",
        f"{'variant':<10} {'seconds':>8} {'extra peak MB':>14} {'RSS setup MB':>13} {'loss':>12}",
    ]
    for name, r in res["variants"].items():
        lines.append(
            f"{name:<10} {r['seconds']:8.2f} {r['peak_extra_mb']:14.0f} {r['rss_setup_mb']:13.0f} {r['loss']:12.6f}"
        )
    for name in res["variants"]:
        if f"{name}_peak_ratio" in res:
            lines.append(
                f"{name}/naive: peak {res[f'{name}_peak_ratio']:.3f}x, time {res[f'{name}_time_ratio']:.3f}x "
                f"(|Δloss| {res[f'{name}_loss_abs_diff']:.2e})"
            )
    if "meets_targets" in res:
        lines.append(f"targets (fused): peak <= 0.25x, time <= 1.3x -> {'MET' if res['meets_targets'] else 'NOT MET'}")
    lines.append(f"memory: {res['memory_method']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk; 0 = auto (~2^24 elements)")
    parser.add_argument("--variants", default="naive,fused", help=f"comma list of {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.hidden, args.vocab, args.chunk_size, args.seed)))
        return
    res = run(args.tokens, args.hidden, args.vocab, args.chunk_size, tuple(args.variants.split(",")), args.seed)
    print(_table(res))
    if args.out:
        from ta_opd.atomic_io import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
