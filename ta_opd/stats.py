"""Per-token statistics from the student's and teacher's top-K lists (METHOD.md §2).

All functions take a ``TokenBatch`` (rows = response tokens of one step) and return ``[N]``
tensors, float64 for real values (so that the budget's ranking is reproducible to the last bit
against the per-token reference in tests/ta_opd/reference.py). Probabilities: s(v) = exp(logp_S(v))
on S_t, t(v) = exp(logp_T(v)) on T_t; a token absent from a list has probability 0 there; padded
entries (id −1 / −inf) and non-finite entries are not in the list.
"""

from __future__ import annotations

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
    student_rank_sampled: Tensor  # int64: entries of S_t with a strictly higher log-prob than y_t (0 = top-1), −1 absent
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
    for start in range(0, length, EMA_BLOCK):
        block = dense[:, start : start + EMA_BLOCK]
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


def _exact_teacher_probs(batch: TokenBatch, cfg: SelectionConfig, s_valid: Tensor, t_on_s: Tensor) -> tuple[Tensor, Tensor]:
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


def compute_token_stats(batch: TokenBatch, cfg: SelectionConfig) -> TokenStats:
    """Every METHOD.md §2 statistic of every row of ``batch`` (vectorised, no per-token loops)."""
    s_ids, t_ids = batch.student_topk_ids, batch.teacher_topk_ids
    s_valid, s = _probs(s_ids, batch.student_topk_logp)  # [N, K]
    t_valid, t = _probs(t_ids, batch.teacher_topk_logp)  # [N, K]
    k = s_ids.shape[1]
    zero = torch.zeros((), dtype=F64)

    # Match the two lists one teacher column at a time ([N, K] work per column, never an [N, K, K] tensor).
    t_in_s = torch.zeros_like(t_valid)  # [N, K] teacher entry i is also in S
    t_on_s = torch.zeros_like(s)  # [N, K] teacher prob of student entry j (0 if not in T)
    for i in range(t_ids.shape[1]):
        same = t_valid[:, i : i + 1] & s_valid & (t_ids[:, i : i + 1] == s_ids)  # [N, K]
        t_in_s[:, i] = same.any(dim=1)
        t_on_s = t_on_s + torch.where(same, t[:, i : i + 1], zero)

    # Union U = S ∪ T: the student's entries (with t(v) where known) + teacher-only entries (s = 0).
    s_mass = s.sum(dim=1)  # Σ_U s = Σ_S s
    t_mass = t.sum(dim=1)  # Σ_U t = Σ_T t
    ok = (s_mass > 0) & (t_mass > 0)
    s_den = torch.where(s_mass > 0, s_mass, torch.ones_like(s_mass)).unsqueeze(1)
    t_den = torch.where(t_mass > 0, t_mass, torch.ones_like(t_mass)).unsqueeze(1)
    s_hat_s = torch.clamp_min(s / s_den, PROB_FLOOR)  # ŝ on student entries
    t_hat_s = torch.clamp_min(t_on_s / t_den, PROB_FLOOR)  # t̂ on student entries
    t_only = t_valid & ~t_in_s  # teacher entries outside S
    s_hat_t = torch.full_like(t, PROB_FLOOR)  # ŝ = max(0, 1e-12) there
    t_hat_t = torch.clamp_min(t / t_den, PROB_FLOOR)

    def _sum_over_union(on_s: Tensor, on_t_only: Tensor) -> Tensor:
        return torch.where(s_valid, on_s, zero).sum(dim=1) + torch.where(t_only, on_t_only, zero).sum(dim=1)

    log_s_hat_s, log_t_hat_s, log_s_hat_t, log_t_hat_t = (x.log() for x in (s_hat_s, t_hat_s, s_hat_t, t_hat_t))
    kl_f = _sum_over_union(t_hat_s * (log_t_hat_s - log_s_hat_s), t_hat_t * (log_t_hat_t - log_s_hat_t))
    kl_r = _sum_over_union(s_hat_s * (log_s_hat_s - log_t_hat_s), s_hat_t * (log_s_hat_t - log_t_hat_t))
    bc = _sum_over_union((s_hat_s * t_hat_s).sqrt(), (s_hat_t * t_hat_t).sqrt())
    kl_f, kl_r, bc = (torch.where(ok, v, zero) for v in (kl_f, kl_r, bc))  # a side with no mass on U → 0

    shared_mass = torch.where(s_valid, t_on_s, zero).sum(dim=1)  # Σ_{S∩T} t
    cmass = shared_mass.clamp(0.0, 1.0)
    cmass_exact: Tensor | None = None
    exact_rows: Tensor | None = None
    compat_mass = cmass
    if cfg.exact_cmass and batch.teacher_logp_on_student_topk is not None:
        t_exact, exact_rows = _exact_teacher_probs(batch, cfg, s_valid, t_on_s)
        cmass_exact = torch.where(s_valid, t_exact, zero).sum(dim=1).clamp(0.0, 1.0)
        compat_mass = cmass_exact

    # H_t: entropy of the student's top-K renormalised over its positive entries, / log(max(n, 2))
    pos = s_valid & (s > 0)
    n_pos = pos.sum(dim=1)
    p = torch.where(pos, s / s_den, zero)
    ent = -torch.where(pos, p * torch.where(pos, p, torch.ones_like(p)).log(), zero).sum(dim=1)
    entropy_norm = torch.where(n_pos > 0, ent / torch.clamp_min(n_pos, 2).to(F64).log(), zero)

    overlap = t_in_s.sum(dim=1).to(F64) / max(k, 1)
    t_top_id, t_top_p = _top1(t_ids, batch.teacher_topk_logp, t_valid)
    s_top_id, s_top_p = _top1(s_ids, batch.student_topk_logp, s_valid)
    reach_t1 = (s_valid & (s_ids == t_top_id.unsqueeze(1)) & (t_top_id >= 0).unsqueeze(1)).any(dim=1)
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
        kl_f_union=kl_f,
        kl_r_union=kl_r,
        bc=bc,
        cmass=cmass,
        cmass_exact=cmass_exact,
        compat_mass=compat_mass,
        entropy_norm=entropy_norm,
        overlap=overlap,
        reach_t1=reach_t1,
        student_rank_sampled=_rank_of(s_ids, batch.student_topk_logp, s_valid, batch.sampled_ids),
        teacher_rank_sampled=_rank_of(t_ids, batch.teacher_topk_logp, t_valid, batch.sampled_ids),
        position_norm=pos_norm,
        student_top1_id=s_top_id,
        student_top1_prob=s_top_p,
        teacher_top1_id=t_top_id,
        teacher_top1_prob=t_top_p,
        student_topk_mass=s_mass,
        teacher_topk_mass=t_mass,
        teacher_mass_on_shared=shared_mass,
        compat=compat,
        exact_rows=exact_rows,
    )
