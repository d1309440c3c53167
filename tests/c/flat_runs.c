/*
 * Drives the flat channels-first leaves (src/bnfast_flat_runs.h), the
 * normalise and the backward's dx, against the portable leaves run by run
 * (bnfast_affine_scalar_*_base, bnfast_grad_scalar_f32_base,
 * bnfast_grad_vec_scalar_*_base, themselves held to NumPy by
 * tests/c/half_leaves.c and the layout tests), for float32, float16 and
 * bfloat16, cached and streamed, on random cases: run lengths S from 32 to
 * 231 (steps that meet a run's end at every offset), channel counts and first
 * channels (the wrap to channel 0), spans that start at every 2- or 4-byte
 * offset of a 64-byte line (the streamed head; the cached leaves also off
 * their itemsize), no runs at all, addend and
 * ReLU, in place (the normalise on x, dx on dy; the masked dx on dy, or its g
 * on dy beside it), and coefficient rows with NaN
 * and infinities.  Both outputs sit in buffers filled with a guard pattern: the
 * bytes around the span must stay untouched.
 *
 * Prints "cases mismatches": tests/test_flat_runs.py wants every case run on a
 * CPU with the leaves and no mismatch.  Without them (another CPU, or
 * -DBNFAST_NO_SIMD) it prints "0 0".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_flat_runs.h"
#include "bnfast_backward_half.h"

#define CASES 30000
#define CAP (64 * 232 + 64)  /* values: runs * S + the largest offset */
#define MAXC 40
#define RNG_SEED 88172645463325252ull
#include "drivers.h"

/* One case of type H (T) with the flat leaf LEAF, against the base leaf per run. */
#define CASE(H, T, LEAF)                                                                 \
    {                                                                                    \
        const T *src1 = inplace ? (const T *)y1 : (const T *)x;                          \
        const T *src2 = inplace ? (const T *)y2 : (const T *)x;                          \
        const T *ad = use_add ? (const T *)add : NULL;                                   \
        ptrdiff_t t, ch = c;                                                             \
        for (t = 0; t < runs; t++) {                                                     \
            bnfast_affine_scalar_##H##_base(src1 + t * S, ad == NULL ? NULL : ad + t * S, \
                                            (T *)y1 + t * S, S, m[ch], a[ch], b[ch], relu); \
            if (++ch == C) ch = 0;                                                       \
        }                                                                                \
        LEAF(src2, ad, (T *)y2, runs, S, c, C, m, a, b, relu);                           \
    }
/* The same for dx, REF the portable leaf of one run: dy is `add`, or y (in place). */
#define GRAD_CASE(T, REF, LEAF)                                                          \
    {                                                                                    \
        const T *dy1 = inplace ? (const T *)y1 : (const T *)add;                         \
        const T *dy2 = inplace ? (const T *)y2 : (const T *)add;                         \
        ptrdiff_t t, ch = c;                                                             \
        for (t = 0; t < runs; t++) {                                                     \
            REF((const T *)x + t * S, dy1 + t * S, (T *)y1 + t * S, S, m[ch], a[ch], b[ch], \
                d[ch]);                                                                  \
            if (++ch == C) ch = 0;                                                       \
        }                                                                                \
        LEAF((const T *)x, dy2, (T *)y2, runs, S, c, C, m, a, b, d);                     \
    }
/* The same with the fused ReLU's mask (mbits from bit mpos on) and, half the
 * time, g (in place: g is dy), against the run-by-run masked leaf.  (g's NaN
 * payloads: the flat leaf copies dy's bits, as the float32 and the column
 * leaves do; the half types' staged run-by-run leaf widens and narrows them,
 * which quietens a signalling NaN.) */
#define MGRAD_CASE(T, REF, LEAF, TRAINING)                                               \
    {                                                                                    \
        T *dy1 = inplace ? (T *)y1 : (T *)add, *dy2 = inplace ? (T *)y2 : (T *)add;      \
        T *g1 = with_g ? (inplace ? dy1 : (T *)(void *)(g1buf + offset)) : NULL;         \
        T *g2 = with_g ? (inplace ? dy2 : (T *)(void *)(g2buf + offset)) : NULL;         \
        /* in place: g over dy and dx beside it, or without g dx over dy */              \
        T *dx1 = inplace ? (with_g ? (T *)(void *)(dx1buf + offset) : dy1) : (T *)y1;    \
        T *dx2 = inplace ? (with_g ? (T *)(void *)(dx2buf + offset) : dy2) : (T *)y2;    \
        ptrdiff_t t, ch = c;                                                             \
        for (t = 0; t < runs; t++) {                                                     \
            REF((const T *)x + t * S, dy1 + t * S, mbits, mpos + t * S, S, m[ch], a[ch], \
                b[ch], d[ch], TRAINING, 0, dx1 + t * S, g1 == NULL ? NULL : g1 + t * S);  \
            if (++ch == C) ch = 0;                                                       \
        }                                                                                \
        LEAF((const T *)x, dy2, mbits, mpos, g2, dx2, runs, S, c, C, m, a, b, d);        \
    }
