/*
 * The statistics' per-channel arithmetic between the sums and the result:
 * - bnfast_run_partials: each run's partial (mean relative to its channel's
 *   origin, m2) from its shifted sums, with m2's rare fix-ups found by one
 *   vectorised test;
 * - bnfast_group_sums: the sums of consecutive groups of doubles (a channel's
 *   S columns, when short runs go by columns), in a fixed 8-lane order;
 * - bnfast_merge_rows: Chan et al.'s merge of rows of partials (see
 *   _moments.pxd merge_rows): C partials that all count n_b folded into C
 *   accumulators that all count n_a, the NaN select as a mask.
 * A 7x7 image of a small batch (fewer than 16 samples) pays the first and the
 * last once per (sample, channel): as Cython loops on the module's SSE2
 * baseline (the fix-ups a scalar scan with a branch a run) they were a fifth of
 * a bfloat16 batch's statistics (2.7 of 11.7 ns a run on the Xeon VM).  All
 * three have AVX2 variants picked at run time; every variant does the same
 * operations in the same order as the scalar code: the same bits.
 */
#ifndef BNFAST_MERGE_H
#define BNFAST_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include <math.h>

#include "bnfast_simd.h"

#define BNFAST_MERGE_ONE(c)                                                              \
    {                                                                                    \
        double delta_ = pmean[c] - mean[c];                                              \
        double m_ = mean[c] + delta_ * r;                                                \
        double w_ = mean[c] * keep + pmean[c] * r;                                       \
        m2[c] = m2[c] + pm2[c] + delta_ * (delta_ * q);                                  \
        mean[c] = m_ == m_ ? m_ : w_;                                                    \
    }

/* The channel loop, V doubles a step (vd_, and vi_ for its lane masks): SSE2's
 * two in the base build (there GCC split a four-double select into scalar moves
 * through the stack), AVX2's four where the CPU has them. */
#define BNFAST_DEFINE_MERGE_ROWS(SUFFIX, ATTR, V)                                        \
    ATTR static void bnfast_merge_rows_##SUFFIX(double *mean, double *m2,                \
                                                const double *pmean, const double *pm2,  \
                                                ptrdiff_t C, double r, double q,         \
                                                double keep) {                           \
        typedef double vd_ __attribute__((vector_size(8 * (V)), aligned(8)));            \
        typedef int64_t vi_ __attribute__((vector_size(8 * (V))));                       \
        ptrdiff_t c = 0;                                                                 \
        for (; c + (V) <= C; c += (V)) {                                                 \
            vd_ ma = *(const vd_ *)(mean + c), mb = *(const vd_ *)(pmean + c);           \
            vd_ delta = mb - ma, m = ma + delta * r, w = ma * keep + mb * r;             \
            vi_ ok = m == m;                                                             \
            *(vd_ *)(m2 + c) = *(const vd_ *)(m2 + c) + *(const vd_ *)(pm2 + c)          \
                               + delta * (delta * q);                                    \
            *(vd_ *)(mean + c) = (vd_)(((vi_)m & ok) | ((vi_)w & ~ok));                  \
        }                                                                                \
        for (; c < C; c++) BNFAST_MERGE_ONE(c)                                           \
    }

/* A run's partial from its shifted sums (n values, inv_n = 1 / n): the mean
 * relative to the channel's origin, and m2 = s2 - s1**2 / n with the rare
 * fix-ups of _moments.pxd's m2_from_sums (a tiny negative from rounding -> 0;
 * finite data whose squares overflowed -> inf; NaN stays), found by one
 * vectorised test so the common loop has no branch. */
