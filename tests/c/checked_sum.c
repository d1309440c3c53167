/*
 * Drives the checked addend sum of src/bnfast_half_leaves.h (half data with an
 * addend: float, taken again in double where the addend cancels the normalised
 * value) in every variant this build has, for tests/test_checked_sum.py.
 *
 * Input (stdin): an int32 count of cases, then per case an int32 type (0
 * float16, 1 bfloat16), an int32 tile width W (<= MAXW), N x values, N addend
 * values (uint16 bits), the tile's float rows hz, fa, hb and double rows m, a, b,
 * W + 16 values each (the 16 past W repeat the start, as the tables' rows do).
 * Output (stdout): one int32, the variants this CPU runs (bit 0: float16 on
 * AVX512F, 1: bfloat16 on AVX-512, 2: AVX512-BF16, 3: float16 on AVX2 + F16C,
 * 4: bfloat16 on AVX2), then per case, relu (0, 1), leaf (scalar: one channel,
 * tile position 0's coefficients, called on spans of 37, 1100 and the rest;
 * tiled: the tile over all N values) and variant (portable; the best vector
 * variant cached, streamed; the AVX2 one cached, streamed: the vector variants
 * give the portable one's bits where the CPU lacks them), N uint16 results.
 * Built with -DLOG_STORES the vector stores are logged (the leaves' own store
 * macros redefined, the same stores) and four int64 follow the results: the
 * non-temporal stores that were misaligned, the elements streamed in a 64-byte
 * line also stored plainly (or beyond the output), the streamed stores of the
 * streamed variants and of the cached ones.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LOG_STORES
#include "bnfast_half.h"
static void log_store(const void *p, int bytes, int nt);
#define LOGGED_(p, bytes, nt, STORE) do { log_store((p), (bytes), (nt)); STORE; } while (0)
#undef bnfast_store8_f16_f16c
#undef bnfast_stream8_f16_f16c
#undef bnfast_store8_bf16_avx2
#undef bnfast_stream8_bf16_avx2
#undef bnfast_store16_f16_z
#undef bnfast_stream16_f16_z
#undef bnfast_store16_bf16_z
#undef bnfast_stream16_bf16_z
#undef bnfast_store16_bf16_hw
#undef bnfast_stream16_bf16_hw
#define bnfast_store8_f16_f16c(p, f) \
    LOGGED_(p, 16, 0, BNFAST_STORE8_HALF_(p, bnfast_pack8_f16_f16c(f)))
#define bnfast_stream8_f16_f16c(p, f) \
    LOGGED_(p, 16, 1, BNFAST_STREAM8_HALF_(p, bnfast_pack8_f16_f16c(f)))
#define bnfast_store8_bf16_avx2(p, f) \
    LOGGED_(p, 16, 0, BNFAST_STORE8_HALF_(p, bnfast_pack8_bf16_avx2(f)))
#define bnfast_stream8_bf16_avx2(p, f) \
    LOGGED_(p, 16, 1, BNFAST_STREAM8_HALF_(p, bnfast_pack8_bf16_avx2(f)))
#define bnfast_store16_f16_z(p, v) \
    LOGGED_(p, 32, 0, _mm256_storeu_si256((__m256i *)(void *)(p), bnfast_pack16_f16_z(v)))
#define bnfast_stream16_f16_z(p, v) \
    LOGGED_(p, 32, 1, _mm256_stream_si256((__m256i *)(void *)(p), bnfast_pack16_f16_z(v)))
#define bnfast_store16_bf16_z(p, v) \
    LOGGED_(p, 32, 0, _mm256_storeu_si256((__m256i *)(void *)(p), bnfast_pack16_bf16_z(v)))
#define bnfast_stream16_bf16_z(p, v) \
    LOGGED_(p, 32, 1, _mm256_stream_si256((__m256i *)(void *)(p), bnfast_pack16_bf16_z(v)))
#define bnfast_store16_bf16_hw(p, v) \
    LOGGED_(p, 32, 0, BNFAST_BF16_HW_16_(p, v, _mm256_storeu_si256, BNFAST_STORE8_HALF_))
#define bnfast_stream16_bf16_hw(p, v) \
    LOGGED_(p, 32, 1, BNFAST_BF16_HW_16_(p, v, _mm256_stream_si256, BNFAST_STREAM8_HALF_))
#endif
#include "bnfast_half_leaves.h"

#define N 8192
#define MAXW 64

typedef void (*scalar_fn)(const void *, const void *, void *, ptrdiff_t, float, float, float,
                          double, double, double, int);
typedef void (*tiled_fn)(const void *, const void *, void *, ptrdiff_t, ptrdiff_t,
                         const float *, const float *, const float *, const double *,
                         const double *, const double *, int);

static uint16_t x[N], add[N];
static uint16_t y[N + 64] __attribute__((aligned(64)));

#ifdef LOG_STORES
/* Per element of y: streamed (1) or not; the counts reported at the end. */
static unsigned char streamed[N + 64];
static int64_t misaligned, mixed, streamed_nt, streamed_cached;
static int streaming_variant;
static void log_store(const void *p, int bytes, int nt) {
    ptrdiff_t e = (const uint16_t *)p - y;
    if (!nt) return;
    if ((uintptr_t)p % (uintptr_t)bytes) misaligned++;
    if (streaming_variant) streamed_nt++; else streamed_cached++;
    for (int k = 0; k < bytes / 2; k++)
        if (e + k >= 0 && e + k < N + 64) streamed[e + k] = 1;
}
/* After a call: a line with a streamed element is streamed whole, inside y + 1 .. + N. */
static void check_lines(void) {
    for (ptrdiff_t e = 0; e < N + 64; e++) {
        if (!streamed[e]) continue;
        ptrdiff_t line = e - e % 32;  /* y is 64-byte aligned: 32 values a line */
        for (ptrdiff_t f = line; f < line + 32; f++)
            if (f < 1 || f > N || !streamed[f]) { mixed++; break; }
    }
    memset(streamed, 0, sizeof streamed);
}
#else
static int streaming_variant;
static void check_lines(void) {}
#endif
static float hz[MAXW + 16], fa[MAXW + 16], hb[MAXW + 16];
static double m[MAXW + 16], a[MAXW + 16], b[MAXW + 16];
static int W;

