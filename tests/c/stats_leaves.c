/*
 * Drives the statistics leaves (src/bnfast_stats.h), the portable ones and the
 * ones this build and CPU pick (AVX2 / F16C; AVX-512's column sums), in
 * every storage type, over the same
 * values: random float16 and bfloat16 patterns (the value sets below), widened
 * to float and double for the float32 and float64 leaves.  Writes the sums as raw
 * doubles to stdout: per (value set, type, variant), the runs' shifts, s1, s2
 * for each run length in RUN_LENGTHS, then s1, s2 for each column-sum case.
 * tests/test_stats_leaves.py compiles it with and without -DBNFAST_NO_SIMD.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bnfast_stats.h"

#define N 65536
#define RUNS 12
static const ptrdiff_t run_lengths[] = {1, 7, 8, 9, 23, 24, 49, 128, 129, 784, 4096};
#define NLENGTHS (sizeof run_lengths / sizeof run_lengths[0])
/* (rows, W, stride): groups of four rows and leftover rows, scalar columns
 * (1 to 7 after the vector steps), a tile inside wider rows, the prefetching
 * groups (rows under 4 KiB, 12 or more) with a column tail. */
static const ptrdiff_t col_cases[][3] = {
    {13, 72, 72}, {10, 131, 131}, {9, 200, 200}, {6, 300, 512}, {5, 3, 3}, {17, 64, 1024},
    {21, 77, 77}, {16, 45, 96},
};
#define NCOLS (sizeof col_cases / sizeof col_cases[0])

static double out[2 * 4096 + 16];
static void emit(const double *v, size_t n) { fwrite(v, sizeof(double), n, stdout); }

/* The leaves RUNS_LEAF and COLS_LEAF over every run length and column case. */
#define RUN_TYPE(T, X, RUNS_LEAF, COLS_LEAF)                                               \
    {                                                                                      \
        size_t l, c;                                                                       \
        for (l = 0; l < NLENGTHS; l++) {                                                   \
            double shift[RUNS], s1[RUNS], s2[RUNS];                                        \
            ptrdiff_t n = run_lengths[l], runs = n * RUNS <= N ? RUNS : N / n;             \
            RUNS_LEAF((const T *)(X), runs, n, shift, s1, s2);                             \
            emit(shift, runs); emit(s1, runs); emit(s2, runs);                             \
        }                                                                                  \
        for (c = 0; c < NCOLS; c++) {                                                      \
            ptrdiff_t rows = col_cases[c][0], W = col_cases[c][1], stride = col_cases[c][2]; \
            size_t j;                                                                      \
            for (j = 0; j < 2 * (size_t)W; j++) out[j] = 0.0;                              \
            /* shift: the row after the block (any values of the type) */                  \
            COLS_LEAF((const T *)(X), rows, W, stride, (const T *)(X) + rows * stride,     \
                      out, out + W);                                                       \
            emit(out, 2 * (size_t)W);                                                      \
        }                                                                                  \
    }

/* The portable leaves, the AVX2 / F16C ones where this CPU has them (named: on an
 * AVX-512 CPU the entries pick others), then the ones the entries pick (AVX2 /
 * F16C, AVX-512's column sums); the portable ones in their stead where a build
 * or CPU lacks them. */
#if BNFAST_DISPATCH_AVX2
#define HAS_AVX2_f32 bnfast_use_avx2()
#define HAS_AVX2_f64 bnfast_use_avx2()
#define HAS_AVX2_f16 bnfast_use_f16c()
#define HAS_AVX2_bf16 bnfast_use_avx2()
#define RUN_AVX2(H, T, X)                                                                  \
    if (HAS_AVX2_##H) {                                                                    \
        RUN_TYPE(T, X, bnfast_shifted_sums_runs_##H##_avx2, bnfast_shifted_colsums_##H##_avx2) \
    } else {                                                                               \
        RUN_TYPE(T, X, bnfast_shifted_sums_runs_##H##_base, bnfast_shifted_colsums_##H##_base) \
    }
#else
#define RUN_AVX2(H, T, X)                                                                  \
    RUN_TYPE(T, X, bnfast_shifted_sums_runs_##H##_base, bnfast_shifted_colsums_##H##_base)
#endif
#define RUN_ALL(H, T, X)                                                                   \
    RUN_TYPE(T, X, bnfast_shifted_sums_runs_##H##_base, bnfast_shifted_colsums_##H##_base) \
    RUN_AVX2(H, T, X)                                                                      \
    RUN_TYPE(T, X, bnfast_shifted_sums_runs_##H, bnfast_shifted_colsums_##H)

/* The value sets: float16 |x| < 8; bfloat16 |x| < 2^8; bfloat16 over its whole
 * finite range (float arithmetic overflows: the double recount); bfloat16
 * |x| < 2^-67, denormals too (float arithmetic underflows: the recount). */
#define NSETS 4
static const uint32_t set_mod[NSETS] = {0x4800u, 0x4380u, 0x7f80u, 0x1e00u};

int main(void) {
    static uint16_t h[N];
    static float f[N];
    static double d[N];
    size_t i;
    int set;
    uint32_t state;
    for (set = 0; set < NSETS; set++) {
        state = 12345u;
        for (i = 0; i < N; i++) {
            state = state * 1664525u + 1013904223u;
            h[i] = (uint16_t)((state >> 16) % set_mod[set] | ((state >> 8) & 0x8000u));
            f[i] = set == 0 ? bnfast_f16_to_float(*(const bnfast_f16 *)&h[i])
                            : bnfast_bf16_to_float(*(const bnfast_bf16 *)&h[i]);
            d[i] = f[i];
        }
        RUN_ALL(f32, float, f)
        RUN_ALL(f64, double, d)
        if (set == 0) { RUN_ALL(f16, bnfast_f16, h) }
        else { RUN_ALL(bf16, bnfast_bf16, h) }
    }
    return 0;
}
