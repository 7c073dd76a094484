# Over 600 lines: one independent plain-Python reference of the whole spec, kept in one file so it reads as the spec.
"""A straightforward per-token reference of docs/method.md §2–5 and §9, written from the spec.

Plain Python: one token at a time, dicts (id → log-prob) for the top-K lists, ``math.log`` /
``math.exp``, ``sorted`` with explicit key tuples. Nothing here calls the vectorised ``ta_opd``
math (only the list of selector names is imported); the tests compare the two (identical masks,
statistics allclose) on random batches, and benchmarks/bench_selectors.py times both.

Conventions both sides must share for bit-identical *rankings* (every value is float64):
- soft-OR(a, b) is written 1 − (1 − a)(1 − b): the same number as a + b − ab, but exactly 1 when an
  input is 1, so tokens clipped to 1 by the normalisation tie exactly and the tie rule decides;
- quantiles interpolate as x_lo + (x_hi − x_lo)·frac over the sorted finite values (numpy 'linear');
- ρ·N_valid is ceil'ed with a 1e-9 tolerance (0.1·30 = 3.0000000000000004 → 3);
- split_budget_ca's round(γ·n) is Python's round (half to even), as the released code's
  ``int(round(gamma * n))`` and the core's docstring say;
- the random selector's scores are the uniform float64 stream of a ``torch.Generator`` seeded with
  seed + rollout index, one draw per row in row order (that stream *is* the specification of the seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# the selector names are the shared contract (ta_opd.config.MASKS); every score below is written here from the spec
from ta_opd.config import MASKS as ALL_MASKS

FLOOR = 1e-12  # ŝ, t̂ floor after renormalisation on the union (docs/method.md §2)
DEGENERATE = 1e-12  # |hi − lo| below this → every normalised value is 0 (docs/method.md §3)
CEIL_TOL = 1e-9

Q3_MASKS = ("q3", "q3_highc", "q3_lowc", "q3_dlearn_high", "q3_dlearn_low", "q3_dincompat_high")
ASCENDING_MASKS = ("q3_lowc", "q3_dlearn_low")  # lowest score first; ties: later position, then earlier sample
NORMALIZATIONS = ("batch_quantile", "batch_minmax", "none")
PROXIES = ("mass", "set", "bc", "prefix_ema")


@dataclass
class RefToken:
    """One response token: its two top-K lists as dicts id → log-prob (finite entries only, list order)."""

    student: dict[int, float]
    teacher: dict[int, float]
    sampled: int
    student_logp: float  # log p_S(y_t); NaN with student_known False = not recorded
    teacher_logp: float
    valid: bool  # loss_mask
    sample: int
    position: int
    length: int  # the sample's response length L
    exact: dict[int, float] | None = None  # exact C: teacher log-prob of student ids (finite values only)
    exact_available: bool = False
    student_known: bool = True


@dataclass
class RefConfig:
    """The knobs of SelectionConfig that the reference reads (same names, docs/method.md defaults)."""

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
    ca_softor_variant: str = "code"
    exact_cmass: bool = False
    exact_cmass_max_union: int = 4096
    exact_cmass_overflow: str = "fallback"
    nonfinite_policy: str = "error"

    @classmethod
    def from_selection_config(cls, cfg: Any) -> RefConfig:
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


@dataclass
class RefResult:
    mask: list[bool]
    stats: list[dict[str, float]]  # per token, docs/method.md §2 names as in ta_opd.stats.TokenStats
    features: dict[str, list[float]] = field(default_factory=dict)  # h, d, c, dc, d_learn, d_incompat, is_q3
    scores: dict[str, list[float]] = field(default_factory=dict)  # every mask's score
    metrics: dict[str, float] = field(default_factory=dict)
    n_budget: int = 0
    valid: list[bool] = field(default_factory=list)  # after the non-finite policy


def tokens_from_batch(batch: Any) -> list[RefToken]:
    """A ``TokenBatch``'s tensors as plain Python records (entries with id ≥ 0 and a finite log-prob)."""

    def as_dict(ids: list[int], logp: list[float]) -> dict[int, float]:
        out: dict[int, float] = {}
        for i, lp in zip(ids, logp, strict=True):
            if i >= 0 and math.isfinite(lp):
                out[i] = lp
        return out

    n = int(batch.sampled_ids.shape[0])
    s_ids, s_lp = batch.student_topk_ids.tolist(), batch.student_topk_logp.double().tolist()
    t_ids, t_lp = batch.teacher_topk_ids.tolist(), batch.teacher_topk_logp.double().tolist()
    exact = batch.teacher_logp_on_student_topk
    exact_lp = None if exact is None else exact.double().tolist()
    avail = None if batch.exact_available is None else batch.exact_available.tolist()
    known = None if getattr(batch, "student_logp_known", None) is None else batch.student_logp_known.tolist()
    slp, tlp = batch.student_logp.double().tolist(), batch.teacher_logp.double().tolist()
    sampled, valid = batch.sampled_ids.tolist(), batch.loss_mask.tolist()
    sample, position, length = batch.sample_index.tolist(), batch.position.tolist(), batch.response_length.tolist()
    tokens = []
    for r in range(n):
        student = as_dict(s_ids[r], s_lp[r])
        ex = None
        if exact_lp is not None:
            ex = {}
            for i, lp, e in zip(s_ids[r], s_lp[r], exact_lp[r], strict=True):
                if i >= 0 and math.isfinite(lp) and math.isfinite(e):
                    ex[i] = e
        tokens.append(
            RefToken(
                student=student,
                teacher=as_dict(t_ids[r], t_lp[r]),
                sampled=sampled[r],
                student_logp=slp[r],
                teacher_logp=tlp[r],
                valid=bool(valid[r]),
                sample=sample[r],
                position=position[r],
                length=length[r],
                exact=ex,
                exact_available=exact_lp is not None and (True if avail is None else bool(avail[r])),
                student_known=True if known is None else bool(known[r]),
            )
        )
    return tokens


