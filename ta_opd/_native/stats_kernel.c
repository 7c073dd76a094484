/* Fused passes of ta_opd.stats (docs/method.md §2), called through ctypes by ta_opd/_native/__init__.py.
 *
 * The numpy path in ta_opd/stats.py is the specification: this file does the same IEEE operations in the
 * same order, so its results are bit-identical to it (tests/ta_opd/test_native_stats.py checks every
 * field). Transcendentals (exp, log) are NOT computed here: the caller applies numpy's exp/log between the
 * passes, so both paths use the very same exp/log. Built with -ffp-contract=off and without -ffast-math,
 * so the compiler neither fuses a*b+c nor reorders a sum.
 *
 * Layout: a chunk of rows, column-major ([k][stride], as the numpy path), stride a multiple of W = 8.
 * Rows are processed W at a time (one SIMD lane per row, accumulators in registers); every per-row sum
 * adds the list's entries in list order. Padding rows (stride > rows) are outside both lists.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define W 8
typedef double vd __attribute__((vector_size(W * sizeof(double))));   /* one row per lane */
typedef int64_t vi __attribute__((vector_size(W * sizeof(int64_t)))); /* lane masks are -1 / 0 */
typedef double *restrict dptr;
typedef const double *restrict cdptr;
typedef int64_t *restrict iptr;
typedef const int64_t *restrict ciptr;

/* np.maximum(x, floor): NaN propagates. */
static inline double max_floor(double x, double floor_value) { return (x != x || x > floor_value) ? x : floor_value; }

