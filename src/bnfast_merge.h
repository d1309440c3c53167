/*
 * Chan et al.'s merge of rows of partials (see _moments.pxd merge_rows): C
 * partials (mean relative to an origin, m2) that all count n_b folded into C
 * accumulators that all count n_a.  Two channels a step with the NaN select
 * as a mask: in Cython the select stayed a branch and the loop scalar, ~1.5 ns
 * a channel, which a 7x7 image's 49-value runs pay twice per (sample, channel).
 * The same operations in the same order as the scalar tail: the same bits.
 */
#ifndef BNFAST_MERGE_H
#define BNFAST_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "bnfast_simd.h"

#define BNFAST_MERGE_ONE(c)                                                              \
    {                                                                                    \
        double delta_ = pmean[c] - mean[c];                                              \
        double m_ = mean[c] + delta_ * r;                                                \
        double w_ = mean[c] * keep + pmean[c] * r;                                       \
        m2[c] = m2[c] + pm2[c] + delta_ * (delta_ * q);                                  \
        mean[c] = m_ == m_ ? m_ : w_;                                                    \
    }

static inline void bnfast_merge_rows(double *mean, double *m2, const double *pmean,
                                     const double *pm2, ptrdiff_t C, double n_a,
                                     double n_b) {
    /* mean_a + (mean_b - mean_a) * r keeps equal means exact; where it is NaN
     * (an infinite mean) the weighted form gives +-inf like PyTorch.
     * delta * (delta * q) is 0 for the first partial (q == 0). */
    double r, q, keep;
    ptrdiff_t c = 0;
    if (n_b <= 0) return;
    r = n_b / (n_a + n_b);
    q = n_a * r;
    keep = 1.0 - r;
#if BNFAST_VECTOR_EXT
    /* Two channels a step: the module's baseline target is SSE2, where GCC
     * split a four-double select into scalar moves through the stack. */
    typedef double v2d_ __attribute__((vector_size(16), aligned(8)));
    typedef int64_t v2i_ __attribute__((vector_size(16)));
    for (; c + 2 <= C; c += 2) {
        v2d_ ma = *(const v2d_ *)(mean + c), mb = *(const v2d_ *)(pmean + c);
        v2d_ delta = mb - ma, m = ma + delta * r, w = ma * keep + mb * r;
        v2i_ ok = m == m;
        *(v2d_ *)(m2 + c) = *(const v2d_ *)(m2 + c) + *(const v2d_ *)(pm2 + c)
                            + delta * (delta * q);
        *(v2d_ *)(mean + c) = (v2d_)(((v2i_)m & ok) | ((v2i_)w & ~ok));
    }
#endif
    for (; c < C; c++) BNFAST_MERGE_ONE(c)
}

#endif /* BNFAST_MERGE_H */
