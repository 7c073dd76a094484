/* Fused passes of ta_opd.stats (METHOD.md §2), called through ctypes by ta_opd/_native/__init__.py.
 *
 * The numpy path in ta_opd/stats.py is the specification: this file does the same IEEE operations in the
 * same order, so its results are bit-identical to it (tests/ta_opd/test_native_stats.py checks every
 * field). Transcendentals (exp, log) are NOT computed here: the caller applies numpy's exp/log between the
 * passes, so both paths use the very same exp/log. Built with -ffp-contract=off and without -ffast-math,
 * so the compiler neither fuses a*b+c nor reorders a sum.
 *
 * Layout: a chunk of m rows, column-major ([k][m], as the numpy path): every inner loop runs over rows
 * (vectorised, one SIMD lane per row) and every per-row sum adds the list's entries in list order. Flags
 * are int64 so that masks and doubles share one lane width; each loop nest is its own function with
 * restrict pointers, so the compiler needs no aliasing checks to vectorise it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define HOT static __attribute__((noinline))
typedef double *restrict dptr;
typedef const double *restrict cdptr;
typedef int64_t *restrict iptr;
typedef const int64_t *restrict ciptr;

/* np.maximum(x, floor): NaN propagates. */
static inline double max_floor(double x, double floor_value) { return (x != x || x > floor_value) ? x : floor_value; }

/* Pass 1: one side's chunk, transposed. An entry is in the list when id >= 0 and its log-prob is finite;
 * outside the list the masked log-prob is -inf and the key is `absent_key` (negative, and different for the
 * two sides, so it never matches: "in the list" is key >= 0 from here on). */
#define PREP_BODY                                                                      \
    for (int64_t r0 = 0; r0 < m; r0 += 8) { /* 8 rows at a time: reads and writes stay in cache lines */ \
        const int64_t r1 = r0 + 8 < m ? r0 + 8 : m;                                    \
        for (int64_t j = 0; j < k; ++j)                                                \
            for (int64_t r = r0; r < r1; ++r) {                                        \
                const double x = (double)lp[r * k + j];                                \
                const int64_t id = ids[r * k + j];                                     \
                const int64_t good = (id >= 0) & (x - x == 0.0); /* finite: x - x is 0 */ \
                    lp_t[j * m + r] = good ? x : -INFINITY;                                \
                key_t[j * m + r] = good ? id : absent_key;                             \
            }                                                                          \
    }

void ta_prep_f64(int64_t m, int64_t k, ciptr ids, cdptr lp, int64_t absent_key, iptr key_t, dptr lp_t) {
    PREP_BODY
}

void ta_prep_f32(int64_t m, int64_t k, ciptr ids, const float *restrict lp, int64_t absent_key, iptr key_t,
                 dptr lp_t) {
    PREP_BODY
}

/* Pass 2 (after p = exp(lp)): the list's mass Σ p (list order) and u = p / den, den = mass if > 0 else 1. */
void ta_norm(int64_t m, int64_t k, cdptr p, dptr u, dptr mass) {
    for (int64_t r = 0; r < m; ++r) mass[r] = p[r];
    for (int64_t j = 1; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) mass[r] += p[j * m + r];
    for (int64_t j = 0; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) u[j * m + r] = p[j * m + r] / (mass[r] > 0.0 ? mass[r] : 1.0);
}

/* Join the lists by id: for each student entry the teacher column with the same id (-1 if none), which
 * teacher entries are shared, and pairs per row. Ids are unique within a valid list (pack_topk); keys of
 * entries outside a list are negative and differ between the sides, so they never match. */
HOT void match_ids(int64_t m, int64_t ks, int64_t kt, ciptr s_key, ciptr t_key, iptr col_of, iptr t_shared,
                   iptr pairs) {
    for (int64_t e = 0; e < ks * m; ++e) col_of[e] = -1;
    for (int64_t e = 0; e < kt * m; ++e) t_shared[e] = 0;
    for (int64_t j = 0; j < ks; ++j)
        for (int64_t i = 0; i < kt; ++i) {
            const int64_t *restrict sk = s_key + j * m, *restrict tk = t_key + i * m;
            int64_t *restrict cj = col_of + j * m, *restrict shared = t_shared + i * m;
            for (int64_t r = 0; r < m; ++r) {
                const int64_t eq = sk[r] == tk[r];
                cj[r] = eq ? i : cj[r];
                shared[r] |= eq;
            }
        }
    for (int64_t r = 0; r < m; ++r) pairs[r] = 0;
    for (int64_t j = 0; j < ks; ++j)
        for (int64_t r = 0; r < m; ++r) pairs[r] += col_of[j * m + r] >= 0;
}

/* The teacher side of each student entry: log t̂, t̂ and t of the matching teacher entry, else the floors
 * and 0. */
