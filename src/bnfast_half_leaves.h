/*
 * The forward's leaves for half-precision storage (float16, bfloat16), by
 * staging (bnfast_half.h): each one widens its input into float buffers, runs
 * the float32 leaf of the same job (bnfast_simd.h, bnfast_backward_simd.h) and
 * narrows what it writes.  One definition for both half types (the macro).
 * The exception is the hot pass, the normalise in float: staging costs two
 * more trips through L1 and a call per run (2x a copy for in-cache data), so
 * it converts in registers, 8 values at a time (bnfast_half.h's load8/store8:
 * F16C, or a shift for bfloat16), with the float32 leaf's arithmetic.
 *
 * Bits: the reductions stage whole calls' worth of values (a chunk of
 * <= BNFAST_REDUCE_STAGE), so half data gives exactly the sums of the same
 * values stored as float32.  (The training statistics widen in registers:
 * bnfast_stats.h.)  The elementwise leaves compute in
 * float (or double: the *d leaves, for tables float cannot carry) and round
 * once to the half type; chunking cannot change elementwise results.
 */
#ifndef BNFAST_HALF_LEAVES_H
#define BNFAST_HALF_LEAVES_H

#include "bnfast_half.h"
#include "bnfast_simd.h"
#include "bnfast_backward_simd.h"

/* Values per staged reduction call. */
#define BNFAST_REDUCE_STAGE 4096

#define BNFAST_MIN(a, b) ((a) < (b) ? (a) : (b))

#define BNFAST_DEFINE_HALF_LEAVES(H, T)                                                   \
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

/* ---------------------------------------------------------------------------
 * The normalise pass in float, converting in registers:
 *   y = round(relu?(((float)x - m) * a + b [+ (float)add]))
 * with the float32 leaf's operations in its order (no FMA), so the result is
 * the float32 leaf's on the widened values, rounded once to the half type.
 * SCALAR: one (m, a, b); TILED: per element of a W-long tile, in pieces of W.
 * Eight values at a time with load8/store8, the tail with the scalar
 * conversions; the epilogue branches are hoisted out of the loops.
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
#define BNFAST_H8_RELU(v) ((bnfast_h8f)((bnfast_h8i)(v) & ~((v) < 0.0f)))
#define BNFAST_H8_COEF(p, i) (*(const bnfast_h8f *)((p) + (i)))
/* Values [0, n8) of the run, MV/AV/BV giving the coefficient vectors at i. */
#define BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, MV, AV, BV)                           \
    if (add == NULL && !relu) {                                                          \
        for (i = 0; i < n8; i += 8) STORE8(y + i, (LOAD8(x + i) - MV) * AV + BV);        \
    } else if (add == NULL) {                                                            \
        for (i = 0; i < n8; i += 8)                                                      \
            STORE8(y + i, BNFAST_H8_RELU((LOAD8(x + i) - MV) * AV + BV));                \
    } else if (!relu) {                                                                  \
        for (i = 0; i < n8; i += 8)                                                      \
            STORE8(y + i, (LOAD8(x + i) - MV) * AV + BV + LOAD8(add + i));               \
    } else {                                                                             \
        for (i = 0; i < n8; i += 8)                                                      \
            STORE8(y + i, BNFAST_H8_RELU((LOAD8(x + i) - MV) * AV + BV + LOAD8(add + i))); \
    }
#define BNFAST_HALF_N8(n) ((n) - (n) % 8)
#else
#define BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, MV, AV, BV)
#define BNFAST_HALF_N8(n) 0
#endif

/* Values [n8, n), one at a time. */
#define BNFAST_HALF_AFFINE_TAIL(TO_F, FROM_F, MS, AS, BS)                               \
    for (i = n8; i < n; i++) {                                                           \
        float v_ = (TO_F(x[i]) - MS) * AS + BS;                                          \
        if (add != NULL) v_ = v_ + TO_F(add[i]);                                         \
        if (relu) v_ = v_ < 0.0f ? 0.0f : v_;                                            \
        y[i] = FROM_F(v_);                                                               \
    }

#define BNFAST_DEFINE_HALF_AFFINE(H, T, VARIANT, ATTR, LOAD8, STORE8)                    \
    ATTR static void bnfast_affine_scalar_##H##_##VARIANT(const T *x, const T *add, T *y, \
                                                         ptrdiff_t n, float m, float a,  \
                                                         float b, int relu) {            \
        ptrdiff_t i, n8 = BNFAST_HALF_N8(n);                                             \
        BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, m, a, b)                               \
        BNFAST_HALF_AFFINE_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,    \
                                m, a, b)                                                 \
    }                                                                                    \
    ATTR static void bnfast_affine_tiled_##H##_##VARIANT(const T *x0, const T *add0,     \
                                                        T *y0, ptrdiff_t total,          \
                                                        ptrdiff_t W, const float *m,     \
                                                        const float *a, const float *b,  \
                                                        int relu) {                      \
        ptrdiff_t i0, i, n, n8;                                                          \
        for (i0 = 0; i0 < total; i0 += W) {                                              \
            const T *x = x0 + i0;                                                        \
            const T *add = add0 == NULL ? NULL : add0 + i0;                              \
            T *y = y0 + i0;                                                              \
            n = total - i0 < W ? total - i0 : W;                                         \
            n8 = BNFAST_HALF_N8(n);                                                      \
            BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, BNFAST_H8_COEF(m, i),              \
                                       BNFAST_H8_COEF(a, i), BNFAST_H8_COEF(b, i))       \
            BNFAST_HALF_AFFINE_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,    \
                                    m[i], a[i], b[i])                                    \
        }                                                                                \
    }

