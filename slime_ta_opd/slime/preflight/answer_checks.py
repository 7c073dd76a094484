"""Pre-flight checks of server answers: position alignment, determinism, top-K sanity, teacher temperature.

Pure functions of per-sample lists (log-probs, SGLang ``[logprob, id, text]`` top-K entries); each
returns a ``CheckResult``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from slime.preflight.report import (
    DETERMINISM_ABS_TOL,
    DETERMINISM_REL_TOL,
    FAIL,
    PASS,
    POSITION_TOL,
    SAMPLED_KL_TOL,
    SKIP,
    TEMPERATURE_REL_TOL,
    TOPK_MATCH_TOL,
    TOPK_SORT_TOL,
    WARN,
    CheckResult,
    fmt_value,
)


def _mean_abs_diff(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], offset: int
) -> tuple[float, float, int]:
    """mean and max |a[i][t] - b[i][t + offset]| over positions where both exist."""
    total, worst, n = 0.0, 0.0, 0
    for row_a, row_b in zip(a, b, strict=True):
        for t, x in enumerate(row_a):
            u = t + offset
            if 0 <= u < len(row_b):
                d = abs(float(x) - float(row_b[u]))
                if not math.isfinite(d):
                    d = math.inf
                total += d
                worst = max(worst, d)
                n += 1
    return (total / n if n else math.nan), worst, n


def check_position_alignment(
    rollout_logprobs: Sequence[Sequence[float]],
    extracted_logprobs: Sequence[Sequence[float]],
    tol: float = POSITION_TOL,
    kl_tol: float = SAMPLED_KL_TOL,
) -> CheckResult:
    """Teacher = student copy: the OPD module's teacher log-probs must equal the rollout's at every position.

    ``rollout_logprobs[i][t]``: the student engine's log-prob of response token t of rollout i (sampled at
    T = 1); ``extracted_logprobs[i][t]``: what the project's teacher-scoring path (request + extraction)
    gives for the same token when the "teacher" is the student. The mismatch is also measured one position
    off either way: an off-by-one extraction matches a shifted copy better than the aligned one.
    """
    lengths_r = [len(r) for r in rollout_logprobs]
    lengths_e = [len(r) for r in extracted_logprobs]
    if lengths_r != lengths_e:
        bad = next(i for i, (a, b) in enumerate(zip(lengths_r, lengths_e, strict=True)) if a != b)
        return CheckResult(
            "position_alignment",
            FAIL,
            f"rollout {bad}: {lengths_e[bad]} teacher log-probs for {lengths_r[bad]} response tokens",
            "the extraction does not return one log-prob per response token",
        )
    n_tokens = sum(lengths_r)
    if n_tokens == 0:
        return CheckResult("position_alignment", FAIL, "the student's rollouts have no response tokens to compare")
    mean0, max0, _ = _mean_abs_diff(rollout_logprobs, extracted_logprobs, 0)
    shifted = {d: _mean_abs_diff(rollout_logprobs, extracted_logprobs, d)[0] for d in (-1, 1)}
    kl = sum(
        float(s) - float(t)
        for rs, rt in zip(rollout_logprobs, extracted_logprobs, strict=True)
        for s, t in zip(rs, rt, strict=True)
    )
    kl /= n_tokens
    best = min([(mean0, 0)] + [(v, d) for d, v in shifted.items() if math.isfinite(v)])
    one_off = min((v for v in shifted.values() if math.isfinite(v)), default=math.nan)
    measured = (
        f"mean |Δ log p| = {fmt_value(mean0)} (max {fmt_value(max0)}) at the right position vs "
        f"{fmt_value(one_off)} one position off; sampled KL = {fmt_value(kl)} over {n_tokens} tokens of "
        f"{len(lengths_r)} rollouts"
    )
    values = {"mean_abs_diff": mean0, "max_abs_diff": max0, "one_off_mean_abs_diff": one_off, "sampled_kl": kl}
    problems = []
    if best[1] != 0 and best[0] < mean0:
        # extracted[t + d] matches rollout[t]: d = +1 → token t got the log-prob of token t - 1 (read early)
        way = "early: token t gets the log-prob of token t-1" if best[1] > 0 else "late: token t gets token t+1's"
        problems.append(
            f"the extracted log-probs match the rollout's at offset {best[1]:+d} (mean |Δ| {fmt_value(best[0])}): the "
            f"teacher-scoring extraction is off by one, reading one position {way}. Every token is then "
            "supervised with its neighbour's teacher log-prob (a one-token response loses all signal)."
        )
    if not mean0 <= tol:
        problems.append(f"mean |Δ log p| {fmt_value(mean0)} > tolerance {tol} (teacher = student copy must agree)")
    if not abs(kl) <= kl_tol:
        problems.append(f"|sampled KL| {fmt_value(abs(kl))} > tolerance {kl_tol} (teacher = student copy gives ~0)")
    if problems:
        return CheckResult("position_alignment", FAIL, measured, "\n".join(problems), values)
    return CheckResult("position_alignment", PASS, measured, values=values)


def check_determinism(
    runs: dict[str, Sequence[Sequence[float]]],
    opd_signal: float,
    rel_tol: float = DETERMINISM_REL_TOL,
    abs_tol: float = DETERMINISM_ABS_TOL,
) -> CheckResult:
    """The same scoring request, repeated and on every teacher replica, must agree to much less than the signal.

    ``runs``: label (e.g. ``"http://t0 #2"``) → per-sample teacher log-probs of the sampled tokens; the
    first run is the reference. ``opd_signal``: mean |log p_T − log p_S| over the same tokens (the
    typical OPD advantage magnitude). Tolerance = max(abs_tol, rel_tol · signal) on the mean spread.
    """
    labels = list(runs)
    if len(labels) < 2:
        return CheckResult("determinism", FAIL, f"{len(labels)} teacher answer(s): need at least two to compare")
    ref = runs[labels[0]]
    worst_mean, worst_max, worst_label = 0.0, 0.0, labels[1]
    for label in labels[1:]:
        mean_d, max_d, _ = _mean_abs_diff(ref, runs[label], 0)
        if not math.isfinite(mean_d) or mean_d > worst_mean or (mean_d == worst_mean and max_d > worst_max):
            worst_mean, worst_max, worst_label = mean_d, max_d, label
    tolerance = max(abs_tol, rel_tol * float(opd_signal))
    measured = (
        f"spread mean |Δ| = {fmt_value(worst_mean)} (max {fmt_value(worst_max)}) over {len(labels)} answers vs "
        f"tolerance {fmt_value(tolerance)} = max({abs_tol}, {rel_tol} × OPD signal {fmt_value(opd_signal)})"
    )
    values = {"spread_mean": worst_mean, "spread_max": worst_max, "tolerance": tolerance, "opd_signal": opd_signal}
    if not worst_mean <= tolerance:
        detail = (
            f"{worst_label} disagrees with {labels[0]}: the teacher's noise is "
            f"{fmt_value(worst_mean / max(opd_signal, 1e-12))}× the OPD signal, so the advantage carries scoring "
            "noise. Use deterministic inference on the teacher (same dtype/kernels on every replica, no "
            "nondeterministic attention), or score on one replica."
        )
        return CheckResult("determinism", FAIL, measured, detail, values)
    return CheckResult("determinism", PASS, measured, values=values)


def check_topk(
    lists: Sequence[Sequence[Any]],
    k: int,
    vocab_rows: int,
    sampled: Sequence[Sequence[tuple[int, float]]] | None = None,
    source: str = "teacher",
) -> CheckResult:
    """Top-K lists of every response position: exactly K entries, sorted desc, ids in range, finite, a distribution.

    ``lists[i][t]``: SGLang entries ``[[logprob, id, text], ...]`` of sample i at response position t;
    ``sampled[i][t]``: (id, log-prob) of the sampled token there — when it is in the list, both log-probs
    must agree (a list taken from another position would not).
    """
    expected = min(k, vocab_rows)
    counts = {"short_or_long": 0, "unsorted": 0, "id_out_of_range": 0, "nonfinite": 0, "duplicate": 0,
              "not_a_distribution": 0, "sampled_mismatch": 0}  # fmt: skip
    first: dict[str, str] = {}
    n_pos = 0
    for i, sample_lists in enumerate(lists):
        for t, entries in enumerate(sample_lists):
            n_pos += 1
            where = f"sample {i} position {t}"

            def bad(kind: str, what: str, where: str = where) -> None:
                counts[kind] += 1
                first.setdefault(kind, f"{where}: {what}")

            if entries is None:
                bad("short_or_long", "no list")
                continue
            if len(entries) != expected:
                bad("short_or_long", f"{len(entries)} entries, expected {expected}")
            vals, ids = [], []
            for e in entries:
                lp = e[0] if isinstance(e, list | tuple) and e else None
                tid = e[1] if isinstance(e, list | tuple) and len(e) > 1 else None
                if lp is None or not isinstance(lp, int | float) or not math.isfinite(lp) or lp > 1e-4:
                    bad("nonfinite", f"log-prob {lp!r}")
                    continue
                if not isinstance(tid, int) or not 0 <= tid < vocab_rows:
                    bad("id_out_of_range", f"id {tid!r} not in [0, {vocab_rows})")
                    continue
                vals.append(float(lp))
                ids.append(tid)
            if any(b > a + TOPK_SORT_TOL for a, b in zip(vals, vals[1:], strict=False)):
                bad("unsorted", f"log-probs {[round(v, 4) for v in vals[:5]]} ... not descending")
            if len(set(ids)) != len(ids):
                bad("duplicate", "an id appears twice")
            if vals and sum(math.exp(v) for v in vals) > 1.0 + 1e-3:
                bad("not_a_distribution", f"probabilities sum to {sum(math.exp(v) for v in vals):.4f} > 1")
            if sampled is not None and t < len(sampled[i]):
                sid, slp = sampled[i][t]
                if sid in ids and abs(vals[ids.index(sid)] - float(slp)) > TOPK_MATCH_TOL:
                    bad(
                        "sampled_mismatch",
                        f"token {sid}: {vals[ids.index(sid)]:.5f} in the top-K, {float(slp):.5f} as the sampled token",
                    )
    n_bad = sum(counts.values())
    measured = f"{source}: {n_pos} positions, K = {expected} requested, {n_bad} violation(s), ids < {vocab_rows}"
    values = {"positions": float(n_pos), "violations": float(n_bad)}
    if n_pos == 0:
        return CheckResult("topk", FAIL, f"{source}: no top-K lists returned for {k} requested", values=values)
    if n_bad:
        detail = "\n".join(f"{kind}: {counts[kind]} (first: {first[kind]})" for kind in counts if counts[kind])
        detail += "\nThe selectors read these lists as each side's top-K distribution (docs/method.md §2)."
        return CheckResult("topk", FAIL, measured, detail, values)
    return CheckResult("topk", PASS, measured, values=values)


def check_teacher_temperature(
    temperature: float,
    rollout_temperature: float,
    base: Sequence[Sequence[float]] | None = None,
    scaled: Sequence[Sequence[float]] | None = None,
    base_top: Sequence[Sequence[Any]] | None = None,
    scaled_top: Sequence[Sequence[Any]] | None = None,
    rel_tol: float = TEMPERATURE_REL_TOL,
) -> CheckResult:
    """``--opd-teacher-temperature T != 1``: the teacher's scores must change, by exactly logits / T.

    ``base``/``scaled``: the teacher's sampled-token log-probs for the same requests without and with the
    temperature; ``*_top``: their top-K lists. Temperature keeps the ranking, and log-prob gaps scale as
    1/T: gap_1 / gap_T over the top-K estimates the temperature the server really applied.
    """
    if temperature == 1.0:
        if rollout_temperature != 1.0:
            return CheckResult(
                "teacher_temperature",
                WARN,
                f"rollout temperature {rollout_temperature}, teacher scores at T = 1",
                "the rollout log-probs (log p_S) are at the sampling temperature, the teacher's at T = 1: the OPD "
                f"advantage mixes temperatures. Pass --opd-teacher-temperature {rollout_temperature} to score the "
                "teacher at the sampling temperature (needs a server that applies it: see teacher_temperature).",
            )
        return CheckResult("teacher_temperature", SKIP, "T = 1 requested: nothing to apply")
    if base is None or scaled is None:
        return CheckResult("teacher_temperature", FAIL, f"T = {temperature}: no teacher answers to compare")
    mean_d, max_d, n = _mean_abs_diff(base, scaled, 0)
    values = {"requested": temperature, "max_change": max_d}
    if not max_d > 1e-6:
        detail = (
            f"--opd-teacher-temperature {temperature} is ignored by the teacher server: its prefill log-probs are "
            "identical at T = 1 and T = {0}. A real SGLang engine has no input-log-prob temperature (it drops the "
            "request field `logprob_temperature`; a router in front drops it too), so the teacher would be "
            "scored at T = 1 while the run believes otherwise. Serve the teacher with this project's embedded "
            "server (it applies `logprob_temperature`, or `custom_labels.logprob_temperature` through a router), "
            "or run with --opd-teacher-temperature 1."
        ).format(temperature)
        return CheckResult(
            "teacher_temperature", FAIL,
            f"T = {temperature}: max |Δ log p| vs T = 1 is {fmt_value(max_d)} over {n} tokens", detail, values,
        )  # fmt: skip
    ratios = []
    for rows_1, rows_t in zip(base_top or [], scaled_top or [], strict=False):
        for e1, et in zip(rows_1, rows_t, strict=False):
            if not e1 or not et or len(e1) < 2 or len(et) < 2:
                continue
            g1 = float(e1[0][0]) - float(e1[-1][0])
            gt = float(et[0][0]) - float(et[-1][0])
            if g1 > 1e-3 and gt > 1e-6:
                ratios.append(g1 / gt)
    if not ratios:
        return CheckResult(
            "teacher_temperature",
            WARN,
            f"T = {temperature}: scores change (max |Δ| {fmt_value(max_d)}) but no top-K gaps to measure T with",
            values=values,
        )
    ratios.sort()
    applied = ratios[len(ratios) // 2]
    values["applied"] = applied
    measured = f"requested T = {temperature}, applied T = {applied:.4g} (median over {len(ratios)} top-K gaps)"
    if abs(applied - temperature) > rel_tol * temperature:
        return CheckResult(
            "teacher_temperature",
            FAIL,
            measured,
            "the teacher's scores change, but not as log_softmax(logits / T): the server applies something else",
            values,
        )
    status = PASS
    detail = ""
    if rollout_temperature != temperature:
        status = WARN
        detail = f"the rollout samples at T = {rollout_temperature}, the teacher scores at T = {temperature}"
    return CheckResult("teacher_temperature", status, measured, detail, values)