#define GRAD_F16_BASE(x, dy, dx, n, m, a, b, d) \
    bnfast_grad_vec_scalar_f16_base(x, dy, dx, n, m, a, b, d, 1)
#define GRAD_BF16_BASE(x, dy, dx, n, m, a, b, d) \
    bnfast_grad_vec_scalar_bf16_base(x, dy, dx, n, m, a, b, d, 1)
/* Evaluation's dx = dy * a, run by run (the leaves behind the run-by-run entry). */
#define SCALE_REF(H)                                                                     \
    static void scale_ref_##H(const bnfast_##H *x, const bnfast_##H *dy, bnfast_##H *dx, \
                              ptrdiff_t n, float m, float a, float b, float d) {         \
        bnfast_grad_run_scalar_##H(x, dy, NULL, 0, n, m, a, b, d, 0, 0, dx, NULL);       \
    }
typedef float bnfast_f32;
SCALE_REF(f32)
SCALE_REF(f16)
SCALE_REF(bf16)

int main(void) {
#if BNFAST_DISPATCH_AVX2
    static unsigned char xbuf[CAP * 4 + 64], abuf[CAP * 4 + 64];
    static unsigned char y1buf[CAP * 4 + 64], y2buf[CAP * 4 + 64];
    static unsigned char g1buf[CAP * 4 + 64], g2buf[CAP * 4 + 64];
    static unsigned char dx1buf[CAP * 4 + 64], dx2buf[CAP * 4 + 64];
    static unsigned char mbits[CAP / 8 + 8];
    static float m[MAXC], a[MAXC], b[MAXC], d[MAXC];
    int cases = 0, mismatches = 0, k;
    uint32_t inf;
    int nan_any;
    size_t span;
    if (!bnfast_use_flat()) {
        printf("0 0\n");
        return 0;
    }
    for (k = 0; k < CASES; k++) {
        /* float32, float16, bfloat16; cached, streamed; normalise, dx, masked dx
         * (cached only), evaluation's dx, masked */
        int type = k % 3, nt = (k / 3) % 2, grad = (k / 6) % 5, with_g = next_rand() % 2;
        ptrdiff_t mpos = next_rand() % 64;  /* the mask's first bit: any offset in a byte */
        size_t size = type == 0 ? 4 : 2;
        ptrdiff_t S = 32 + next_rand() % 200, C = 1 + next_rand() % MAXC;
        ptrdiff_t c = next_rand() % C, runs = next_rand() % 65, i;
        ptrdiff_t offset = (ptrdiff_t)(next_rand() % (64 / size)) * (ptrdiff_t)size;
        /* The cached leaves also take spans off their itemsize (a misaligned out=
         * view); the streamed ones need an element-aligned output. */
        if (!nt && next_rand() % 4 == 0) offset += size == 4 ? 2 : 1;
        int relu = next_rand() % 2, use_add = next_rand() % 2, inplace = next_rand() % 4 == 0;
        unsigned char *x = xbuf + offset, *add = abuf + offset;
        unsigned char *y1 = y1buf + offset, *y2 = y2buf + offset;
        if (runs * S + 64 > CAP) runs = (CAP - 64) / S;
        random_rows(m, a, b, d, C);
        random_inputs(type == 0, x, add, runs * S);
        /* The outputs' bytes and 128 guard bytes after them (no leaf store is wider
         * than 64). */
        span = (size_t)offset + (size_t)(runs * S) * size + 128;
        memset(y1buf, 0xa5, span);
        memset(y2buf, 0xa5, span);
        memset(g1buf, 0x5a, span);
        memset(g2buf, 0x5a, span);
        memset(dx1buf, 0x3c, span);
        memset(dx2buf, 0x3c, span);
        for (i = 0; i < (ptrdiff_t)sizeof mbits; i++) mbits[i] = (unsigned char)next_rand();
        if (inplace) {
            memcpy(y1, grad ? add : x, (size_t)(runs * S) * size);
            memcpy(y2, grad ? add : x, (size_t)(runs * S) * size);
        }
        if (grad == 2 || grad == 4) {  /* masked: training, evaluation */
            int training = grad == 2;
            if (type == 0) {
                if (training) MGRAD_CASE(float, bnfast_grad_run_scalar_f32, bnfast_flat_mgrad_f32, 1)
                else MGRAD_CASE(float, bnfast_grad_run_scalar_f32, bnfast_flat_mscale_f32, 0)
            } else if (type == 1) {
                if (training) MGRAD_CASE(bnfast_f16, bnfast_grad_run_scalar_f16, bnfast_flat_mgrad_f16, 1)
                else MGRAD_CASE(bnfast_f16, bnfast_grad_run_scalar_f16, bnfast_flat_mscale_f16, 0)
            } else {
                if (training) MGRAD_CASE(bnfast_bf16, bnfast_grad_run_scalar_bf16, bnfast_flat_mgrad_bf16, 1)
                else MGRAD_CASE(bnfast_bf16, bnfast_grad_run_scalar_bf16, bnfast_flat_mscale_bf16, 0)
            }
        } else if (grad == 3) {  /* evaluation: dx = dy * a */
            if (type == 0) {
                if (nt) GRAD_CASE(float, scale_ref_f32, bnfast_flat_scale_f32_nt)
                else GRAD_CASE(float, scale_ref_f32, bnfast_flat_scale_f32)
            } else if (type == 1) {
                if (nt) GRAD_CASE(bnfast_f16, scale_ref_f16, bnfast_flat_scale_f16_nt)
                else GRAD_CASE(bnfast_f16, scale_ref_f16, bnfast_flat_scale_f16)
            } else {
                if (nt) GRAD_CASE(bnfast_bf16, scale_ref_bf16, bnfast_flat_scale_bf16_nt)
                else GRAD_CASE(bnfast_bf16, scale_ref_bf16, bnfast_flat_scale_bf16)
            }
        } else if (grad) {
            if (type == 0) {
                if (nt) GRAD_CASE(float, bnfast_grad_scalar_f32_base, bnfast_flat_grad_f32_nt)
                else GRAD_CASE(float, bnfast_grad_scalar_f32_base, bnfast_flat_grad_f32)
            } else if (type == 1) {
                if (nt) GRAD_CASE(bnfast_f16, GRAD_F16_BASE, bnfast_flat_grad_f16_nt)
                else GRAD_CASE(bnfast_f16, GRAD_F16_BASE, bnfast_flat_grad_f16)
            } else {
                if (nt) GRAD_CASE(bnfast_bf16, GRAD_BF16_BASE, bnfast_flat_grad_bf16_nt)
                else GRAD_CASE(bnfast_bf16, GRAD_BF16_BASE, bnfast_flat_grad_bf16)
            }
        } else if (type == 0) {
            if (nt) CASE(f32, float, bnfast_flat_runs_f32_nt)
            else CASE(f32, float, bnfast_flat_runs_f32)
        } else if (type == 1) {
            if (nt) CASE(f16, bnfast_f16, bnfast_flat_runs_f16_nt)
            else CASE(f16, bnfast_f16, bnfast_flat_runs_f16)
        } else {
            if (nt) CASE(bf16, bnfast_bf16, bnfast_flat_runs_bf16_nt)
            else CASE(bf16, bnfast_bf16, bnfast_flat_runs_bf16)
        }
        bnfast_nt_fence();
        cases++;
        inf = type == 0 ? 0x7f800000u : type == 1 ? 0x7c00u : 0x7f80u;
        /* (any NaN payload: training's dx, where both sums' terms can be NaN; and
         * the half types' g, which is y1/y2 itself when in place) */
        nan_any = grad == 1 || grad == 2;
        if (!same_values(y1buf, y2buf, span, (size_t)offset, size, inf,
                         nan_any || ((grad == 2 || grad == 4) && type != 0))
            || !same_values(g1buf, g2buf, span, (size_t)offset, size, inf, type != 0)
            || !same_values(dx1buf, dx2buf, span, (size_t)offset, size, inf, nan_any)) {
            if (mismatches < 10)
                fprintf(stderr, "mismatch: type %d nt %d grad %d S %td C %td c %td runs %td "
                        "offset %td relu %d add %d inplace %d\n", type, nt, grad, S, C, c, runs,
                        offset, relu, use_add, inplace);
            mismatches++;
        }
    }
    printf("%d %d\n", cases, mismatches);
#else
    printf("0 0\n");
#endif
    return 0;
}
