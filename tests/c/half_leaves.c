/*
 * Drives the half-precision normalise leaves (src/bnfast_half_leaves.h) over
 * every 16-bit pattern with a few coefficient sets, in every variant this
 * build has (portable; F16C / AVX2; AVX512-BF16; then the streaming twins of
 * the vector ones, which must give the same bits; then float16 on AVX512F and
 * bfloat16 on AVX512F without AVX512-BF16, each cached and streamed; then
 * the flat runs of bnfast_flat_runs.h, the same), and
 * writes the outputs as raw uint16 to stdout, one block per (type, leaf, coefficients, variant);
 * the leaves are the scalar one (one channel), the tiled one (a channels-last
 * tile) and the runs (channels-first runs, with a scalar call for the rest),
 * out of place, then in place (y is x: each value read before it is written).
 * tests/test_half_leaves.py compiles it twice (with and without
 * -DBNFAST_NO_SIMD) and checks every block against NumPy's float32
 * arithmetic rounded by NumPy (float16) and ml_dtypes (bfloat16).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_half_leaves.h"
#include "bnfast_flat_runs.h"

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

/* Runs of S values (channels-first), channel t % 3 for run t, then the values
 * left by a scalar call with the next run's channel: every part of the
 * leaves (the wide steps, the 8-value steps, the one-value tail).  The
 * streaming variants get S_NT: their pieces must start 16-byte aligned. */
/* A 7x7 image: 6 * 8 + 1; on AVX-512, two overlapping steps of 32, or 32 + 16
 * + 1 (bfloat16's z variant). */
#define S_CACHED 49
#define S_NT 120      /* 3 * 32 + 3 * 8, runs 240 bytes apart: every 64-byte offset */

/* The runs leaf over the whole runs of SRC, the scalar leaf over the rest, into
 * y, then emitted (SRC is x, or y itself: in place). */
#define RUNS_THEN_SCALAR(H, T, VARIANT, S, SRC)                                            \
    bnfast_affine_runs_##H##_##VARIANT((const T *)SRC, (const T *)add, (T *)y, runs,       \
                                      (S), 0, 3, tm, ta, tb, relu);                        \
    bnfast_affine_scalar_##H##_##VARIANT(                                                  \
        (const T *)SRC + runs * (S), (const T *)add + runs * (S), (T *)y + runs * (S),     \
        N - runs * (S), tm[runs % 3], ta[0], tb[0], relu);                                 \
    bnfast_nt_fence();                                                                     \
    emit(y, N);

#define RUN(H, T, VARIANT, S)                                                              \
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
            runs = N / (S);                                                                \
            RUNS_THEN_SCALAR(H, T, VARIANT, S, x)                                          \
            memcpy(y, x, sizeof y);  /* the same in place: y is x */                       \
            RUNS_THEN_SCALAR(H, T, VARIANT, S, y)                                          \
        }                                                                                  \
    }

/* VARIANT where this build and CPU have it, else the portable one (the layout
 * stays fixed: a missing variant repeats the portable one). */
#if BNFAST_DISPATCH_AVX2
#define RUN_IF(HAS, H, T, VARIANT, S) \
    if (HAS) { RUN(H, T, VARIANT, S) } else { RUN(H, T, base, S) }
#else
#define RUN_IF(HAS, H, T, VARIANT, S) RUN(H, T, base, S)
#endif

#if BNFAST_DISPATCH_AVX2
/* The flat runs (bnfast_flat_runs.h) as a variant: its scalar and tiled leaves
 * are the z variant's cached ones (the remainder after the streamed runs does
 * not start 16-byte aligned). */
#define FLAT_VARIANT(H, NT)                                                                \
    static inline void bnfast_affine_runs_##H##_flat##NT(                                  \
            const bnfast_##H *x, const bnfast_##H *add, bnfast_##H *y, ptrdiff_t runs,     \
            ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,         \
            const float *b, int relu) {                                                    \
        bnfast_flat_runs_##H##NT(x, add, y, runs, S, c, C, m, a, b, relu);                 \
    }
FLAT_VARIANT(f16, )
FLAT_VARIANT(f16, _nt)
FLAT_VARIANT(bf16, )
FLAT_VARIANT(bf16, _nt)
#define bnfast_affine_scalar_f16_flat bnfast_affine_scalar_f16_z
#define bnfast_affine_tiled_f16_flat bnfast_affine_tiled_f16_z
#define bnfast_affine_scalar_f16_flat_nt bnfast_affine_scalar_f16_z
#define bnfast_affine_tiled_f16_flat_nt bnfast_affine_tiled_f16_z
#define bnfast_affine_scalar_bf16_flat bnfast_affine_scalar_bf16_z
#define bnfast_affine_tiled_bf16_flat bnfast_affine_tiled_bf16_z
#define bnfast_affine_scalar_bf16_flat_nt bnfast_affine_scalar_bf16_z
#define bnfast_affine_tiled_bf16_flat_nt bnfast_affine_tiled_bf16_z
#endif

int main(void) {
    /* y 16-byte aligned: the streaming variants' contract. */
    static uint16_t x[N], add[N], y[N] __attribute__((aligned(64)));
    static float tm[W], ta[W], tb[W];
    size_t c, j;
    ptrdiff_t runs;
    int relu;
    for (j = 0; j < N; j++) {
        x[j] = (uint16_t)j;
        add[j] = (uint16_t)(j * 40503u);  /* every pattern again, shuffled */
    }
    /* The portable variants first, then whichever this build and CPU have; a
     * variant missing here repeats the portable one, so the layout is fixed. */
    RUN(f16, bnfast_f16, base, S_CACHED)
    RUN_IF(bnfast_use_f16c(), f16, bnfast_f16, f16c, S_CACHED)
    RUN(bf16, bnfast_bf16, base, S_CACHED)
    RUN_IF(bnfast_use_avx2(), bf16, bnfast_bf16, avx2, S_CACHED)
    RUN_IF(bnfast_use_bf16_hw(), bf16, bnfast_bf16, hw, S_CACHED)
    /* The streaming twins (non-temporal stores), after the cached ones. */
    RUN_IF(bnfast_use_f16c(), f16, bnfast_f16, f16c_nt, S_NT)
    RUN_IF(bnfast_use_avx2(), bf16, bnfast_bf16, avx2_nt, S_NT)
    RUN_IF(bnfast_use_bf16_hw(), bf16, bnfast_bf16, hw_nt, S_NT)
    /* float16 on AVX512F (zmm), cached then streamed. */
    RUN_IF(bnfast_use_f16_z(), f16, bnfast_f16, z, S_CACHED)
    RUN_IF(bnfast_use_f16_z(), f16, bnfast_f16, z_nt, S_NT)
    /* bfloat16 on AVX512F's integer rounding (no AVX512-BF16), cached then streamed. */
    RUN_IF(bnfast_use_bf16_z(), bf16, bnfast_bf16, z, S_CACHED)
    RUN_IF(bnfast_use_bf16_z(), bf16, bnfast_bf16, z_nt, S_NT)
    /* The flat runs, cached then streamed (which takes any run length), float16
     * then bfloat16. */
    RUN_IF(bnfast_use_flat(), f16, bnfast_f16, flat, S_CACHED)
    RUN_IF(bnfast_use_flat(), f16, bnfast_f16, flat_nt, S_CACHED)
    RUN_IF(bnfast_use_flat(), bf16, bnfast_bf16, flat, S_CACHED)
    RUN_IF(bnfast_use_flat(), bf16, bnfast_bf16, flat_nt, S_CACHED)
    return 0;
}
