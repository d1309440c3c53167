/*
 * Drives the half-precision normalise leaves (src/bnfast_half_leaves.h) over
 * every 16-bit pattern with a few coefficient sets, in every variant this
 * build has (portable; F16C / AVX2; AVX512-BF16; then the streaming twins of
 * the vector ones, which must give the same bits), and writes the outputs as
 * raw uint16 to stdout, one block per (type, leaf, coefficients, variant).
 * tests/test_half_leaves.py compiles it twice (with and without
 * -DBNFAST_NO_SIMD) and checks every block against NumPy's float32
 * arithmetic rounded by NumPy (float16) and ml_dtypes (bfloat16).
 */
#include <stdio.h>
#include <stdlib.h>

#include "bnfast_half_leaves.h"

#define N 65536
#define W 72  /* a channels-last tile: C = 3 repeated 24 times */

static const float coefs[][3] = {   /* m, a, b */
    {0.0f, 1.0f, 0.0f},             /* identity: widen + narrow round trip */
    {0.5f, 3.0f, -0.25f},           /* rounding in the normal range */
    {1.0f, 1e-6f, 0.0f},            /* into float16 subnormals, bfloat16 small */
    {-2.0f, 1e30f, 1.0f},           /* overflow to inf */
    {1e-39f, 1e-3f, 1e-40f},        /* float denormals on the way (bfloat16's hw fallback) */
    {0.3f, 1.7f, 0.1f},             /* inexact products: a fused multiply-add would show */
};
#define NCOEF (sizeof coefs / sizeof coefs[0])

static void emit(const void *y, size_t n) { fwrite(y, 2, n, stdout); }

#define RUN(H, T, VARIANT)                                                                 \
    for (c = 0; c < NCOEF; c++) {                                                          \
        for (j = 0; j < W; j++) {                                                          \
            tm[j] = coefs[c][0] * (float)(1 + j % 3);                                      \
            ta[j] = coefs[c][1]; tb[j] = coefs[c][2];                                      \
        }                                                                                  \
        for (relu = 0; relu < 2; relu++) {                                                 \
            bnfast_affine_scalar_##H##_##VARIANT((const T *)x, (const T *)add, (T *)y, N,  \
                                                coefs[c][0], coefs[c][1], coefs[c][2], relu); \
            bnfast_nt_fence();  /* for the streaming variants */                            \
            emit(y, N);                                                                    \
            bnfast_affine_tiled_##H##_##VARIANT((const T *)x, NULL, (T *)y, N, W, tm, ta, tb, \
                                               relu);                                      \
            bnfast_nt_fence();                                                             \
            emit(y, N);                                                                    \
        }                                                                                  \
    }

int main(void) {
    /* y 16-byte aligned: the streaming variants' contract. */
    static uint16_t x[N], add[N], y[N] __attribute__((aligned(64)));
    static float tm[W], ta[W], tb[W];
    size_t c, j;
    int relu;
    for (j = 0; j < N; j++) {
        x[j] = (uint16_t)j;
        add[j] = (uint16_t)(j * 40503u);  /* every pattern again, shuffled */
    }
    /* The portable variants first, then whichever this build and CPU have; a
     * variant missing here repeats the portable one, so the layout is fixed. */
    RUN(f16, bnfast_f16, base)
#if BNFAST_DISPATCH_AVX2
    if (bnfast_use_f16c()) { RUN(f16, bnfast_f16, f16c) } else { RUN(f16, bnfast_f16, base) }
#else
    RUN(f16, bnfast_f16, base)
#endif
    RUN(bf16, bnfast_bf16, base)
#if BNFAST_DISPATCH_AVX2
    if (bnfast_use_avx2()) { RUN(bf16, bnfast_bf16, avx2) } else { RUN(bf16, bnfast_bf16, base) }
    if (bnfast_use_bf16_hw()) { RUN(bf16, bnfast_bf16, hw) } else { RUN(bf16, bnfast_bf16, base) }
#else
    RUN(bf16, bnfast_bf16, base)
    RUN(bf16, bnfast_bf16, base)
#endif
    /* The streaming twins (non-temporal stores), after the cached ones. */
#if BNFAST_DISPATCH_AVX2
    if (bnfast_use_f16c()) { RUN(f16, bnfast_f16, f16c_nt) } else { RUN(f16, bnfast_f16, base) }
    if (bnfast_use_avx2()) { RUN(bf16, bnfast_bf16, avx2_nt) } else { RUN(bf16, bnfast_bf16, base) }
    if (bnfast_use_bf16_hw()) { RUN(bf16, bnfast_bf16, hw_nt) } else { RUN(bf16, bnfast_bf16, base) }
#else
    RUN(f16, bnfast_f16, base)
    RUN(bf16, bnfast_bf16, base)
    RUN(bf16, bnfast_bf16, base)
#endif
    return 0;
}
