"""The OPD post-process end to end vs a plain per-token Python reference, on SGLang-shaped answers.

Usage::

    python benchmarks/bench_post_process.py [--samples 32] [--tokens 7944] [--k 16] [--ratio 0.1]
        [--mask dlearn_high] [--repeats 5] [--out FILE]

Input: ``--samples`` rollout samples with ``--tokens`` response tokens in all (lengths differ by at
most one), each carrying what the rollout and the teacher leave on a sample: the student's per-position
top-K in ``metadata["student_top_logprobs"]`` and the teacher's ``/generate`` answer in ``sample.reward``
(``meta_info.input_token_logprobs`` and ``input_top_logprobs``, SGLang's ``[logprob, token id, None]``
entries, K per position, best first), ``rollout_log_probs`` and ``loss_mask``.

* ``post_process``: the project's ``post_process_rewards`` (``slime.rollout.on_policy_distillation``),
  i.e. parse the answers, pack both top-K sides into tensors (``ta_opd.topk.pack_topk``), statistics,
  normalisation, scores, budget, masks written back into ``sample.loss_mask``; ``select_tokens``
  and ``pack_topk`` are also timed inside it.
* ``reference``: the same work one token at a time in plain Python: each position's lists become
  dicts (finite entries, best first, first K distinct ids), then ``tests/ta_opd/reference.py``'s
  ``select`` (statistics, normalisation, scores, budget, min-keep, metrics).

Both run in this process, one thread, alternating, ``--repeats`` times each; medians (and min/max)
of wall and CPU time are reported, and the masks of the two are compared. The ratio
``post_process_vs_per_token_reference`` is reference / post-process (median wall time).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
from common import add_run_options, emit, met, parser, reference, spread  # noqa: E402

TARGET_RATIO = 10.0
FULL = {"samples": 32, "tokens": 7944, "k": 16}
QUICK_KWARGS = {"samples": 4, "tokens": 256, "k": 8, "repeats": 2}


def _args(k: int, mask: str, ratio: float):
    from slime.utils.arguments import parse_args

    return parse_args(
        ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:1/generate", "--rollout-batch-size", "1",
         "--rollout-max-response-len", "8192", "--hf-checkpoint", str(ROOT),
         "--opd-budget-mask", mask, "--opd-budget-ratio", str(ratio), "--opd-topk-metrics-k", str(k)]
    )  # fmt: skip


def make_samples(samples: int, tokens: int, k: int, seed: int = 0, vocab: int = 4096, prompt_len: int = 16):
    """Samples as the rollout and ``reward_func`` leave them (Python lists, as decoded from SGLang's JSON)."""
    from slime.rollout.on_policy_distillation import STUDENT_TOPK_KEY
    from slime.utils.types import Sample

    gen = torch.Generator().manual_seed(seed)
    lengths = [tokens // samples + (1 if i < tokens % samples else 0) for i in range(samples)]
    n = sum(lengths)
    # correlated student/teacher logits over a small candidate set per position, then top-K of each
    cand = 4 * k
    base = torch.randn(n, cand, generator=gen)
    s_full = torch.log_softmax(base * 2.0, dim=1).double()
    t_full = torch.log_softmax((base + 0.7 * torch.randn(n, cand, generator=gen)) * 2.0, dim=1).double()
    cand_ids = torch.stack([torch.randperm(vocab, generator=gen)[:cand] for _ in range(n)])
    s_lp, s_col = s_full.topk(k, dim=1)
    t_lp, t_col = t_full.topk(k, dim=1)
    s_ids, t_ids = cand_ids.gather(1, s_col), cand_ids.gather(1, t_col)
    picked = torch.multinomial(s_full.exp(), 1, generator=gen).squeeze(1)
    sampled = cand_ids.gather(1, picked[:, None]).squeeze(1)
    s_logp = s_full.gather(1, picked[:, None]).squeeze(1)
    t_logp = t_full.gather(1, picked[:, None]).squeeze(1)
    valid = torch.rand(n, generator=gen) < 0.97
    rows = (s_lp.tolist(), s_ids.tolist(), t_lp.tolist(), t_ids.tolist())
    out, start = [], 0
    for i, length in enumerate(lengths):
        sl = slice(start, start + length)
        s_top, t_top = (_entries(lps[sl], ids[sl]) for lps, ids in ((rows[0], rows[1]), (rows[2], rows[3])))
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        response = sampled[sl].tolist()
        answer = {
            "text": "",
            "meta_info": {
                # logprob_start_len = prompt_len - 1: the last prompt token has no log-prob of its own
                "input_token_logprobs": [[None, prompt[-1], None]]
                + [[lp, tid, None] for lp, tid in zip(t_logp[sl].tolist(), response, strict=True)],
                "input_top_logprobs": [None] + t_top,
            },
        }
        sample = Sample(group_index=i, index=i, tokens=prompt + response, response_length=length)
        sample.rollout_log_probs = s_logp[sl].tolist()
        sample.loss_mask = [int(v) for v in valid[sl].tolist()]
        sample.metadata = {STUDENT_TOPK_KEY: s_top}
        sample.reward = answer
        out.append(sample)
        start += length
    return out


def _entries(lps: list[list[float]], ids: list[list[int]]) -> list[list[list]]:
    """SGLang's per-position lists: ``[logprob, token id, None]`` per entry."""
    return [[[lp, tid, None] for lp, tid in zip(a, b, strict=True)] for a, b in zip(lps, ids, strict=True)]


def _clean(row, k: int) -> dict[int, float]:
    """One position's SGLang list as the reference's dict: finite entries, best first, first K distinct ids."""
    pairs = []
    for entry in row or []:
        if entry is None or entry[0] is None or entry[1] is None:
            continue
        lp, tid = float(entry[0]), int(entry[1])
        if math.isfinite(lp) and tid >= 0:
            pairs.append((lp, tid))
    pairs.sort(key=lambda p: -p[0])
    out: dict[int, float] = {}
    for lp, tid in pairs:
        if tid not in out and len(out) < k:
            out[tid] = lp
    return out


def reference_post_process(ref, samples, k: int, cfg) -> list[list[int]]:
    """Per-token reference: parse each position's lists into a record, then ``reference.select``."""
    from slime.rollout.on_policy_distillation import STUDENT_TOPK_KEY

    tokens = []
    for s_i, sample in enumerate(samples):
        length = sample.response_length
        meta = sample.reward["meta_info"]
        t_lp = meta["input_token_logprobs"][-length:]
        t_top = meta["input_top_logprobs"][-length:]
        s_top = sample.metadata[STUDENT_TOPK_KEY]
        response = sample.tokens[-length:]
        for j in range(length):
            tokens.append(
                ref.RefToken(
                    student=_clean(s_top[j], k),
                    teacher=_clean(t_top[j], k),
                    sampled=int(response[j]),
                    student_logp=float(sample.rollout_log_probs[j]),
                    teacher_logp=float(t_lp[j][0]),
                    valid=bool(sample.loss_mask[j]),
                    sample=s_i,
                    position=j,
                    length=length,
                )
            )
    result = ref.select(tokens, cfg, k, rollout_index=0)
    masks, start = [], 0
    for sample in samples:
        masks.append([int(v) for v in result.mask[start : start + sample.response_length]])
        start += sample.response_length
    return masks


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t0, time.process_time() - c0


def run(
    samples: int = FULL["samples"],
    tokens: int = FULL["tokens"],
    k: int = FULL["k"],
    ratio: float = 0.1,
    mask: str = "dlearn_high",
    repeats: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> dict:
    import slime.rollout.on_policy_distillation as opd
    import ta_opd.topk as topk

    ref = reference()
    torch.set_num_threads(threads)
    args = _args(k, mask, ratio)
    batch = make_samples(samples, tokens, k, seed)
    loss_masks = [list(s.loss_mask) for s in batch]
    cfg = ref.RefConfig.from_selection_config(opd_module(opd).selection_config_from_args(args))

    # time pack_topk and select_tokens where post_process_rewards reaches them (module globals)
    inner: dict[str, list[float]] = {"pack_topk": [], "select_tokens": []}
    patched = [(topk, "pack_topk"), (opd_module(opd), "select_tokens")]
    originals = [getattr(m, name) for m, name in patched]

    def wrap(name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                inner[name].append(time.perf_counter() - t0)

        return timed

    def ours():
        for s, m in zip(batch, loss_masks, strict=True):
            s.loss_mask = list(m)  # the post-process overwrites loss_mask with the selection
        return opd.post_process_rewards(args, batch, rollout_id=0)

    def theirs():
        for s, m in zip(batch, loss_masks, strict=True):
            s.loss_mask = list(m)
        return reference_post_process(ref, batch, k, cfg)

    wall = {"post_process": [], "reference": []}
    cpu = {"post_process": [], "reference": []}
    per_call = {"pack_topk": [], "select_tokens": []}
    try:
        for (m, name), fn in zip(patched, originals, strict=True):
            setattr(m, name, wrap(name, fn))
        ours()  # warm-up (kernel build/load, allocator)
        for _ in range(max(repeats, 1)):
            for key in inner:
                inner[key].clear()
            _, w, c = _timed(ours)
            wall["post_process"].append(w)
            cpu["post_process"].append(c)
            for key in inner:
                per_call[key].append(sum(inner[key]))
            _, w, c = _timed(theirs)
            wall["reference"].append(w)
            cpu["reference"].append(c)
    finally:
        for (m, name), fn in zip(patched, originals, strict=True):
            setattr(m, name, fn)
    ours()
    got = [list(s.loss_mask) for s in batch]
    want = theirs()
    med = {key: statistics.median(v) for key, v in wall.items()}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
    ratio_value = med["reference"] / med["post_process"]
    return {
        "benchmark": "post_process",
        "samples": samples,
        "tokens": sum(s.response_length for s in batch),
        "k": k,
        "mask": mask,
        "rho": ratio,
        "repeats": repeats,
        "torch_threads": threads,
        "wall_s": {key: spread(v) for key, v in wall.items()},
        "cpu_s": {key: spread(v) for key, v in cpu.items()},
        "inside_post_process_s": {key: spread(v) for key, v in per_call.items()},
        "post_process_vs_per_token_reference": ratio_value,
        "post_process_vs_per_token_reference_cpu_ratio": med_cpu["reference"] / med_cpu["post_process"],
        "identical_masks": got == want,
        "kept": sum(map(sum, got)),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio_value >= TARGET_RATIO,
        "ratios": {"post_process_vs_per_token_reference": ratio_value},
    }


def opd_module(opd):
    """The module whose global ``select_tokens`` post_process_rewards calls (the patch file itself)."""
    return sys.modules[opd.post_process_rewards.__module__]


def table(res: dict) -> str:
    w, c, inside = res["wall_s"], res["cpu_s"], res["inside_post_process_s"]
    lines = [
        f"OPD post-process vs per-token reference: {res['samples']} samples, {res['tokens']} response tokens, "
        f"K={res['k']}, mask {res['mask']} rho={res['rho']}, {res['repeats']} repeats, "
        f"{res['torch_threads']} thread(s)",
        f"{'':<28} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s':>8}",
    ]
    for key in ("post_process", "reference"):
        lines.append(
            f"{key:<28} {w[key]['median']:9.4f} {w[key]['min']:8.4f} {w[key]['max']:8.4f} {c[key]['median']:8.4f}"
        )
    for key, v in inside.items():
        lines.append(f"{'  of which ' + key:<28} {v['median']:9.4f} {v['min']:8.4f} {v['max']:8.4f}")
    lines.append(
        f"ratio {res['post_process_vs_per_token_reference']:.1f}x (cpu "
        f"{res['post_process_vs_per_token_reference_cpu_ratio']:.1f}x), target >= {res['target_ratio']:.0f}x: "
        f"{met(res['meets_target'])}; identical masks: {res['identical_masks']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=FULL["samples"])
    p.add_argument("--tokens", type=int, default=FULL["tokens"], help="response tokens of the whole step")
    p.add_argument("--k", type=int, default=FULL["k"])
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--mask", default="dlearn_high")
    p.add_argument("--repeats", type=int, default=5)
    add_run_options(p, QUICK_KWARGS)
    a = p.parse_args(argv)
    kwargs = dict(samples=a.samples, tokens=a.tokens, k=a.k, ratio=a.ratio, mask=a.mask, repeats=a.repeats)
    kwargs["threads"] = a.threads
    if a.quick:
        kwargs.update(QUICK_KWARGS)
    res = run(**kwargs)
    emit(table(res), res, a.out)


if __name__ == "__main__":
    main()