static void run_scalar(scalar_fn f, int relu) {
    /* out= one value past a 64-byte line: the streamed variant's head */
    uint16_t *out = y + 1;
    ptrdiff_t spans[] = {0, 37, 37 + 1100, N};
    for (int s = 0; s < 3; s++) {
        ptrdiff_t i = spans[s], n = spans[s + 1] - i;
        f(x + i, add + i, out + i, n, hz[0], fa[0], hb[0], m[0], a[0], b[0], relu);
    }
    fwrite(out, 2, N, stdout);
}

static void run_tiled(tiled_fn f, int relu) {
    uint16_t *out = y + 1;
    f(x, add, out, N, W, hz, fa, hb, m, a, b, relu);
    fwrite(out, 2, N, stdout);
}

#define VARIANTS 5
#define AS_S(fn) ((scalar_fn)(void (*)(void))(fn))
#define AS_T(fn) ((tiled_fn)(void (*)(void))(fn))
/* Variant slot k: type H's leaves of variant V; PUT2: the cached one at k and
 * the streamed one at k + 1. */
#define PUT1(k, H, V)                                                                    \
    do {                                                                                 \
        s[k] = AS_S(bnfast_checked_scalar_##H##_##V);                                    \
        t[k] = AS_T(bnfast_checked_tiled_##H##_##V);                                     \
    } while (0)
#define PUT2(k, H, V) do { PUT1(k, H, V); PUT1((k) + 1, H, V##_nt); } while (0)

int main(void) {
    int has = 0;
#if BNFAST_DISPATCH_AVX2
    has = bnfast_use_f16_z() | bnfast_use_bf16_z() << 1 | bnfast_use_bf16_hw() << 2
          | bnfast_use_f16c() << 3 | bnfast_use_avx2() << 4;
#endif
    fwrite(&has, 4, 1, stdout);
    int cases, type;
    if (fread(&cases, 4, 1, stdin) != 1) return 1;
    for (int k = 0; k < cases; k++) {
        size_t row;
        if (fread(&type, 4, 1, stdin) != 1 || fread(&W, 4, 1, stdin) != 1 || W < 1 || W > MAXW)
            return 1;
        row = (size_t)W + 16;
        if (fread(x, 2, N, stdin) != N || fread(add, 2, N, stdin) != N
            || fread(hz, 4, row, stdin) != row || fread(fa, 4, row, stdin) != row
            || fread(hb, 4, row, stdin) != row || fread(m, 8, row, stdin) != row
            || fread(a, 8, row, stdin) != row || fread(b, 8, row, stdin) != row)
            return 1;
        for (int relu = 0; relu < 2; relu++) {
            scalar_fn s[VARIANTS];
            tiled_fn t[VARIANTS];
            if (type == 0) {
                for (int v = 0; v < VARIANTS; v++) PUT1(v, f16, base);
#if BNFAST_DISPATCH_AVX2
                if (has & 8) PUT2(3, f16, f16c);
                if (has & 1) PUT2(1, f16, z);
#endif
            } else {
                for (int v = 0; v < VARIANTS; v++) PUT1(v, bf16, base);
#if BNFAST_DISPATCH_AVX2
                if (has & 16) PUT2(3, bf16, avx2);
                if (has & 4) PUT2(1, bf16, hw);
                else if (has & 2) PUT2(1, bf16, z);
#endif
            }
            for (int v = 0; v < VARIANTS; v++) {
                streaming_variant = v == 2 || v == 4;
                run_scalar(s[v], relu);
                check_lines();
            }
            for (int v = 0; v < VARIANTS; v++) {
                streaming_variant = v == 2 || v == 4;
                run_tiled(t[v], relu);
                check_lines();
            }
        }
    }
#ifdef LOG_STORES
    int64_t counts[4] = {misaligned, mixed, streamed_nt, streamed_cached};
    fwrite(counts, 8, 4, stdout);
#endif
    return 0;
}
