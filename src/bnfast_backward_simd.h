/*
 * SIMD leaves of the backward pass (see src/_backward.pyx), on top of the
 * shared machinery of bnfast_simd.h (vector types, 8-lane discipline, AVX2
 * run-time dispatch).
 *
 *   centered_coldot   per-column sum(y) and sum((x - shift) * y) of a row-major
 *                     block (channels-last pass 1); double accumulation, fixed
 *                     order, no FMA, so every variant gives the same bits.
 *   mask_select       out = ReLU-mask bit ? y : 0, the mask packed 8 per byte
 *                     (little bit order) starting at any bit position.
 *   pack_positive     the mask itself: bit i = !(y[i] <= 0), as torch's
 *                     threshold_backward (NaN passes the gradient).
 *   grad_* / scale_*  the elementwise dx in the storage type, one (m, a, b, d)
 *                     per run (SCALAR, channels-first) or per element of a
 *                     tile (TILED, channels-last):
 *                       training  dx = (dy * a + (x - m) * b) + d
 *                       eval      dx = dy * a
 *
 * Kept in a header of its own so the backward work does not edit the forward's
 * leaves; it relies only on bnfast_simd.h's public macros.
 */
#ifndef BNFAST_BACKWARD_SIMD_H
#define BNFAST_BACKWARD_SIMD_H

#include <stddef.h>
#include <string.h>

#include "bnfast_simd.h"

#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#include <emmintrin.h>
#define BNFAST_HAVE_SSE2_PACK 1
#else
#define BNFAST_HAVE_SSE2_PACK 0
#endif

#if defined(__clang__)
#define BNFAST_BWD_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define BNFAST_BWD_IVDEP _Pragma("GCC ivdep")
#else
#define BNFAST_BWD_IVDEP
#endif

/* Bit (pos) of a little-bit-order packed mask. */
#define BNFAST_BIT(bits, pos) (((bits)[(pos) >> 3] >> ((pos) & 7)) & 1)