HOT void gather_teacher(int64_t m, int64_t ks, double prob_floor, double log_floor, ciptr col_of, cdptr t_l,
                        cdptr t_u, cdptr t_p, dptr log_th_s, dptr th_s, dptr t_here) {
    for (int64_t j = 0; j < ks; ++j)
        for (int64_t r = 0; r < m; ++r) {
            const int64_t e = j * m + r, i = col_of[e];
            const int64_t at = i >= 0 ? i * m + r : r; /* a valid address either way: no masked gather */
            const double log_t = max_floor(t_l[at], log_floor), t_hat = max_floor(t_u[at], prob_floor);
            log_th_s[e] = i >= 0 ? log_t : log_floor;
            th_s[e] = i >= 0 ? t_hat : prob_floor;
            t_here[e] = i >= 0 ? t_p[at] : 0.0;
        }
}

/* H_t: entropy of the renormalised positive student entries / log(max(n_pos, 2)). */
HOT void entropy(int64_t m, int64_t ks, cdptr log_n, cdptr s_p, cdptr s_u, cdptr s_l, dptr h, iptr n_pos,
                 dptr out) {
    for (int64_t r = 0; r < m; ++r) n_pos[r] = 0;
    for (int64_t j = 0; j < ks; ++j)
        for (int64_t r = 0; r < m; ++r) {
            const int64_t pos = s_p[j * m + r] > 0.0;
            const double term = pos ? s_u[j * m + r] * s_l[j * m + r] : 0.0;
            h[r] = j == 0 ? term : h[r] + term;
            n_pos[r] += pos;
        }
    for (int64_t r = 0; r < m; ++r) out[r] = n_pos[r] > 0 ? -h[r] / log_n[n_pos[r]] : 0.0;
}

/* Student entries: Σ t̂(log t̂ − log ŝ), Σ ŝ(log t̂ − log ŝ), Σ sqrt(ŝ t̂) and Σ t, in list order. */
HOT void student_sums(int64_t m, int64_t ks, double prob_floor, double log_floor, ciptr s_key, cdptr s_u, cdptr s_l,
                      cdptr log_th_s, cdptr th_s, cdptr t_here, dptr kl_f, dptr kl_r, dptr bc, dptr shared) {
    for (int64_t j = 0; j < ks; ++j)
        for (int64_t r = 0; r < m; ++r) {
            const int64_t e = j * m + r;
            const double log_sh = max_floor(s_l[e], log_floor), sh = max_floor(s_u[e], prob_floor);
            const double log_ratio = log_th_s[e] - log_sh;
            const double f = th_s[e] * log_ratio, rv = sh * log_ratio;
            const double b = s_key[e] >= 0 ? sqrt(sh * th_s[e]) : 0.0;
            kl_f[r] = j == 0 ? f : kl_f[r] + f;
            kl_r[r] = j == 0 ? rv : kl_r[r] + rv;
            bc[r] = j == 0 ? b : bc[r] + b;
            shared[r] = j == 0 ? t_here[e] : shared[r] + t_here[e];
        }
}

/* Teacher-only entries (ŝ = the floor); shared and invalid entries contribute exact zeros. */
HOT void teacher_sums(int64_t m, int64_t kt, double prob_floor, double log_floor, ciptr t_key, ciptr t_shared,
                      cdptr t_u, cdptr t_l, dptr kf_t, dptr lr_t, dptr bc_t) {
    for (int64_t i = 0; i < kt; ++i)
        for (int64_t r = 0; r < m; ++r) {
            const int64_t e = i * m + r;
            const double th = max_floor(t_u[e], prob_floor);
            const double lrt = t_shared[e] ? 0.0 : max_floor(t_l[e], log_floor) - log_floor;
            const double f = th * lrt;
            const double b = (t_shared[e] || t_key[e] < 0) ? 0.0 : sqrt(th * prob_floor);
            kf_t[r] = i == 0 ? f : kf_t[r] + f;
            lr_t[r] = i == 0 ? lrt : lr_t[r] + lrt;
            bc_t[r] = i == 0 ? b : bc_t[r] + b;
        }
}

/* Sampled-token rank in one list: entries with a strictly higher log-prob, -1 when absent (the last hit
 * wins, as the numpy scatter does). */
HOT void rank_of(int64_t m, int64_t k, ciptr key, cdptr lp, ciptr sampled, dptr q, iptr higher, iptr out) {
    for (int64_t r = 0; r < m; ++r) q[r] = INFINITY, higher[r] = 0;
    for (int64_t j = 0; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) q[r] = key[j * m + r] == sampled[r] ? lp[j * m + r] : q[r];
    for (int64_t j = 0; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) higher[r] += lp[j * m + r] > q[r];
    for (int64_t r = 0; r < m; ++r) out[r] = q[r] < INFINITY ? higher[r] : -1;
}

/* First column holding each row's highest masked log-prob (0 for an empty list). */
HOT void top_col(int64_t m, int64_t k, cdptr lp, dptr best, iptr col) {
    for (int64_t r = 0; r < m; ++r) best[r] = lp[r];
    for (int64_t j = 1; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) best[r] = lp[j * m + r] > best[r] ? lp[j * m + r] : best[r];
    for (int64_t r = 0; r < m; ++r) col[r] = 0;
    for (int64_t j = k - 1; j >= 0; --j)
        for (int64_t r = 0; r < m; ++r) col[r] = lp[j * m + r] == best[r] ? j : col[r];
}

