/*
 * The forward's leaves for half-precision storage (float16, bfloat16), by
 * staging (bnfast_half.h): each one widens its input into float buffers, runs
 * the float32 leaf of the same job (bnfast_simd.h, bnfast_backward_simd.h) and
 * narrows what it writes.  One definition for both half types (the macro).
 *
 * Bits: the reductions stage whole calls' worth of values (shifted sums: a
 * statistics chunk, <= BNFAST_REDUCE_STAGE; column sums: four rows at a time,
 * the float32 leaf's own row group), so half data gives exactly the statistics
 * of the same values stored as float32.  The elementwise leaves compute in
 * float (or double: the *d leaves, for tables float cannot carry) and round
 * once to the half type; chunking cannot change elementwise results.
 */
#ifndef BNFAST_HALF_LEAVES_H
#define BNFAST_HALF_LEAVES_H

#include "bnfast_half.h"
#include "bnfast_simd.h"
#include "bnfast_backward_simd.h"

/* The statistics' chunk (CHUNK in _batch_stats.pxd): one staged call per chunk. */
#define BNFAST_REDUCE_STAGE 4096

#define BNFAST_MIN(a, b) ((a) < (b) ? (a) : (b))

#define BNFAST_DEFINE_HALF_LEAVES(H, T)                                                   \
    /* s1 += sum(x - shift), s2 += sum((x - shift)^2) */                                  \
    static inline void bnfast_shifted_sums_##H(const T *x, ptrdiff_t n, double shift,             \
                                        double *s1, double *s2) {                         \
        float buf[BNFAST_REDUCE_STAGE];                                                   \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_REDUCE_STAGE);                                   \
            bnfast_widen_##H(x + i, buf, k);                                              \
            bnfast_shifted_sums_f32(buf, k, shift, s1, s2);                               \
        }                                                                                 \
    }                                                                                     \
    /* sy += sum(y), sxy += sum((x - shift) * y) */                                       \
    static inline void bnfast_centered_dot_##H(const T *x, const T *y, ptrdiff_t n, double shift, \
                                        double *sy, double *sxy) {                        \
        float xb[BNFAST_REDUCE_STAGE], yb[BNFAST_REDUCE_STAGE];                           \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_REDUCE_STAGE);                                   \
            bnfast_widen_##H(x + i, xb, k);                                               \
            bnfast_widen_##H(y + i, yb, k);                                               \
            bnfast_centered_dot_f32(xb, yb, k, shift, sy, sxy);                           \
        }                                                                                 \
    }                                                                                     \
    /* Column sums of rows x W values (see bnfast_shifted_colsums_f32), four rows at a     \
     * time through stage: 5 * W floats of the caller's (W does not fit the stack). */     \
    static inline void bnfast_shifted_colsums_##H(const T *x, ptrdiff_t rows, ptrdiff_t W,        \
                                           const T *shift, double *s1, double *s2,        \
                                           float *stage) {                                \
        float *fshift = stage + 4 * W;                                                    \
        ptrdiff_t r, k;                                                                   \
        bnfast_widen_##H(shift, fshift, W);                                               \
        for (r = 0; r < rows; r += k) {                                                   \
            k = BNFAST_MIN(rows - r, 4);                                                  \
            bnfast_widen_##H(x + r * W, stage, k * W);                                    \
            bnfast_shifted_colsums_f32(stage, k, W, fshift, s1, s2);                      \
        }                                                                                 \
    }                                                                                     \
    /* y = relu?(round(((float)x - m) * a + b [+ add])): one (m, a, b) for the run */     \
    static inline void bnfast_affine_scalar_##H(const T *x, const T *add, T *y, ptrdiff_t n,      \
                                         float m, float a, float b, int relu) {           \
        float xb[BNFAST_STAGE], ab[BNFAST_STAGE];                                         \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_STAGE);                                          \
            bnfast_widen_##H(x + i, xb, k);                                               \
            if (add != NULL) bnfast_widen_##H(add + i, ab, k);                            \
            bnfast_affine_scalar_f32(xb, add == NULL ? NULL : ab, xb, k, m, a, b, relu);  \
            bnfast_narrow_##H(xb, y + i, k);                                              \
        }                                                                                 \
    }                                                                                     \
    /* ... computed in double (a table float cannot carry) */                             \
    static inline void bnfast_affine_scalar_##H##d(const T *x, const T *add, T *y, ptrdiff_t n,   \
                                            double m, double a, double b, int relu) {     \
        float xb[BNFAST_STAGE], ab[BNFAST_STAGE];                                         \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_STAGE);                                          \
            bnfast_widen_##H(x + i, xb, k);                                               \
            if (add != NULL) bnfast_widen_##H(add + i, ab, k);                            \
            bnfast_affine_scalar_f32d(xb, add == NULL ? NULL : ab, xb, k, m, a, b, relu); \
            bnfast_narrow_##H(xb, y + i, k);                                              \
        }                                                                                 \
    }                                                                                     \
    BNFAST_DEFINE_HALF_TILED(H, T, , float, bnfast_affine_tiled_f32)                      \
    BNFAST_DEFINE_HALF_TILED(H, T, d, double, bnfast_affine_tiled_f32d)                   \
    /* ReLU mask bits !(y <= 0) of n values (bits of 8 values per byte) */                \
    static inline void bnfast_pack_positive_##H(const T *y, ptrdiff_t n, unsigned char *bits) {   \
        float buf[BNFAST_STAGE];                                                          \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_STAGE);                                          \
            bnfast_widen_##H(y + i, buf, k);                                              \
            bnfast_pack_positive_f32(buf, k, bits + i / 8);                               \
        }                                                                                 \
    }

/* The tiled affine (a channels-last tile of W coefficients, pieces of W values):
 * whole tiles per staged chunk when W fits, else chunks within each piece. */
#define BNFAST_DEFINE_HALF_TILED(H, T, SUFFIX, U, LEAF)                                   \
    static inline void bnfast_affine_tiled_##H##SUFFIX(const T *x, const T *add, T *y,            \
                                                ptrdiff_t total, ptrdiff_t W, const U *m, \
                                                const U *a, const U *b, int relu) {       \
        float xb[BNFAST_STAGE], ab[BNFAST_STAGE];                                         \
        ptrdiff_t i, j, k, piece;                                                         \
        ptrdiff_t span = W <= BNFAST_STAGE ? BNFAST_STAGE / W * W : W;                    \
        for (i = 0; i < total; i += span) {                                               \
            piece = BNFAST_MIN(total - i, span);                                          \
            for (j = 0; j < piece; j += k) {                                              \
                k = BNFAST_MIN(piece - j, BNFAST_STAGE);                                  \
                bnfast_widen_##H(x + i + j, xb, k);                                       \
                if (add != NULL) bnfast_widen_##H(add + i + j, ab, k);                    \
                if (W <= BNFAST_STAGE)                                                    \
                    LEAF(xb, add == NULL ? NULL : ab, xb, k, W, m, a, b, relu);           \
                else                                                                      \
                    LEAF(xb, add == NULL ? NULL : ab, xb, k, k, m + j, a + j, b + j, relu); \
                bnfast_narrow_##H(xb, y + i + j, k);                                      \
            }                                                                             \
        }                                                                                 \
    }

BNFAST_DEFINE_HALF_LEAVES(f16, bnfast_f16)
BNFAST_DEFINE_HALF_LEAVES(bf16, bnfast_bf16)

#endif /* BNFAST_HALF_LEAVES_H */