/* ---------------------------------------------------------------------------
 * centered_coldot: sy[j] += sum_r y[r*W + j],  sxy[j] += sum_r (x[r*W + j] - shift[j]) * y[r*W + j]
 * Rows four at a time (their terms summed in registers, then one update of
 * sy/sxy, which stay in L1), leftover rows one at a time; the scalar column
 * tail uses the same expression tree, so the result depends on the shape only.
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
#define BNFAST_DEFINE_CENTERED_COLDOT(NAME, T, ATTR)                                     \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t rows, ptrdiff_t W,           \
                          const double *shift, double *sy, double *sxy) {                \
        ptrdiff_t r = 0, j, j4 = W - W % 4;                                              \
        double k, e0, e1, e2, e3, f0, f1, f2, f3;                                        \
        for (; r + 4 <= rows; r += 4) {                                                  \
            const T *x0 = x + r * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;           \
            const T *y0 = y + r * W, *y1 = y0 + W, *y2 = y1 + W, *y3 = y2 + W;           \
            for (j = 0; j < j4; j += 4) {                                                \
                bnfast_v4d kv = *(const bnfast_v4d *)(shift + j);                        \
                bnfast_v4d v0 = BNFAST_LOAD4(T, y0 + j), v1 = BNFAST_LOAD4(T, y1 + j);   \
                bnfast_v4d v2 = BNFAST_LOAD4(T, y2 + j), v3 = BNFAST_LOAD4(T, y3 + j);   \
                bnfast_v4d d0 = BNFAST_LOAD4(T, x0 + j) - kv;                            \
                bnfast_v4d d1 = BNFAST_LOAD4(T, x1 + j) - kv;                            \
                bnfast_v4d d2 = BNFAST_LOAD4(T, x2 + j) - kv;                            \
                bnfast_v4d d3 = BNFAST_LOAD4(T, x3 + j) - kv;                            \
                *(bnfast_v4d *)(sy + j) += (v0 + v1) + (v2 + v3);                        \
                *(bnfast_v4d *)(sxy + j) += (d0 * v0 + d1 * v1) + (d2 * v2 + d3 * v3);   \
            }                                                                            \
            for (j = j4; j < W; j++) {                                                   \
                k = shift[j];                                                            \
                f0 = (double)y0[j]; f1 = (double)y1[j];                                  \
                f2 = (double)y2[j]; f3 = (double)y3[j];                                  \
                e0 = (double)x0[j] - k; e1 = (double)x1[j] - k;                          \
                e2 = (double)x2[j] - k; e3 = (double)x3[j] - k;                          \
                sy[j] += (f0 + f1) + (f2 + f3);                                          \
                sxy[j] += (e0 * f0 + e1 * f1) + (e2 * f2 + e3 * f3);                     \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            const T *xp = x + r * W, *yp = y + r * W;                                    \
            for (j = 0; j < W; j++) {                                                    \
                f0 = (double)yp[j]; sy[j] += f0; sxy[j] += ((double)xp[j] - shift[j]) * f0; \
            }                                                                            \
        }                                                                                \
    }
#else
#define BNFAST_DEFINE_CENTERED_COLDOT(NAME, T, ATTR)                                     \
    static void NAME(const T *x, const T *y, ptrdiff_t rows, ptrdiff_t W,                \
                     const double *shift, double *sy, double *sxy) {                     \
        ptrdiff_t r = 0, j;                                                              \
        double k, e0, e1, e2, e3, f0, f1, f2, f3;                                        \
        for (; r + 4 <= rows; r += 4) {                                                  \
            const T *x0 = x + r * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;           \
            const T *y0 = y + r * W, *y1 = y0 + W, *y2 = y1 + W, *y3 = y2 + W;           \
            for (j = 0; j < W; j++) {                                                    \
                k = shift[j];                                                            \
                f0 = (double)y0[j]; f1 = (double)y1[j];                                  \
                f2 = (double)y2[j]; f3 = (double)y3[j];                                  \
                e0 = (double)x0[j] - k; e1 = (double)x1[j] - k;                          \
                e2 = (double)x2[j] - k; e3 = (double)x3[j] - k;                          \
                sy[j] += (f0 + f1) + (f2 + f3);                                          \
                sxy[j] += (e0 * f0 + e1 * f1) + (e2 * f2 + e3 * f3);                     \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            const T *xp = x + r * W, *yp = y + r * W;                                    \
            for (j = 0; j < W; j++) {                                                    \
                f0 = (double)yp[j]; sy[j] += f0; sxy[j] += ((double)xp[j] - shift[j]) * f0; \
            }                                                                            \
        }                                                                                \
    }
#endif

/* ---------------------------------------------------------------------------
 * mask_select: out[i] = bit (pos + i) ? y[i] : 0.  A select, not a product:
 * a masked-out NaN or Inf gradient gives 0, as torch's threshold_backward.
 * out may be y itself.
 * ------------------------------------------------------------------------- */
#define BNFAST_MASK_SELECT_SCALAR(T, lo, hi)                                             \
    for (i = (lo); i < (hi); i++) {                                                      \
        out[i] = BNFAST_BIT(bits, pos + i) ? y[i] : (T)0;                                \
    }

#if BNFAST_VECTOR_EXT
typedef float bnfast_v8f __attribute__((vector_size(32), aligned(4)));
typedef int bnfast_v8i __attribute__((vector_size(32), aligned(4)));
typedef long long bnfast_v4l __attribute__((vector_size(32), aligned(8)));
typedef double bnfast_v4du __attribute__((vector_size(32), aligned(8)));

#define BNFAST_DEFINE_MASK_SELECT_F32(NAME, ATTR)                                        \
    ATTR static void NAME(const float *y, const unsigned char *bits, ptrdiff_t pos,      \
                          ptrdiff_t n, float *out) {                                     \
        ptrdiff_t i, head = (8 - (pos & 7)) & 7;                                         \
        const bnfast_v8i lane = {1, 2, 4, 8, 16, 32, 64, 128};                           \
        if (head > n) head = n;                                                          \
        BNFAST_MASK_SELECT_SCALAR(float, 0, head)                                        \
        for (i = head; i + 8 <= n; i += 8) {                                             \
            int b = bits[(pos + i) >> 3];                                                \
            bnfast_v8i sel = (bnfast_v8i)(((bnfast_v8i){b, b, b, b, b, b, b, b} & lane) != 0);          \
            bnfast_v8i v = (bnfast_v8i)(*(const bnfast_v8f *)(y + i));                   \
            *(bnfast_v8f *)(out + i) = (bnfast_v8f)(v & sel);                            \
        }                                                                                \
        BNFAST_MASK_SELECT_SCALAR(float, i, n)                                           \
    }

