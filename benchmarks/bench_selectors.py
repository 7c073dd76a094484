"""Token selection speed: the vectorised ``ta_opd.select_tokens`` vs the per-token reference.

Usage::

    python benchmarks/bench_selectors.py [--samples 64] [--length 4096] [--k 16] [--ratio 0.03]
        [--ref-samples 4] [--train-samples 2] [--threads 1] [--selectors ca_softor,q3] [--out FILE]

What is measured, per selector (every registered mask):

* ``vec_s``: one ``select_tokens`` call (statistics → normalisation → scores → budget → metrics)
  on the whole step, ``samples × length`` response tokens with K-entry top-K lists on both sides
  (best of ``--repeats`` after one warm-up call).
* ``ref_subset_s``: ``tests/ta_opd/reference.py``'s ``select`` (plain Python, one token at a time)
  on the first ``--ref-samples`` samples only, a step of its own; the one-off conversion of
  tensors to Python records is not timed. ``ref_s`` extrapolates it **linearly per token** to the
  full step (the reference's sorts are O(N log N), so this slightly flatters the reference).
* ``ratio`` = ref_s / vec_s; ``identical_masks``: ``select_tokens`` on the same subset gives the
  reference's mask exactly.
* ``share_of_train_step`` = vec_s / train_step_s, where train_step_s is forward+backward of the
  tiny Qwen3 ``student`` (``slime.embedded.models.build_tiny_model``, sequence length ``length``)
  measured on ``--train-samples`` sequences one at a time and scaled linearly to ``samples``.

Both sides run with ``--threads`` torch threads (default 1: the reference is single-threaded, and
on a shared machine OpenMP spin-waiting makes multi-threaded timings meaningless).
``run()`` returns everything as a dict; the script prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ta_opd.atomic_io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 100.0


def _reference():
    sys.path.insert(0, str(ROOT / "tests" / "ta_opd"))
    import reference  # noqa: PLC0415  (tests/ta_opd/reference.py)

    return reference


def make_batch(samples: int, length: int, k: int, seed: int = 0, vocab: int = 64):
    """A synthetic step: correlated student/teacher distributions over ``vocab`` ids, top-K of each."""
    from ta_opd import TokenBatch

    gen = torch.Generator().manual_seed(seed)
    n = samples * length
    base = torch.randn(n, vocab, generator=gen)
    student_full = torch.log_softmax(base * 2.0, dim=1)
    teacher_full = torch.log_softmax((base + 0.7 * torch.randn(n, vocab, generator=gen)) * 2.0, dim=1)
    s_lp, s_ids = student_full.topk(k, dim=1)
    t_lp, t_ids = teacher_full.topk(k, dim=1)
    sampled = torch.multinomial(student_full.exp(), 1, generator=gen).squeeze(1)
    batch = TokenBatch(
        student_topk_ids=s_ids,
        student_topk_logp=s_lp,
        teacher_topk_ids=t_ids,
        teacher_topk_logp=t_lp,
        sampled_ids=sampled,
        student_logp=student_full.gather(1, sampled[:, None]).squeeze(1),
        teacher_logp=teacher_full.gather(1, sampled[:, None]).squeeze(1),
        loss_mask=torch.rand(n, generator=gen) < 0.95,
        sample_index=torch.arange(samples).repeat_interleave(length),
        position=torch.arange(length).repeat(samples),
        response_length=torch.full((n,), length, dtype=torch.long),
        num_samples=samples,
    )
    return batch


def _subset(batch, rows: int):
    from ta_opd import TokenBatch

    fields = {
        name: (value[:rows] if isinstance(value, torch.Tensor) else value) for name, value in vars(batch).items()
    }
    fields["num_samples"] = None
    return TokenBatch(**fields)


def train_step_seconds(samples: int, length: int, measured: int) -> dict:
    """Forward+backward of the tiny student on ``measured`` sequences (one at a time), scaled to ``samples``."""
    from slime.embedded.models import build_tiny_model

    model = build_tiny_model("student", seed=0, max_positions=max(length, 512)).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 98, (measured, length), generator=gen)
    out = model(input_ids=ids[:1, : min(length, 256)], labels=ids[:1, : min(length, 256)])  # warm-up
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i in range(measured):
        out = model(input_ids=ids[i : i + 1], labels=ids[i : i + 1])
        out.loss.backward()
    seconds = time.perf_counter() - t0
    return {
        "train_model": "tiny Qwen3 'student' (hidden 64, 2 layers, vocab 128)",
        "train_measured_sequences": measured,
        "train_measured_s": seconds,
        "train_step_s": seconds * samples / measured,
        "train_method": f"fwd+bwd of {measured} x {length}-token sequences, scaled linearly to {samples}",
    }


def run(
    samples: int = 64,
    length: int = 4096,
    k: int = 16,
    ratio: float = 0.03,
    ref_samples: int = 4,
    train_samples: int = 2,
    threads: int = 1,
    repeats: int = 3,
    selectors: tuple[str, ...] | None = None,
    seed: int = 0,
) -> dict:
    from ta_opd import SELECTORS, SelectionConfig, select_tokens

    ref = _reference()
    torch.set_num_threads(threads)
    names = tuple(selectors) if selectors else tuple(SELECTORS.names())
    batch = make_batch(samples, length, k, seed)
    n_tokens = batch.n_tokens
    ref_samples = min(ref_samples, samples)
    sub = _subset(batch, ref_samples * length)
    t0 = time.perf_counter()
    sub_tokens = ref.tokens_from_batch(sub)
    convert_s = time.perf_counter() - t0

    select_tokens(batch, SelectionConfig(mask=names[0], ratio=ratio))  # warm-up
    rows = {}
    for name in names:
        cfg = SelectionConfig(mask=name, ratio=ratio)
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            result = select_tokens(batch, cfg, rollout_index=1)
            times.append(time.perf_counter() - t0)
        vec_s = min(times)
        t0 = time.perf_counter()
        want = ref.select(sub_tokens, ref.RefConfig.from_selection_config(cfg), k, rollout_index=1)
        ref_subset_s = time.perf_counter() - t0
        got_sub = select_tokens(sub, cfg, rollout_index=1)
        ref_s = ref_subset_s * n_tokens / sub.n_tokens
        rows[name] = {
            "vec_s": vec_s,
            "ref_subset_s": ref_subset_s,
            "ref_s": ref_s,
            "ratio": ref_s / vec_s,
            "vec_us_per_token": vec_s / n_tokens * 1e6,
            "ref_us_per_token": ref_subset_s / sub.n_tokens * 1e6,
            "identical_masks": got_sub.mask.tolist() == want.mask,
            "kept": int(result.mask.sum()),
        }
    train = train_step_seconds(samples, length, train_samples)
    for row in rows.values():
        row["share_of_train_step"] = row["vec_s"] / train["train_step_s"]
    ratios = [r["ratio"] for r in rows.values()]
    return {
        "benchmark": "selectors",
        "samples": samples,
        "length": length,
        "tokens": n_tokens,
        "k": k,
        "rho": ratio,
        "torch_threads": threads,
        "ref_samples": ref_samples,
        "ref_tokens": sub.n_tokens,
        "ref_convert_s": convert_s,
        "ref_method": (
            f"per-token reference timed on the first {ref_samples} samples ({sub.n_tokens} tokens) as their own step, "
            f"extrapolated linearly per token to {n_tokens}"
        ),
        **train,
        "selectors": rows,
        "min_ratio": min(ratios),
        "geomean_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
        "target_ratio": TARGET_RATIO,
        "meets_target": min(ratios) >= TARGET_RATIO,
        "all_identical_masks": all(r["identical_masks"] for r in rows.values()),
    }


def table(res: dict) -> str:
    lines = [
        f"select_tokens vs per-token reference: {res['samples']} samples x {res['length']} tokens = {res['tokens']} "
        f"tokens, K={res['k']}, rho={res['rho']}, {res['torch_threads']} torch thread(s)",
        f"reference: {res['ref_method']}",
        f"training step: {res['train_method']} = {res['train_step_s']:.1f} s",
        f"{'selector':<18} {'vec s':>8} {'ref s (extrap.)':>16} {'ratio':>8} {'us/tok vec':>11} {'us/tok ref':>11} "
        f"{'% train step':>13} {'same mask':>10}",
    ]
    for name, r in res["selectors"].items():
        lines.append(
            f"{name:<18} {r['vec_s']:8.3f} {r['ref_s']:16.1f} {r['ratio']:7.1f}x {r['vec_us_per_token']:11.2f} "
            f"{r['ref_us_per_token']:11.1f} {100 * r['share_of_train_step']:12.2f}% {str(r['identical_masks']):>10}"
        )
    lines.append(
        f"min ratio {res['min_ratio']:.1f}x, geomean {res['geomean_ratio']:.1f}x, "
        f"target >= {res['target_ratio']:.0f}x: {'MET' if res['meets_target'] else 'NOT MET'}; "
        f"identical masks on the subset: {res['all_identical_masks']}"
    )
    return "\n".join(lines)


QUICK_KWARGS = {"samples": 8, "length": 1024, "ref_samples": 2, "train_samples": 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.03)
    p.add_argument("--ref-samples", type=int, default=4, help="samples the per-token reference runs on")
    p.add_argument("--train-samples", type=int, default=2, help="sequences of the measured training step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per selector; the best counts")
    p.add_argument("--selectors", default="", help="comma-separated masks (default: every registered one)")
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK_KWARGS}")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_selectors.json"), help="JSON result path")
    a = p.parse_args(argv)
    kwargs = dict(
        samples=a.samples,
        length=a.length,
        k=a.k,
        ratio=a.ratio,
        ref_samples=a.ref_samples,
        train_samples=a.train_samples,
        threads=a.threads,
        repeats=a.repeats,
        selectors=tuple(s for s in a.selectors.split(",") if s) or None,
    )
    if a.quick:
        kwargs.update(QUICK_KWARGS)
    res = run(**kwargs)
    print(table(res))
    out = atomic_write_text(a.out, json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
