"""Padded top-K tensors and the flattened token batch of one rollout step (docs/method.md §2).

Layout: all response tokens of one rollout step, flattened in sample order to N rows. Top-K
lists are ids ``[N, K]`` int64 padded with ``-1`` and log-probs ``[N, K]`` padded with ``-inf``,
sorted by log-prob descending. Every row carries its ``sample_index`` and ``position``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ta_opd._native import pack_kernel

PAD_ID = -1
# the smallest magnitude that rounds to ±inf in float32 (log-probs are stored as float32)
_F32_OVERFLOW = 3.4028235677973366e38
_MAX_TOKEN_ID = 1 << 40  # far above any vocabulary; keeps junk ids from overflowing int64 tensors

Entry = Sequence[Any]  # SGLang's [logprob, token_id, text_or_None]


def _clean_row(row: Sequence[Entry] | None, k: int) -> list[tuple[float, int]]:
    """Finite (logprob, id) pairs of one position, best first, at most k, ids deduplicated."""
    if not row:
        return []
    pairs: list[tuple[float, int]] = []
    seen: set[int] = set()
    for entry in row:
        if entry is None or len(entry) < 2 or entry[0] is None or entry[1] is None:
            continue
        try:
            lp, tid = float(entry[0]), int(entry[1])
            if tid != entry[1] or tid >= _MAX_TOKEN_ID:
                raise ValueError
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(
                f"top-K entry {list(entry)[:3]!r}: expected [logprob, token id, text] with a number and an integer "
                f"token id below {_MAX_TOKEN_ID}"
            ) from exc
        if not math.isfinite(lp) or abs(lp) >= _F32_OVERFLOW or tid < 0 or tid in seen:
            continue
        seen.add(tid)
        pairs.append((lp, tid))
    pairs.sort(key=lambda p: -p[0])  # stable: equal log-probs keep the server's order
    return pairs[:k]


def pack_topk(entries: Sequence[Sequence[Entry] | None], k: int) -> tuple[Tensor, Tensor]:
    """SGLang-shaped per-position lists → (ids [N, K] int64, logp [N, K] float32), padded.

    Entries that are None, empty, or have a non-finite log-prob are dropped (docs/method.md §2);
    rows are sorted by log-prob descending and truncated to ``k``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = len(entries)
    ids = torch.full((n, k), PAD_ID, dtype=torch.long)
    logp = torch.full((n, k), float("-inf"), dtype=torch.float32)
    slow_rows = _pack_native(entries, k, ids, logp) if n and k else None
    if slow_rows is None:
        slow_rows = _pack_clean_rows(entries, k, ids, logp)
    for i in slow_rows:
        pairs = _clean_row(entries[i], k)
        if pairs:
            ids[i, : len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            logp[i, : len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    return ids, logp


def _pack_native(entries: Sequence[Sequence[Entry] | None], k: int, ids: Tensor, logp: Tensor) -> list[int] | None:
    """Fast path of ``pack_topk`` in C (ta_opd/_native/pack_kernel.c): one pass over the lists that fills
    the clean rows (as ``_pack_clean_rows`` defines them) and returns the others' indices; None without
    the compiled kernel."""
    lib = pack_kernel()
    if lib is None:
        return None
    rows = entries if type(entries) is list else list(entries)
    slow = torch.zeros(len(rows), dtype=torch.uint8)
    count = lib.ta_pack_topk(rows, len(rows), k, ids.data_ptr(), logp.data_ptr(), slow.data_ptr())
    if count < 0:
        return None
    return slow.nonzero().squeeze(1).tolist() if count else []


def _pack_clean_rows(entries: Sequence[Sequence[Entry] | None], k: int, ids: Tensor, logp: Tensor) -> list[int]:
    """Fast path of ``pack_topk``: fill the rows that are already clean, return the others' indices.

    A server's lists are nearly always clean (at most k entries, finite log-probs, distinct
    non-negative integer ids, best first); for such a row ``_clean_row`` returns it unchanged, so
    one tensor conversion of all entries replaces a Python loop per entry (selection must
    cost next to nothing). Any other row, and every row if an entry is not a plain
    ``[number, int, ...]``, goes through ``_clean_row``, which also raises its errors.
    """
    n = len(entries)
    if n == 0 or k == 0:
        return list(range(n)) if k == 0 else []
    lengths = [len(row) if row else 0 for row in entries]
    flat = [entry for row in entries if row for entry in row]
    try:
        lp = torch.tensor([e[0] for e in flat], dtype=torch.float64)
        tid = torch.tensor([e[1] for e in flat])
    except (TypeError, ValueError, IndexError, KeyError, OverflowError, RuntimeError):
        return list(range(n))
    if tid.dtype not in (torch.int64, torch.bool) or tid.dim() != 1 or lp.dim() != 1:
        return list(range(n))  # e.g. ids that are lists: the per-row path names the bad entry
    tid = tid.long()
    length = torch.tensor(lengths, dtype=torch.long)
    fast = (length <= k) & (length > 0)
    row_of = torch.repeat_interleave(torch.arange(n), length)  # [E]
    col = torch.arange(len(flat)) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
    bad = ~torch.isfinite(lp.to(torch.float32)) | (tid < 0) | (tid >= _MAX_TOKEN_ID)  # finite as stored
    fast[row_of[bad]] = False
    keep = fast[row_of]  # entries of fast rows (each fits in k columns)
    ids_fast = torch.full((n, k), PAD_ID, dtype=torch.long)
    lp_fast = torch.full((n, k), float("-inf"), dtype=torch.float64)
    ids_fast[row_of[keep], col[keep]] = tid[keep]
    lp_fast[row_of[keep], col[keep]] = lp[keep]
    valid = ids_fast >= 0
    pair = valid[:, 1:] & valid[:, :-1]
    # best first (ties keep the server's order, as the stable sort does) and no repeated id
    fast &= ~(pair & (lp_fast[:, 1:] > lp_fast[:, :-1])).any(dim=1)
    sorted_ids = torch.sort(torch.where(valid, ids_fast, PAD_ID), dim=1).values
    fast &= ~((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any(dim=1)
    ids[fast] = ids_fast[fast]
    logp[fast] = lp_fast[fast].to(torch.float32)
    return [i for i, (ok, m) in enumerate(zip(fast.tolist(), lengths, strict=True)) if not ok and m > 0]


def _all_floats(values: list[Any]) -> bool:
    """Every value is a Python float (what ``float(v)`` would return unchanged)."""
    return not values or set(map(type, values)) == {float}


def lookup_logprobs(entries: Sequence[Sequence[Entry] | None], query_ids: Tensor) -> Tensor:
    """Log-probs of ``query_ids [N, K]`` looked up in per-position lists (``-inf`` where absent).

    Used for exact C: the teacher's answer to ``token_ids_logprob`` holds, per position, the
    log-probs of the requested ids; we need them at each position's student top-K ids.
    """
    n, k = query_ids.shape
    if len(entries) != n:
        raise ValueError(f"got {len(entries)} positions of requested-id log-probs, expected {n}")
    out = torch.full((n, k), float("-inf"), dtype=torch.float32)
    for i, row in enumerate(entries):
        if not row:
            continue
        table = {int(e[1]): float(e[0]) for e in row if e is not None and e[0] is not None and e[1] is not None}
        qi = query_ids[i].tolist()
        out[i] = torch.tensor([table.get(q, float("-inf")) if q >= 0 else float("-inf") for q in qi])
    return out


@dataclass
class TokenBatch:
    """All response tokens of one rollout step, flattened (rows in sample order, then position)."""

    student_topk_ids: Tensor  # [N, K] int64, -1 padded
    student_topk_logp: Tensor  # [N, K] float, -inf padded
    teacher_topk_ids: Tensor  # [N, K] int64, -1 padded
    teacher_topk_logp: Tensor  # [N, K] float, -inf padded
    sampled_ids: Tensor  # [N] int64: y_t
    student_logp: Tensor  # [N] float: log p_S(y_t) (NaN where unknown)
    teacher_logp: Tensor  # [N] float: log p_T(y_t)
    loss_mask: Tensor  # [N] bool: supervisable response token
    sample_index: Tensor  # [N] int64, 0..B-1
    position: Tensor  # [N] int64, 0-based index in the sample's response
    response_length: Tensor  # [N] int64, the row's sample's response length L
    teacher_logp_on_student_topk: Tensor | None = None  # [N, K] exact C: teacher log-prob of each student id
    exact_available: Tensor | None = None  # [N] bool: exact C known for this row (else lower bound)
    num_samples: int | None = None  # B (samples without response tokens still count)
    student_logp_known: Tensor | None = None  # [N] bool: False where rollout log-probs were not recorded
    topk_missing: Tensor | None = None  # [N] bool: a top-K list was absent/short at this position (docs/method.md §2)

    @property
    def n_tokens(self) -> int:
        return int(self.sampled_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.student_topk_ids.shape[1])

    @property
    def has_topk(self) -> bool:
        """Both sides carry top-K lists (K > 0)."""
        return self.student_topk_ids.shape[1] > 0 and self.teacher_topk_ids.shape[1] > 0

    def n_samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return int(self.sample_index.max().item()) + 1 if self.n_tokens else 0

    def validate(self, cfg: Any = None) -> TokenBatch:
        """Check shapes, dtypes and the K of both sides; raises ValueError naming the mismatch."""
        n = self.n_tokens
        for name in ("student_logp", "teacher_logp", "loss_mask", "sample_index", "position", "response_length"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
        for side in ("student", "teacher"):
            ids, logp = getattr(self, f"{side}_topk_ids"), getattr(self, f"{side}_topk_logp")
            if ids.dim() != 2 or ids.shape != logp.shape or ids.shape[0] != n:
                raise ValueError(
                    f"{side} top-K ids {tuple(ids.shape)} and log-probs {tuple(logp.shape)} must both be [{n}, K]"
                )
            if ids.dtype != torch.long:
                raise TypeError(f"{side}_topk_ids must be int64, got {ids.dtype}")
        if self.student_topk_ids.shape[1] != self.teacher_topk_ids.shape[1]:
            raise ValueError(
                f"top-K length mismatch: student K={self.student_topk_ids.shape[1]}, "
                f"teacher K={self.teacher_topk_ids.shape[1]}"
            )
        if self.loss_mask.dtype != torch.bool:
            raise TypeError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
        if self.teacher_logp_on_student_topk is not None and (
            self.teacher_logp_on_student_topk.shape != self.student_topk_ids.shape
        ):
            raise ValueError(
                f"teacher_logp_on_student_topk shape {tuple(self.teacher_logp_on_student_topk.shape)} "
                f"!= student top-K shape {tuple(self.student_topk_ids.shape)}"
            )
        if self.sampled_ids.dim() != 1 or self.sampled_ids.shape[0] != n:
            raise ValueError(f"sampled_ids must have shape [{n}], got {tuple(self.sampled_ids.shape)}")
        for name in ("sample_index", "position", "response_length", "sampled_ids"):
            if getattr(self, name).dtype != torch.long:
                raise TypeError(f"{name} must be int64, got {getattr(self, name).dtype}")
        for name in ("exact_available", "student_logp_known", "topk_missing"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.bool or t.shape != (n,)):
                raise ValueError(f"{name} must be a bool tensor of shape [{n}], got {t.dtype} {tuple(t.shape)}")
        if n and (self.sample_index.min() < 0 or self.position.min() < 0):
            raise ValueError("sample_index and position must be >= 0")
        if cfg is not None and getattr(cfg, "selecting", False):
            if not self.has_topk:
                raise ValueError(f"mask {cfg.mask!r} needs student and teacher top-K lists, got K=0")
            if self.topk_missing is not None and bool(self.topk_missing.any()):
                samples = torch.unique(self.sample_index[self.topk_missing]).tolist()
                raise ValueError(
                    f"mask {cfg.mask!r} needs student and teacher top-K lists at every response position; "
                    f"sample(s) {samples[:10]} have missing or short lists (docs/method.md §2)"
                )
        return self

    def to(self, device: torch.device | str) -> TokenBatch:
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return TokenBatch(**values)

    @classmethod
    def from_sample_lists(
        cls,
        student_top_per_sample: Sequence[Sequence[Sequence[Entry] | None] | None],
        teacher_top_per_sample: Sequence[Sequence[Sequence[Entry] | None] | None],
        sampled_ids_per_sample: Sequence[Sequence[int]],
        student_logp_per_sample: Sequence[Sequence[float] | None] | None,
        teacher_logp_per_sample: Sequence[Sequence[float]],
        loss_mask_per_sample: Sequence[Sequence[int]],
        k: int,
        teacher_ids_logprobs_per_sample: Sequence[Sequence[Sequence[Entry] | None] | None] | None = None,
        require_topk: bool | None = None,
    ) -> TokenBatch:
        """Build a batch from per-sample Python lists, one entry per response position.

        A sample's top-K lists must cover its whole response for a selector other than full
        (docs/method.md §2). By default (``require_topk=None``) missing or short lists become empty rows
        flagged in ``topk_missing`` and ``validate(cfg)`` / ``select_tokens`` raise ValueError naming
        the sample only when the configured mask selects; ``require_topk=True`` raises here already.
        A None in ``student_logp_per_sample`` (rollout log-probs not recorded) becomes NaN with
        ``student_logp_known`` False; the non-finite policy then ignores those rows.
        ``teacher_ids_logprobs_per_sample[i]`` (exact C) may be None for a sample whose id union
        overflowed: that sample falls back to the lower bound.
        """
        n_samples = len(sampled_ids_per_sample)
        for name, seq in (
            ("teacher_logp_per_sample", teacher_logp_per_sample),
            ("loss_mask_per_sample", loss_mask_per_sample),
            ("student_top_per_sample", student_top_per_sample),
            ("teacher_top_per_sample", teacher_top_per_sample),
        ):
            if len(seq) != n_samples:
                raise ValueError(f"{name} has {len(seq)} samples, expected {n_samples}")
        lengths = [len(s) for s in sampled_ids_per_sample]
        student_rows: list[Sequence[Entry] | None] = []
        teacher_rows: list[Sequence[Entry] | None] = []
        exact_rows: list[Sequence[Entry] | None] = []
        exact_ok: list[bool] = []
        student_lp: list[float] = []
        student_known: list[bool] = []
        missing: list[bool] = []
        for i, length in enumerate(lengths):
            for name, lists in (("teacher log-probs", teacher_logp_per_sample), ("loss mask", loss_mask_per_sample)):
                if len(lists[i]) != length:
                    raise ValueError(f"sample {i}: {name} has {len(lists[i])} entries, response has {length} tokens")
            short = [False] * length
            for side, per_sample, rows in (
                ("student", student_top_per_sample, student_rows),
                ("teacher", teacher_top_per_sample, teacher_rows),
            ):
                lists = per_sample[i]
                have = 0 if lists is None else len(lists)
                if have < length:
                    if require_topk:
                        raise ValueError(
                            f"sample {i}: {side} top-K lists cover {have} of {length} response positions; "
                            "a selector other than 'full' needs both lists at every position"
                        )
                    rows.extend(list(lists or []) + [None] * (length - have))
                    short[have:] = [True] * (length - have)
                else:
                    rows.extend(list(lists[:length]))
            missing.extend(short)
            slp = None if student_logp_per_sample is None else student_logp_per_sample[i]
            if slp is None:
                student_lp.extend([float("nan")] * length)
                student_known.extend([False] * length)
            else:
                if len(slp) != length:
                    raise ValueError(f"sample {i}: student log-probs have {len(slp)} entries, expected {length}")
                if type(slp) is list and _all_floats(slp):
                    student_lp.extend(slp)  # the common case: plain floats, no per-value conversion
                    student_known.extend([True] * length)
                else:
                    student_lp.extend(float("nan") if v is None else float(v) for v in slp)
                    student_known.extend(v is not None for v in slp)
            exact = None if teacher_ids_logprobs_per_sample is None else teacher_ids_logprobs_per_sample[i]
            if exact is None or len(exact) < length:
                exact_rows.extend([None] * length)
                exact_ok.extend([False] * length)
            else:
                exact_rows.extend(list(exact[:length]))
                exact_ok.extend([True] * length)
        s_ids, s_lp = pack_topk(student_rows, k)
        t_ids, t_lp = pack_topk(teacher_rows, k)
        sample_index = torch.repeat_interleave(torch.arange(n_samples), torch.tensor(lengths, dtype=torch.long))
        position = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        exact_tensor = None
        exact_available = None
        if teacher_ids_logprobs_per_sample is not None:
            exact_tensor = lookup_logprobs(exact_rows, s_ids)
            exact_available = torch.tensor(exact_ok, dtype=torch.bool)

        def _flat(seqs: Sequence[Sequence[Any]], dtype: torch.dtype) -> Tensor:
            return torch.tensor(
                [float(v) if dtype.is_floating_point else int(v) for s in seqs for v in s], dtype=dtype
            )

        teacher_flat = [float("nan") if v is None else float(v) for s in teacher_logp_per_sample for v in s]
        return cls(
            student_topk_ids=s_ids,
            student_topk_logp=s_lp,
            teacher_topk_ids=t_ids,
            teacher_topk_logp=t_lp,
            sampled_ids=_flat(sampled_ids_per_sample, torch.long),
            student_logp=torch.tensor(student_lp, dtype=torch.float32),
            teacher_logp=torch.tensor(teacher_flat, dtype=torch.float32),
            loss_mask=_flat(loss_mask_per_sample, torch.long).bool(),
            sample_index=sample_index.long(),
            position=position.long(),
            response_length=torch.repeat_interleave(
                torch.tensor(lengths, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
            ),
            teacher_logp_on_student_topk=exact_tensor,
            exact_available=exact_available,
            num_samples=n_samples,
            student_logp_known=torch.tensor(student_known, dtype=torch.bool),
            topk_missing=torch.tensor(missing, dtype=torch.bool),
        )