# ------------------------------------------------------------------ §2 statistics, one token at a time


def _top1(lst: dict[int, float]) -> tuple[int, float]:
    """(id, prob) of the highest log-prob; the first in list order among equals; (−1, 0) if empty."""
    best_id, best_lp = -1, -math.inf
    for i, lp in lst.items():
        if lp > best_lp:
            best_id, best_lp = i, lp
    return best_id, (math.exp(best_lp) if best_id >= 0 else 0.0)


def _rank(lst: dict[int, float], y: int) -> int:
    """Entries with a strictly higher log-prob than y (0 = top-1); −1 when y is not in the list."""
    if y not in lst:
        return -1
    return sum(1 for lp in lst.values() if lp > lst[y])


def token_stats(tok: RefToken, k: int) -> dict[str, float]:
    """Every docs/method.md §2 statistic of one token from its two lists (K = the list width)."""
    s = {v: math.exp(lp) for v, lp in tok.student.items()}  # s(v) on S_t
    t = {v: math.exp(lp) for v, lp in tok.teacher.items()}  # t(v) on T_t
    union = list(s) + [v for v in t if v not in s]  # U_t = S ∪ T
    s_sum = sum(s.get(v, 0.0) for v in union)
    t_sum = sum(t.get(v, 0.0) for v in union)
    kl_f = kl_r = bc = 0.0
    if s_sum > 0 and t_sum > 0:  # a side with no mass on U → D = KLr = BC = 0
        for v in union:
            s_hat = max(s.get(v, 0.0) / s_sum, FLOOR)
            t_hat = max(t.get(v, 0.0) / t_sum, FLOOR)
            kl_f += t_hat * (math.log(t_hat) - math.log(s_hat))
            kl_r += s_hat * (math.log(s_hat) - math.log(t_hat))
            bc += math.sqrt(s_hat * t_hat)
    shared = 0.0  # Σ_{v ∈ S} t(v) from the teacher's own top-K (a lower bound of C)
    for v in s:
        shared += t.get(v, 0.0)
    positive = [p for p in s.values() if p > 0]  # H over the entries with positive probability
    h = 0.0
    if positive:
        z = sum(positive)
        for p in positive:
            h -= (p / z) * math.log(p / z)
        h /= math.log(max(len(positive), 2))
    t_top_id, t_top_p = _top1(tok.teacher)
    s_top_id, s_top_p = _top1(tok.student)
    return {
        "kl_f_union": kl_f,
        "kl_r_union": kl_r,
        "bc": bc,
        "cmass": min(max(shared, 0.0), 1.0),
        "entropy_norm": h,
        "overlap": sum(1 for v in t if v in s) / max(k, 1),
        "reach_t1": float(t_top_id >= 0 and t_top_id in s),
        "student_rank_sampled": _rank(tok.student, tok.sampled),
        "teacher_rank_sampled": _rank(tok.teacher, tok.sampled),
        "position_norm": tok.position / max(tok.length - 1, 1),
        "student_top1_id": s_top_id,
        "student_top1_prob": s_top_p,
        "teacher_top1_id": t_top_id,
        "teacher_top1_prob": t_top_p,
        "student_topk_mass": sum(s.values()),
        "teacher_topk_mass": sum(t.values()),
        "teacher_mass_on_shared": shared,
    }