static inline vd load_d(const double *p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vi load_i(const int64_t *p) {
    vi v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vd splat_d(double x) { return (vd){0} + x; }
static inline vi splat_i(int64_t x) { return (vi){0} + x; }
/* mask ? a : b, lane by lane, by bits (exact) */
static inline vd sel_d(vi mask, vd a, vd b) { return (vd)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vi sel_i(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
/* base[at[w]] for every lane */
static inline vd gather_d(const double *base, vi at) {
#if defined(__AVX512F__)
    return (vd)_mm512_i64gather_pd((__m512i)at, base, 8);
#else
    vd v;
    for (int w = 0; w < W; ++w) v[w] = base[at[w]];
    return v;
#endif
}
static inline vd vmax_floor(vd x, vd floor_value) { return sel_d((x != x) | (x > floor_value), x, floor_value); }
static inline vd vsqrt(vd x) { /* correctly rounded, as numpy's sqrt */
#if defined(__AVX512F__)
    return (vd)_mm512_sqrt_pd((__m512d)x);
#else
    for (int w = 0; w < W; ++w) x[w] = sqrt(x[w]);
    return x;
#endif
}

/* Pass 1: one side's chunk, transposed to [k][stride]. An entry is in the list when id >= 0 and its
 * log-prob is finite; outside the list (and on padding rows r >= m) the masked log-prob is -inf and the key
 * is `absent_key` (negative, different for the two sides, so it never matches: "in the list" is key >= 0). */
#define PREP_BODY                                                                            \
    for (int64_t r0 = 0; r0 < stride; r0 += W) {                                             \
        for (int64_t j = 0; j < k; ++j)                                                      \
            for (int64_t r = r0; r < r0 + W; ++r) {                                          \
                const int64_t real = r < m;                                                  \
                const double x = real ? (double)lp[r * k + j] : -INFINITY;                   \
                const int64_t id = real ? ids[r * k + j] : -1;                               \
                const int64_t good = (id >= 0) & (x - x == 0.0); /* finite: x - x is 0 */    \
                lp_t[j * stride + r] = good ? x : -INFINITY;                                 \
                key_t[j * stride + r] = good ? id : absent_key;                              \
            }                                                                                \
    }

void ta_prep_f64(int64_t m, int64_t stride, int64_t k, ciptr ids, cdptr lp, int64_t absent_key, iptr key_t,
                 dptr lp_t) {
    PREP_BODY
}

void ta_prep_f32(int64_t m, int64_t stride, int64_t k, ciptr ids, const float *restrict lp, int64_t absent_key,
                 iptr key_t, dptr lp_t) {
    PREP_BODY
}

/* Pass 2 (after p = exp(lp)): the list's mass Σ p (list order) and u = p / den, den = mass if > 0 else 1.
 * mass: [stride] scratch; mass_out: the chunk's first m rows of the output. */
void ta_norm(int64_t m, int64_t stride, int64_t k, cdptr p, dptr u, dptr mass, dptr mass_out) {
    for (int64_t r = 0; r < stride; ++r) mass[r] = p[r];
    for (int64_t j = 1; j < k; ++j)
        for (int64_t r = 0; r < stride; ++r) mass[r] += p[j * stride + r];
    for (int64_t j = 0; j < k; ++j)
        for (int64_t r = 0; r < stride; ++r) u[j * stride + r] = p[j * stride + r] / (mass[r] > 0.0 ? mass[r] : 1.0);
    for (int64_t r = 0; r < m; ++r) mass_out[r] = mass[r];
}

/* Pass 3 (after l = log(u)): every statistic of the chunk's first m rows (stride: see above).
 * ks, kt: list lengths; k_norm = max(K, 1) for the overlap; log_n[c] = numpy's log(max(c, 2)), c = 0..ks.
 * outs: the addresses of the whole step's outputs, in the order below (t_on_s may be 0); this chunk's rows
 * start at row `first`. t_on_s is row-major [rows, ks]: the teacher's prob of each student entry, 0 where
 * the teacher does not list it. */
void ta_row_stats(int64_t m, int64_t stride, int64_t ks, int64_t kt, double prob_floor, double log_floor,
                  double k_norm, cdptr log_n, ciptr s_key, cdptr s_lp, cdptr s_p, cdptr s_u, cdptr s_l, cdptr s_mass,
                  ciptr t_key, cdptr t_lp, cdptr t_p, cdptr t_u, cdptr t_l, cdptr t_mass, ciptr sampled,
                  const intptr_t *outs, int64_t first) {
    double *restrict kl_f_out = (double *)outs[0] + first, *restrict kl_r_out = (double *)outs[1] + first;
    double *restrict bc_out = (double *)outs[2] + first, *restrict cmass_out = (double *)outs[3] + first;
    double *restrict shared_out = (double *)outs[4] + first, *restrict entropy_out = (double *)outs[5] + first;
    double *restrict overlap_out = (double *)outs[6] + first;
    uint8_t *restrict reach_out = (uint8_t *)outs[7] + first;
    int64_t *restrict s_rank_out = (int64_t *)outs[8] + first, *restrict t_rank_out = (int64_t *)outs[9] + first;
    int64_t *restrict s_top_id_out = (int64_t *)outs[10] + first;
    double *restrict s_top_p_out = (double *)outs[11] + first;
    int64_t *restrict t_top_id_out = (int64_t *)outs[12] + first;
    double *restrict t_top_p_out = (double *)outs[13] + first;
    double *restrict t_on_s = outs[14] ? (double *)outs[14] + first * ks : NULL;
    sampled += first;
    vi col_of[ks > 0 ? ks : 1];   /* teacher column of each student entry, -1 if unshared */
    vi t_shared[kt > 0 ? kt : 1]; /* teacher entry listed by the student too (-1 / 0) */
    for (int64_t r0 = 0; r0 < stride; r0 += W) {
        /* join the lists by id (ids are unique within a valid list, as pack_topk guarantees) */
        const vi minus_one = splat_i(-1), zero_i = splat_i(0), lane = {0, 1, 2, 3, 4, 5, 6, 7};
        vi pairs = zero_i;
        for (int64_t i = 0; i < kt; ++i) t_shared[i] = zero_i;
        int64_t j = 0;
        for (; j + 4 <= ks; j += 4) { /* four student entries per sweep of the teacher list: independent chains */
            const vi id0 = load_i(s_key + j * stride + r0), id1 = load_i(s_key + (j + 1) * stride + r0);
            const vi id2 = load_i(s_key + (j + 2) * stride + r0), id3 = load_i(s_key + (j + 3) * stride + r0);
            vi c0 = minus_one, c1 = minus_one, c2 = minus_one, c3 = minus_one;
            for (int64_t i = 0; i < kt; ++i) {
                const vi tk = load_i(t_key + i * stride + r0), iv = splat_i(i);
                const vi e0 = id0 == tk, e1 = id1 == tk, e2 = id2 == tk, e3 = id3 == tk;
                c0 = sel_i(e0, iv, c0), c1 = sel_i(e1, iv, c1), c2 = sel_i(e2, iv, c2), c3 = sel_i(e3, iv, c3);
                t_shared[i] |= (e0 | e1) | (e2 | e3);
            }
            col_of[j] = c0, col_of[j + 1] = c1, col_of[j + 2] = c2, col_of[j + 3] = c3;
        }
        for (; j < ks; ++j) {
            const vi id = load_i(s_key + j * stride + r0);
            vi c = minus_one;
            for (int64_t i = 0; i < kt; ++i) {
                const vi eq = id == load_i(t_key + i * stride + r0);
                c = sel_i(eq, splat_i(i), c);
                t_shared[i] |= eq;
            }
            col_of[j] = c;
        }
        for (j = 0; j < ks; ++j) pairs -= col_of[j] >= 0;

        /* student entries, in list order: H_t's sum; KLf, KLr, BC with the teacher side of each entry
         * (log t̂, t̂, t of the matching teacher entry, else the floors and 0); the teacher's mass on S */
        const vd pf = splat_d(prob_floor), lf = splat_d(log_floor), zero_d = splat_d(0.0);
        vd h = zero_d, kl_f = zero_d, kl_r = zero_d, bc = zero_d, shared = zero_d;
        vi n_pos = zero_i;
        for (int64_t j = 0; j < ks; ++j) {
            const int64_t e = j * stride + r0;
            const vi c = col_of[j], matched = c >= 0;
            /* the matching teacher entry's values (unmatched lanes read their own row's first entry) */
            const vi at = sel_i(matched, c * stride, zero_i) + lane + r0;
            const vd t_l_at = gather_d(t_l, at), t_u_at = gather_d(t_u, at), t_p_at = gather_d(t_p, at);
            const vd log_th_s = sel_d(matched, vmax_floor(t_l_at, lf), lf);
            const vd th_s = sel_d(matched, vmax_floor(t_u_at, pf), pf);
            const vd t_here = sel_d(matched, t_p_at, zero_d);
            const vd su = load_d(s_u + e), sl = load_d(s_l + e);
            const vi pos = load_d(s_p + e) > 0.0;
            const vd h_term = sel_d(pos, su * sl, zero_d);
            const vd log_sh = vmax_floor(sl, lf), sh = vmax_floor(su, pf);
            const vd log_ratio = log_th_s - log_sh;
            const vd f = th_s * log_ratio, rv = sh * log_ratio;
            const vd b = sel_d(load_i(s_key + e) >= 0, vsqrt(sh * th_s), zero_d);
            if (j == 0) {
                h = h_term, kl_f = f, kl_r = rv, bc = b, shared = t_here;
            } else {
                h += h_term, kl_f += f, kl_r += rv, bc += b, shared += t_here;
            }
            n_pos -= pos;
            if (t_on_s)
                for (int64_t w = 0; w < W && r0 + w < m; ++w) t_on_s[(r0 + w) * ks + j] = t_here[w];
        }

        /* teacher-only entries (ŝ = the floor); shared and invalid entries contribute exact zeros */
        vd kf_t = zero_d, lr_t = zero_d, bc_t = zero_d;
        for (int64_t i = 0; i < kt; ++i) {
            const int64_t e = i * stride + r0;
            const vd th = vmax_floor(load_d(t_u + e), pf);
            const vi sh_i = t_shared[i];
            const vd lrt = sel_d(sh_i, zero_d, vmax_floor(load_d(t_l + e), lf) - lf);
            const vd f = th * lrt;
            const vd b = sel_d(sh_i | (load_i(t_key + e) < 0), zero_d, vsqrt(th * pf));
            if (i == 0) {
                kf_t = f, lr_t = lrt, bc_t = b;
            } else {
                kf_t += f, lr_t += lrt, bc_t += b;
            }
        }

        /* top-1 of each side (first in list order among equals: the descending sweep keeps the lowest
         * column) and the sampled token's ranks (entries with a strictly higher log-prob; -1 when absent;
         * the last hit wins, as the numpy scatter does) */
        const vi want = load_i(sampled + r0); /* sampled is padded to the stride by the caller */
        vd s_best = load_d(s_lp + r0), t_best = load_d(t_lp + r0), s_q = splat_d(INFINITY), t_q = s_q;
        for (int64_t j = 1; j < ks; ++j) {
            const vd x = load_d(s_lp + j * stride + r0);
            s_best = sel_d(x > s_best, x, s_best);
        }
        for (int64_t i = 1; i < kt; ++i) {
            const vd x = load_d(t_lp + i * stride + r0);
            t_best = sel_d(x > t_best, x, t_best);
        }
        for (int64_t j = 0; j < ks; ++j)
            s_q = sel_d(load_i(s_key + j * stride + r0) == want, load_d(s_lp + j * stride + r0), s_q);
        for (int64_t i = 0; i < kt; ++i)
            t_q = sel_d(load_i(t_key + i * stride + r0) == want, load_d(t_lp + i * stride + r0), t_q);
        vi s_top_id = zero_i, t_top_id = zero_i, reach = zero_i, s_higher = zero_i, t_higher = zero_i;
        vd s_top_p = zero_d, t_top_p = zero_d;
        for (int64_t j = ks - 1; j >= 0; --j) {
            const int64_t e = j * stride + r0;
            const vd x = load_d(s_lp + e);
            const vi top = x == s_best;
            s_top_id = sel_i(top, load_i(s_key + e), s_top_id);
            s_top_p = sel_d(top, load_d(s_p + e), s_top_p);
            s_higher -= x > s_q;
        }
        for (int64_t i = kt - 1; i >= 0; --i) {
            const int64_t e = i * stride + r0;
            const vd x = load_d(t_lp + e);
            const vi top = x == t_best;
            t_top_id = sel_i(top, load_i(t_key + e), t_top_id);
            t_top_p = sel_d(top, load_d(t_p + e), t_top_p);
            reach = sel_i(top, t_shared[i], reach);
            t_higher -= x > t_q;
        }
        const vi s_any = s_best > -INFINITY, t_any = t_best > -INFINITY;

        /* a side with no mass on U: D = KLr = BC = 0 */
        const vi ok_row = (load_d(s_mass + r0) > 0.0) & (load_d(t_mass + r0) > 0.0);
        vd log_n_at;
        for (int w = 0; w < W; ++w) log_n_at[w] = log_n[n_pos[w]];
        const vd res_d[] = {
            sel_d(ok_row, kl_f + kf_t, zero_d),
            sel_d(ok_row, -(kl_r + prob_floor * lr_t), zero_d),
            sel_d(ok_row, bc + bc_t, zero_d),
            sel_d(shared < 0.0, zero_d, sel_d(shared > 1.0, splat_d(1.0), shared)), /* np.clip: NaN stays */
            shared,
            sel_d(n_pos > 0, -h / log_n_at, zero_d),
            __builtin_convertvector(pairs, vd) / k_norm,
            sel_d(s_any, s_top_p, zero_d),
            sel_d(t_any, t_top_p, zero_d),
        };
        double *const out_d[] = {kl_f_out, kl_r_out, bc_out, cmass_out, shared_out, entropy_out, overlap_out,
                                 s_top_p_out, t_top_p_out};
        const vi res_i[] = {
            sel_i(s_q < INFINITY, s_higher, minus_one),
            sel_i(t_q < INFINITY, t_higher, minus_one),
            sel_i(s_any, s_top_id, minus_one),
            sel_i(t_any, t_top_id, minus_one),
        };
        int64_t *const out_i[] = {s_rank_out, t_rank_out, s_top_id_out, t_top_id_out};
        const vi reached = t_any & reach;
        const int64_t n_rows = r0 + W <= m ? W : (r0 < m ? m - r0 : 0); /* padding blocks write nothing */
        for (size_t f = 0; f < sizeof res_d / sizeof res_d[0]; ++f) memcpy(out_d[f] + r0, &res_d[f], 8 * n_rows);
        for (size_t f = 0; f < sizeof res_i / sizeof res_i[0]; ++f) memcpy(out_i[f] + r0, &res_i[f], 8 * n_rows);
        for (int64_t w = 0; w < n_rows; ++w) reach_out[r0 + w] = (uint8_t)(reached[w] != 0);
    }
}

/* ------------------------------------------------------------------ exact order statistics (ta_opd.order_stats)
 * ta_kth: out[i] = sort(x)[ks[i]] for ranks ks ascending and distinct, x without NaN. A strided sample brackets
 * each rank; counting passes check that each bracket holds its ranks, one copying pass collects the values
 * inside the brackets, and a three-way quickselect (ties stay together) finds each rank there. A bracket
 * that misses falls back to selecting over a copy of all of x. scratch: 2 n + 1 + KTH_SAMPLE doubles. */
#define KTH_SAMPLE 2048
#define KTH_SMALL 8192

static inline void swap_d(double *a, double *b) {
    const double t = *a;
    *a = *b, *b = t;
}

static int cmp_d(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* In place: afterwards a[k] is the k-th smallest of a[0..n), everything before it <= and after it >=. */
static void select3(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    uint64_t seed = 0x9E3779B97F4A7C15ull; /* fixed: the same choices every run */
    while (hi > lo) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        const int64_t span = hi - lo + 1;
        double p0 = a[lo + (int64_t)((seed >> 11) % (uint64_t)span)];
        double p1 = a[lo + (int64_t)((seed >> 23) % (uint64_t)span)];
        double p2 = a[lo + (int64_t)((seed >> 37) % (uint64_t)span)];
        if (p0 > p1) swap_d(&p0, &p1);
        if (p1 > p2) swap_d(&p1, &p2);
        if (p0 > p1) swap_d(&p0, &p1);
        const double pivot = p1; /* median of three random entries */
        int64_t lt = lo, i = lo, gt = hi;
        while (i <= gt) {
            if (a[i] < pivot)
                swap_d(&a[lt++], &a[i++]);
            else if (a[i] > pivot)
                swap_d(&a[i], &a[gt--]);
            else
                ++i;
        }
        if (k < lt)
            hi = lt - 1;
        else if (k > gt)
            lo = gt + 1;
        else
            return;
    }
}

static void select_all(int64_t n, const double *x, int64_t k, double *scratch, double *out) {
    memcpy(scratch, x, sizeof(double) * (size_t)n);
    select3(scratch, n, k);
    *out = scratch[k];
}

static void kth(int64_t n, const double *restrict x, int64_t nk, const int64_t *restrict ks, double *restrict scratch,
                double *restrict out);

/* Returns 0, or -1 when out of memory. */
int ta_kth(int64_t n, const double *restrict x, int64_t nk, const int64_t *restrict ks, double *restrict out) {
    double *scratch = malloc(sizeof(double) * (size_t)(2 * n + 1 + KTH_SAMPLE));
    if (!scratch) return -1;
    kth(n, x, nk, ks, scratch, out);
    free(scratch);
    return 0;
}

static void kth(int64_t n, const double *restrict x, int64_t nk, const int64_t *restrict ks, double *restrict scratch,
                double *restrict out) {
    if (n <= KTH_SMALL) {
        memcpy(scratch, x, sizeof(double) * (size_t)n);
        int64_t start = 0; /* ranks ascending: each select works right of the previous one */
        for (int64_t i = 0; i < nk; ++i) {
            select3(scratch + start, n - start, ks[i] - start);
            out[i] = scratch[ks[i]];
            start = ks[i] + 1;
        }
        return;
    }
    double *sample = scratch + n + 1;
    const int64_t step = n / KTH_SAMPLE;
    int64_t m = 0;
    for (int64_t r = 0; r < n && m < KTH_SAMPLE; r += step) sample[m++] = x[r];
    qsort(sample, (size_t)m, sizeof(double), cmp_d);
    /* brackets: the sample ranks of the k-th value spread by sqrt(m q (1 - q)); 4 of those either side, and
     * the brackets of neighbouring ranks merged (at most KTH_MAX_BRACKETS; more ranks: one bracket each) */
    enum { KTH_MAX_BRACKETS = 16 };
    double lo[KTH_MAX_BRACKETS], hi[KTH_MAX_BRACKETS];
    int64_t first[KTH_MAX_BRACKETS], last[KTH_MAX_BRACKETS], nb = 0;
    for (int64_t i = 0; i < nk; ++i) {
        const double q = (double)ks[i] / (double)(n - 1), pos = q * (double)(m - 1);
        const double margin = 4.0 * sqrt((double)m * q * (1.0 - q)) + 4.0;
        const int64_t lo_i = (int64_t)floor(pos - margin), hi_i = (int64_t)ceil(pos + margin);
        const double b_lo = lo_i > 0 ? sample[lo_i] : -INFINITY, b_hi = hi_i < m - 1 ? sample[hi_i] : INFINITY;
        if (nb > 0 && b_lo <= hi[nb - 1]) { /* overlaps the previous bracket: widen it */
            hi[nb - 1] = b_hi > hi[nb - 1] ? b_hi : hi[nb - 1];
            last[nb - 1] = i;
        } else if (nb < KTH_MAX_BRACKETS) {
            lo[nb] = b_lo, hi[nb] = b_hi, first[nb] = last[nb] = i, ++nb;
        } else { /* too many separate ranks for one pass: select over all of x */
            select_all(n, x, ks[i], scratch, &out[i]);
        }
    }
    /* one counting pass for every bracket, then one copying pass */
    int64_t below[KTH_MAX_BRACKETS] = {0}, inside[KTH_MAX_BRACKETS] = {0}, at[KTH_MAX_BRACKETS + 1];
    for (int64_t b = 0; b < nb; ++b) {
        const double b_lo = lo[b], b_hi = hi[b];
        vi v_below = splat_i(0), v_inside = splat_i(0); /* lane masks are -1: subtract to count */
        int64_t r = 0;
        for (; r + W <= n; r += W) {
            const vd v = load_d(x + r);
            v_below -= v < b_lo;
            v_inside -= (v >= b_lo) & (v <= b_hi);
        }
        int64_t c_below = 0, c_inside = 0;
        for (int w = 0; w < W; ++w) c_below += v_below[w], c_inside += v_inside[w];
        for (; r < n; ++r) {
            c_below += x[r] < b_lo;
            c_inside += (x[r] >= b_lo) & (x[r] <= b_hi);
        }
        below[b] = c_below, inside[b] = c_inside;
    }
    int64_t offset = 0;
    for (int64_t b = 0; b < nb; ++b) at[b] = offset, offset += inside[b];
    for (int64_t r = 0; r < n; ++r) { /* the branch is rarely taken: brackets hold a few % of x */
        const double v = x[r];
        for (int64_t b = 0; b < nb; ++b)
            if (v >= lo[b] && v <= hi[b]) scratch[at[b]++] = v;
    }
    for (int64_t b = 0; b < nb; ++b) {
        double *buf = scratch + (at[b] - inside[b]);
        if (below[b] <= ks[first[b]] && ks[last[b]] < below[b] + inside[b]) {
            int64_t start = 0;
            for (int64_t j = first[b]; j <= last[b]; ++j) {
                const int64_t k = ks[j] - below[b];
                select3(buf + start, inside[b] - start, k - start);
                out[j] = buf[k];
                start = k + 1;
            }
        } else { /* the sample misjudged these ranks */
            for (int64_t j = first[b]; j <= last[b]; ++j) select_all(n, x, ks[j], scratch + offset + 1, &out[j]);
        }
    }
}
