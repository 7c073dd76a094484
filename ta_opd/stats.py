"""Per-token statistics from the student's and teacher's top-K lists (docs/method.md §2).

All functions take a ``TokenBatch`` (rows = response tokens of one step) and return ``[N]``
tensors, float64 for real values (so that the budget's ranking is reproducible to the last bit
against the per-token reference in tests/ta_opd/reference.py). Probabilities: s(v) = exp(logp_S(v))
on S_t, t(v) = exp(logp_T(v)) on T_t; a token absent from a list has probability 0 there; padded
entries (id −1 / −inf) and non-finite entries are not in the list.

The heavy part runs in numpy over chunks of rows, column-major ([K, rows]): a per-row sum is then
K contiguous vector adds in list order (the reference's order), and ŝ, t̂ and their logs are
written as the reference writes them (max(s / Σs, 1e-12), then log), so that the identities the
ranking's ties rest on hold exactly (a one-entry list has ŝ = 1; identical lists give D = 0).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ta_opd._native import stats_kernel
from ta_opd.config import SelectionConfig
from ta_opd.topk import TokenBatch

PROB_FLOOR = 1e-12  # ŝ, t̂ are floored here after renormalisation on U (docs/method.md §2)
EMA_BLOCK = 256  # prefix-EMA scan block: α^-i stays far from float64 overflow inside a block
F64 = torch.float64


@dataclass
class TokenStats:
    """Per-token statistics, every field ``[N]`` (see docs/method.md §2 for each definition)."""

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
    """e_0 = x_0, e_t = α·e_{t−1} + (1 − α)·x_t along the positions of each sample (docs/method.md §2).

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
    from the teacher's own top-K. Union overflow (docs/method.md §2): ``fallback`` keeps the lower bound for
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
    # numpy's exp, like the lower-bound values from _chunk_stats: a token must get the same number either way
    exact_p = torch.from_numpy(np.exp(torch.where(use, exact_lp, torch.zeros((), dtype=F64)).cpu().numpy()))
    probs = torch.where(use, exact_p.to(t_on_s.device), t_on_s)
    return probs, use.any(dim=1)


ROW_CHUNK = 4096  # rows per chunk: the [K, chunk] float64 intermediates stay cache-resident
LOG_FLOOR = math.log(PROB_FLOOR)


def _side(ids: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray, np.ndarray]:
    """One side's chunk: (valid [n, K], all valid?, log-prob [K, n] float64 with −inf outside the
    list, prob [K, n] (0 outside), mass [n]). Column-major ([K, n]) so that every per-row sum is
    a sequence of contiguous vector adds in list order, the order the per-token reference sums in."""
    ok = ids >= 0
    ok &= np.isfinite(logp)
    all_ok = bool(ok.all())
    lp = np.array(logp.T, dtype=np.float64, order="C")
    if not all_ok:
        np.putmask(lp, ~ok.T, -np.inf)
    prob = np.exp(lp)
    return ok, all_ok, lp, prob, np.add.reduce(prob, axis=0)