#define BNFAST_DEFINE_MASK_SELECT_F64(NAME, ATTR)                                        \
    ATTR static void NAME(const double *y, const unsigned char *bits, ptrdiff_t pos,     \
                          ptrdiff_t n, double *out) {                                    \
        ptrdiff_t i, head = (8 - (pos & 7)) & 7;                                         \
        const bnfast_v4l lane0 = {1, 2, 4, 8}, lane1 = {16, 32, 64, 128};                \
        if (head > n) head = n;                                                          \
        BNFAST_MASK_SELECT_SCALAR(double, 0, head)                                       \
        for (i = head; i + 8 <= n; i += 8) {                                             \
            long long b = bits[(pos + i) >> 3];                                          \
            bnfast_v4l bv = {b, b, b, b};                                                \
            bnfast_v4l v0 = (bnfast_v4l)(*(const bnfast_v4du *)(y + i));                 \
            bnfast_v4l v1 = (bnfast_v4l)(*(const bnfast_v4du *)(y + i + 4));             \
            *(bnfast_v4du *)(out + i) = (bnfast_v4du)(v0 & (bnfast_v4l)((bv & lane0) != 0));         \
            *(bnfast_v4du *)(out + i + 4) = (bnfast_v4du)(v1 & (bnfast_v4l)((bv & lane1) != 0));     \
        }                                                                                \
        BNFAST_MASK_SELECT_SCALAR(double, i, n)                                          \
    }
#else
#define BNFAST_DEFINE_MASK_SELECT_F32(NAME, ATTR)                                        \
    static void NAME(const float *y, const unsigned char *bits, ptrdiff_t pos,           \
                     ptrdiff_t n, float *out) {                                          \
        ptrdiff_t i;                                                                     \
        BNFAST_MASK_SELECT_SCALAR(float, 0, n)                                           \
    }
#define BNFAST_DEFINE_MASK_SELECT_F64(NAME, ATTR)                                        \
    static void NAME(const double *y, const unsigned char *bits, ptrdiff_t pos,          \
                     ptrdiff_t n, double *out) {                                         \
        ptrdiff_t i;                                                                     \
        BNFAST_MASK_SELECT_SCALAR(double, 0, n)                                          \
    }
#endif

/* ---------------------------------------------------------------------------
 * pack_positive: bits[i / 8] bit (i % 8) = !(y[i] <= 0) for i < n; the last
 * partial byte is written whole (its unused bits 0).  SSE2 compare + movemask
 * on x86 (cmpnle is true for NaN), a plain loop elsewhere.
 * ------------------------------------------------------------------------- */
#define BNFAST_PACK_TAIL(T)                                                              \
    if (i < n) {                                                                         \
        unsigned b = 0;                                                                  \
        ptrdiff_t j;                                                                     \
        for (j = 0; i + j < n; j++) b |= (unsigned)(!(y[i + j] <= (T)0)) << j;           \
        bits[i >> 3] = (unsigned char)b;                                                 \
    }

#if BNFAST_HAVE_SSE2_PACK
static void bnfast_pack_positive_f32(const float *y, ptrdiff_t n, unsigned char *bits) {
    const __m128 z = _mm_setzero_ps();
    ptrdiff_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        int lo = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(y + i), z));
        int hi = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(y + i + 4), z));
        bits[i >> 3] = (unsigned char)(lo | (hi << 4));
    }
    BNFAST_PACK_TAIL(float)
}
static void bnfast_pack_positive_f64(const double *y, ptrdiff_t n, unsigned char *bits) {
    const __m128d z = _mm_setzero_pd();
    ptrdiff_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        int b0 = _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(y + i), z));
        int b1 = _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(y + i + 2), z));
        int b2 = _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(y + i + 4), z));
        int b3 = _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(y + i + 6), z));
        bits[i >> 3] = (unsigned char)(b0 | (b1 << 2) | (b2 << 4) | (b3 << 6));
    }
    BNFAST_PACK_TAIL(double)
}
#else
#define BNFAST_DEFINE_PACK_POSITIVE(NAME, T)                                             \
    static void NAME(const T *y, ptrdiff_t n, unsigned char *bits) {                     \
        ptrdiff_t i, j;                                                                  \
        for (i = 0; i + 8 <= n; i += 8) {                                                \
            unsigned b = 0;                                                              \
            for (j = 0; j < 8; j++) b |= (unsigned)(!(y[i + j] <= (T)0)) << j;           \
            bits[i >> 3] = (unsigned char)b;                                             \
        }                                                                                \
        BNFAST_PACK_TAIL(T)                                                              \
    }
