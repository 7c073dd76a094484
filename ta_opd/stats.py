"""Per-token statistics from the student's and teacher's top-K lists (METHOD.md §2).

All functions take a ``TokenBatch`` (rows = response tokens of one step) and return ``[N]``
tensors, float64 for real values (so that the budget's ranking is reproducible to the last bit
against the per-token reference in tests/ta_opd/reference.py). Probabilities: s(v) = exp(logp_S(v))
on S_t, t(v) = exp(logp_T(v)) on T_t; a token absent from a list has probability 0 there; padded
entries (id −1 / −inf) and non-finite entries are not in the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ta_opd.config import SelectionConfig
from ta_opd.topk import TokenBatch

PROB_FLOOR = 1e-12  # ŝ, t̂ are floored here after renormalisation on U (METHOD.md §2)
EMA_BLOCK = 256  # prefix-EMA scan block: α^-i stays far from float64 overflow inside a block
F64 = torch.float64


@dataclass
class TokenStats:
    """Per-token statistics, every field ``[N]`` (see METHOD.md §2 for each definition)."""

    kl_f_union: Tensor  # D_t = Σ_U t̂ (log t̂ − log ŝ)
    kl_r_union: Tensor  # Σ_U ŝ (log ŝ − log t̂)
    bc: Tensor  # Bhattacharyya Σ_U sqrt(ŝ t̂)
    cmass: Tensor  # teacher mass on the student's top-K from the teacher's top-K (lower bound)
    cmass_exact: Tensor | None  # exact mode: true teacher mass on the student's top-K (lower bound where unknown)
    compat_mass: Tensor  # C_t used by the 'mass' proxy: cmass_exact in exact mode, else cmass
    entropy_norm: Tensor  # H_t: entropy of the renormalised student top-K / log(max(n, 2))
    overlap: Tensor  # |ids(S) ∩ ids(T)| / K
    reach_t1: Tensor  # bool: the teacher's top-1 id is in S_t
    student_rank_sampled: (
        Tensor  # int64: entries of S_t with a strictly higher log-prob than y_t (0 = top-1), −1 absent
    )
    teacher_rank_sampled: Tensor  # int64: same in T_t
    position_norm: Tensor  # t / max(L − 1, 1)
    student_top1_id: Tensor  # int64, −1 for an empty list
    student_top1_prob: Tensor
    teacher_top1_id: Tensor
    teacher_top1_prob: Tensor
    student_topk_mass: Tensor  # Σ_S s
    teacher_topk_mass: Tensor  # Σ_T t
    teacher_mass_on_shared: Tensor  # Σ_{S∩T} t
    compat: Tensor  # the configured compatibility proxy C (mass | set | bc | prefix_ema)
    exact_rows: Tensor | None = None  # bool [N]: exact mode and C_t used at least one exact teacher log-prob

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _probs(ids: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """(valid [N, K] bool, prob [N, K] float64 with 0 at invalid entries)."""
    valid = (ids >= 0) & torch.isfinite(logp)
    prob = torch.where(valid, logp.to(F64), torch.full((), -torch.inf, dtype=F64)).exp()
    return valid, prob


def _rank_of(ids: Tensor, logp: Tensor, valid: Tensor, query: Tensor) -> Tensor:
    """Rank of ``query [N]`` in each row (entries with a strictly higher log-prob), −1 if absent."""
    hit = valid & (ids == query.unsqueeze(1))  # [N, K]
    present = hit.any(dim=1)
    lp = logp.to(F64)
    q_lp = torch.where(hit, lp, torch.full((), -torch.inf, dtype=F64)).amax(dim=1)
    higher = (valid & (lp > q_lp.unsqueeze(1))).sum(dim=1)
    return torch.where(present, higher, torch.full_like(higher, -1))


def _top1(ids: Tensor, logp: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Id and probability of the highest log-prob entry (first in list order among equals); −1 / 0 if empty."""
    masked = torch.where(valid, logp.to(F64), torch.full((), -torch.inf, dtype=F64))
    best_j = masked.argmax(dim=1)  # argmax returns the first maximal index
    any_valid = valid.any(dim=1)
    top_id = torch.where(any_valid, ids.gather(1, best_j.unsqueeze(1)).squeeze(1), torch.full_like(best_j, -1))
    best_lp = masked.gather(1, best_j.unsqueeze(1)).squeeze(1)
    top_prob = torch.where(any_valid, best_lp.exp(), torch.zeros_like(best_lp))
    return top_id, top_prob


