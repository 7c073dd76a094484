"""A plain per-token reference of METHOD.md §2–5 and §9, written from the spec with Python loops.

Nothing here imports the vectorised modules' math: one token at a time, dictionaries for the top-K
lists, ``math.log``/``math.exp``, ``sorted`` with explicit key tuples. Only the random selector
draws its uniform scores from the same seeded ``torch.Generator`` stream (the seed is the spec).
The vectorised code in ``ta_opd`` must give identical masks and allclose statistics.

Floating-point choices that matter for bit-exact ranking are spelled out where both sides must
agree: soft-OR is written 1 − (1 − a)(1 − b) (exact 1 whenever an input is 1), normalisation is
(z − lo)/(hi − lo) clipped, quantiles interpolate as lo + (hi − lo)·frac.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FLOOR = 1e-12


@dataclass
class RefToken:
    student: list[tuple[int, float]]  # (id, logp) entries of S_t, list order
    teacher: list[tuple[int, float]]
    sampled: int
    student_logp: float
    teacher_logp: float
    valid: bool
    sample: int
    position: int
    length: int
    exact: list[float] | None = None  # teacher log-prob per student entry (exact C), list order of `student`
    exact_available: bool = True
    student_known: bool = True


@dataclass
class RefConfig:
    mask: str = "full"
    ratio: float = 1.0
    seed: int = 42
    min_keep_per_sample: int = 1
    gamma: float = 0.5
    compat_proxy: str = "mass"
    prefix_ema_alpha: float = 0.9
    normalization: str = "batch_quantile"
    q_low: float = 0.05
    q_high: float = 0.95
    k: int = 16
    ca_softor_variant: str = "code"
    exact_cmass: bool = False
    exact_cmass_max_union: int = 4096
    exact_cmass_overflow: str = "fallback"
    nonfinite_policy: str = "error"


@dataclass
class RefResult:
    mask: list[bool]
    stats: list[dict[str, float]]
    features: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    n_budget: int = 0


def tokens_from_batch(batch: Any) -> list[RefToken]:
    """Turn a ``TokenBatch`` into plain Python records (finite entries with id >= 0 only)."""

    def entries(ids: list[int], logp: list[float]) -> list[tuple[int, float]]:
        return [(i, lp) for i, lp in zip(ids, logp, strict=True) if i >= 0 and math.isfinite(lp)]

    out = []
    n = batch.sampled_ids.shape[0]
    s_ids, s_lp = batch.student_topk_ids.tolist(), batch.student_topk_logp.double().tolist()
    t_ids, t_lp = batch.teacher_topk_ids.tolist(), batch.teacher_topk_logp.double().tolist()
    exact = None if batch.teacher_logp_on_student_topk is None else batch.teacher_logp_on_student_topk.double().tolist()
    avail = None if batch.exact_available is None else batch.exact_available.tolist()
    known = None if batch.student_logp_known is None else batch.student_logp_known.tolist()
    for r in range(n):
        st = entries(s_ids[r], s_lp[r])
        ex = None
        if exact is not None:  # keep the exact value aligned with the kept student entries
            ex = [e for i, lp, e in zip(s_ids[r], s_lp[r], exact[r], strict=True) if i >= 0 and math.isfinite(lp)]
        out.append(
            RefToken(
                student=st,
                teacher=entries(t_ids[r], t_lp[r]),
                sampled=int(batch.sampled_ids[r]),
                student_logp=float(batch.student_logp[r]),
                teacher_logp=float(batch.teacher_logp[r]),
                valid=bool(batch.loss_mask[r]),
                sample=int(batch.sample_index[r]),
                position=int(batch.position[r]),
                length=int(batch.response_length[r]),
                exact=ex,
                exact_available=True if avail is None else bool(avail[r]),
                student_known=True if known is None else bool(known[r]),
            )
        )
    return out


# ---------------------------------------------------------------- §2 statistics, one token at a time


def token_stats(tok: RefToken, k: int) -> dict[str, float]:
    s = {i: math.exp(lp) for i, lp in tok.student}
    t = {i: math.exp(lp) for i, lp in tok.teacher}
    union = [i for i, _ in tok.student] + [i for i, _ in tok.teacher if i not in s]
    s_sum = sum(s.values())
    t_sum = sum(t.values())
    klf = klr = bc = 0.0
    if s_sum > 0 and t_sum > 0:
        for v in union:
            sh = max(s.get(v, 0.0) / s_sum, FLOOR)
            th = max(t.get(v, 0.0) / t_sum, FLOOR)
            klf += th * (math.log(th) - math.log(sh))
            klr += sh * (math.log(sh) - math.log(th))
            bc += math.sqrt(sh * th)
    shared = sum(t[v] for v in s if v in t)
    positive = [p for p in s.values() if p > 0]
    if positive:
        z = sum(positive)
        ent = -sum((p / z) * math.log(p / z) for p in positive)
        h = ent / math.log(max(len(positive), 2))
    else:
        h = 0.0
    t_top = max(tok.teacher, key=lambda e: e[1]) if tok.teacher else None  # max() keeps the first of equals
    s_top = max(tok.student, key=lambda e: e[1]) if tok.student else None

    def rank(entries: list[tuple[int, float]]) -> int:
        for i, lp in entries:
            if i == tok.sampled:
                return sum(1 for _, other in entries if other > lp)
        return -1

    return {
        "kl_f_union": klf,
        "kl_r_union": klr,
        "bc": bc,
        "cmass": min(max(shared, 0.0), 1.0),
        "entropy_norm": h,
        "overlap": len([v for v in t if v in s]) / max(k, 1),
        "reach_t1": float(t_top is not None and t_top[0] in s),
        "student_rank_sampled": rank(tok.student),
        "teacher_rank_sampled": rank(tok.teacher),
        "position_norm": tok.position / max(tok.length - 1, 1),
        "student_top1_id": s_top[0] if s_top else -1,
        "student_top1_prob": math.exp(s_top[1]) if s_top else 0.0,
        "teacher_top1_id": t_top[0] if t_top else -1,
        "teacher_top1_prob": math.exp(t_top[1]) if t_top else 0.0,
        "student_topk_mass": s_sum,
        "teacher_topk_mass": t_sum,
        "teacher_mass_on_shared": shared,
    }


def exact_cmass(tokens: list[RefToken], cfg: RefConfig) -> list[float]:
    """Exact C per token with the union overflow rule, sample by sample (METHOD.md §2)."""
    allowed: dict[int, set[int] | None] = {}  # sample → ids whose exact value may be used (None: all)
    for sample in sorted({tok.sample for tok in tokens}):
        best: dict[int, float] = {}
        for tok in tokens:
            if tok.sample == sample and tok.exact_available:
                for i, lp in tok.student:
                    best[i] = max(best.get(i, -math.inf), lp)
        if len(best) <= cfg.exact_cmass_max_union:
            allowed[sample] = None
        elif cfg.exact_cmass_overflow == "error":
            raise ValueError(f"sample {sample}: union {len(best)} > {cfg.exact_cmass_max_union}")
        elif cfg.exact_cmass_overflow == "fallback":
            allowed[sample] = set()
        else:
            ranked = sorted(best, key=lambda i: (-best[i], i))
            allowed[sample] = set(ranked[: cfg.exact_cmass_max_union])
    out = []
    for tok in tokens:
        t = {i: math.exp(lp) for i, lp in tok.teacher}
        total = 0.0
        for j, (i, _) in enumerate(tok.student):
            ids = allowed[tok.sample]
            ex = tok.exact[j] if tok.exact is not None else -math.inf
            if tok.exact_available and (ids is None or i in ids) and math.isfinite(ex):
                total += math.exp(ex)
            else:
                total += t.get(i, 0.0)
        out.append(min(max(total, 0.0), 1.0))
    return out


def prefix_ema(tokens: list[RefToken], values: list[float], alpha: float) -> list[float]:
    out = [0.0] * len(tokens)
    by_sample: dict[int, list[int]] = {}
    for r, tok in enumerate(tokens):
        by_sample.setdefault(tok.sample, []).append(r)
    for rows in by_sample.values():
        rows.sort(key=lambda r: tokens[r].position)
        e = 0.0
        for j, r in enumerate(rows):
            e = values[r] if j == 0 else alpha * e + (1.0 - alpha) * values[r]
            out[r] = e
    return out


# ---------------------------------------------------------------- §3 normalisation


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def normalize(values: list[float], method: str, q_low: float, q_high: float) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    if method == "batch_quantile":
        lo, hi = quantile(finite, q_low), quantile(finite, q_high)
    elif method == "batch_minmax":
        lo, hi = min(finite), max(finite)
    elif method == "none":
        lo, hi = 0.0, max(max(finite), 1e-12)
    else:
        raise ValueError(method)
    if abs(hi - lo) < 1e-12:
        return [0.0] * len(values)
    return [min(max((v - lo) / (hi - lo), 0.0), 1.0) if math.isfinite(v) else 0.0 for v in values]


def soft_or(a: float, b: float) -> float:
    return 1.0 - (1.0 - a) * (1.0 - b)


# ---------------------------------------------------------------- §4 scores


def scores_for(name: str, f: dict[str, list[float]], cfg: RefConfig, rollout_index: int) -> list[float]:
    n = len(f["h"])
    h, d, c, dc = f["h"], f["d"], f["c"], f["dc"]
    dl = [d[i] * c[i] for i in range(n)]
    di = [d[i] * (1.0 - c[i]) for i in range(n)]
    if name == "full":
        return [1.0] * n
    if name in ("dlearn_high", "q3_dlearn_high", "q3_dlearn_low"):
        return dl
    if name == "ca_softor":
        return [soft_or(h[i], dc[i] if cfg.ca_softor_variant == "code" else dl[i]) for i in range(n)]
    if name == "entropy":
        return list(h)
    if name == "tip":
        return [soft_or(h[i], d[i]) for i in range(n)]
    if name == "divergence":
        return list(d)
    if name == "random":
        gen = torch.Generator().manual_seed(cfg.seed + rollout_index)
        return torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    if name in ("compatibility", "q3_highc", "q3_lowc"):
        return list(c)
    if name in ("dincompat_high", "q3_dincompat_high"):
        return di
    if name in ("q3", "split_budget_ca"):
        return [(1.0 - h[i]) * dc[i] for i in range(n)]
    raise ValueError(name)


ASCENDING = {"q3_lowc", "q3_dlearn_low"}
Q3_MASKS = {"q3", "q3_highc", "q3_lowc", "q3_dlearn_high", "q3_dlearn_low", "q3_dincompat_high"}
ALL_MASKS = [
    "full",
    "dlearn_high",
    "ca_softor",
    "entropy",
    "tip",
    "divergence",
    "random",
    "compatibility",
    "dincompat_high",
    "split_budget_ca",
    "q3",
    "q3_highc",
    "q3_lowc",
    "q3_dlearn_high",
    "q3_dlearn_low",
    "q3_dincompat_high",
]


# ---------------------------------------------------------------- §5 budget


def budget_n(ratio: float, n_valid: int) -> int:
    return max(1, math.ceil(ratio * n_valid - 1e-9))


def top_rows(rows: list[int], score: list[float], tokens: list[RefToken], n: int, ascending: bool) -> list[int]:
    if ascending:
        key = lambda r: (score[r], -tokens[r].position, tokens[r].sample)  # noqa: E731
    else:
        key = lambda r: (-score[r], tokens[r].position, tokens[r].sample)  # noqa: E731
    return sorted(rows, key=key)[: max(n, 0)]


def min_keep(kept: list[bool], tokens: list[RefToken], valid: list[bool], m: int, fallback: list[float]) -> list[bool]:
    kept = list(kept)
    for sample in sorted({tok.sample for tok in tokens}):
        rows = [r for r, tok in enumerate(tokens) if tok.sample == sample and valid[r]]
        need = min(m, len(rows)) - sum(1 for r in rows if kept[r])
        if need <= 0:
            continue
        rest = sorted((r for r in rows if not kept[r]), key=lambda r: (-fallback[r], tokens[r].position))
        for r in rest[:need]:
            kept[r] = True
    return kept


# ---------------------------------------------------------------- the whole step


def select(tokens: list[RefToken], cfg: RefConfig, rollout_index: int = 0) -> RefResult:
    n = len(tokens)
    valid = [tok.valid for tok in tokens]
    bad = [
        valid[r]
        and (not math.isfinite(tokens[r].teacher_logp) or (tokens[r].student_known and not math.isfinite(tokens[r].student_logp)))
        for r in range(n)
    ]
    if any(bad):
        if cfg.nonfinite_policy == "error":
            raise ValueError("non-finite sampled-token log-prob")
        valid = [valid[r] and not bad[r] for r in range(n)]
    stats = [token_stats(tok, cfg.k) for tok in tokens]
    mass = [st["cmass"] for st in stats]
    if cfg.exact_cmass and all(tok.exact is not None for tok in tokens):
        mass = exact_cmass(tokens, cfg)
    for st, m in zip(stats, mass, strict=True):
        st["compat_mass"] = m
    if cfg.compat_proxy == "mass":
        compat = mass
    elif cfg.compat_proxy == "set":
        compat = [st["overlap"] for st in stats]
    elif cfg.compat_proxy == "bc":
        compat = [st["bc"] for st in stats]
    else:
        compat = prefix_ema(tokens, mass, cfg.prefix_ema_alpha)
    for st, c in zip(stats, compat, strict=True):
        st["compat"] = c

    def norm(xs: list[float]) -> list[float]:
        return normalize(xs, cfg.normalization, cfg.q_low, cfg.q_high)

    d_raw = [st["kl_f_union"] for st in stats]
    f = {
        "h": norm([st["entropy_norm"] for st in stats]),
        "d": norm(d_raw),
        "c": norm(compat),
        "dc": norm([d_raw[i] * compat[i] for i in range(n)]),
    }
    h_med, d_med = quantile(f["h"], 0.5), quantile(f["d"], 0.5)
    f["is_q3"] = [float(f["h"][i] < h_med and f["d"][i] >= d_med) for i in range(n)]
    f["d_learn"] = [f["d"][i] * f["c"][i] for i in range(n)]
    f["d_incompat"] = [f["d"][i] * (1.0 - f["c"][i]) for i in range(n)]
    scores = {name: scores_for(name, f, cfg, rollout_index) for name in ALL_MASKS}
    fallback = scores["ca_softor"]

    valid_rows = [r for r in range(n) if valid[r]]
    if cfg.mask == "full" or cfg.ratio >= 1.0:
        return RefResult(list(valid), stats, f, scores, len(valid_rows))
    if not valid_rows:
        return RefResult([False] * n, stats, f, scores, 0)
    nb = budget_n(cfg.ratio, len(valid_rows))
    kept = [False] * n
    if cfg.mask == "split_budget_ca":
        n_first = min(nb, round(cfg.gamma * nb))
        for r in top_rows(valid_rows, f["h"], tokens, n_first, False):
            kept[r] = True
        for r in top_rows(valid_rows, scores["split_budget_ca"], tokens, nb - n_first, False):
            kept[r] = True
        short = nb - sum(kept)
        rest = [r for r in valid_rows if not kept[r]]
        for r in top_rows(rest, fallback, tokens, short, False):
            kept[r] = True
    else:
        rows = valid_rows
        if cfg.mask in Q3_MASKS:
            rows = [r for r in valid_rows if f["is_q3"][r]]
        for r in top_rows(rows, scores[cfg.mask], tokens, nb, cfg.mask in ASCENDING):
            kept[r] = True
    kept = min_keep(kept, tokens, valid, cfg.min_keep_per_sample, fallback)
    return RefResult(kept, stats, f, scores, nb)