BNFAST_DEFINE_PACK_POSITIVE(bnfast_pack_positive_f32, float)
BNFAST_DEFINE_PACK_POSITIVE(bnfast_pack_positive_f64, double)
#endif

/* ---------------------------------------------------------------------------
 * Elementwise dx in the storage type (plain loops: GCC vectorises them).
 * ivdep: dx may be dy itself (same index, no loop-carried dependence).
 * ------------------------------------------------------------------------- */
#define BNFAST_DEFINE_GRAD_SCALAR(NAME, T, ATTR)                                         \
    ATTR static void NAME(const T *x, const T *dy, T *dx, ptrdiff_t n,                   \
                          T m, T a, T b, T d) {                                          \
        ptrdiff_t i;                                                                     \
        BNFAST_BWD_IVDEP for (i = 0; i < n; i++) {                                       \
            dx[i] = (dy[i] * a + (x[i] - m) * b) + d;                                    \
        }                                                                                \
    }
#define BNFAST_DEFINE_GRAD_TILED(NAME, T, ATTR)                                          \
    ATTR static void NAME(const T *x, const T *dy, T *dx, ptrdiff_t n,                   \
                          const T *m, const T *a, const T *b, const T *d) {              \
        ptrdiff_t i;                                                                     \
        BNFAST_BWD_IVDEP for (i = 0; i < n; i++) {                                       \
            dx[i] = (dy[i] * a[i] + (x[i] - m[i]) * b[i]) + d[i];                        \
        }                                                                                \
    }
#define BNFAST_DEFINE_SCALE_SCALAR(NAME, T, ATTR)                                        \
    ATTR static void NAME(const T *dy, T *dx, ptrdiff_t n, T a) {                        \
        ptrdiff_t i;                                                                     \
        BNFAST_BWD_IVDEP for (i = 0; i < n; i++) { dx[i] = dy[i] * a; }                  \
    }
#define BNFAST_DEFINE_SCALE_TILED(NAME, T, ATTR)                                         \
    ATTR static void NAME(const T *dy, T *dx, ptrdiff_t n, const T *a) {                 \
        ptrdiff_t i;                                                                     \
        BNFAST_BWD_IVDEP for (i = 0; i < n; i++) { dx[i] = dy[i] * a[i]; }               \
    }

