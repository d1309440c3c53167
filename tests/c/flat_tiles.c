/*
 * Drives the streamed flat channels-last leaves (src/bnfast_flat_tiles.h)
 * against the portable tiled leaves (bnfast_affine_tiled_*_base, held to
 * NumPy by tests/c/half_leaves.c and the layout tests), for float32, float16
 * and bfloat16, on random cases: tile lengths W from 16 to 300 (multiples of
 * 16 and not, shorter than a step too: vectors that cross a tile's end at
 * every offset), blocks of any length (a last tile cut short, none at all),
 * outputs that start at every element offset of a 64-byte line (the masked
 * head), addend and ReLU, in place, and coefficient rows with NaN and
 * infinities.  Both outputs sit in buffers filled with a guard pattern: the
 * bytes around the span must stay untouched.
 *
 * Prints "cases mismatches": tests/test_flat_tiles.py wants every case run on a
 * CPU with the leaves and no mismatch.  Without them (another CPU, or
 * -DBNFAST_NO_SIMD) it prints "0 0".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_half_leaves.h"
#include "bnfast_backward_half.h"
#include "bnfast_flat_tiles.h"

#define CASES 20000
#define CAP (4 * 1024 + 64)  /* values: a block + the largest offset */
#define MAXW 300
#define RNG_SEED 2463534242ull
#include "drivers.h"

/* One case of type H (T): the portable leaf into y1, the flat one into y2. */
#define CASE(H, T)                                                                       \
    {                                                                                    \
        const T *src1 = inplace ? (const T *)y1 : (const T *)x;                          \
        const T *src2 = inplace ? (const T *)y2 : (const T *)x;                          \
        const T *ad = use_add ? (const T *)add : NULL;                                   \
        bnfast_affine_tiled_##H##_base(src1, ad, (T *)y1, total, W, m, a, b, relu);      \
        bnfast_flat_tiles_##H##_nt(src2, ad, (T *)y2, total, W, m, a, b, relu);          \
    }

/* The backward's dx (TRAINING 1: (dy - d) * a + (x - m) * b; 0: dy * a), dy being
 * `add` (or y itself, in place): the portable leaves tile by tile into y1, the
 * flat one into y2. */
#define GRAD_CASE(H, T, TRAINING)                                                        \
    {                                                                                    \
        const T *dy1 = inplace ? (const T *)y1 : (const T *)add;                         \
        const T *dy2 = inplace ? (const T *)y2 : (const T *)add;                         \
        ptrdiff_t i0;                                                                    \
        for (i0 = 0; i0 < total; i0 += W)                                                \
            GRAD_REF_##H((const T *)x + i0, dy1 + i0, (T *)y1 + i0,                      \
                         BNFAST_MIN(W, total - i0), TRAINING);                           \
        (TRAINING ? bnfast_flat_tiles_grad_##H##_nt : bnfast_flat_tiles_scale_##H##_nt)( \
            (const T *)x, dy2, (T *)y2, total, W, m, a, b, d);                           \
    }
#define GRAD_REF_f32(x, dy, dx, n, training)                                             \
    ((training) ? bnfast_grad_tiled_f32_base(x, dy, dx, n, m, a, b, d)                   \
                : bnfast_scale_tiled_f32_base(dy, dx, n, a))
#define GRAD_REF_f16(x, dy, dx, n, training) \
    bnfast_grad_vec_tiled_f16_base(x, dy, dx, n, m, a, b, d, training)
#define GRAD_REF_bf16(x, dy, dx, n, training) \
    bnfast_grad_vec_tiled_bf16_base(x, dy, dx, n, m, a, b, d, training)

int main(void) {
#if BNFAST_DISPATCH_AVX2
    static unsigned char xbuf[CAP * 4 + 64], abuf[CAP * 4 + 64];
    static unsigned char y1buf[CAP * 4 + 192], y2buf[CAP * 4 + 192];
    static float m[MAXW], a[MAXW], b[MAXW], d[MAXW];
    int cases = 0, mismatches = 0, k;
    size_t span;
    if (!bnfast_flat_tiles_taken_f32(16)) {
        printf("0 0\n");
        return 0;
    }
    for (k = 0; k < CASES; k++) {
        /* float32, float16, bfloat16; the normalise, dx in training, in evaluation */
        int type = k % 3, grad = (k / 3) % 3;
        size_t size = type == 0 ? 4 : 2;
        ptrdiff_t W = next_rand() % 4 == 0 ? 16 * (1 + next_rand() % 16)
                                           : 16 + next_rand() % (MAXW - 15);
        ptrdiff_t total = next_rand() % 8 == 0 ? next_rand() % 64 : next_rand() % (CAP - 64);
        ptrdiff_t offset = (ptrdiff_t)(next_rand() % (64 / size)) * (ptrdiff_t)size;
        int relu = next_rand() % 2, use_add = next_rand() % 2, inplace = next_rand() % 4 == 0;
        unsigned char *x = xbuf + offset, *add = abuf + offset;
        unsigned char *y1 = y1buf + offset, *y2 = y2buf + offset;
        random_rows(m, a, b, d, W);
        random_inputs(type == 0, x, add, total);
        /* The outputs' bytes and 128 guard bytes after them (no store is wider
         * than 64). */
        span = (size_t)offset + (size_t)total * size + 128;
        memset(y1buf, 0xa5, span);
        memset(y2buf, 0xa5, span);
        if (inplace) {
            memcpy(y1, grad ? add : x, (size_t)total * size);
            memcpy(y2, grad ? add : x, (size_t)total * size);
        }
        if (grad == 1) {
            if (type == 0) GRAD_CASE(f32, float, 1)
            else if (type == 1) GRAD_CASE(f16, bnfast_f16, 1)
            else GRAD_CASE(bf16, bnfast_bf16, 1)
        } else if (grad == 2) {
            if (type == 0) GRAD_CASE(f32, float, 0)
            else if (type == 1) GRAD_CASE(f16, bnfast_f16, 0)
            else GRAD_CASE(bf16, bnfast_bf16, 0)
        } else if (type == 0) {
            CASE(f32, float)
        } else if (type == 1) {
            CASE(f16, bnfast_f16)
        } else {
            CASE(bf16, bnfast_bf16)
        }
        bnfast_nt_fence();
        cases++;
        if (!same_values(y1buf, y2buf, span, (size_t)offset, size,
                         type == 0 ? 0x7f800000u : type == 1 ? 0x7c00u : 0x7f80u, grad == 1)) {
            if (mismatches < 10)
                fprintf(stderr, "mismatch: type %d grad %d W %td total %td offset %td relu %d "
                        "add %d inplace %d\n", type, grad, W, total, offset, relu, use_add,
                        inplace);
            mismatches++;
        }
    }
    printf("%d %d\n", cases, mismatches);
#else
    printf("0 0\n");
#endif
    return 0;
}
