/*
 * Drives the backward's pass-1 leaves for half-precision data
 * (src/bnfast_backward_half.h: column sums, channels-last; runs,
 * channels-first; plain and with the fused ReLU's mask) over finite half
 * values, and writes their sums as raw doubles to stdout: per (type, case),
 * three blocks of 2 * L doubles (sy then sxy): the float32 leaf on the widened
 * values, then two half leaves -- plain: the portable one and the one this CPU
 * picks (F16C / AVX2); masked: the picked one (staged without F16C / AVX2)
 * without and with the masked gradient g written.  tests/test_half_leaves.py compiles
 * it with and without -DBNFAST_NO_SIMD and checks that the three blocks agree
 * bit for bit, and that both builds write the same bytes.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bnfast_backward_half.h"

#define N 40000
#define LMAX 4096

/* (rows or runs, W or n, kind): kind 0 column sums of rows x W, 1 runs of n,
 * 2 and 3 the same masked (from bit MASK_POS on).  W = 200 has float32 rows of
 * 800 bytes: one row at a time (BNFAST_ROW_GROUP). */
static const ptrdiff_t cases[][3] = {
    {37, 72, 0}, {30, 200, 0}, {9, 1024, 0}, {101, 13, 0}, {6, 4096, 0},
    {500, 49, 1}, {7, 3136, 1}, {333, 3, 1}, {41, 300, 1}, {1, 8, 1}, {60, 23, 1}, {30, 129, 1},
    {37, 72, 2}, {30, 200, 2}, {9, 1024, 2}, {101, 13, 2}, {6, 4096, 2},
    {500, 49, 3}, {7, 3136, 3}, {333, 3, 3}, {41, 300, 3}, {1, 8, 3}, {60, 23, 3}, {30, 129, 3},
};
#define MASK_POS 3
#define NCASES (sizeof cases / sizeof cases[0])
_Static_assert(sizeof cases / sizeof cases[0] == 24, "one stride per case below");
/* Column sums: the rows' stride per case (runs: unused).  The rows are column
 * tiles of wider rows where it exceeds W, grouped by the stride (72 columns of
 * 800-byte float32 rows one at a time, 200 of 4 KiB rows four at a time: the
 * staged leaves then stage at another stride than W). */
static const ptrdiff_t strides[] = {200, 1024, 1024, 24, 4100, 0, 0, 0, 0, 0, 0, 0,
                                    200, 1024, 1024, 24, 4100, 0, 0, 0, 0, 0, 0, 0};

static double sy[LMAX], sxy[LMAX], shift[LMAX];
static float xf[N], yf[N], stage[N];
static unsigned char bits[N / 8 + 8];

static void emit(ptrdiff_t len) {
    fwrite(sy, 8, (size_t)len, stdout);
    fwrite(sxy, 8, (size_t)len, stdout);
}

static void clear(ptrdiff_t len) {
    ptrdiff_t j;
    for (j = 0; j < len; j++) sy[j] = sxy[j] = 0.0;
}

/* Every finite pattern (the exponent field not all ones), shuffled by a multiplier. */
#define FILL(T, H, EXP_MASK)                                                               \
    for (i = 0, k = 0; i < N; k++) {                                                      \
        uint16_t bx = (uint16_t)(k * 40503u), by = (uint16_t)(k * 9973u + 17u);           \
        if ((bx & EXP_MASK) == EXP_MASK || (by & EXP_MASK) == EXP_MASK) continue;        \
        H##x[i].bits = bx; H##y[i].bits = by;                                             \
        xf[i] = bnfast_##H##_to_float(H##x[i]); yf[i] = bnfast_##H##_to_float(H##y[i]);   \
        i++;                                                                              \
    }