#define BNFAST_BWD_LEAVES(SUFFIX, ATTR)                                                  \
    BNFAST_DEFINE_CENTERED_COLDOT(bnfast_centered_coldot_f32_##SUFFIX, float, ATTR)      \
    BNFAST_DEFINE_CENTERED_COLDOT(bnfast_centered_coldot_f64_##SUFFIX, double, ATTR)     \
    BNFAST_DEFINE_MASK_SELECT_F32(bnfast_mask_select_f32_##SUFFIX, ATTR)                 \
    BNFAST_DEFINE_MASK_SELECT_F64(bnfast_mask_select_f64_##SUFFIX, ATTR)                 \
    BNFAST_DEFINE_GRAD_SCALAR(bnfast_grad_scalar_f32_##SUFFIX, float, ATTR)              \
    BNFAST_DEFINE_GRAD_SCALAR(bnfast_grad_scalar_f64_##SUFFIX, double, ATTR)             \
    BNFAST_DEFINE_GRAD_TILED(bnfast_grad_tiled_f32_##SUFFIX, float, ATTR)                \
    BNFAST_DEFINE_GRAD_TILED(bnfast_grad_tiled_f64_##SUFFIX, double, ATTR)               \
    BNFAST_DEFINE_SCALE_SCALAR(bnfast_scale_scalar_f32_##SUFFIX, float, ATTR)            \
    BNFAST_DEFINE_SCALE_SCALAR(bnfast_scale_scalar_f64_##SUFFIX, double, ATTR)           \
    BNFAST_DEFINE_SCALE_TILED(bnfast_scale_tiled_f32_##SUFFIX, float, ATTR)              \
    BNFAST_DEFINE_SCALE_TILED(bnfast_scale_tiled_f64_##SUFFIX, double, ATTR)

BNFAST_BWD_LEAVES(base, )
#if BNFAST_DISPATCH_AVX2
BNFAST_BWD_LEAVES(avx2, BNFAST_AVX2_TARGET)
#define BNFAST_BWD_PICK(name) BNFAST_PICK(name##_base, name##_avx2)
#else
#define BNFAST_BWD_PICK(name) name##_base
#endif

static inline void bnfast_centered_coldot_f32(const float *x, const float *y, ptrdiff_t rows,
                                              ptrdiff_t W, const double *shift, double *sy,
                                              double *sxy) {
    BNFAST_BWD_PICK(bnfast_centered_coldot_f32)(x, y, rows, W, shift, sy, sxy);
}
static inline void bnfast_centered_coldot_f64(const double *x, const double *y, ptrdiff_t rows,
                                              ptrdiff_t W, const double *shift, double *sy,
                                              double *sxy) {
    BNFAST_BWD_PICK(bnfast_centered_coldot_f64)(x, y, rows, W, shift, sy, sxy);
}
static inline void bnfast_mask_select_f32(const float *y, const unsigned char *bits,
                                          ptrdiff_t pos, ptrdiff_t n, float *out) {
    BNFAST_BWD_PICK(bnfast_mask_select_f32)(y, bits, pos, n, out);
}
static inline void bnfast_mask_select_f64(const double *y, const unsigned char *bits,
                                          ptrdiff_t pos, ptrdiff_t n, double *out) {
    BNFAST_BWD_PICK(bnfast_mask_select_f64)(y, bits, pos, n, out);
}
static inline void bnfast_grad_scalar_f32(const float *x, const float *dy, float *dx, ptrdiff_t n,
                                          float m, float a, float b, float d) {
    BNFAST_BWD_PICK(bnfast_grad_scalar_f32)(x, dy, dx, n, m, a, b, d);
}
static inline void bnfast_grad_scalar_f64(const double *x, const double *dy, double *dx,
                                          ptrdiff_t n, double m, double a, double b, double d) {
    BNFAST_BWD_PICK(bnfast_grad_scalar_f64)(x, dy, dx, n, m, a, b, d);
}
static inline void bnfast_grad_tiled_f32(const float *x, const float *dy, float *dx, ptrdiff_t n,
                                         const float *m, const float *a, const float *b,
                                         const float *d) {
    BNFAST_BWD_PICK(bnfast_grad_tiled_f32)(x, dy, dx, n, m, a, b, d);
}
static inline void bnfast_grad_tiled_f64(const double *x, const double *dy, double *dx,
                                         ptrdiff_t n, const double *m, const double *a,
                                         const double *b, const double *d) {
    BNFAST_BWD_PICK(bnfast_grad_tiled_f64)(x, dy, dx, n, m, a, b, d);
}
static inline void bnfast_scale_scalar_f32(const float *dy, float *dx, ptrdiff_t n, float a) {
    BNFAST_BWD_PICK(bnfast_scale_scalar_f32)(dy, dx, n, a);
}
static inline void bnfast_scale_scalar_f64(const double *dy, double *dx, ptrdiff_t n, double a) {
    BNFAST_BWD_PICK(bnfast_scale_scalar_f64)(dy, dx, n, a);
}
static inline void bnfast_scale_tiled_f32(const float *dy, float *dx, ptrdiff_t n, const float *a) {
    BNFAST_BWD_PICK(bnfast_scale_tiled_f32)(dy, dx, n, a);
}
static inline void bnfast_scale_tiled_f64(const double *dy, double *dx, ptrdiff_t n,
                                          const double *a) {
    BNFAST_BWD_PICK(bnfast_scale_tiled_f64)(dy, dx, n, a);
}

#endif /* BNFAST_BACKWARD_SIMD_H */