def _by_sample(tokens: list[RefToken]) -> dict[int, list[int]]:
    """sample → its rows ordered by position (then row order)."""
    groups: dict[int, list[int]] = {}
    for r, tok in enumerate(tokens):
        groups.setdefault(tok.sample, []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: tokens[r].position)
    return dict(sorted(groups.items()))


def exact_cmass(tokens: list[RefToken], cfg: RefConfig) -> list[float]:
    """Exact C per token: true teacher mass on S_t (docs/method.md §2 exact mode).

    Per student entry the exact teacher log-prob is used where known (row available, value finite),
    else the lower-bound value t(v) from the teacher's top-K. Union overflow, per sample (the union
    of student top-K ids over the sample's available rows > max_union): ``fallback`` → the whole
    sample keeps the lower bound; ``truncate`` → exact values only for the max_union ids with the
    highest student log-prob anywhere in the sample (ties: lower id); ``error`` → ValueError.
    """
    allowed: dict[int, set[int] | None] = {}
    for sample, rows in _by_sample(tokens).items():
        best: dict[int, float] = {}
        for r in rows:
            if tokens[r].exact_available:
                for v, lp in tokens[r].student.items():
                    best[v] = max(best.get(v, -math.inf), lp)
        if len(best) <= cfg.exact_cmass_max_union:
            allowed[sample] = None  # every id may use its exact value
        elif cfg.exact_cmass_overflow == "error":
            raise ValueError(f"sample {sample}: student top-K id union {len(best)} > {cfg.exact_cmass_max_union}")
        elif cfg.exact_cmass_overflow == "fallback":
            allowed[sample] = set()
        else:
            allowed[sample] = set(sorted(best, key=lambda v: (-best[v], v))[: cfg.exact_cmass_max_union])
    out = []
    for tok in tokens:
        ids = allowed[tok.sample]
        total = 0.0
        for v in tok.student:
            ex = None if tok.exact is None else tok.exact.get(v)
            if tok.exact_available and ex is not None and (ids is None or v in ids):
                total += math.exp(ex)
            else:
                total += math.exp(tok.teacher[v]) if v in tok.teacher else 0.0
        out.append(min(max(total, 0.0), 1.0))
    return out