def _order_within_sample(sample_index: Tensor, position: Tensor) -> Tensor:
    """0-based index of each row among its sample's rows ordered by (position, row order)."""
    n = sample_index.shape[0]
    order = torch.argsort(position, stable=True)
    order = order[torch.argsort(sample_index[order], stable=True)]
    sorted_s = sample_index[order]
    rank_sorted = torch.arange(n, device=sample_index.device) - torch.searchsorted(sorted_s, sorted_s)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def prefix_ema(values: Tensor, sample_index: Tensor, position: Tensor, alpha: float) -> Tensor:
    """e_0 = x_0, e_t = α·e_{t−1} + (1 − α)·x_t along the positions of each sample (METHOD.md §2).

    Vectorised over samples as a blocked scan over positions: inside a block of width W,
    e_{b+i} = α^{i+1}·e_{b−1} + α^i·Σ_{j≤i} w_j x_{b+j} α^{−j} is a cumulative sum; carrying e
    between blocks keeps α^{−j} ≤ α^{−W} bounded. The Python loop runs over ⌈L/W⌉ blocks, not tokens.
    """
    n = values.shape[0]
    if n == 0:
        return values.to(F64)
    device = values.device
    rank = _order_within_sample(sample_index, position)
    _, sample_dense = torch.unique(sample_index, return_inverse=True)
    n_samples = int(sample_dense.max().item()) + 1
    length = int(rank.max().item()) + 1
    dense = torch.zeros(n_samples, length, dtype=F64, device=device)
    dense[sample_dense, rank] = values.to(F64)
    out = torch.zeros_like(dense)
    carry = torch.zeros(n_samples, dtype=F64, device=device)  # e at the position before the block
    # α^-W must stay finite: W·ln(1/α) ≤ 345 (α^-W ≤ 1e150), so small α gets narrower blocks
    width_max = EMA_BLOCK if alpha >= 1.0 or alpha <= 0.0 else max(1, min(EMA_BLOCK, int(345.0 / -math.log(alpha))))
    for start in range(0, length, width_max):
        block = dense[:, start : start + width_max]
        width = block.shape[1]
        i = torch.arange(width, dtype=F64, device=device)
        w = torch.full((width,), 1.0 - alpha, dtype=F64, device=device)
        if start == 0:
            w[0] = 1.0  # e_0 = x_0
        if alpha == 0.0:
            res = block.clone()  # e_t = x_t
        else:
            acc = torch.cumsum(block * w * alpha ** (-i), dim=1)
            res = alpha**i * acc
            if start > 0:
                res = res + carry.unsqueeze(1) * alpha ** (i + 1)
        out[:, start : start + width] = res
        carry = res[:, -1]
    return out[sample_dense, rank]