/* Pass 3 (after l = log(u)): every statistic of the chunk's rows. Returns 0, or -1 if out of memory.
 * ks, kt: list lengths; k_norm = max(K, 1) for the overlap; log_n[c] = numpy's log(max(c, 2)), c = 0..ks.
 * Outputs are [m] at the chunk's offset; t_on_s (may be NULL) is row-major [m, ks]: the teacher's prob
 * of each student entry, 0 where the teacher does not list it. */
int ta_row_stats(int64_t m, int64_t ks, int64_t kt, double prob_floor, double log_floor, double k_norm,
                 cdptr log_n, ciptr s_key, cdptr s_lp, cdptr s_p, cdptr s_u, cdptr s_l, cdptr s_mass,
                 ciptr t_key, cdptr t_lp, cdptr t_p, cdptr t_u, cdptr t_l, cdptr t_mass, ciptr sampled,
                 dptr kl_f_out, dptr kl_r_out, dptr bc_out, dptr cmass_out, dptr shared_out, dptr entropy_out,
                 dptr overlap_out, uint8_t *restrict reach_out, iptr s_rank_out, iptr t_rank_out, iptr s_top_id_out,
                 dptr s_top_p_out, iptr t_top_id_out, dptr t_top_p_out, double *restrict t_on_s) {
    double *log_th_s = malloc(sizeof(double) * (size_t)(3 * ks * m + 6 * m));
    int64_t *t_shared = malloc(sizeof(int64_t) * (size_t)(kt * m + ks * m + 4 * m));
    if (!log_th_s || !t_shared) {
        free(log_th_s), free(t_shared);
        return -1;
    }
    double *th_s = log_th_s + ks * m, *t_here = th_s + ks * m;
    double *kf_t = t_here + ks * m, *lr_t = kf_t + m, *bc_t = lr_t + m, *h = bc_t + m, *best = h + m, *q = best + m;
    int64_t *col_of = t_shared + kt * m, *pairs = col_of + ks * m, *n_pos = pairs + m, *col = n_pos + m, *higher = col + m;

    match_ids(m, ks, kt, s_key, t_key, col_of, t_shared, pairs);
    gather_teacher(m, ks, prob_floor, log_floor, col_of, t_l, t_u, t_p, log_th_s, th_s, t_here);
    entropy(m, ks, log_n, s_p, s_u, s_l, h, n_pos, entropy_out);
    student_sums(m, ks, prob_floor, log_floor, s_key, s_u, s_l, log_th_s, th_s, t_here, kl_f_out, kl_r_out, bc_out,
                 shared_out);
    teacher_sums(m, kt, prob_floor, log_floor, t_key, t_shared, t_u, t_l, kf_t, lr_t, bc_t);
    for (int64_t r = 0; r < m; ++r) {
        const int ok_row = s_mass[r] > 0.0 && t_mass[r] > 0.0; /* a side with no mass on U: D = KLr = BC = 0 */
        const double kl_f = kl_f_out[r] + kf_t[r], kl_r = kl_r_out[r] + prob_floor * lr_t[r];
        const double bc = bc_out[r] + bc_t[r], shared = shared_out[r];
        kl_f_out[r] = ok_row ? kl_f : 0.0;
        kl_r_out[r] = ok_row ? -kl_r : 0.0;
        bc_out[r] = ok_row ? bc : 0.0;
        cmass_out[r] = shared < 0.0 ? 0.0 : (shared > 1.0 ? 1.0 : shared);
        overlap_out[r] = (double)pairs[r] / k_norm;
    }
    if (t_on_s)
        for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < ks; ++j) t_on_s[r * ks + j] = t_here[j * m + r];

    /* top-1 of each side (first in list order among equals) and the sampled token's ranks */
    top_col(m, ks, s_lp, best, col);
    for (int64_t r = 0; r < m; ++r) {
        const int any = best[r] > -INFINITY;
        s_top_id_out[r] = any ? s_key[col[r] * m + r] : -1;
        s_top_p_out[r] = any ? s_p[col[r] * m + r] : 0.0;
    }
    top_col(m, kt, t_lp, best, col);
    for (int64_t r = 0; r < m; ++r) {
        const int any = best[r] > -INFINITY;
        t_top_id_out[r] = any ? t_key[col[r] * m + r] : -1;
        t_top_p_out[r] = any ? t_p[col[r] * m + r] : 0.0;
        reach_out[r] = (uint8_t)(any && t_shared[col[r] * m + r]);
    }
    rank_of(m, ks, s_key, s_lp, sampled, q, higher, s_rank_out);
    rank_of(m, kt, t_key, t_lp, sampled, q, higher, t_rank_out);
    free(log_th_s), free(t_shared);
    return 0;
}