#define RUN_CASES(T, H, BASE_COLDOT, BASE_RUNS)                                            \
    for (c = 0; c < NCASES; c++) {                                                        \
        ptrdiff_t a = cases[c][0], w = cases[c][1], len = cases[c][2] % 2 ? a : w, r;     \
        ptrdiff_t st = strides[c];                                                        \
        for (j = 0; j < len; j++)  /* 0.1: shifts float cannot hold */                  \
            shift[j] = 0.375 * (double)(j % 5) - 0.5 + 0.1 * (double)(j % 3);             \
        if (cases[c][2] == 0) {                                                           \
            clear(len); bnfast_centered_coldot_f32(xf, yf, a, w, st, shift, sy, sxy);     \
            emit(len);                                                                    \
            clear(len); BASE_COLDOT(H##x, H##y, a, w, st, shift, sy, sxy); emit(len);     \
            clear(len); bnfast_coldot_##H(H##x, H##y, a, w, st, shift, sy, sxy); emit(len); \
        } else if (cases[c][2] == 1) {                                                    \
            clear(len); bnfast_centered_dot_runs_f32(xf, yf, a, w, shift, sy, sxy); emit(len); \
            clear(len); BASE_RUNS(H##x, H##y, a, w, shift, sy, sxy); emit(len);           \
            clear(len); bnfast_centered_dot_runs_##H(H##x, H##y, a, w, shift, sy, sxy);   \
            emit(len);                                                                    \
        } else if (cases[c][2] == 2) {                                                    \
            clear(len);                                                                   \
            bnfast_centered_coldot_masked_f32(xf, yf, bits, MASK_POS, a, w, st, shift, sy, \
                                              sxy, NULL);                                 \
            emit(len);                                                                    \
            clear(len);                                                                   \
            bnfast_centered_coldot_any_##H(H##x, H##y, bits, MASK_POS, a, w, st, shift, sy, \
                                           sxy, NULL, stage);                             \
            emit(len);                                                                    \
            clear(len);                                                                   \
            bnfast_centered_coldot_any_##H(H##x, H##y, bits, MASK_POS, a, w, st, shift, sy, \
                                           sxy, H##g, stage);                             \
            emit(len);                                                                    \
        } else {                                                                          \
            clear(len);                                                                   \
            for (r = 0; r < a; r++)                                                       \
                bnfast_centered_dot_masked_f32(xf + r * w, yf + r * w, bits, MASK_POS + r * w, \
                                               w, shift[r], sy + r, sxy + r, NULL);       \
            emit(len);                                                                    \
            clear(len);                                                                   \
            for (r = 0; r < a; r++)                                                       \
                bnfast_centered_dot_masked_##H(H##x + r * w, H##y + r * w, bits,          \
                                               MASK_POS + r * w, w, shift[r], sy + r,     \
                                               sxy + r, NULL);                            \
            emit(len);                                                                    \
            clear(len);                                                                   \
            for (r = 0; r < a; r++)                                                       \
                bnfast_centered_dot_masked_##H(H##x + r * w, H##y + r * w, bits,          \
                                               MASK_POS + r * w, w, shift[r], sy + r,     \
                                               sxy + r, H##g + r * w);                    \
            emit(len);                                                                    \
        }                                                                                 \
    }

int main(void) {
    static bnfast_f16 f16x[N], f16y[N], f16g[N];
    static bnfast_bf16 bf16x[N], bf16y[N], bf16g[N];
    size_t c;
    ptrdiff_t i, j;
    uint32_t k;
    for (i = 0; i < N / 8 + 8; i++) bits[i] = (unsigned char)((uint32_t)(i * 2654435761u) >> 13);
    FILL(bnfast_f16, f16, 0x7c00u)
    RUN_CASES(bnfast_f16, f16, bnfast_coldot_f16_base, bnfast_dot_runs_f16_base)
    FILL(bnfast_bf16, bf16, 0x7f80u)
    RUN_CASES(bnfast_bf16, bf16, bnfast_coldot_bf16_base, bnfast_dot_runs_bf16_base)
    return 0;
}
