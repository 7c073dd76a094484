"""Sparse vs dense LM head of the torch trainer at Qwen3's vocabulary.

Usage::

    python benchmarks/bench_sparse_head.py [--quick] [--tokens 4096] [--hidden 2048] [--vocab 151936]
        [--ratio 0.1] [--phases train,logprobs] [--variants dense,sparse,sparse_fresh_grad] [--out results.json]

Both variants run the project's own code path, ``slime.backends.torch_utils.model.sampled_token_log_probs``
followed by the trainer's loss ``slime.backends.torch_utils.loss.policy_loss`` (PPO-clip, per-sample
mean), exactly as ``TorchTrainRayActor._train_step`` calls them, CPU float32:

* ``train`` phase, forward + backward: ``dense`` (``sparse=False``: ``[T, V]`` logits, log-softmax
  over every position, loss mask applied afterwards) vs ``sparse`` (``sparse=True`` with the kept
  rows only: hidden states gathered, LM head + log-softmax + gather on ``ρ·T`` rows);
* ``logprobs`` phase, no grad: the old log-probs of all ``T`` response tokens
  (``TorchTrainRayActor.compute_log_probs``): ``dense`` vs ``sparse`` with the trainer's default
  ``--lm-head-chunk-size`` (row chunks, so the peak is bounded by the chunk, not by ``T``).

The backbone is a stand-in that returns fixed hidden states ``[1, T + 1, H]`` (a leaf tensor with
``requires_grad``), so the numbers isolate the LM head, the log-softmax and the loss; the LM-head
weight ``[V, H]`` is a trainable parameter. ``T`` response tokens are scored from one sequence;
``round(ρ·T)`` positions are kept at random; the old log-probs of the kept rows are the current ones
(the first PPO step: ratio 1, no clipping), so the gradients are not zero and are compared between
variants.

The train phase measures a steady-state step: the weight's ``[V, H]`` gradient buffer exists before
the step in both variants, as it does in a trainer after its first step. ``dense`` keeps a
persistent ``weight.grad`` zeroed in place (``zero_()``); torch's autograd still makes a fresh
``[V, H]`` gradient in backward and adds it in. ``sparse`` has the trainer's buffer
(``attach_head_grad_buffer``, zeroed with ``set_to_none`` as ``TorchTrainRayActor`` does), which
its backward writes into, so its step allocates no ``[V, H]`` tensor. ``sparse_fresh_grad`` is the
sparse head without the buffer (the gradient allocated in the step, as before the buffer existed);
its ratio to ``dense`` is reported too (``fresh_grad_*`` keys; ``dense_fresh_grad`` with
``--variants`` for the dense side measured the same way).

Memory is measured honestly: each (phase, variant) runs in a fresh subprocess; after building
the inputs (initialised in place, so set-up itself makes no larger transient) and a warm-up on 8
tokens, we read the resident set size (``psutil``), run one step, and read the OS high-water mark
``ru_maxrss``. The reported peak is ``ru_maxrss`` − RSS after set-up: the extra memory the step
needed. Time is the wall clock and the CPU time of that one step. Targets (train phase): sparse
peak and time <= 0.15x dense.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
from common import emit  # noqa: E402

PHASES = ("train", "logprobs")
# train phase: steady state (a persistent weight-gradient buffer) and the sparse head without one; the
# no-grad logprobs phase has no gradient, so only dense and sparse
VARIANTS = ("dense", "sparse", "sparse_fresh_grad", "dense_fresh_grad")
TRAIN_VARIANTS = ("dense", "sparse", "sparse_fresh_grad")
LOGPROB_VARIANTS = ("dense", "sparse")
# The sizes. The no-grad log-prob phase costs as much as the dense forward in *both* variants,
# so by default it runs at 1024 tokens to keep `make bench` under 10 minutes on 2 cores.
FULL = {"tokens": 4096, "hidden": 2048, "vocab": 151_936, "logprob_tokens": 1024}
QUICK = {"tokens": 256, "hidden": 256, "vocab": 151_936, "logprob_tokens": 256}
TARGET_PEAK_RATIO = 0.15
QUICK_KWARGS = {"quick": True}  # what `run_all.py --quick` passes to run()
TARGET_TIME_RATIO = 0.15


def _child(phase: str, variant: str, tokens: int, hidden: int, vocab: int, ratio: float, seed: int) -> dict:
    import math
    from argparse import Namespace
    from types import SimpleNamespace

    import psutil
    import torch

    from slime.backends.torch_utils.loss import policy_loss
    from slime.backends.torch_utils.model import (
        attach_head_grad_buffer,
        build_response_batch,
        sampled_token_log_probs,
    )
    from slime.utils.arguments import get_parser

    class HiddenStandIn(torch.nn.Module):
        """Returns the first L rows of fixed hidden states: the backbone's output without its cost."""

        def __init__(self, length: int, width: int):
            super().__init__()
            self.hidden = torch.nn.Parameter(torch.empty(1, length, width).normal_(generator=gen))

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(last_hidden_state=self.hidden[:, : input_ids.shape[1]])

    class HeadOnlyLM(torch.nn.Module):
        """A causal LM whose ``base_model`` is the stand-in: ``logits = lm_head(last_hidden_state)``."""

        def __init__(self, length: int, width: int, vocab_size: int):
            super().__init__()
            self.base_model = HiddenStandIn(length, width)
            self.lm_head = torch.nn.Linear(width, vocab_size, bias=False, device="meta")
            self.lm_head.weight = torch.nn.Parameter(torch.empty(vocab_size, width).normal_(0, width**-0.5))

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=self.lm_head(self.base_model(input_ids).last_hidden_state))

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = HeadOnlyLM(tokens + 1, hidden, vocab)
    sparse = variant.startswith("sparse")
    weight = model.lm_head.weight
    # steady state: the weight's gradient buffer exists before the step (see the module doc)
    grad_buffer = phase == "train" and not variant.endswith("_fresh_grad")
    if grad_buffer and sparse:
        attach_head_grad_buffer(model)  # what TorchTrainRayActor does with the sparse head
    elif grad_buffer:
        weight.grad = torch.zeros_like(weight)  # a persistent .grad that autograd adds into

    def zero_grad() -> None:
        kept = weight.grad if grad_buffer and not sparse else None
        model.zero_grad(set_to_none=True)  # the trainer's zeroing (the sparse buffer is overwritten next step)
        if kept is not None:
            weight.grad = kept.zero_()  # dense: zeroed in place

    chunk_size = get_parser().get_default("lm_head_chunk_size")
    loss_args = Namespace(eps_clip=0.2, eps_clip_high=0.28, calculate_per_token_loss=False)

    ids = torch.randint(0, vocab, (tokens + 1,), generator=gen).tolist()
    n_keep = max(1, round(ratio * tokens))
    keep = torch.zeros(tokens, dtype=torch.bool)
    keep[torch.randperm(tokens, generator=gen)[:n_keep]] = True
    advantages = torch.randn(tokens, generator=gen)
    # On-policy old log-probs at the kept rows (PPO ratio 1, nothing clipped, so the gradient is not
    # zero); masked rows get a finite filler that the loss never reads. Same values in both variants.
    old_logp = torch.full((tokens,), -math.log(vocab))
    if phase == "train":
        with torch.no_grad():
            full = build_response_batch([ids], [1], [tokens])
            old_logp[keep] = sampled_token_log_probs(model, full, select=keep, sparse=True)

    def train_step(n: int) -> tuple[float, float]:
        """One micro-batch of ``_train_step`` over the first ``n`` response tokens."""
        batch = build_response_batch([ids[: n + 1]], [1], [n])
        mask = keep[:n].clone()
        mask[0] = mask[0] or not bool(mask.any())
        if sparse:
            sel = mask.nonzero().squeeze(-1)  # LM head only at kept positions
            rows_mask = torch.ones(sel.numel(), dtype=torch.bool)
        else:
            sel = torch.arange(n)
            rows_mask = mask
        logp = sampled_token_log_probs(model, batch, select=sel, temperature=1.0, sparse=sparse)
        loss, _ = policy_loss(
            loss_args,
            logp,
            old_logp[:n][sel],
            advantages[:n][sel],
            rows_mask,
            batch.sample_index[sel],
            global_token_count=int(mask.sum()),
            global_sample_count=1,
        )
        loss.backward()
        grad_norm = float(weight.grad.norm())
        zero_grad()
        return float(loss.detach()), grad_norm

    @torch.no_grad()
    def logprob_step(n: int) -> tuple[float, float]:
        """``compute_log_probs``: log-probs of all ``n`` response tokens, no grad."""
        batch = build_response_batch([ids[: n + 1]], [1], [n])
        logp = sampled_token_log_probs(model, batch, temperature=1.0, sparse=sparse, chunk_size=chunk_size)
        return float(logp.double().sum()), float(logp.double().norm())

    step = train_step if phase == "train" else logprob_step
    step(8)  # warm-up (kernels, allocator) on a few tokens
    rss_setup = psutil.Process().memory_info().rss
    highwater_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    value, norm = step(tokens)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "phase": phase,
        "variant": variant,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_setup_mb": rss_setup / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_extra_mb": (peak - rss_setup) / 2**20,
        # the [V, H] weight gradient the step allocates: the dense temporary, the sparse head's without a buffer
        "weight_grad_mb": vocab * hidden * 4 / 2**20 if phase == "train" and not (sparse and grad_buffer) else 0.0,
        "grad_buffer": grad_buffer,
        # False would mean set-up, not the step, set the high-water mark (the peak is then an upper bound)
        "peak_set_by_step": bool(peak > highwater_setup),
        "value": value,
        "norm": norm,
        "kept_tokens": n_keep if phase == "train" else tokens,
        "chunk_rows": chunk_size if (sparse and phase == "logprobs") else None,
        "keeps_logits": bool(sparse and grad_buffer and n_keep <= hidden),  # two backward matmuls, not three
        "torch_threads": torch.get_num_threads(),
    }


