"""Full-vocabulary per-token statistics for the fixed-context diagnostic (docs/method.md §6.2).

The one implementation of the statistics that need full logits: student/teacher entropy
(nats), KLf = KL(p_T‖p_S), KLr = KL(p_S‖p_T), full-vocabulary Bhattacharyya coefficient,
and the support definitions of C used by the robustness check (§6.5): exact C (teacher mass
on the student's top-K), overlap, Jaccard, shared teacher / student top-K mass. The
union-at-K statistics (D = KLf_union, KLr_union, BC_union, H = normalised top-K entropy, the
lower-bound C) are *not* re-implemented here: top-K lists are built from the full logits and
handed to :func:`ta_opd.stats.compute_token_stats`, the same code the training step uses, and
the KL and entropy terms are :func:`ta_opd.sd_kernels.kl_divergence` and :func:`ta_opd.sd_kernels.p_log_ratio`,
the self-distillation losses' own.

Everything works on one chunk of tokens ``[n, V]``; :func:`chunked_fullvocab_token_stats`
walks a longer token range so that at most ``chunk_tokens × V`` logits exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# p·(log p − log q) with 0·log 0 = 0 and the full-vocabulary KL: the SD losses' kernels' own.
from ta_opd.sd_kernels import kl_divergence, p_log_ratio

# Columns produced per student model (besides the per-K ones below).
FULLVOCAB_STATS = ("entropy_student", "kl_f", "kl_r", "bc_full", "student_logp_sampled")
# Columns that depend only on the teacher.
TEACHER_STATS = ("entropy_teacher", "teacher_logp_sampled")
# Support definitions of C at each K (suffix ``_k{K}``), docs/method.md §6.5.
SUPPORT_STATS = ("cmass_exact", "overlap", "jaccard", "shared_teacher_mass", "shared_student_mass")
# Union-at-K statistics taken from ``ta_opd.stats.compute_token_stats`` (suffix ``_k{K}``).
UNION_STATS = ("kl_f_union", "kl_r_union", "bc", "cmass", "entropy_norm")


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of a full log-distribution ``[n, V]`` (0·log 0 = 0)."""
    return -p_log_ratio(logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)


def kl_from_logp(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ_v a(v)(log a(v) − log b(v)) per row; terms with a(v) = 0 contribute 0."""
    return kl_divergence(logp_a, logp_b).clamp_min(0.0)


def topk_from_logp(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ids ``[n, k]`` and log-probs ``[n, k]`` of each row, sorted descending."""
    if k < 1 or k > logp.shape[-1]:
        raise ValueError(f"top-K size k={k} must be in [1, vocab={logp.shape[-1]}]")
    values, ids = torch.topk(logp, k, dim=-1, sorted=True)
    return ids, values


def support_stats(
    student_logp: torch.Tensor,  # [n, V] full log-probs
    teacher_logp: torch.Tensor,  # [n, V]
    student_ids: torch.Tensor,  # [n, K] student top-K ids
    teacher_ids: torch.Tensor,  # [n, K] teacher top-K ids
) -> dict[str, torch.Tensor]:
    """Support definitions of compatibility C at one K (docs/method.md §2, §6.5), each ``[n]``.

    ``cmass_exact`` = Σ_{v∈S} p_T(v) (clipped to [0, 1]); ``overlap`` = |S∩T|/K;
    ``jaccard`` = |S∩T|/|S∪T|; ``shared_teacher_mass`` = Σ_{v∈S∩T} p_T(v);
    ``shared_student_mass`` = Σ_{v∈S∩T} p_S(v).
    """
    k = student_ids.shape[-1]
    p_t_on_s = teacher_logp.gather(-1, student_ids).exp()  # [n, K]
    p_s_on_s = student_logp.gather(-1, student_ids).exp()  # [n, K]
    # s_in_t[i, a] = student id a of row i is also in the teacher's top-K.
    s_in_t = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1)  # [n, K]
    n_shared = s_in_t.sum(-1).to(student_logp.dtype)
    return {
        "cmass_exact": p_t_on_s.sum(-1).clamp(0.0, 1.0),
        "overlap": n_shared / k,
        "jaccard": n_shared / (2 * k - n_shared),
        "shared_teacher_mass": (p_t_on_s * s_in_t).sum(-1).clamp(0.0, 1.0),
        "shared_student_mass": (p_s_on_s * s_in_t).sum(-1).clamp(0.0, 1.0),
    }


def union_stats_at_k(
    student_ids: torch.Tensor,  # [n, K]
    student_topk_logp: torch.Tensor,  # [n, K]
    teacher_ids: torch.Tensor,  # [n, K]
    teacher_topk_logp: torch.Tensor,  # [n, K]
    sampled_ids: torch.Tensor,  # [n]
    student_logp_sampled: torch.Tensor,  # [n]
    teacher_logp_sampled: torch.Tensor,  # [n]
    position: torch.Tensor | None = None,  # [n]
    response_length: torch.Tensor | None = None,  # [n]
    sample_index: torch.Tensor | None = None,  # [n]
) -> dict[str, torch.Tensor]:
    """The training step's §2 statistics on top-K lists, via :func:`ta_opd.stats.compute_token_stats`."""
    from ta_opd.diagnostics.selection import make_token_batch, token_stats

    batch = make_token_batch(
        student_ids,
        student_topk_logp,
        teacher_ids,
        teacher_topk_logp,
        sampled_ids,
        student_logp_sampled,
        teacher_logp_sampled,
        position=position,
        response_length=response_length,
        sample_index=sample_index,
    )
    stats = token_stats(batch, topk_k=student_ids.shape[-1])
    return {name: getattr(stats, name).to(student_topk_logp.dtype) for name in UNION_STATS}