def _exact_teacher_probs(
    batch: TokenBatch, cfg: SelectionConfig, s_valid: Tensor, t_on_s: Tensor
) -> tuple[Tensor, Tensor]:
    """Teacher prob of each student top-K entry [N, K] in exact mode, and the rows that used exact values [N].

    An entry uses ``teacher_logp_on_student_topk`` when it is finite, its row is marked available and
    its sample's student-id union is within ``exact_cmass_max_union``; otherwise the lower-bound value
    from the teacher's own top-K. Union overflow (METHOD.md §2): ``fallback`` keeps the lower bound for
    the whole sample, ``truncate`` keeps exact values for the ``max_union`` ids with the highest
    student log-prob at any position of the sample (ties: lower id), ``error`` raises naming the sample.
    """
    assert batch.teacher_logp_on_student_topk is not None
    exact_lp = batch.teacher_logp_on_student_topk.to(F64)
    n = exact_lp.shape[0]
    row_ok = (
        batch.exact_available.bool()
        if batch.exact_available is not None
        else torch.ones(n, dtype=torch.bool, device=exact_lp.device)
    )
    use = s_valid & row_ok.unsqueeze(1)
    rows, cols = use.nonzero(as_tuple=True)
    if rows.numel():
        sid = batch.sample_index[rows]
        tok = batch.student_topk_ids[rows, cols]
        stride = int(tok.max().item()) + 1
        uniq, inv = torch.unique(sid * stride + tok, return_inverse=True)
        u_sample, u_tok = uniq // stride, uniq % stride
        n_samples = int(batch.sample_index.max().item()) + 1
        union = torch.bincount(u_sample, minlength=n_samples)
        over = union > cfg.exact_cmass_max_union
        if bool(over.any()):
            bad = over.nonzero(as_tuple=True)[0]
            if cfg.exact_cmass_overflow == "error":
                listed = ", ".join(f"sample {int(b)} ({int(union[b])} ids)" for b in bad[:5])
                raise ValueError(
                    f"student top-K id union exceeds exact_cmass_max_union={cfg.exact_cmass_max_union}: {listed} "
                    "(exact_cmass_overflow='error'; use 'fallback' or 'truncate')"
                )
            if cfg.exact_cmass_overflow == "fallback":
                keep_u = ~over[u_sample]
            else:  # truncate: the max_union ids with the best student log-prob anywhere in the sample
                s_lp = batch.student_topk_logp[rows, cols].to(F64)
                best = torch.full((uniq.numel(),), -torch.inf, dtype=F64, device=s_lp.device)
                best = best.scatter_reduce(0, inv, s_lp, reduce="amax")
                order = torch.argsort(u_tok, stable=True)
                order = order[torch.argsort(-best[order], stable=True)]
                order = order[torch.argsort(u_sample[order], stable=True)]
                sorted_s = u_sample[order]
                rank_sorted = torch.arange(order.numel(), device=order.device) - torch.searchsorted(sorted_s, sorted_s)
                rank = torch.empty_like(rank_sorted)
                rank[order] = rank_sorted
                keep_u = ~over[u_sample] | (rank < cfg.exact_cmass_max_union)
            keep = keep_u[inv]
            use = torch.zeros_like(use)
            use[rows[keep], cols[keep]] = True
    use = use & torch.isfinite(exact_lp)
    probs = torch.where(use, torch.where(use, exact_lp, torch.zeros((), dtype=F64)).exp(), t_on_s)
    return probs, use.any(dim=1)


ROW_CHUNK = 8192  # rows per chunk: the [chunk, K] intermediates stay cache-resident (and no huge allocations)