def _spawn(phase: str, variant: str, tokens: int, hidden: int, vocab: int, ratio: float, seed: int) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "slime_ta_opd"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{phase}:{variant}", "--tokens", str(tokens)]
    cmd += ["--hidden", str(hidden), "--vocab", str(vocab), "--ratio", str(ratio), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase}/{variant} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    quick: bool = False,
    tokens: int | None = None,
    hidden: int | None = None,
    vocab: int | None = None,
    logprob_tokens: int | None = None,
    ratio: float = 0.1,
    phases: tuple[str, ...] = PHASES,
    seed: int = 0,
    variants: tuple[str, ...] = TRAIN_VARIANTS,
) -> dict:
    """Each (phase, variant) in a fresh subprocess; returns the numbers and sparse/dense ratios.

    Default sizes: the issue's T = 4096, H = 2048, V = 151,936 for the train phase, T = 1024 for the
    no-grad log-prob phase. ``quick``: T = 256, H = 256 (same V), for smoke tests. ``variants``: those of
    the train phase (``dense`` and ``sparse`` always run).
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {VARIANTS}")
    train_variants = ("dense", "sparse", *(v for v in variants if v not in ("dense", "sparse")))
    size = dict(QUICK if quick else FULL)
    given = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "logprob_tokens": logprob_tokens}
    size.update({k: v for k, v in given.items() if v is not None})
    out: dict = {
        "benchmark": "sparse_head",
        **size,
        "rho": ratio,
        "quick": quick,
        "dtype": "float32",
        "device": "cpu",
        "memory_method": "fresh subprocess per (phase, variant); ru_maxrss minus psutil RSS after set-up + warm-up",
        "train_state": "steady state: the [V, H] weight-gradient buffer allocated in set-up in dense and sparse "
        "(dense: persistent .grad zeroed in place, autograd still makes its [V, H] gradient in backward; sparse: "
        "the trainer's buffer, written in place); sparse_fresh_grad: no buffer",
        "phases": {},
    }
    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        t = size["tokens"] if phase == "train" else size["logprob_tokens"]
        res: dict = {"tokens": t}
        names = train_variants if phase == "train" else LOGPROB_VARIANTS
        res.update({v: _spawn(phase, v, t, size["hidden"], size["vocab"], ratio, seed) for v in names})
        res.update(_ratios(res, "sparse", "dense"))
        if "sparse_fresh_grad" in res:  # the sparse head without the buffer vs dense measured the same way
            fresh = _ratios(res, "sparse_fresh_grad", "dense_fresh_grad" if "dense_fresh_grad" in res else "dense")
            res.update({f"fresh_grad_{k}": v for k, v in fresh.items()})
        out["phases"][phase] = res
        for key in ("peak_ratio", "activation_peak_ratio", "time_ratio", "cpu_time_ratio"):
            out[f"{phase}_{key}"] = res[key]
            if f"fresh_grad_{key}" in res:
                out[f"{phase}_fresh_grad_{key}"] = res[f"fresh_grad_{key}"]
    if "train" in out["phases"]:
        out["target_peak_ratio"] = TARGET_PEAK_RATIO
        out["target_time_ratio"] = TARGET_TIME_RATIO
        out["meets_time_target"] = bool(out["train_time_ratio"] <= TARGET_TIME_RATIO)
        out["meets_peak_target"] = bool(out["train_peak_ratio"] <= TARGET_PEAK_RATIO)
        out["meets_activation_peak_target"] = bool(out["train_activation_peak_ratio"] <= TARGET_PEAK_RATIO)
        # the headline pair of run_all's table (train phase: fwd + bwd at the kept rows vs dense)
        # (the sparse head without the buffer, as measured before it: train_fresh_grad_peak_ratio & co.)
        out["ratios"] = {
            "sparse_head_time_vs_dense": out["train_time_ratio"],
            "sparse_head_memory_vs_dense": out["train_peak_ratio"],
        }
    return out


def _ratios(res: dict, num: str, den: str) -> dict:
    """``num`` / ``den`` of one phase: peak, peak without the weight gradient each allocates, wall and CPU time,
    and how far the loss value and gradient norm are apart."""
    a, b = res[num], res[den]
    act = [max(r["peak_extra_mb"] - r["weight_grad_mb"], 0.0) for r in (a, b)]
    return {
        "peak_ratio": a["peak_extra_mb"] / max(b["peak_extra_mb"], 1e-9),
        "activation_peak_ratio": act[0] / max(act[1], 1e-9),
        "time_ratio": a["seconds"] / max(b["seconds"], 1e-9),
        "cpu_time_ratio": a["cpu_seconds"] / max(b["cpu_seconds"], 1e-9),
        "value_abs_diff": abs(a["value"] - b["value"]),
        "norm_rel_diff": abs(a["norm"] - b["norm"]) / max(abs(b["norm"]), 1e-30),
    }


def table(res: dict) -> str:
    lines = [
        f"sparse vs dense LM head, H={res['hidden']} V={res['vocab']} rho={res['rho']} "
        f"(CPU float32{', quick sizes' if res['quick'] else ''})",
        f"{'phase':<9} {'variant':<17} {'T':>5} {'rows':>5} {'wall s':>8} {'cpu s':>8} {'extra peak MB':>14} "
        f"{'w-grad MB':>10}",
    ]
    for phase, r in res["phases"].items():
        for v in (v for v in VARIANTS if v in r):
            x = r[v]
            rows = x["kept_tokens"] if v.startswith("sparse") else r["tokens"]
            lines.append(
                f"{phase:<9} {v:<17} {r['tokens']:>5} {rows:>5} {x['seconds']:8.2f} {x['cpu_seconds']:8.2f} "
                f"{x['peak_extra_mb']:14.0f} {x['weight_grad_mb']:10.0f}"
            )
    for phase, r in res["phases"].items():
        what = "fwd+bwd of head, log-softmax, loss" if phase == "train" else "no-grad old log-probs"
        lines.append(
            f"{phase} ({what}) sparse/dense: peak {r['peak_ratio']:.3f}x "
            f"(without the weight gradient {r['activation_peak_ratio']:.3f}x), time {r['time_ratio']:.3f}x "
            f"(cpu {r['cpu_time_ratio']:.3f}x); |Δ value| {r['value_abs_diff']:.1e}, "
            f"rel Δ norm {r['norm_rel_diff']:.1e}"
        )
        if "fresh_grad_peak_ratio" in r:
            lines.append(
                f"{phase} without the gradient buffer (sparse_fresh_grad/dense): "
                f"peak {r['fresh_grad_peak_ratio']:.3f}x, "
                f"time {r['fresh_grad_time_ratio']:.3f}x (cpu {r['fresh_grad_cpu_time_ratio']:.3f}x); "
                f"rel Δ norm {r['fresh_grad_norm_rel_diff']:.1e}"
            )
    if "target_peak_ratio" in res:
        verdict = {True: "MET", False: "NOT MET"}
        lines.append(
            f"targets (train): time <= {TARGET_TIME_RATIO}x {verdict[res['meets_time_target']]}; "
            f"peak <= {TARGET_PEAK_RATIO}x {verdict[res['meets_peak_target']]} "
            f"(without the weight gradient: {verdict[res['meets_activation_peak_target']]})"
        )
    lines.append(f"memory: {res['memory_method']}")
    lines.append(f"train: {res['train_state']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller sizes: {QUICK}")
    parser.add_argument("--tokens", type=int, default=None, help=f"response tokens T (default {FULL['tokens']})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden size H (default {FULL['hidden']})")
    parser.add_argument("--vocab", type=int, default=None, help=f"vocabulary V (default {FULL['vocab']})")
    parser.add_argument(
        "--logprob-tokens", type=int, default=None, help=f"T of the logprobs phase (default {FULL['logprob_tokens']})"
    )
    parser.add_argument("--ratio", type=float, default=0.1, help="kept-token ratio ρ")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    parser.add_argument(
        "--variants",
        default=",".join(TRAIN_VARIANTS),
        help=f"train-phase variants, comma list of {','.join(VARIANTS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        phase, variant = args.child.split(":")
        print(json.dumps(_child(phase, variant, args.tokens, args.hidden, args.vocab, args.ratio, args.seed)))
        return
    phases = tuple(args.phases.split(","))
    variants = tuple(args.variants.split(","))
    res = run(
        args.quick, args.tokens, args.hidden, args.vocab, args.logprob_tokens, args.ratio, phases, args.seed, variants
    )
    emit(table(res), res, args.out, indent=2)


if __name__ == "__main__":
    main()