static inline double bnfast_m2_fixup(double m2, double s1, double s2) {
    if (m2 < 0.0) return 0.0;
    if (s2 == (double)INFINITY && s1 - s1 == 0.0) return (double)INFINITY;
    return m2;
}
#define BNFAST_DEFINE_RUN_PARTIALS(SUFFIX, ATTR)                                         \
    ATTR static void bnfast_run_partials_##SUFFIX(const double *shift, const double *origin, \
                                                  const double *s1, const double *s2,    \
                                                  ptrdiff_t w, double inv_n,             \
                                                  double *pmean, double *pm2) {          \
        ptrdiff_t r;                                                                     \
        int64_t bad = 0;                                                                 \
        for (r = 0; r < w; r++) {                                                        \
            double m2_ = s2[r] - s1[r] * (s1[r] * inv_n);                                \
            pmean[r] = (shift[r] - origin[r]) + s1[r] * inv_n;                           \
            pm2[r] = m2_;                                                                \
            bad |= !(m2_ >= 0.0);                                                        \
        }                                                                                \
        if (bad)                                                                         \
            for (r = 0; r < w; r++)                                                      \
                if (!(pm2[r] >= 0.0)) pm2[r] = bnfast_m2_fixup(pm2[r], s1[r], s2[r]);    \
    }

/* out[g] = the sum of the len doubles v[g * len ...]: lane l of eight takes values
 * i % 8 == l, the lanes then combined in BNFAST_COMBINE8's order (a fixed order
 * that vectorises: eight independent chains, not one 49 adds long). */
#define BNFAST_DEFINE_GROUP_SUMS(SUFFIX, ATTR)                                           \
    ATTR static void bnfast_group_sums_##SUFFIX(const double *v, ptrdiff_t groups,       \
                                                ptrdiff_t len, double *out) {            \
        ptrdiff_t g, i, l, len8 = len - len % 8;                                         \
        for (g = 0; g < groups; g++) {                                                   \
            const double *p = v + g * len;                                               \
            double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                      \
            for (i = 0; i < len8; i += 8)                                                \
                for (l = 0; l < 8; l++) a[l] += p[i + l];                                \
            for (l = 0; i + l < len; l++) a[l] += p[i + l];                              \
            out[g] = BNFAST_COMBINE8(a);                                                 \
        }                                                                                \
    }

#if BNFAST_VECTOR_EXT
BNFAST_DEFINE_MERGE_ROWS(base, , 2)
#else
static void bnfast_merge_rows_base(double *mean, double *m2, const double *pmean,
                                   const double *pm2, ptrdiff_t C, double r, double q,
                                   double keep) {
    ptrdiff_t c;
    for (c = 0; c < C; c++) BNFAST_MERGE_ONE(c)
}
#endif
BNFAST_DEFINE_RUN_PARTIALS(base, )
BNFAST_DEFINE_GROUP_SUMS(base, )
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_MERGE_ROWS(avx2, BNFAST_AVX2_TARGET, 4)
BNFAST_DEFINE_RUN_PARTIALS(avx2, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_GROUP_SUMS(avx2, BNFAST_AVX2_TARGET)
#define BNFAST_MERGE_PICK(f) BNFAST_PICK(f##_base, f##_avx2)
#else
#define BNFAST_MERGE_PICK(f) f##_base
#endif

static inline void bnfast_merge_rows(double *mean, double *m2, const double *pmean,
                                     const double *pm2, ptrdiff_t C, double n_a,
                                     double n_b) {
    /* mean_a + (mean_b - mean_a) * r keeps equal means exact; where it is NaN
     * (an infinite mean) the weighted form gives +-inf like PyTorch.
     * delta * (delta * q) is 0 for the first partial (q == 0). */
    double r;
    if (n_b <= 0) return;
    r = n_b / (n_a + n_b);
    BNFAST_MERGE_PICK(bnfast_merge_rows)(mean, m2, pmean, pm2, C, r, n_a * r, 1.0 - r);
}

static inline void bnfast_group_sums(const double *v, ptrdiff_t groups, ptrdiff_t len,
                                     double *out) {
    BNFAST_MERGE_PICK(bnfast_group_sums)(v, groups, len, out);
}

static inline void bnfast_run_partials(const double *shift, const double *origin,
                                       const double *s1, const double *s2, ptrdiff_t w,
                                       double inv_n, double *pmean, double *pm2) {
    BNFAST_MERGE_PICK(bnfast_run_partials)(shift, origin, s1, s2, w, inv_n, pmean, pm2);
}

#endif /* BNFAST_MERGE_H */