def _match(s_ids: Tensor, s_valid: Tensor, t_ids: Tensor, t_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Join each row's two lists by id (ids are unique within a list, as ``pack_topk`` guarantees).

    Returns (hit [n, K]: student entry j is also in T, tj [n, K]: its teacher column (meaningful
    where hit), t_in_s [n, K]: teacher entry i is also in S). One sort + searchsorted per chunk.
    """
    k_t = t_ids.shape[1]
    t_key = torch.where(t_valid, t_ids, torch.full((), -1, dtype=t_ids.dtype))
    s_key = torch.where(s_valid, s_ids, torch.full((), -2, dtype=s_ids.dtype))  # never equals a padded teacher id
    t_sorted, t_perm = torch.sort(t_key, dim=1)
    idx = torch.searchsorted(t_sorted, s_key).clamp_max_(k_t - 1)
    hit = t_sorted.gather(1, idx) == s_key
    tj = t_perm.gather(1, idx)
    t_in_s = torch.zeros(t_ids.shape, dtype=torch.int8, device=t_ids.device)
    t_in_s = t_in_s.scatter_add_(1, tj, hit.to(torch.int8)) > 0
    return hit, tj, t_in_s


def _chunk_stats(
    s_ids: Tensor, s_lp_in: Tensor, t_ids: Tensor, t_lp_in: Tensor, sampled: Tensor, k: int
) -> dict[str, Tensor]:
    """§2 statistics of a chunk of rows (float64; every [n, K] intermediate lives only inside the chunk)."""
    zero = torch.zeros((), dtype=F64, device=s_ids.device)
    neg_inf = torch.full((), -math.inf, dtype=F64, device=s_ids.device)
    s_valid = (s_ids >= 0) & torch.isfinite(s_lp_in)
    t_valid = (t_ids >= 0) & torch.isfinite(t_lp_in)
    s_lp = torch.where(s_valid, s_lp_in.to(F64), neg_inf)  # [n, K]
    t_lp = torch.where(t_valid, t_lp_in.to(F64), neg_inf)
    s, t = s_lp.exp(), t_lp.exp()  # 0 outside the lists
    s_mass, t_mass = s.sum(dim=1), t.sum(dim=1)  # Σ_U s, Σ_U t
    s_pos, t_pos = s_mass > 0, t_mass > 0
    ok = s_pos & t_pos
    s_den = torch.where(s_pos, s_mass, torch.ones_like(s_mass))
    t_den = torch.where(t_pos, t_mass, torch.ones_like(t_mass))

    hit, tj, t_in_s = _match(s_ids, s_valid, t_ids, t_valid)
    t_on_s = torch.where(hit, t.gather(1, tj), zero)  # teacher prob of each student entry (0 if not in T)

    # Union U = student entries (s_valid) + teacher-only entries (t_valid & ~t_in_s, where ŝ = 1e-12).
    sh_s = torch.clamp_min(s / s_den.unsqueeze(1), PROB_FLOOR)  # ŝ on student entries
    th_s = torch.clamp_min(t_on_s / t_den.unsqueeze(1), PROB_FLOOR)  # t̂ on student entries
    th_t = torch.clamp_min(t / t_den.unsqueeze(1), PROB_FLOOR)  # t̂ on teacher entries
    t_only = t_valid & ~t_in_s
    # log of the ratio (one log per entry); exactly 0 where t̂ = ŝ, so identical distributions give D = 0 exactly
    log_ratio_s = (th_s / sh_s).log()  # log t̂ − log ŝ on student entries
    log_ratio_t = (th_t / PROB_FLOOR).log()  # on teacher-only entries (ŝ = 1e-12)
    kl_f = torch.where(s_valid, th_s * log_ratio_s, zero).sum(1) + torch.where(t_only, th_t * log_ratio_t, zero).sum(1)
    kl_r = torch.where(s_valid, sh_s * log_ratio_s, zero).sum(1) + torch.where(
        t_only, PROB_FLOOR * log_ratio_t, zero
    ).sum(1)
    bc = torch.where(s_valid, (sh_s * th_s).sqrt(), zero).sum(1) + torch.where(
        t_only, (PROB_FLOOR * th_t).sqrt(), zero
    ).sum(1)
    kl_f = torch.where(ok, kl_f, zero)  # a side with no mass on U → D = KLr = BC = 0
    kl_r = torch.where(ok, -kl_r, zero)
    bc = torch.where(ok, bc, zero)

    shared = t_on_s.sum(dim=1)  # Σ_{S∩T} t

    # H_t: entropy of the student's top-K renormalised over its positive entries / log(max(n, 2))
    pos = s > 0
    n_pos = pos.sum(dim=1)
    p = s / s_den.unsqueeze(1)
    ent = -torch.where(pos, p * torch.where(pos, p, 1.0).log(), zero).sum(dim=1)
    entropy_norm = torch.where(n_pos > 0, ent / torch.clamp_min(n_pos, 2).to(F64).log(), zero)

    s_top_id, s_top_p = _top1(s_ids, s_lp, s_valid)
    t_top_id, t_top_p = _top1(t_ids, t_lp, t_valid)
    reach_t1 = (s_valid & (s_ids == t_top_id.unsqueeze(1)) & (t_top_id >= 0).unsqueeze(1)).any(dim=1)
    return {
        "kl_f_union": kl_f,
        "kl_r_union": kl_r,
        "bc": bc,
        "cmass": shared.clamp(0.0, 1.0),
        "entropy_norm": entropy_norm,
        "overlap": t_in_s.sum(dim=1).to(F64) / max(k, 1),
        "reach_t1": reach_t1,
        "student_rank_sampled": _rank_of(s_ids, s_lp, s_valid, sampled),
        "teacher_rank_sampled": _rank_of(t_ids, t_lp, t_valid, sampled),
        "student_top1_id": s_top_id,
        "student_top1_prob": s_top_p,
        "teacher_top1_id": t_top_id,
        "teacher_top1_prob": t_top_p,
        "student_topk_mass": s_mass,
        "teacher_topk_mass": t_mass,
        "teacher_mass_on_shared": shared,
    }


def compute_token_stats(batch: TokenBatch, cfg: SelectionConfig) -> TokenStats:
    """Every METHOD.md §2 statistic of every row of ``batch`` (vectorised over chunks of rows)."""
    s_ids, t_ids = batch.student_topk_ids, batch.teacher_topk_ids
    k = s_ids.shape[1]
    n = s_ids.shape[0]
    if k == 0 or t_ids.shape[1] == 0:
        raise ValueError("compute_token_stats needs student and teacher top-K lists (K > 0 on both sides)")
    parts = [
        _chunk_stats(
            s_ids[a : a + ROW_CHUNK],
            batch.student_topk_logp[a : a + ROW_CHUNK],
            t_ids[a : a + ROW_CHUNK],
            batch.teacher_topk_logp[a : a + ROW_CHUNK],
            batch.sampled_ids[a : a + ROW_CHUNK],
            k,
        )
        for a in range(0, max(n, 1), ROW_CHUNK)
    ]
    cols = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    cmass = cols["cmass"]
    cmass_exact: Tensor | None = None
    exact_rows: Tensor | None = None
    compat_mass = cmass
    if cfg.exact_cmass and batch.teacher_logp_on_student_topk is not None:
        s_valid = (s_ids >= 0) & torch.isfinite(batch.student_topk_logp)
        t_valid = (t_ids >= 0) & torch.isfinite(batch.teacher_topk_logp)
        hit, tj, _ = _match(s_ids, s_valid, t_ids, t_valid)
        t = torch.where(t_valid, batch.teacher_topk_logp.to(F64), -math.inf).exp()
        t_on_s = torch.where(hit, t.gather(1, tj), 0.0)
        t_exact, exact_rows = _exact_teacher_probs(batch, cfg, s_valid, t_on_s)
        cmass_exact = torch.where(s_valid, t_exact, 0.0).sum(dim=1).clamp(0.0, 1.0)
        compat_mass = cmass_exact
    bc, overlap = cols["bc"], cols["overlap"]
    pos_norm = batch.position.to(F64) / torch.clamp_min(batch.response_length - 1, 1).to(F64)

    proxy = cfg.compat_proxy
    if proxy == "mass":
        compat = compat_mass
    elif proxy == "set":
        compat = overlap
    elif proxy == "bc":
        compat = bc
    elif proxy == "prefix_ema":
        compat = prefix_ema(compat_mass, batch.sample_index, batch.position, cfg.prefix_ema_alpha)
    else:
        raise ValueError(f"unknown compat proxy {proxy!r}; expected one of mass, set, bc, prefix_ema")

    return TokenStats(
        cmass_exact=cmass_exact,
        compat_mass=compat_mass,
        position_norm=pos_norm,
        compat=compat,
        exact_rows=exact_rows,
        **cols,
    )
