"""Per-token statistics from the student's and teacher's top-K lists (METHOD.md §2).

All functions take a ``TokenBatch`` (rows = response tokens of one step) and return ``[N]``
tensors. Probabilities: s(v) = exp(logp_S(v)) on S_t, t(v) = exp(logp_T(v)) on T_t; a token
absent from a list has probability 0 there; padded entries (id −1 / −inf) are not in the list.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ta_opd.config import SelectionConfig
from ta_opd.topk import TokenBatch

PROB_FLOOR = 1e-12  # ŝ, t̂ are floored here after renormalisation on U (METHOD.md §2)
EMA_BLOCK = 256  # prefix-EMA scan block: α^-i stays far from float64 overflow inside a block


@dataclass
class TokenStats:
    """Per-token statistics, every field ``[N]`` (see METHOD.md §2 for each definition)."""

    kl_f_union: Tensor  # D_t = Σ_U t̂ (log t̂ − log ŝ)
    kl_r_union: Tensor  # Σ_U ŝ (log ŝ − log t̂)
    bc: Tensor  # Bhattacharyya Σ_U sqrt(ŝ t̂)
    cmass: Tensor  # teacher mass on the student's top-K from the teacher's top-K (lower bound)
    cmass_exact: Tensor | None  # true teacher mass on the student's top-K (exact mode), else None
    compat_mass: Tensor  # C_t used by the 'mass' proxy: exact where available, else the lower bound
    entropy_norm: Tensor  # H_t: entropy of the renormalised student top-K / log(max(n, 2))
    overlap: Tensor  # |ids(S) ∩ ids(T)| / K
    reach_t1: Tensor  # teacher's top-1 id is in S_t (bool)
    student_rank_sampled: Tensor  # entries of S_t with higher log-prob than y_t (0 = top-1), −1 if absent
    teacher_rank_sampled: Tensor  # same in T_t
    position_norm: Tensor  # t / max(L − 1, 1)
    student_top1_id: Tensor
    student_top1_prob: Tensor
    teacher_top1_id: Tensor
    teacher_top1_prob: Tensor
    student_topk_mass: Tensor  # Σ_{S} s
    teacher_topk_mass: Tensor  # Σ_{T} t
    teacher_mass_on_shared: Tensor  # Σ_{S∩T} t
    compat: Tensor  # the configured compatibility proxy C (mass | set | bc | prefix_ema)

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _probs(ids: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """(valid [N, K] bool, prob [N, K] float64 with 0 at invalid entries)."""
    valid = (ids >= 0) & torch.isfinite(logp)
    prob = torch.where(valid, logp.to(torch.float64).exp(), torch.zeros((), dtype=torch.float64))
    return valid, prob


def _rank_of(ids: Tensor, logp: Tensor, valid: Tensor, query: Tensor) -> Tensor:
    """Competition rank of ``query [N]`` in each row (entries with a strictly higher log-prob), −1 if absent."""
    hit = valid & (ids == query.unsqueeze(1))  # [N, K]
    present = hit.any(dim=1)
    q_lp = torch.where(hit, logp.to(torch.float64), torch.full_like(logp, float("-inf"), dtype=torch.float64))
    q_lp = q_lp.max(dim=1).values
    higher = (valid & (logp.to(torch.float64) > q_lp.unsqueeze(1))).sum(dim=1)
    return torch.where(present, higher, torch.full_like(higher, -1))


def _top1(ids: Tensor, logp: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    masked = torch.where(valid, logp.to(torch.float64), torch.full_like(logp, float("-inf"), dtype=torch.float64))
    best_lp, best_j = masked.max(dim=1)
    any_valid = valid.any(dim=1)
    top_id = torch.where(any_valid, ids.gather(1, best_j.unsqueeze(1)).squeeze(1), torch.full_like(best_j, -1))
    top_prob = torch.where(any_valid, best_lp.exp(), torch.zeros_like(best_lp))
    return top_id, top_prob


def prefix_ema(values: Tensor, sample_index: Tensor, position: Tensor, alpha: float) -> Tensor:
    """e_0 = x_0, e_t = α e_{t−1} + (1 − α) x_t along the positions of each sample (METHOD.md §2).

    Vectorised as a blocked scan: inside a block of positions, e_t = α^t (e_{b−1}·α + ...) is a
    cumulative sum of x_i α^{−i}; the carry between blocks keeps α^{−i} bounded.
    """
    n = values.shape[0]
    if n == 0:
        return values.to(torch.float32)
    n_samples = int(sample_index.max().item()) + 1
    length = int(position.max().item()) + 1
    dense = torch.zeros(n_samples, length, dtype=torch.float64, device=values.device)
    dense[sample_index, position] = values.to(torch.float64)
    out = torch.zeros_like(dense)
    carry = torch.zeros(n_samples, dtype=torch.float64, device=values.device)  # e at the previous position
    for start in range(0, length, EMA_BLOCK):  # loop over blocks of positions, vectorised over samples
        block = dense[:, start : start + EMA_BLOCK]
        width = block.shape[1]
        i = torch.arange(width, dtype=torch.float64, device=values.device)
        # contribution weights: x_i enters with (1 − α), except the very first position of a sample (weight 1)
        w = torch.full((width,), 1.0 - alpha, dtype=torch.float64, device=values.device)
        if start == 0:
            w[0] = 1.0
        if alpha == 0.0:
            out[:, start : start + width] = block * (w > 0)
            if start == 0:
                out[:, 0] = block[:, 0]
            carry = out[:, start + width - 1]
            continue
        inv_pow = alpha ** (-i)  # α^{−i}
        pow_ = alpha**i  # α^{i}
        acc = torch.cumsum(block * w * inv_pow, dim=1)  # Σ_{j≤i} w_j x_j α^{−j}
        carry_term = carry.unsqueeze(1) * alpha ** (i + 1) if start > 0 else 0.0
        out[:, start : start + width] = pow_ * acc + carry_term
        carry = out[:, start + width - 1]
    return out[sample_index, position].to(torch.float32)


def compute_token_stats(batch: TokenBatch, cfg: SelectionConfig) -> TokenStats:
    """Every METHOD.md §2 statistic of every row of ``batch`` (vectorised, no per-token loops)."""
    s_valid, s = _probs(batch.student_topk_ids, batch.student_topk_logp)  # [N, K]
    t_valid, t = _probs(batch.teacher_topk_ids, batch.teacher_topk_logp)  # [N, K]
    k = batch.student_topk_ids.shape[1]

    # match[n, i, j]: teacher entry i and student entry j name the same token
    match = (
        t_valid.unsqueeze(2)
        & s_valid.unsqueeze(1)
        & (batch.teacher_topk_ids.unsqueeze(2) == batch.student_topk_ids.unsqueeze(1))
    )
    t_in_s = match.any(dim=2)  # [N, K] teacher entry is also in S
    t_on_s = torch.einsum("nij,ni->nj", match.to(torch.float64), t)  # [N, K] teacher prob of each student entry

    # Union U = S ∪ T: the student's entries (with t(v) where known) + teacher-only entries (s = 0).
    s_mass = s.sum(dim=1)  # Σ_U s
    t_mass = t.sum(dim=1)  # Σ_U t (every teacher entry lies in U)
    ok = (s_mass > 0) & (t_mass > 0)
    s_den = torch.where(ok, s_mass, torch.ones_like(s_mass)).unsqueeze(1)
    t_den = torch.where(ok, t_mass, torch.ones_like(t_mass)).unsqueeze(1)
    # student-side entries of U
    s_hat_s = torch.clamp_min(s / s_den, PROB_FLOOR)
    t_hat_s = torch.clamp_min(t_on_s / t_den, PROB_FLOOR)
    # teacher-only entries of U
    t_only = t_valid & ~t_in_s
    s_hat_t = torch.full_like(t, PROB_FLOOR)
    t_hat_t = torch.clamp_min(t / t_den, PROB_FLOOR)

    def _sum_over_union(fn_s: Tensor, fn_t: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=torch.float64)
        return torch.where(s_valid, fn_s, zero).sum(dim=1) + torch.where(t_only, fn_t, zero).sum(dim=1)

    kl_f = _sum_over_union(t_hat_s * (t_hat_s.log() - s_hat_s.log()), t_hat_t * (t_hat_t.log() - s_hat_t.log()))
    kl_r = _sum_over_union(s_hat_s * (s_hat_s.log() - t_hat_s.log()), s_hat_t * (s_hat_t.log() - t_hat_t.log()))
    bc = _sum_over_union((s_hat_s * t_hat_s).sqrt(), (s_hat_t * t_hat_t).sqrt())
    zero_n = torch.zeros_like(kl_f)
    kl_f, kl_r, bc = (torch.where(ok, v, zero_n) for v in (kl_f, kl_r, bc))

    shared_mass = torch.where(s_valid, t_on_s, torch.zeros((), dtype=torch.float64)).sum(dim=1)
    cmass = shared_mass.clamp(0.0, 1.0)
    cmass_exact = None
    compat_mass = cmass
    if cfg.exact_cmass and batch.teacher_logp_on_student_topk is not None:
        exact_lp = batch.teacher_logp_on_student_topk.to(torch.float64)
        exact_p = torch.where(s_valid & torch.isfinite(exact_lp), exact_lp.exp(), torch.zeros((), dtype=torch.float64))
        cmass_exact = exact_p.sum(dim=1).clamp(0.0, 1.0)
        available = (
            batch.exact_available if batch.exact_available is not None else torch.ones_like(cmass, dtype=torch.bool)
        )
        # the exact mass can never be below what the teacher's own top-K already shows
        compat_mass = torch.where(available, torch.maximum(cmass_exact, cmass), cmass)

    # H_t: entropy of the student's top-K renormalised over its positive entries, / log(max(n, 2))
    pos = s_valid & (s > 0)
    n_pos = pos.sum(dim=1)
    p = torch.where(pos, s / s_den, torch.zeros((), dtype=torch.float64))
    ent = -torch.where(pos, p * torch.where(pos, p, torch.ones_like(p)).log(), torch.zeros_like(p)).sum(dim=1)
    entropy_norm = torch.where(
        n_pos > 0, ent / torch.log(torch.clamp_min(n_pos, 2).to(torch.float64)), torch.zeros_like(ent)
    )

    overlap = t_in_s.sum(dim=1).to(torch.float64) / max(k, 1)
    t_top_id, t_top_p = _top1(batch.teacher_topk_ids, batch.teacher_topk_logp, t_valid)
    s_top_id, s_top_p = _top1(batch.student_topk_ids, batch.student_topk_logp, s_valid)
    reach_t1 = (s_valid & (batch.student_topk_ids == t_top_id.unsqueeze(1)) & (t_top_id >= 0).unsqueeze(1)).any(1)

    pos_norm = batch.position.to(torch.float64) / torch.clamp_min(batch.response_length - 1, 1).to(torch.float64)

    proxy = cfg.compat_proxy
    if proxy == "mass":
        compat = compat_mass
    elif proxy == "set":
        compat = overlap
    elif proxy == "bc":
        compat = bc
    elif proxy == "prefix_ema":
        compat = prefix_ema(compat_mass, batch.sample_index, batch.position, cfg.prefix_ema_alpha).to(torch.float64)
    else:
        raise ValueError(f"unknown compat proxy {proxy!r}; expected mass, set, bc or prefix_ema")

    f32 = torch.float32
    return TokenStats(
        kl_f_union=kl_f.to(f32),
        kl_r_union=kl_r.to(f32),
        bc=bc.to(f32),
        cmass=cmass.to(f32),
        cmass_exact=None if cmass_exact is None else cmass_exact.to(f32),
        compat_mass=compat_mass.to(f32),
        entropy_norm=entropy_norm.to(f32),
        overlap=overlap.to(f32),
        reach_t1=reach_t1,
        student_rank_sampled=_rank_of(batch.student_topk_ids, batch.student_topk_logp, s_valid, batch.sampled_ids),
        teacher_rank_sampled=_rank_of(batch.teacher_topk_ids, batch.teacher_topk_logp, t_valid, batch.sampled_ids),
        position_norm=pos_norm.to(f32),
        student_top1_id=s_top_id,
        student_top1_prob=s_top_p.to(f32),
        teacher_top1_id=t_top_id,
        teacher_top1_prob=t_top_p.to(f32),
        student_topk_mass=s_mass.to(f32),
        teacher_topk_mass=t_mass.to(f32),
        teacher_mass_on_shared=shared_mass.to(f32),
        compat=compat.to(f32),
    )