def prefix_ema(tokens: list[RefToken], values: list[float], alpha: float) -> list[float]:
    """e_0 = x_0, e_t = α e_{t−1} + (1 − α) x_t over each sample's positions (docs/method.md §2)."""
    out = [0.0] * len(tokens)
    for rows in _by_sample(tokens).values():
        e = 0.0
        for j, r in enumerate(rows):
            e = values[r] if j == 0 else alpha * e + (1.0 - alpha) * values[r]
            out[r] = e
    return out


# ------------------------------------------------------------------ §3 normalisation


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of the finite values (0 when there are none)."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return 0.0
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def normalize(values: list[float], method: str, q_low: float = 0.05, q_high: float = 0.95) -> list[float]:
    """Norm(z) = clip((z − lo)/(hi − lo), 0, 1); non-finite → 0; |hi − lo| < 1e-12 → all 0 (docs/method.md §3)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    if method == "batch_quantile":
        lo, hi = quantile(finite, q_low), quantile(finite, q_high)
    elif method == "batch_minmax":
        lo, hi = min(finite), max(finite)
    elif method == "none":
        lo, hi = 0.0, max(max(finite), DEGENERATE)
    else:
        raise ValueError(f"unknown normalization {method!r}")
    span = hi - lo
    if abs(span) < DEGENERATE:
        return [0.0] * len(values)
    return [min(max((v - lo) / span, 0.0), 1.0) if math.isfinite(v) else 0.0 for v in values]


def soft_or(a: float, b: float) -> float:
    return 1.0 - (1.0 - a) * (1.0 - b)


# ------------------------------------------------------------------ §4 scores


def features(stats: list[dict[str, float]], cfg: RefConfig) -> dict[str, list[float]]:
    """H̃, D̃, C̃, DC̃, D^L, D^I and the Q3 flag, token by token (docs/method.md §3–4)."""

    def norm(xs: list[float]) -> list[float]:
        return normalize(xs, cfg.normalization, cfg.q_low, cfg.q_high)

    d_raw = [st["kl_f_union"] for st in stats]
    c_raw = [st["compat"] for st in stats]
    h = norm([st["entropy_norm"] for st in stats])
    d = norm(d_raw)
    c = norm(c_raw)
    dc = norm([d_raw[i] * c_raw[i] for i in range(len(stats))])
    h_med, d_med = quantile(h, 0.5), quantile(d, 0.5)
    return {
        "h": h,
        "d": d,
        "c": c,
        "dc": dc,
        "d_learn": [d[i] * c[i] for i in range(len(d))],
        "d_incompat": [d[i] * (1.0 - c[i]) for i in range(len(d))],
        "is_q3": [float(h[i] < h_med and d[i] >= d_med) for i in range(len(d))],
    }


def random_scores(n: int, seed: int, rollout_index: int) -> list[float]:
    import torch  # the seeded stream is the specification of the random selector

    gen = torch.Generator().manual_seed(int(seed) + int(rollout_index))
    return torch.rand(n, generator=gen, dtype=torch.float64).tolist()


def score(name: str, i: int, f: dict[str, list[float]], cfg: RefConfig) -> float:
    """The score of mask ``name`` for token i (docs/method.md §4); random is drawn in ``select``."""
    h, d, c, dc, dl, di = f["h"][i], f["d"][i], f["c"][i], f["dc"][i], f["d_learn"][i], f["d_incompat"][i]
    if name == "full":
        return 1.0
    if name in ("dlearn_high", "q3_dlearn_high", "q3_dlearn_low"):
        return dl
    if name == "ca_softor":
        return soft_or(h, dc) if cfg.ca_softor_variant == "code" else soft_or(h, dl)
    if name == "entropy":
        return h
    if name == "tip":
        return soft_or(h, d)
    if name == "divergence":
        return d
    if name in ("compatibility", "q3_highc", "q3_lowc"):
        return c
    if name in ("dincompat_high", "q3_dincompat_high"):
        return di
    if name in ("q3", "split_budget_ca"):
        return (1.0 - h) * dc
    raise ValueError(f"unknown mask {name!r}")


# ------------------------------------------------------------------ §5 budget


def budget_n(ratio: float, n_valid: int) -> int:
    """n = max(1, ceil(ρ · N_valid)) with a 1e-9 tolerance on the floating product."""
    return max(1, math.ceil(ratio * n_valid - CEIL_TOL))


def top_rows(rows: list[int], sc: list[float], tokens: list[RefToken], n: int, ascending: bool) -> list[int]:
    """The first n rows by the tie rule: (score desc, position asc, sample asc), or for ascending
    variants (score asc, position desc, sample asc)."""
    if ascending:
        ordered = sorted(rows, key=lambda r: (sc[r], -tokens[r].position, tokens[r].sample))
    else:
        ordered = sorted(rows, key=lambda r: (-sc[r], tokens[r].position, tokens[r].sample))
    return ordered[: max(n, 0)]


def min_keep(kept: list[bool], valid: list[bool], tokens: list[RefToken], m: int, fallback: list[float]) -> list[bool]:
    """Every sample with a valid token gets up to m kept tokens, best ca_softor score first (then position)."""
    kept = list(kept)
    if m <= 0:
        return kept
    for rows in _by_sample(tokens).values():
        mine = [r for r in rows if valid[r]]
        need = min(m, len(mine)) - sum(1 for r in mine if kept[r])
        if need > 0:
            rest = sorted((r for r in mine if not kept[r]), key=lambda r: (-fallback[r], tokens[r].position))
            for r in rest[:need]:
                kept[r] = True
    return kept


# ------------------------------------------------------------------ §9 metrics


def _mean(values: list[float], where: list[bool]) -> float:
    xs = [v for v, w in zip(values, where, strict=True) if w and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else math.nan


def metrics(
    tokens: list[RefToken],
    valid: list[bool],
    kept: list[bool],
    nominal_ratio: float,
    stats: list[dict[str, float]] | None,
    f: dict[str, list[float]] | None,
) -> dict[str, float]:
    """docs/method.md §9: realised ratio; feature means over valid and kept; Q3 share; overlap; teacher mass
    on the shared set; reach_t1; mean sampled reverse KL (log p_S − log p_T) over valid and kept tokens."""
    kv = [k and v for k, v in zip(kept, valid, strict=True)]
    n_valid, n_kept = sum(valid), sum(kv)
    out = {
        "opd/n_valid_tokens": float(n_valid),
        "opd/n_kept_tokens": float(n_kept),
        "opd/nominal_ratio": float(min(nominal_ratio, 1.0)),
        "opd/realised_ratio": n_kept / n_valid if n_valid else 0.0,
    }
    rev_kl = [tok.student_logp - tok.teacher_logp for tok in tokens]
    out["opd/sampled_rev_kl_all"] = _mean(rev_kl, valid)
    out["opd/sampled_rev_kl_kept"] = _mean(rev_kl, kv)
    if f is not None:
        for key, name in (
            ("h", "h_norm"),
            ("d", "d_norm"),
            ("c", "c_norm"),
            ("d_learn", "d_learn"),
            ("d_incompat", "d_incompat"),
            ("is_q3", "q3_share"),
        ):
            out[f"opd/{name}_valid"] = _mean(f[key], valid)
            out[f"opd/{name}_kept"] = _mean(f[key], kv)
    if stats is not None:
        for key, name in (
            ("overlap", "overlap_ratio"),
            ("teacher_mass_on_shared", "teacher_mass_on_shared"),
            ("reach_t1", "reach_t1"),
            ("kl_f_union", "kl_f_union_valid"),
            ("compat_mass", "cmass_valid"),
            ("entropy_norm", "entropy_norm_valid"),
        ):
            out[f"opd/{name}"] = _mean([st[key] for st in stats], valid)
    return out


# ------------------------------------------------------------------ the whole step


def select(tokens: list[RefToken], cfg: RefConfig, k: int, rollout_index: int = 0) -> RefResult:
    """Statistics → normalisation → scores → global budget → min-keep → metrics for one rollout step."""
    n = len(tokens)
    if cfg.mask != "full" and not cfg.ratio > 0:
        raise ValueError(f"budget ratio must be > 0 with mask {cfg.mask!r}")
    selecting = cfg.mask != "full" and cfg.ratio < 1.0
    valid = [tok.valid for tok in tokens]
    n_bad = 0
    for r, tok in enumerate(tokens):
        bad_student = tok.student_known and not math.isfinite(tok.student_logp)
        if valid[r] and (not math.isfinite(tok.teacher_logp) or bad_student):
            if cfg.nonfinite_policy == "error":
                raise ValueError(f"sample {tok.sample} position {tok.position}: non-finite sampled-token log-prob")
            valid[r] = False
            n_bad += 1

    stats: list[dict[str, float]] | None = None
    f: dict[str, list[float]] | None = None
    scores: dict[str, list[float]] = {}
    if k > 0:
        stats = [token_stats(tok, k) for tok in tokens]
        mass = [st["cmass"] for st in stats]
        if cfg.exact_cmass and any(tok.exact is not None for tok in tokens):
            exact = exact_cmass(tokens, cfg)
            for st, e in zip(stats, exact, strict=True):
                st["cmass_exact"] = e
            mass = exact
        if cfg.compat_proxy == "mass":
            compat = mass
        elif cfg.compat_proxy == "set":
            compat = [st["overlap"] for st in stats]
        elif cfg.compat_proxy == "bc":
            compat = [st["bc"] for st in stats]
        elif cfg.compat_proxy == "prefix_ema":
            compat = prefix_ema(tokens, mass, cfg.prefix_ema_alpha)
        else:
            raise ValueError(f"unknown compat proxy {cfg.compat_proxy!r}")
        for st, m, c in zip(stats, mass, compat, strict=True):
            st["compat_mass"] = m
            st["compat"] = c
        f = features(stats, cfg)
        for name in ALL_MASKS:
            if name == "random":
                scores[name] = random_scores(n, cfg.seed, rollout_index)
            else:
                scores[name] = [score(name, i, f, cfg) for i in range(n)]

    valid_rows = [r for r in range(n) if valid[r]]
    n_added = 0
    if not selecting:
        kept = list(valid)
        nb = len(valid_rows)
    elif not valid_rows:
        kept, nb = [False] * n, 0
    else:
        assert f is not None, "a selector needs top-K lists"
        nb = budget_n(cfg.ratio, len(valid_rows))
        fallback = scores["ca_softor"]
        kept = [False] * n
        if cfg.mask == "split_budget_ca":
            n_first = min(nb, round(cfg.gamma * nb))  # two independent picks over all valid tokens
            for r in top_rows(valid_rows, f["h"], tokens, n_first, False):
                kept[r] = True
            for r in top_rows(valid_rows, scores["split_budget_ca"], tokens, nb - n_first, False):
                kept[r] = True
            short = nb - sum(kept)  # overlap of the two picks → top up by ca_softor
            for r in top_rows([r for r in valid_rows if not kept[r]], fallback, tokens, short, False):
                kept[r] = True
        else:
            rows = [r for r in valid_rows if f["is_q3"][r]] if cfg.mask in Q3_MASKS else valid_rows
            for r in top_rows(rows, scores[cfg.mask], tokens, nb, cfg.mask in ASCENDING_MASKS):
                kept[r] = True
        before = sum(kept)
        kept = min_keep(kept, valid, tokens, cfg.min_keep_per_sample, fallback)
        n_added = sum(kept) - before
    m = metrics(tokens, valid, kept, cfg.ratio if selecting else 1.0, stats, f)
    m["opd/nonfinite_logp_tokens"] = float(n_bad)
    m["opd/budget_n"] = float(nb)
    m["opd/min_keep_added"] = float(n_added)
    return RefResult(kept, stats or [], f or {}, scores, m, nb, valid)


# ------------------------------------------------------------------ random test batches


def random_batch(
    seed: int,
    exact: bool = False,
    max_samples: int = 5,
    max_len: int = 24,
    k: int | None = None,
    ties: bool = False,
) -> Any:
    """A random ``TokenBatch``: random K, overlapping lists over a small vocabulary, padded and
    non-finite entries, empty lists, identical lists (D = 0), loss_mask 0, samples of different
    lengths (one may be empty), and optionally exact-C log-probs with some rows unavailable.

    ``ties``: every row's pair of lists is one of 3 templates, so many tokens have identical
    statistics and scores and the budget's tie rule decides which are kept."""
    import random

    import torch

    from ta_opd.topk import TokenBatch

    rng = random.Random(seed)
    k = rng.randint(1, 6) if k is None else k
    n_samples = rng.randint(1, max_samples)
    lengths = [rng.randint(0 if b else 1, max_len) for b in range(n_samples)]
    vocab = k + rng.randint(0, 5)

    def one_list(ids_pool: list[int]) -> tuple[list[int], list[float]]:
        n = rng.randint(0, k) if rng.random() < 0.15 else k
        ids = rng.sample(ids_pool, min(n, len(ids_pool)))
        logits = [rng.gauss(0, rng.choice([0.5, 2.0])) for _ in ids]
        z = math.log(sum(math.exp(x) for x in logits) + rng.random() * 2) if ids else 0.0  # top-K mass < 1
        lps = sorted((x - z for x in logits), reverse=True)
        if lps and rng.random() < 0.1:
            lps[rng.randrange(len(lps))] = rng.choice([-math.inf, math.nan])  # a non-finite entry: dropped
        if len(lps) >= 2 and rng.random() < 0.1:
            lps[1] = lps[0]  # a tie inside the list
        return ids + [-1] * (k - len(ids)), lps + [-math.inf] * (k - len(lps))

    rows = {name: [] for name in ("s_ids", "s_lp", "t_ids", "t_lp", "exact")}
    sampled, slp, tlp, mask, sidx, pos, length, avail = [], [], [], [], [], [], [], []
    templates = [(one_list(list(range(vocab))), one_list(list(range(vocab)))) for _ in range(3)]
    for b, n_b in enumerate(lengths):
        sample_avail = rng.random() < 0.8
        for t in range(n_b):
            if ties:
                (s_ids, s_lp), (t_ids, t_lp) = rng.choice(templates)
            else:
                s_ids, s_lp = one_list(list(range(vocab)))
                if rng.random() < 0.1:
                    t_ids, t_lp = list(s_ids), list(s_lp)  # identical lists: D = 0
                else:
                    t_ids, t_lp = one_list(list(range(vocab)))
            t_of = {i: lp for i, lp in zip(t_ids, t_lp, strict=True) if i >= 0}
            ex = []
            for i in s_ids:
                if i < 0 or rng.random() < 0.1:
                    ex.append(-math.inf)
                elif i in t_of and math.isfinite(t_of[i]):
                    ex.append(t_of[i])
                else:
                    ex.append(math.log(rng.random() * 0.05 + 1e-9))
            for key, value in (("s_ids", s_ids), ("s_lp", s_lp), ("t_ids", t_ids), ("t_lp", t_lp), ("exact", ex)):
                rows[key].append(value)
            sampled.append(rng.randrange(vocab))
            slp.append(-rng.random() * 3)
            tlp.append(-rng.random() * 3)
            mask.append(rng.random() < 0.8)
            sidx.append(b)
            pos.append(t)
            length.append(n_b)
            avail.append(sample_avail)

    def ids_tensor(x: list[list[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).reshape(len(x), k)

    def lp_tensor(x: list[list[float]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32).reshape(len(x), k)

    return TokenBatch(
        student_topk_ids=ids_tensor(rows["s_ids"]),
        student_topk_logp=lp_tensor(rows["s_lp"]),
        teacher_topk_ids=ids_tensor(rows["t_ids"]),
        teacher_topk_logp=lp_tensor(rows["t_lp"]),
        sampled_ids=torch.tensor(sampled, dtype=torch.long),
        student_logp=torch.tensor(slp, dtype=torch.float32),
        teacher_logp=torch.tensor(tlp, dtype=torch.float32),
        loss_mask=torch.tensor(mask, dtype=torch.bool),
        sample_index=torch.tensor(sidx, dtype=torch.long),
        position=torch.tensor(pos, dtype=torch.long),
        response_length=torch.tensor(length, dtype=torch.long),
        teacher_logp_on_student_topk=lp_tensor(rows["exact"]) if exact else None,
        exact_available=torch.tensor(avail, dtype=torch.bool) if exact else None,
        num_samples=n_samples,
    )


def batch_from_rows(rows: list[dict[str, Any]], k: int) -> Any:
    """A ``TokenBatch`` from hand-written rows for the hand-computed tests.

    Each row: ``s`` / ``t`` = list of (id, prob) (probabilities, not log-probs; 0 → −inf), and optional
    ``y`` (sampled id, 0), ``sample`` (0), ``pos`` (row order within its sample), ``len`` (the
    sample's row count), ``mask`` (True), ``slp`` / ``tlp`` (sampled log-probs, −1.0), ``exact``
    (list of teacher probs per student entry).
    """
    import torch

    from ta_opd.topk import TokenBatch

    def pad(entries: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
        ids = [i for i, _ in entries] + [-1] * (k - len(entries))
        lps = [math.log(p) if p > 0 else -math.inf for _, p in entries] + [-math.inf] * (k - len(entries))
        return ids, lps

    counts: dict[int, int] = {}
    positions = []
    for row in rows:
        b = row.get("sample", 0)
        positions.append(row.get("pos", counts.get(b, 0)))
        counts[b] = counts.get(b, 0) + 1
    s = [pad(row["s"]) for row in rows]
    t = [pad(row["t"]) for row in rows]
    has_exact = any("exact" in row for row in rows)
    exact = [
        [math.log(p) if p > 0 else -math.inf for p in row.get("exact", [])]
        + [-math.inf] * (k - len(row.get("exact", [])))
        for row in rows
    ]
    n = len(rows)
    return TokenBatch(
        student_topk_ids=torch.tensor([x[0] for x in s], dtype=torch.long).reshape(n, k),
        student_topk_logp=torch.tensor([x[1] for x in s], dtype=torch.float64).reshape(n, k),
        teacher_topk_ids=torch.tensor([x[0] for x in t], dtype=torch.long).reshape(n, k),
        teacher_topk_logp=torch.tensor([x[1] for x in t], dtype=torch.float64).reshape(n, k),
        sampled_ids=torch.tensor([row.get("y", 0) for row in rows], dtype=torch.long),
        student_logp=torch.tensor([row.get("slp", -1.0) for row in rows], dtype=torch.float64),
        teacher_logp=torch.tensor([row.get("tlp", -1.0) for row in rows], dtype=torch.float64),
        loss_mask=torch.tensor([row.get("mask", True) for row in rows], dtype=torch.bool),
        sample_index=torch.tensor([row.get("sample", 0) for row in rows], dtype=torch.long),
        position=torch.tensor(positions, dtype=torch.long),
        response_length=torch.tensor([row.get("len", counts[row.get("sample", 0)]) for row in rows], dtype=torch.long),
        teacher_logp_on_student_topk=torch.tensor(exact, dtype=torch.float64).reshape(n, k) if has_exact else None,
    )