def _match(
    s_ids: np.ndarray, s_ok: np.ndarray, s_all: bool, t_ids: np.ndarray, t_ok: np.ndarray, t_all: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join each row's two lists by id (ids are unique within a list, as ``pack_topk`` guarantees).

    Returns, for every id in both lists, the flat [K, n] index of its student entry, of its teacher
    entry, and its row. One row-wise sort of the 2K keys ``id << b | column`` (column < K: student,
    ≥ K: teacher) puts a shared id's two entries side by side, student first. Entries outside a
    list get distinct negative ids, so they never pair.
    """
    n, k = s_ids.shape
    width = 2 * k
    shift = (width - 1).bit_length()
    keys = np.concatenate([s_ids, t_ids], axis=1)
    if not (s_all and t_all):
        cols = np.arange(width, dtype=np.int64)
        np.copyto(keys, -1 - cols, where=~np.concatenate([s_ok, t_ok], axis=1))
    if keys.size and int(keys.max()) >= 1 << (62 - shift):  # ids far above any vocabulary: densify first
        keys = np.unique(keys, return_inverse=True)[1].reshape(n, width).astype(np.int64) - 2 * width
        if not (s_all and t_all):
            np.copyto(keys, -1 - np.arange(width, dtype=np.int64), where=~np.concatenate([s_ok, t_ok], axis=1))
    keys <<= shift
    keys |= np.arange(width, dtype=np.int64)
    keys.sort(axis=1)
    flat = keys.reshape(-1)
    id_key = flat >> shift
    pair = id_key[:-1] == id_key[1:]
    pair[width - 1 :: width] = False  # the last key of a row and the first of the next are not a pair
    at = np.flatnonzero(pair)
    row = at // width
    col_mask = (1 << shift) - 1
    s_col = flat[at] & col_mask
    t_col = (flat[at + 1] & col_mask) - k
    return s_col * n + row, t_col * n + row, row


def _top1(ids: np.ndarray, lp: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(column, id, prob, non-empty) of each row's highest log-prob, the first in list order among equals."""
    k, n = lp.shape
    best = np.maximum.reduce(lp, axis=0)
    is_best = lp == best
    col = np.zeros(n, dtype=np.int64)
    for j in range(k - 1, 0, -1):  # a loop over the K columns, last to first, so the first maximum wins
        np.copyto(col, j, where=is_best[j])
    np.copyto(col, 0, where=is_best[0])
    non_empty = best > -np.inf
    top_id = np.where(non_empty, ids.reshape(-1)[np.arange(n) * k + col], -1)
    top_p = prob.reshape(-1)[col * n + np.arange(n)]  # exp(best), the value the list's mass summed
    return col, top_id, np.where(non_empty, top_p, 0.0), non_empty


def _rank_of(ids: np.ndarray, ok: np.ndarray, all_ok: bool, lp: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Rank of ``query [n]`` in each row (entries with a strictly higher log-prob), −1 if absent."""
    n, k = ids.shape
    hit = ids == query[:, None]
    if not all_ok:
        hit &= ok
    at = np.flatnonzero(hit)
    rows = at // k
    q_lp = np.full(n, np.inf)
    q_lp[rows] = lp.reshape(-1)[(at - rows * k) * n + rows]
    higher = np.count_nonzero(lp > q_lp, axis=0)
    return np.where(q_lp < np.inf, higher, -1)


def _chunk_stats(
    s_ids: np.ndarray,
    s_logp: np.ndarray,
    t_ids: np.ndarray,
    t_logp: np.ndarray,
    sampled: np.ndarray,
    k: int,
    want_t_on_s: bool = False,
) -> dict[str, np.ndarray]:
    """§2 statistics of a chunk of rows (float64; every [K, n] intermediate lives only inside the chunk).

    Union U = student entries + teacher-only entries. On student entries ŝ = max(s / Σs, 1e-12) and t̂
    comes from the teacher entry with the same id, or is the floor; teacher-only entries have ŝ = 1e-12.
    Entries outside a list contribute exactly 0 to every sum: both logs are the floor there.
    """
    n, kk = s_ids.shape
    s_ok, s_all, s_lp, s, s_mass = _side(s_ids, s_logp)
    t_ok, t_all, t_lp, t, t_mass = _side(t_ids, t_logp)
    s_pos, t_pos = s_mass > 0, t_mass > 0
    ok = s_pos & t_pos
    s_den = np.where(s_pos, s_mass, 1.0)
    t_den = np.where(t_pos, t_mass, 1.0)
    s_at, t_at, pair_row = _match(s_ids, s_ok, s_all, t_ids, t_ok, t_all)
    red = np.add.reduce
    s_den, t_den = s_den[None, :], t_den[None, :]

    # ŝ, t̂ and their logs as the per-token reference writes them: log(max(s / Σs, 1e-12)), so that
    # identities hold exactly (one entry: ŝ = 1, log ŝ = 0) and tied tokens stay tied
    sh = s / s_den
    log_sh = np.log(sh)  # −inf outside the list
    # H_t: entropy of the student's top-K renormalised over its positive entries / log(max(n, 2))
    h_term = sh * log_sh
    if s_all and float(s.min(initial=1.0)) > 0.0:
        n_pos = np.full(n, kk)
    else:
        positive = s > 0
        np.putmask(h_term, ~positive, 0.0)  # 0·(−inf) outside the list
        n_pos = np.count_nonzero(positive, axis=0)
    entropy_norm = np.where(n_pos > 0, -red(h_term, axis=0) / np.log(np.maximum(n_pos, 2)), 0.0)
    np.maximum(log_sh, LOG_FLOOR, out=log_sh)  # log ŝ (the floor outside the list)
    np.maximum(sh, PROB_FLOOR, out=sh)  # ŝ

    th = t / t_den
    log_th = np.log(th)
    np.maximum(log_th, LOG_FLOOR, out=log_th)  # log t̂ on teacher entries (the floor outside the list)
    np.maximum(th, PROB_FLOOR, out=th)  # t̂

    # the teacher's side of each student entry: log t̂, t̂ and t from its teacher entry, else the floor / 0
    log_th_s = np.full((kk, n), LOG_FLOOR)
    log_th_s.reshape(-1)[s_at] = log_th.reshape(-1)[t_at]
    th_s = np.full((kk, n), PROB_FLOOR)
    th_s.reshape(-1)[s_at] = th.reshape(-1)[t_at]
    t_on_s = np.zeros((kk, n))
    t_on_s.reshape(-1)[s_at] = t.reshape(-1)[t_at]

    log_ratio = log_th_s
    log_ratio -= log_sh  # log t̂ − log ŝ on student entries; exactly 0 where t̂ = ŝ and outside the list
    kl_f = red(th_s * log_ratio, axis=0)
    kl_r = red(sh * log_ratio, axis=0)
    bc_s = sh * th_s
    np.sqrt(bc_s, out=bc_s)
    if not s_all:
        np.putmask(bc_s, ~s_ok.T, 0.0)
    bc = red(bc_s, axis=0)
    # teacher-only entries (ŝ = 1e-12): shared and outside-the-list entries are zeroed
    log_ratio_t = log_th
    log_ratio_t -= LOG_FLOOR  # log t̂ − log 1e-12, 0 outside the list
    log_ratio_t.reshape(-1)[t_at] = 0.0
    kl_f += red(th * log_ratio_t, axis=0)
    kl_r += PROB_FLOOR * red(log_ratio_t, axis=0)
    bc_t = th * PROB_FLOOR
    np.sqrt(bc_t, out=bc_t)
    bc_t.reshape(-1)[t_at] = 0.0
    if not t_all:
        np.putmask(bc_t, ~t_ok.T, 0.0)
    bc += red(bc_t, axis=0)
    shared = red(t_on_s, axis=0)  # Σ_{S∩T} t, in student list order

    _, s_top_id, s_top_p, _ = _top1(s_ids, s_lp, s)
    t_top_col, t_top_id, t_top_p, t_non_empty = _top1(t_ids, t_lp, t)
    t_shared = np.zeros(kk * n, dtype=bool)
    t_shared[t_at] = True
    out = {
        "kl_f_union": np.where(ok, kl_f, 0.0),  # a side with no mass on U → D = KLr = BC = 0
        "kl_r_union": np.where(ok, -kl_r, 0.0),
        "bc": np.where(ok, bc, 0.0),
        "cmass": np.clip(shared, 0.0, 1.0),
        "entropy_norm": entropy_norm,
        "overlap": np.bincount(pair_row, minlength=n) / max(k, 1),
        "reach_t1": t_shared[t_top_col * n + np.arange(n)] & t_non_empty,
        "student_rank_sampled": _rank_of(s_ids, s_ok, s_all, s_lp, sampled),
        "teacher_rank_sampled": _rank_of(t_ids, t_ok, t_all, t_lp, sampled),
        "student_top1_id": s_top_id,
        "student_top1_prob": s_top_p,
        "teacher_top1_id": t_top_id,
        "teacher_top1_prob": t_top_p,
        "student_topk_mass": s_mass,
        "teacher_topk_mass": t_mass,
        "teacher_mass_on_shared": shared,
    }
    if want_t_on_s:
        out["t_on_s"] = t_on_s.T
    return out


NATIVE_ROW_CHUNK = 1024  # rows per kernel chunk: its [K, chunk] float64 buffers stay cache-resident
_ABSENT_KEY = {"s": -(2**62), "t": -(2**62) - 1}  # ids of entries outside a list: never equal, never sampled
_OUT_FIELDS = (
    ("kl_f_union", np.float64),
    ("kl_r_union", np.float64),
    ("bc", np.float64),
    ("cmass", np.float64),
    ("teacher_mass_on_shared", np.float64),
    ("entropy_norm", np.float64),
    ("overlap", np.float64),
    ("reach_t1", np.bool_),
    ("student_rank_sampled", np.int64),
    ("teacher_rank_sampled", np.int64),
    ("student_top1_id", np.int64),
    ("student_top1_prob", np.float64),
    ("teacher_top1_id", np.int64),
    ("teacher_top1_prob", np.float64),
)  # fmt: skip  (the kernel's output order)


def _native_stats(lib, arrays: list[np.ndarray], k: int, want_t_on_s: bool) -> dict[str, np.ndarray]:
    """The fields of ``_chunk_stats`` for all rows, from the compiled kernel (ta_opd/_native): the same
    IEEE operations in the same order, with numpy's exp/log applied between its passes, so the result is
    bit-identical to the numpy path."""
    s_ids, s_logp, t_ids, t_logp, sampled = (np.ascontiguousarray(x) for x in arrays)
    s_ids, t_ids, sampled = (x.astype(np.int64, copy=False) for x in (s_ids, t_ids, sampled))
    if s_logp.dtype not in (np.float32, np.float64):
        s_logp = s_logp.astype(np.float64)
    if t_logp.dtype not in (np.float32, np.float64):
        t_logp = t_logp.astype(np.float64)
    n, ks = s_ids.shape
    kt = t_ids.shape[1]
    out = {name: np.empty(n, dtype=dtype) for name, dtype in _OUT_FIELDS}
    out["student_topk_mass"], out["teacher_topk_mass"] = np.empty(n), np.empty(n)
    t_on_s = np.empty((n, ks)) if want_t_on_s else None
    log_n = np.log(np.maximum(np.arange(ks + 1, dtype=np.float64), 2.0))  # numpy's log, as the numpy path
    rows = min(n, NATIVE_ROW_CHUNK)
    # the kernel works on 8 rows at a time (padding rows are outside both lists); an odd number of 64-byte
    # lines per column keeps the K columns of a buffer in different L1 sets (a 4 KiB stride would alias)
    stride = -(-rows // 8) * 8
    stride += 8 if (stride // 8) % 2 == 0 else 0
    # per side: key [K, stride] int64 (< 0 outside the list); lp, p = exp(lp), u = p / mass, l = log(u) float64
    bufs, calls = [], []
    for ids, logp, kk, mass, absent in (
        (s_ids, s_logp, ks, "student_topk_mass", _ABSENT_KEY["s"]),
        (t_ids, t_logp, kt, "teacher_topk_mass", _ABSENT_KEY["t"]),
    ):
        buf = {"key": np.empty(kk * stride, dtype=np.int64), "mass": np.empty(stride)}
        buf.update({b: np.empty(kk * stride) for b in ("lp", "p", "u", "l")})
        ptr = {name: x.ctypes.data for name, x in buf.items()}  # fixed addresses, taken once
        bufs.append(ptr)
        prep = lib.ta_prep_f32 if logp.dtype == np.float32 else lib.ta_prep_f64
        src = (ids.ctypes.data, logp.ctypes.data, logp.itemsize, out[mass].ctypes.data)
        calls.append((prep, kk, absent, buf, ptr, *src))
    s, t = bufs
    sampled = np.concatenate([sampled, np.full(stride, -1, dtype=np.int64)])  # the kernel reads whole 8-row blocks
    outs = np.array([out[name].ctypes.data for name, _ in _OUT_FIELDS] + [t_on_s.ctypes.data if want_t_on_s else 0])
    row_args = (
        PROB_FLOOR, LOG_FLOOR, float(max(k, 1)), log_n.ctypes.data,
        s["key"], s["lp"], s["p"], s["u"], s["l"], s["mass"], t["key"], t["lp"], t["p"], t["u"], t["l"], t["mass"],
        sampled.ctypes.data, outs.ctypes.data,
    )  # fmt: skip
    exp, log, norm, row_stats = np.exp, np.log, lib.ta_norm, lib.ta_row_stats
    gc_was_on = gc.isenabled()
    gc.disable()  # the loop allocates no containers; a collection here would walk every object of the process
    try:
        for a in range(0, n, rows):
            m = min(rows, n - a)
            for prep, kk, absent, buf, ptr, ids_at, lp_at, lp_size, mass_at in calls:
                prep(m, stride, kk, ids_at + a * kk * 8, lp_at + a * kk * lp_size, absent, ptr["key"], ptr["lp"])
                exp(buf["lp"], out=buf["p"])
                norm(m, stride, kk, ptr["p"], ptr["u"], ptr["mass"], mass_at + a * 8)
                log(buf["u"], out=buf["l"])
            row_stats(m, stride, ks, kt, *row_args, a)
    finally:
        if gc_was_on:
            gc.enable()
    if t_on_s is not None:
        out["t_on_s"] = t_on_s
    return out


def compute_token_stats(batch: TokenBatch, cfg: SelectionConfig) -> TokenStats:
    """Every docs/method.md §2 statistic of every row of ``batch`` (vectorised over chunks of rows)."""
    s_ids, t_ids = batch.student_topk_ids, batch.teacher_topk_ids
    k = s_ids.shape[1]
    n = s_ids.shape[0]
    if k == 0 or t_ids.shape[1] == 0:
        raise ValueError("compute_token_stats needs student and teacher top-K lists (K > 0 on both sides)")
    exact = cfg.exact_cmass and batch.teacher_logp_on_student_topk is not None
    device = s_ids.device
    arrays = [
        x.detach().cpu().numpy()
        for x in (s_ids, batch.student_topk_logp, t_ids, batch.teacher_topk_logp, batch.sampled_ids)
    ]
    lib = stats_kernel() if n else None
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 and 0·(−inf) outside the lists are masked
        if lib is not None:
            merged = _native_stats(lib, arrays, k, want_t_on_s=exact)
        else:
            parts = [
                _chunk_stats(*(x[a : a + ROW_CHUNK] for x in arrays), k, want_t_on_s=exact)
                for a in range(0, max(n, 1), ROW_CHUNK)
            ]
            merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    cols = {name: torch.from_numpy(value).to(device) for name, value in merged.items()}
    t_on_s = cols.pop("t_on_s", None)
    cmass = cols["cmass"]
    cmass_exact: Tensor | None = None
    exact_rows: Tensor | None = None
    compat_mass = cmass
    if exact:
        assert t_on_s is not None
        s_valid = (s_ids >= 0) & torch.isfinite(batch.student_topk_logp)
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