#define BNFAST_DEFINE_HALF_AFFINE_ALL(H, T, VARIANT, ATTR, LOAD8, STORE8)                \
    BNFAST_DEFINE_HALF_AFFINE(H, T, VARIANT, ATTR, LOAD8, STORE8)                        \
    BNFAST_DEFINE_AFFINE_RUNS(bnfast_affine_runs_##H##_##VARIANT, T, ATTR,               \
                              bnfast_affine_scalar_##H##_##VARIANT)

BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, base, , bnfast_load8_f16, bnfast_store8_f16)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, base, , bnfast_load8_bf16, bnfast_store8_bf16)
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                              bnfast_store8_f16_f16c)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, avx2, BNFAST_AVX2_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_store8_bf16_avx2)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, hw, BNFAST_BF16_HW_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_store8_bf16_hw)
/* Streaming twins (bnfast_half.h's stream8: the same rounding, non-temporal
 * stores), for outputs far beyond the caches.  As bnfast_simd.h's float32 ones:
 * the caller streams only pieces that start 16-byte aligned and span whole
 * 16-byte groups (8 values), so the plain-stored tail is at most the array's
 * last values, and calls bnfast_nt_fence() after a block. */
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, f16c_nt, BNFAST_F16C_TARGET,
                              bnfast_load8_f16_f16c, bnfast_stream8_f16_f16c)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, avx2_nt, BNFAST_AVX2_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_stream8_bf16_avx2)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, hw_nt, BNFAST_BF16_HW_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_stream8_bf16_hw)
#endif

/* The leaves, picked at run time: NT is empty (cached stores) or _nt (streamed);
 * a CPU without the vector store, and the portable build, get the portable
 * leaves, which store plainly (the PICK macros drop the others' names there). */
#define BNFAST_DEFINE_HALF_AFFINE_PICKS(NT)                                              \
    static inline void bnfast_affine_runs_f16##NT(                                       \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t runs,   \
            ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,       \
            const float *b, int relu) {                                                  \
        BNFAST_PICK_F16C(bnfast_affine_runs_f16_base, bnfast_affine_runs_f16_f16c##NT)(  \
            x, add, y, runs, S, c, C, m, a, b, relu);                                    \
    }                                                                                    \
    static inline void bnfast_affine_runs_bf16##NT(                                      \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t runs, \
            ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,       \
            const float *b, int relu) {                                                  \
        BNFAST_PICK_BF16(bnfast_affine_runs_bf16_base, bnfast_affine_runs_bf16_avx2##NT, \
                         bnfast_affine_runs_bf16_hw##NT)(x, add, y, runs, S, c, C, m, a, b, relu); \
    }                                                                                    \
    static inline void bnfast_affine_scalar_f16##NT(                                     \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t n,      \
            float m, float a, float b, int relu) {                                       \
        BNFAST_PICK_F16C(bnfast_affine_scalar_f16_base, bnfast_affine_scalar_f16_f16c##NT)( \
            x, add, y, n, m, a, b, relu);                                                \
    }                                                                                    \
    static inline void bnfast_affine_tiled_f16##NT(                                      \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t n,      \
            ptrdiff_t W, const float *m, const float *a, const float *b, int relu) {     \
        BNFAST_PICK_F16C(bnfast_affine_tiled_f16_base, bnfast_affine_tiled_f16_f16c##NT)( \
            x, add, y, n, W, m, a, b, relu);                                             \
    }                                                                                    \
    static inline void bnfast_affine_scalar_bf16##NT(                                    \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t n,   \
            float m, float a, float b, int relu) {                                       \
        BNFAST_PICK_BF16(bnfast_affine_scalar_bf16_base, bnfast_affine_scalar_bf16_avx2##NT, \
                         bnfast_affine_scalar_bf16_hw##NT)(x, add, y, n, m, a, b, relu); \
    }                                                                                    \
    static inline void bnfast_affine_tiled_bf16##NT(                                     \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t n,   \
            ptrdiff_t W, const float *m, const float *a, const float *b, int relu) {     \
        BNFAST_PICK_BF16(bnfast_affine_tiled_bf16_base, bnfast_affine_tiled_bf16_avx2##NT, \
                         bnfast_affine_tiled_bf16_hw##NT)(x, add, y, n, W, m, a, b, relu); \
    }
BNFAST_DEFINE_HALF_AFFINE_PICKS()
BNFAST_DEFINE_HALF_AFFINE_PICKS(_nt)

#endif /* BNFAST_HALF_LEAVES_H */