def fullvocab_token_stats(
    student_logits: torch.Tensor,  # [n, V]
    teacher_logits: torch.Tensor,  # [n, V]
    sampled_ids: torch.Tensor,  # [n]
    ks: Sequence[int] = (16,),
    union_ks: Sequence[int] = (),
    keep_topk: int = 0,
    position: torch.Tensor | None = None,
    response_length: torch.Tensor | None = None,
    sample_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All per-token statistics of one chunk of tokens (docs/method.md §6.2), each ``[n]`` (or ``[n, K]``).

    Full-vocabulary: ``entropy_student``, ``entropy_teacher`` (nats), ``kl_f`` = KL(p_T‖p_S),
    ``kl_r`` = KL(p_S‖p_T), ``bc_full`` = Σ_v sqrt(p_S p_T), sampled-token log-probs.
    Per K in ``ks``: the support statistics of :func:`support_stats` (suffix ``_k{K}``);
    per K in ``union_ks``: the union statistics of :func:`union_stats_at_k` (suffix ``_k{K}``).
    ``keep_topk > 0`` also returns the top-``keep_topk`` lists (``student_topk_ids``,
    ``student_topk_logp``, ``teacher_topk_ids``, ``teacher_topk_logp``,
    ``teacher_logp_on_student_topk``), the input the selectors need.
    Logits are upcast to at least float32; vocab sizes must match.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be [tokens, vocab] of the same shape (truncate to a shared vocabulary first)"
        )
    if sampled_ids.shape != student_logits.shape[:1]:
        raise ValueError(f"sampled_ids has shape {tuple(sampled_ids.shape)}, expected ({student_logits.shape[0]},)")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    logp_t = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    sampled = sampled_ids.long().unsqueeze(-1)
    out: dict[str, torch.Tensor] = {
        "entropy_student": entropy_from_logp(logp_s),
        "entropy_teacher": entropy_from_logp(logp_t),
        "kl_f": kl_from_logp(logp_t, logp_s),
        "kl_r": kl_from_logp(logp_s, logp_t),
        "bc_full": (0.5 * (logp_s + logp_t)).exp().sum(-1).clamp(0.0, 1.0),
        "student_logp_sampled": logp_s.gather(-1, sampled).squeeze(-1),
        "teacher_logp_sampled": logp_t.gather(-1, sampled).squeeze(-1),
    }
    k_max = max([*ks, *union_ks, keep_topk, 1])
    s_ids, s_top = topk_from_logp(logp_s, k_max)
    t_ids, t_top = topk_from_logp(logp_t, k_max)
    for k in ks:
        for name, value in support_stats(logp_s, logp_t, s_ids[:, :k], t_ids[:, :k]).items():
            out[f"{name}_k{k}"] = value
    for k in union_ks:
        union = union_stats_at_k(
            s_ids[:, :k],
            s_top[:, :k],
            t_ids[:, :k],
            t_top[:, :k],
            sampled_ids.long(),
            out["student_logp_sampled"],
            out["teacher_logp_sampled"],
            position=position,
            response_length=response_length,
            sample_index=sample_index,
        )
        for name, value in union.items():
            out[f"{name}_k{k}"] = value
    if keep_topk > 0:
        out["student_topk_ids"] = s_ids[:, :keep_topk]
        out["student_topk_logp"] = s_top[:, :keep_topk]
        out["teacher_topk_ids"] = t_ids[:, :keep_topk]
        out["teacher_topk_logp"] = t_top[:, :keep_topk]
        out["teacher_logp_on_student_topk"] = logp_t.gather(-1, s_ids[:, :keep_topk])
    return out


def chunked_fullvocab_token_stats(
    student_logits_fn: Callable[[int, int], torch.Tensor],
    teacher_logits_fn: Callable[[int, int], torch.Tensor],
    sampled_ids: torch.Tensor,  # [N]
    chunk_tokens: int,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """:func:`fullvocab_token_stats` over N tokens, ``chunk_tokens`` rows of logits at a time.

    ``*_logits_fn(a, b)`` returns the logits of rows ``a:b`` (e.g. the LM head applied to a slice
    of hidden states), so the full ``[N, V]`` matrix never exists. Per-token keyword tensors
    (``position``, ``response_length``, ``sample_index``) are sliced alongside.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n = sampled_ids.shape[0]
    per_token = {key: kwargs.pop(key) for key in ("position", "response_length", "sample_index") if key in kwargs}
    parts: dict[str, list[torch.Tensor]] = {}
    for a in range(0, n, chunk_tokens):
        b = min(n, a + chunk_tokens)
        sliced = {key: (None if v is None else v[a:b]) for key, v in per_token.items()}
        chunk = fullvocab_token_stats(
            student_logits_fn(a, b), teacher_logits_fn(a, b), sampled_ids[a:b], **kwargs, **sliced
        )
        for key, value in chunk.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}
