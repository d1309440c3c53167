/*
 * SIMD leaves of the backward pass (see src/_backward.pyx), on top of the
 * shared machinery of bnfast_simd.h (vector types, 8-lane discipline, AVX2
 * run-time dispatch).
 *
 *   centered_coldot   per-column sum(y) and sum((x - shift) * y) of a row-major
 *                     block (channels-last pass 1); double accumulation, fixed
 *                     order, no FMA, so every variant gives the same bits.
 *   *_masked          the same with the ReLU mask applied on the fly (fused
 *                     variant); the mask is packed 8 per byte, little bit order.
 *   pack_positive     the mask itself: bit i = !(y[i] <= 0), as torch's
 *                     threshold_backward (NaN passes the gradient).
 *   grad_* / scale_*  the elementwise dx in the storage type, one (m, a, b, d)
 *                     per run (SCALAR, channels-first) or per element of a
 *                     tile (TILED, channels-last), m and d the zeros of the
 *                     x and dy terms (bnfast_table.h):
 *                       training  dx = (dy - d) * a + (x - m) * b
 *                       eval      dx = dy * a
 *
 * Kept in a header of its own so the backward work does not edit the forward's
 * leaves; it relies only on bnfast_simd.h's public macros.
 */
#ifndef BNFAST_BACKWARD_SIMD_H
#define BNFAST_BACKWARD_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bnfast_simd.h"

#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#include <emmintrin.h>
#define BNFAST_HAVE_SSE2_PACK 1
#else
#define BNFAST_HAVE_SSE2_PACK 0
#endif

/* Loops below use bnfast_simd.h's BNFAST_IVDEP. */

/* Bit (pos) of a little-bit-order packed mask. */
#define BNFAST_BIT(bits, pos) (((bits)[(pos) >> 3] >> ((pos) & 7)) & 1)

/* ---------------------------------------------------------------------------
 * centered_coldot: per column j < W of rows `stride` values apart (a column tile
 * of wider rows when stride > W), with o = r*stride + j:
 *     sy[j] += sum_r y[o],  sxy[j] += sum_r (x[o] - shift[j]) * y[o]
 * Rows four at a time (their terms summed in registers, then one update of
 * sy/sxy, which stay in L1) -- but only where four rows do not interleave
 * streams inside one 4 KiB page: for rows of 512 B to 2 KiB that confuses the
 * hardware prefetchers and runs at half speed (measured: W = 256 float32,
 * 4.6 ms grouped vs 3.0 ms row by row for 25 MB).  Other rows go one at a
 * time.  The grouping depends on the stride and the type only, and the scalar
 * column tail uses the same expression tree, so the result depends on the shape
 * only.
 * ------------------------------------------------------------------------- */
/* BNFAST_ROW_GROUP(T, W): see bnfast_simd.h */
/* A group's four rows, stride apart from `first`: pointers p0..p3 to T, or
 * (mask) positions p0..p3. */
#define BNFAST_ROWS4(T, p, first, stride)                                                \
    const T *p##0 = (first), *p##1 = p##0 + (stride), *p##2 = p##1 + (stride),           \
            *p##3 = p##2 + (stride)
#define BNFAST_POS4(p, first, stride)                                                    \
    ptrdiff_t p##0 = (first), p##1 = p##0 + (stride), p##2 = p##1 + (stride),            \
              p##3 = p##2 + (stride)
/* The vector part: columns [0, j4) of four rows (COLDOT_VEC4) or of one row
 * (COLDOT_VEC1); without vector extensions j4 is 0 and they vanish, and the
 * scalar loops below cover every column in the same order. */
/* Load kinds (K): how a leaf reads its storage type.  BNFAST_LD4_<K>(p): four
 * values at p as doubles; BNFAST_TOD_<K>(v): one value as a double.  The float
 * and double kinds are plain conversions; the half kinds (bnfast_backward_half.h)
 * widen through float, exactly, so a leaf instantiated for half data computes
 * what the float32 leaf computes on the same values stored as float32. */
#define BNFAST_TOD_float(v) ((double)(v))
#define BNFAST_TOD_double(v) ((double)(v))
#if BNFAST_VECTOR_EXT
#define BNFAST_LD4_float(p) BNFAST_LOAD4(float, p)
#define BNFAST_LD4_double(p) BNFAST_LOAD4(double, p)
/* Eight values at p as two v4d (LO: p[0..3], HI: p[4..7]): one conversion of
 * eight halves where a kind has it (bnfast_backward_half.h). */
#define BNFAST_LD8_float(p, LO, HI) \
    ((LO) = BNFAST_LOAD4(float, p), (HI) = BNFAST_LOAD4(float, (p) + 4))
#define BNFAST_LD8_double(p, LO, HI) \
    ((LO) = BNFAST_LOAD4(double, p), (HI) = BNFAST_LOAD4(double, (p) + 4))
#define BNFAST_COLDOT_VECTOR_COLUMNS(W) ((W) - (W) % 4)
/* Columns [0, j4) of four rows; the half kinds (BNFAST_WIDE8_<K> 1) take eight
 * columns a step (one widening of eight halves), then four: each column's
 * arithmetic is the same either way. */
#define BNFAST_WIDE8_float 0
#define BNFAST_WIDE8_double 0
/* Four-column steps that prefetch (a line at a time): float and double; the
 * half kinds prefetch in their eight-column steps. */
#define BNFAST_PF4_float 1
#define BNFAST_PF4_double 1
#define BNFAST_COLDOT4_TERMS(K, j, LD)                                                   \
    {                                                                                    \
        bnfast_v4d kv = *(const bnfast_v4d *)(shift + (j));                              \
        *(bnfast_v4d *)(sy + (j)) += (v0 + v1) + (v2 + v3);                              \
        *(bnfast_v4d *)(sxy + (j)) +=                                                    \
            ((d0 - kv) * v0 + (d1 - kv) * v1) + ((d2 - kv) * v2 + (d3 - kv) * v3);       \
    }
/* The next group's rows (BNFAST_PF_DIST(W) values ahead), a line at a time:
 * four rows of under 4 KiB share pages, and the hardware prefetchers follow
 * such streams badly (measured, W = 1024 bfloat16 from memory: 1.32 -> 1.01
 * cycles a value; float32 and double since, rows under 4 KiB: channels-last
 * float32 backward with the caches emptied, 2 threads, 16x64x28x28 ~670 ->
 * ~510 us, 16x512x4x4 ~200 -> ~125; from the caches unchanged, but rows of
 * 4 KiB and more lost 4-9%, (512, 2048) 438 -> 480 us: none there). */
#ifndef BNFAST_PF_DIST
#define BNFAST_PF_DIST(W) (4 * (W))
#endif
#define BNFAST_COLDOT_PREFETCH(o)                                                        \
    {                                                                                    \
        __builtin_prefetch(x0 + (o)); __builtin_prefetch(x1 + (o));                      \
        __builtin_prefetch(x2 + (o)); __builtin_prefetch(x3 + (o));                      \
        __builtin_prefetch(y0 + (o)); __builtin_prefetch(y1 + (o));                      \
        __builtin_prefetch(y2 + (o)); __builtin_prefetch(y3 + (o));                      \
    }
/* Columns j..j+3 of four rows, as doubles. */
#define BNFAST_COLDOT4_STEP(K)                                                           \
    {                                                                                    \
        bnfast_v4d v0 = BNFAST_LD4_##K(y0 + j), v1 = BNFAST_LD4_##K(y1 + j);             \
        bnfast_v4d v2 = BNFAST_LD4_##K(y2 + j), v3 = BNFAST_LD4_##K(y3 + j);             \
        bnfast_v4d d0 = BNFAST_LD4_##K(x0 + j), d1 = BNFAST_LD4_##K(x1 + j);             \
        bnfast_v4d d2 = BNFAST_LD4_##K(x2 + j), d3 = BNFAST_LD4_##K(x3 + j);             \
        BNFAST_COLDOT4_TERMS(K, j, 0)                                                    \
    }
#define BNFAST_COLDOT_VEC4(K)                                                            \
    j = 0;                                                                               \
    if (BNFAST_WIDE8_##K) {                                                              \
        for (; j + 8 <= j4; j += 8) {                                                    \
            bnfast_v4d v0, v1, v2, v3, d0, d1, d2, d3, V0, V1, V2, V3, D0, D1, D2, D3;   \
            if (!(j & 31)) BNFAST_COLDOT_PREFETCH(j + BNFAST_PF_DIST(stride))            \
            BNFAST_LD8_##K(y0 + j, v0, V0); BNFAST_LD8_##K(y1 + j, v1, V1);              \
            BNFAST_LD8_##K(y2 + j, v2, V2); BNFAST_LD8_##K(y3 + j, v3, V3);              \
            BNFAST_LD8_##K(x0 + j, d0, D0); BNFAST_LD8_##K(x1 + j, d1, D1);              \
            BNFAST_LD8_##K(x2 + j, d2, D2); BNFAST_LD8_##K(x3 + j, d3, D3);              \
            BNFAST_COLDOT4_TERMS(K, j, 0)                                                \
            v0 = V0; v1 = V1; v2 = V2; v3 = V3; d0 = D0; d1 = D1; d2 = D2; d3 = D3;      \
            BNFAST_COLDOT4_TERMS(K, j + 4, 0)                                            \
        }                                                                                \
    }                                                                                    \
    if (BNFAST_PF4_##K && BNFAST_SHARED_PAGES(*x0, stride)) {                            \
        for (; j < j4; j += 4) {                                                         \
            if (!((j * (ptrdiff_t)sizeof(*x0)) & 63))                                    \
                BNFAST_COLDOT_PREFETCH(j + BNFAST_PF_DIST(stride))                       \
            BNFAST_COLDOT4_STEP(K)                                                       \
        }                                                                                \
    } else {  /* (a loop of its own: a test a step cost wide rows 3-5%) */               \
        for (; j < j4; j += 4) BNFAST_COLDOT4_STEP(K)                                    \
    }
#define BNFAST_COLDOT1_TERMS(j, v0, d0)                                                  \
    *(bnfast_v4d *)(sy + (j)) += v0;                                                     \
    *(bnfast_v4d *)(sxy + (j)) += (d0 - *(const bnfast_v4d *)(shift + (j))) * v0;
#define BNFAST_COLDOT_VEC1(K)                                                            \
    j = 0;                                                                               \
    if (BNFAST_WIDE8_##K) {                                                              \
        for (; j + 8 <= j4; j += 8) {                                                    \
            bnfast_v4d v0, V0, d0, D0;                                                   \
            BNFAST_LD8_##K(yp + j, v0, V0); BNFAST_LD8_##K(xp + j, d0, D0);              \
            BNFAST_COLDOT1_TERMS(j, v0, d0)                                              \
            BNFAST_COLDOT1_TERMS(j + 4, V0, D0)                                          \
        }                                                                                \
    }                                                                                    \
    for (; j < j4; j += 4) {                                                             \
        bnfast_v4d v0 = BNFAST_LD4_##K(yp + j), d0 = BNFAST_LD4_##K(xp + j);             \
        BNFAST_COLDOT1_TERMS(j, v0, d0)                                                  \
    }
#else
#define BNFAST_COLDOT_VECTOR_COLUMNS(W) 0
#define BNFAST_COLDOT_VEC4(K)
#define BNFAST_COLDOT_VEC1(K)
#endif

/* T: the storage type; K: its load kind; G: the type whose size picks the row
 * group (float for the half types: the grouping, hence the sums, of float32
 * data of the same values). */
#define BNFAST_DEFINE_CENTERED_COLDOT_K(NAME, T, K, G, ATTR)                             \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t rows, ptrdiff_t W,           \
                          ptrdiff_t stride, const double *shift, double *sy,             \
                          double *sxy) {                                                 \
        ptrdiff_t r = 0, j, j4 = BNFAST_COLDOT_VECTOR_COLUMNS(W);                        \
        ptrdiff_t group = BNFAST_ROW_GROUP(G, stride);                                   \
        double k, e0, e1, e2, e3, f0, f1, f2, f3;                                        \
        for (; group == 4 && r + 4 <= rows; r += 4) {                                    \
            BNFAST_ROWS4(T, x, x + r * stride, stride);                                  \
            BNFAST_ROWS4(T, y, y + r * stride, stride);                                  \
            BNFAST_COLDOT_VEC4(K)                                                        \
            for (j = j4; j < W; j++) {                                                   \
                k = shift[j];                                                            \
                f0 = BNFAST_TOD_##K(y0[j]); f1 = BNFAST_TOD_##K(y1[j]);                  \
                f2 = BNFAST_TOD_##K(y2[j]); f3 = BNFAST_TOD_##K(y3[j]);                  \
                e0 = BNFAST_TOD_##K(x0[j]) - k; e1 = BNFAST_TOD_##K(x1[j]) - k;          \
                e2 = BNFAST_TOD_##K(x2[j]) - k; e3 = BNFAST_TOD_##K(x3[j]) - k;          \
                sy[j] += (f0 + f1) + (f2 + f3);                                          \
                sxy[j] += (e0 * f0 + e1 * f1) + (e2 * f2 + e3 * f3);                     \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            const T *xp = x + r * stride, *yp = y + r * stride;                          \
            BNFAST_COLDOT_VEC1(K)                                                        \
            for (j = j4; j < W; j++) {                                                   \
                f0 = BNFAST_TOD_##K(yp[j]); sy[j] += f0;                                 \
                sxy[j] += (BNFAST_TOD_##K(xp[j]) - shift[j]) * f0;                       \
            }                                                                            \
        }                                                                                \
    }
#define BNFAST_DEFINE_CENTERED_COLDOT(NAME, T, ATTR) \
    BNFAST_DEFINE_CENTERED_COLDOT_K(NAME, T, T, T, ATTR)

/* ---------------------------------------------------------------------------
 * centered_dot_runs: for each of `runs` consecutive runs of n values (run r at
 * x + r * n, y + r * n):  sy[r] += sum(y),  sxy[r] += sum((x - shift[r]) * y).
 * Per run exactly bnfast_centered_dot's arithmetic (bnfast_simd.h: 8 lanes,
 * lane j summing i % 8 == j, the tail into lanes 0.., one fixed combine), two
 * runs interleaved: short runs (a 7x7 image is 49 values) are bound by the
 * latency of their own adds, and two independent chains overlap.  Channels-
 * first pass 1 (unmasked); one call per sample and block of channels.
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
/* Lanes (A0, A1 | B0, B1) of the run at (xr, yr), plus its tail, into *SY, *SXY. */
#define BNFAST_DOT_FINISH_ARRAY(K, xr, yr, k, A0, A1, B0, B1, SY, SXY)                    \
    {                                                                                    \
        double a_[8], b_[8];                                                             \
        ptrdiff_t i_;                                                                    \
        BNFAST_LANES8(a_, b_, A0, A1, B0, B1)                                            \
        for (i_ = n8; i_ < n; i_++) {                                                    \
            a_[i_ - n8] += BNFAST_TOD_##K((yr)[i_]);                                     \
            b_[i_ - n8] += (BNFAST_TOD_##K((xr)[i_]) - (k)) * BNFAST_TOD_##K((yr)[i_]);  \
        }                                                                                \
        *(SY) += BNFAST_COMBINE8(a_);                                                    \
        *(SXY) += BNFAST_COMBINE8(b_);                                                   \
    }
/* ... in registers (bnfast_simd.h's AVX finish: the same operations). */
#if defined(__x86_64__) || defined(__i386__)
#define BNFAST_DOT_LANE(A, B, LANE, I, XR, YR, KK, K)                                    \
    {                                                                                    \
        double v_ = BNFAST_TOD_##K((YR)[n8 + (I)]);                                      \
        (A)[LANE] += v_;                                                                 \
        (B)[LANE] += (BNFAST_TOD_##K((XR)[n8 + (I)]) - (KK)) * v_;                       \
    }
#define BNFAST_DOT_FINISH_AVX(K, xr, yr, k, A0, A1, B0, B1, SY, SXY)                    \
    {                                                                                    \
        double s1_, s2_;                                                                 \
        BNFAST_TAIL_LANES(BNFAST_DOT_LANE, A0, A1, B0, B1, xr, yr, k, K)                 \
        BNFAST_COMBINE8_AVX(A0, A1, B0, B1, s1_, s2_)                                    \
        *(SY) += s1_;                                                                    \
        *(SXY) += s2_;                                                                   \
    }
#endif
#if defined(__AVX__)
#define BNFAST_DOT_FINISH_BASE BNFAST_DOT_FINISH_AVX
#else
#define BNFAST_DOT_FINISH_BASE BNFAST_DOT_FINISH_ARRAY
#endif
#define BNFAST_DEFINE_CENTERED_DOT_RUNS(NAME, T, ATTR, FINISH)                           \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t runs, ptrdiff_t n,           \
                          const double *shift, double *sy, double *sxy) {                \
        ptrdiff_t r = 0, i, n8 = n - n % 8;                                              \
        for (; r + 2 <= runs; r += 2) {                                                  \
            const T *xp = x + r * n, *yp = y + r * n, *xq = xp + n, *yq = yp + n;        \
            double kp = shift[r], kq = shift[r + 1];                                     \
            bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0;                     \
            bnfast_v4d c0 = a0, c1 = a0, d0 = a0, d1 = a0, u0, u1, v0, v1, w0, w1;       \
            for (i = 0; i < n8; i += 8) {                                                \
                BNFAST_LD8_##T(yp + i, u0, u1); BNFAST_LD8_##T(yq + i, v0, v1);          \
                a0 += u0; a1 += u1; c0 += v0; c1 += v1;                                  \
                BNFAST_LD8_##T(xp + i, w0, w1);                                          \
                b0 += (w0 - kp) * u0;                                                    \
                b1 += (w1 - kp) * u1;                                                    \
                BNFAST_LD8_##T(xq + i, w0, w1);                                          \
                d0 += (w0 - kq) * v0;                                                    \
                d1 += (w1 - kq) * v1;                                                    \
            }                                                                            \
            FINISH(T, xp, yp, kp, a0, a1, b0, b1, sy + r, sxy + r)                       \
            FINISH(T, xq, yq, kq, c0, c1, d0, d1, sy + r + 1, sxy + r + 1)               \
        }                                                                                \
        for (; r < runs; r++) {                                                          \
            const T *xp = x + r * n, *yp = y + r * n;                                    \
            double kp = shift[r];                                                        \
            bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, u0, u1, w0, w1;     \
            for (i = 0; i < n8; i += 8) {                                                \
                BNFAST_LD8_##T(yp + i, u0, u1);                                          \
                a0 += u0; a1 += u1;                                                      \
                BNFAST_LD8_##T(xp + i, w0, w1);                                          \
                b0 += (w0 - kp) * u0;                                                    \
                b1 += (w1 - kp) * u1;                                                    \
            }                                                                            \
            FINISH(T, xp, yp, kp, a0, a1, b0, b1, sy + r, sxy + r)                       \
        }                                                                                \
    }
#else
#define BNFAST_DEFINE_CENTERED_DOT_RUNS(NAME, T, ATTR, FINISH)                           \
    static void NAME(const T *x, const T *y, ptrdiff_t runs, ptrdiff_t n,                \
                     const double *shift, double *sy, double *sxy) {                     \
        ptrdiff_t r, i;                                                                  \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xp = x + r * n, *yp = y + r * n;                                    \
            double a[8] = {0}, b[8] = {0};                                               \
            for (i = 0; i < n; i++) {                                                    \
                a[i % 8] += BNFAST_TOD_##T(yp[i]);                                       \
                b[i % 8] += (BNFAST_TOD_##T(xp[i]) - shift[r]) * BNFAST_TOD_##T(yp[i]);  \
            }                                                                            \
            sy[r] += BNFAST_COMBINE8(a);                                                 \
            sxy[r] += BNFAST_COMBINE8(b);                                                \
        }                                                                                \
    }
#endif

/* ---------------------------------------------------------------------------
 * Masked leaves of the fused variant: the gradient is y where the ReLU mask's
 * bit is set and 0 elsewhere -- a select, not a product, so a masked-out NaN
 * or Inf gives 0 as in torch's threshold_backward.  The mask is read 8 (or 4)
 * bits at a time from any bit position; g, when not NULL, receives the
 * masked gradient (the addend's gradient).
 *
 *   centered_dot_masked    centered_dot of x and the masked y   (pass 1, channels-first)
 *   centered_coldot_masked centered_coldot of the same          (pass 1, channels-last)
 *   grad_masked_scalar/_tiled  dx from the masked dy            (pass 2)
 * ------------------------------------------------------------------------- */
/* 8 (4) mask bits from bit p on, reading the next byte only when they straddle it. */
#define BNFAST_BYTE_AT(bits, p)                                                          \
    ((((unsigned)(bits)[(p) >> 3]                                                        \
       | (((p) & 7) ? (unsigned)(bits)[((p) >> 3) + 1] << 8 : 0u)) >> ((p) & 7)) & 0xFFu)
#define BNFAST_NIBBLE_AT(bits, p)                                                        \
    ((((unsigned)(bits)[(p) >> 3]                                                        \
       | (((p) & 7) > 4 ? (unsigned)(bits)[((p) >> 3) + 1] << 8 : 0u)) >> ((p) & 7)) & 0xFu)

#if BNFAST_VECTOR_EXT
typedef float bnfast_v8f __attribute__((vector_size(32), aligned(4)));
typedef int bnfast_v8i __attribute__((vector_size(32), aligned(4)));
typedef long long bnfast_v4l __attribute__((vector_size(32), aligned(8)));
/* 8 floats, and the integer vector of the same width. */
#define BNFAST_V8_float bnfast_v8f
#define BNFAST_I8_float bnfast_v8i

typedef float bnfast_m4f __attribute__((vector_size(16), aligned(4)));
typedef int bnfast_m4i __attribute__((vector_size(16), aligned(4)));
typedef double bnfast_m4d __attribute__((vector_size(32), aligned(8)));
#define BNFAST_V4_float bnfast_m4f
#define BNFAST_I4_float bnfast_m4i
#define BNFAST_V4_double bnfast_m4d
#define BNFAST_I4_double bnfast_v4l

/* The select is done in the storage type and the result widened: selecting on
 * the widened doubles makes GCC 12 crash (ICE in convert_mode_scalar) for
 * float on a plain SSE2 target. */
/* 4 values of type T at p, lanes whose bit in nib (bit k for lane k) is clear zeroed. */
#define BNFAST_SELECT4(T, p, nib)                                                        \
    ((BNFAST_V4_##T)((BNFAST_I4_##T)(*(const BNFAST_V4_##T *)(p))                        \
                     & (BNFAST_I4_##T)((((BNFAST_I4_##T){nib, nib, nib, nib})            \
                                        & (BNFAST_I4_##T){1, 2, 4, 8}) != 0)))
#define BNFAST_WIDEN4(s, o)                                                              \
    ((bnfast_v4d){(double)(s)[(o)], (double)(s)[(o) + 1], (double)(s)[(o) + 2], (double)(s)[(o) + 3]})

/* 32-byte vectors of the storage type (8 floats or 4 doubles): GCC's code for
 * wider generic vectors it must split (64-byte double vectors on AVX2) goes
 * through the stack and ran the fused pass 1 at half speed. */
#define BNFAST_V32_float bnfast_v8f
#define BNFAST_V32_double bnfast_m4d
#define BNFAST_N32_float 8
#define BNFAST_N32_double 4
#define BNFAST_SELECT32_float(p, bv) BNFAST_SELECT8(float, p, bv)
#define BNFAST_SELECT32_double(p, bv) BNFAST_SELECT4(double, p, bv)
/* The 8 masked values at y + i (mask byte `byte`) as two v4d, lo and hi; into g + i too if g. */
#define BNFAST_MASKED8_float(y, g, i, byte, lo, hi)                                     \
    do {                                                                                 \
        bnfast_v8f u_ = BNFAST_SELECT8(float, (y) + (i), byte);                          \
        if (g) *(bnfast_v8f *)((g) + (i)) = u_;                                          \
        lo = BNFAST_WIDEN4(u_, 0);                                                       \
        hi = BNFAST_WIDEN4(u_, 4);                                                       \
    } while (0)
#define BNFAST_MASKED8_double(y, g, i, byte, lo, hi)                                    \
    do {                                                                                 \
        bnfast_m4d u0_ = BNFAST_SELECT4(double, (y) + (i), byte);                        \
        bnfast_m4d u1_ = BNFAST_SELECT4(double, (y) + (i) + 4, (byte) >> 4);             \
        if (g) {                                                                         \
            *(bnfast_m4d *)((g) + (i)) = u0_;                                            \
            *(bnfast_m4d *)((g) + (i) + 4) = u1_;                                        \
        }                                                                                \
        lo = (bnfast_v4d)u0_;                                                            \
        hi = (bnfast_v4d)u1_;                                                            \
    } while (0)
/* 8 floats at p, lanes whose bit in byte is clear zeroed. */
#define BNFAST_SELECT8(T, p, byte)                                                       \
    ((BNFAST_V8_##T)((BNFAST_I8_##T)(*(const BNFAST_V8_##T *)(p))                        \
                     & (BNFAST_I8_##T)((((BNFAST_I8_##T){byte, byte, byte, byte, byte, byte, \
                         byte, byte}) & (BNFAST_I8_##T){1, 2, 4, 8, 16, 32, 64, 128}) != 0)))

/* The masked dot's vector loop over [0, n8): lanes a0/a1 (sums of the masked y)
 * and b0/b1 (of (x - shift) * masked y); g gets the masked y.  Shared by the
 * whole-run leaf and the carried-lanes one (dot_masked_lanes). */
#define BNFAST_DOT_MASKED8_LOOP(T)                                                       \
        for (i = 0; i < n8; i += 8) {                                                    \
            byte = BNFAST_BYTE_AT(bits, pos + i);                                        \
            BNFAST_MASKED8_##T(y, g, i, byte, y0, y1);                                   \
            a0 += y0; a1 += y1;                                                          \
            b0 += (BNFAST_LOAD4(T, x + i) - shift) * y0;                                 \
            b1 += (BNFAST_LOAD4(T, x + i + 4) - shift) * y1;                             \
        }
#define BNFAST_DEFINE_CENTERED_DOT_MASKED(NAME, T, ATTR)                                 \
    ATTR static void NAME(const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos, \
                          ptrdiff_t n, double shift, double *sy, double *sxy, T *g) {    \
        bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, y0, y1;                 \
        double a[8], b[8], v;                                                            \
        ptrdiff_t i, n8 = n - n % 8;                                                     \
        unsigned byte;                                                                   \
        BNFAST_DOT_MASKED8_LOOP(T)                                                       \
        for (i = 0; i < 4; i++) {                                                        \
            a[i] = a0[i]; a[i + 4] = a1[i]; b[i] = b0[i]; b[i + 4] = b1[i];              \
        }                                                                                \
        for (i = n8; i < n; i++) {                                                       \
            v = BNFAST_BIT(bits, pos + i) ? (double)y[i] : 0.0;                          \
            if (g) g[i] = BNFAST_BIT(bits, pos + i) ? y[i] : (T)0;                       \
            a[i - n8] += v;                                                              \
            b[i - n8] += ((double)x[i] - shift) * v;                                     \
        }                                                                                \
        *sy += BNFAST_COMBINE8(a);                                                       \
        *sxy += BNFAST_COMBINE8(b);                                                      \
    }

/* The masked twin of centered_coldot; the mask bit of x[r*stride + j] is pos + r*stride + j,
 * and g (when not NULL) is laid out as x. */
#define BNFAST_DEFINE_CENTERED_COLDOT_MASKED(NAME, T, ATTR)                              \
    ATTR static void NAME(const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos, \
                          ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride, const double *shift, \
                          double *sy, double *sxy, T *g) {                               \
        ptrdiff_t r = 0, j, j4 = W - W % 4, q, group = BNFAST_ROW_GROUP(T, stride);      \
        double e, f;                                                                     \
        for (; group == 4 && r + 4 <= rows; r += 4) {                                    \
            BNFAST_POS4(q, pos + r * stride, stride);                                    \
            BNFAST_ROWS4(T, x, x + r * stride, stride);                                  \
            BNFAST_ROWS4(T, y, y + r * stride, stride);                                  \
            for (j = 0; j < j4; j += 4) {                                                \
                bnfast_v4d kv = *(const bnfast_v4d *)(shift + j);                        \
                BNFAST_V4_##T s0 = BNFAST_SELECT4(T, y0 + j, BNFAST_NIBBLE_AT(bits, q0 + j)); \
                BNFAST_V4_##T s1 = BNFAST_SELECT4(T, y1 + j, BNFAST_NIBBLE_AT(bits, q1 + j)); \
                BNFAST_V4_##T s2 = BNFAST_SELECT4(T, y2 + j, BNFAST_NIBBLE_AT(bits, q2 + j)); \
                BNFAST_V4_##T s3 = BNFAST_SELECT4(T, y3 + j, BNFAST_NIBBLE_AT(bits, q3 + j)); \
                bnfast_v4d v0 = BNFAST_WIDEN4(s0, 0), v1 = BNFAST_WIDEN4(s1, 0);         \
                bnfast_v4d v2 = BNFAST_WIDEN4(s2, 0), v3 = BNFAST_WIDEN4(s3, 0);         \
                bnfast_v4d d0 = BNFAST_LOAD4(T, x0 + j) - kv;                            \
                bnfast_v4d d1 = BNFAST_LOAD4(T, x1 + j) - kv;                            \
                bnfast_v4d d2 = BNFAST_LOAD4(T, x2 + j) - kv;                            \
                bnfast_v4d d3 = BNFAST_LOAD4(T, x3 + j) - kv;                            \
                if (g) {                                                                 \
                    T *g0 = g + r * stride + j;                                          \
                    *(BNFAST_V4_##T *)g0 = s0;                                           \
                    *(BNFAST_V4_##T *)(g0 + stride) = s1;                                \
                    *(BNFAST_V4_##T *)(g0 + 2 * stride) = s2;                            \
                    *(BNFAST_V4_##T *)(g0 + 3 * stride) = s3;                            \
                }                                                                        \
                *(bnfast_v4d *)(sy + j) += (v0 + v1) + (v2 + v3);                        \
                *(bnfast_v4d *)(sxy + j) += (d0 * v0 + d1 * v1) + (d2 * v2 + d3 * v3);   \
            }                                                                            \
            for (j = j4; j < W; j++) {                                                   \
                double w0 = BNFAST_BIT(bits, q0 + j) ? (double)y0[j] : 0.0;              \
                double w1 = BNFAST_BIT(bits, q1 + j) ? (double)y1[j] : 0.0;              \
                double w2 = BNFAST_BIT(bits, q2 + j) ? (double)y2[j] : 0.0;              \
                double w3 = BNFAST_BIT(bits, q3 + j) ? (double)y3[j] : 0.0;              \
                if (g) {                                                                 \
                    g[r * stride + j] = (T)w0; g[(r + 1) * stride + j] = (T)w1;          \
                    g[(r + 2) * stride + j] = (T)w2; g[(r + 3) * stride + j] = (T)w3;    \
                }                                                                        \
                sy[j] += (w0 + w1) + (w2 + w3);                                          \
                sxy[j] += (((double)x0[j] - shift[j]) * w0 + ((double)x1[j] - shift[j]) * w1) \
                          + (((double)x2[j] - shift[j]) * w2 + ((double)x3[j] - shift[j]) * w3); \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            for (j = 0; j < j4; j += 4) {                                                \
                q = r * stride + j;                                                      \
                BNFAST_V4_##T s0 = BNFAST_SELECT4(T, y + q, BNFAST_NIBBLE_AT(bits, pos + q)); \
                bnfast_v4d v0 = BNFAST_WIDEN4(s0, 0);                                    \
                if (g) *(BNFAST_V4_##T *)(g + q) = s0;                                   \
                *(bnfast_v4d *)(sy + j) += v0;                                           \
                *(bnfast_v4d *)(sxy + j) +=                                              \
                    (BNFAST_LOAD4(T, x + q) - *(const bnfast_v4d *)(shift + j)) * v0;    \
            }                                                                            \
            for (j = j4; j < W; j++) {                                                   \
                q = r * stride + j;                                                      \
                f = BNFAST_BIT(bits, pos + q) ? (double)y[q] : 0.0;                      \
                if (g) g[q] = (T)f;                                                      \
                e = (double)x[q] - shift[j];                                             \
                sy[j] += f; sxy[j] += e * f;                                             \
            }                                                                            \
        }                                                                                \
    }

/* dx (and g) from the masked dy, 8 values at a time in the storage type.  The
 * coefficient expressions M, A, B, D are scalars (SCALAR) or tile loads (TILED). */
#define BNFAST_GRAD_MASKED_BODY(T, M, A, B, D, m_i, a_i, b_i, d_i)                       \
    ptrdiff_t i, h;                                                                      \
    unsigned byte;                                                                       \
    T v;                                                                                 \
    for (i = 0; i + 8 <= n; i += 8) {                                                    \
        byte = BNFAST_BYTE_AT(bits, pos + i);                                            \
        for (h = 0; h < 8; h += BNFAST_N32_##T) { /* 1 (float) or 2 (double) steps */    \
            BNFAST_V32_##T u = BNFAST_SELECT32_##T(dy + i + h, byte >> h);               \
            if (g) *(BNFAST_V32_##T *)(g + i + h) = u;                                   \
            if (dx) {                                                                    \
                if (training)                                                            \
                    *(BNFAST_V32_##T *)(dx + i + h) =                                    \
                        (u - D) * A + (*(const BNFAST_V32_##T *)(x + i + h) - M) * B;    \
                else                                                                     \
                    *(BNFAST_V32_##T *)(dx + i + h) = u * A;                             \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
    for (; i < n; i++) {                                                                 \
        v = BNFAST_BIT(bits, pos + i) ? dy[i] : (T)0;                                    \
        if (g) g[i] = v;                                                                 \
        if (dx) dx[i] = training ? (v - d_i) * a_i + (x[i] - m_i) * b_i : v * a_i;       \
    }

#define BNFAST_TILE32(T, p) (*(const BNFAST_V32_##T *)((p) + i + h))
#define BNFAST_DEFINE_GRAD_MASKED(SCALAR, TILED, T, ATTR)                                \
    ATTR static void SCALAR(const T *x, const T *dy, const unsigned char *bits,    \
                                   ptrdiff_t pos, ptrdiff_t n, T m, T a, T b, T d,       \
                                   int training, T *dx, T *g) {                          \
        BNFAST_GRAD_MASKED_BODY(T, m, a, b, d, m, a, b, d)                               \
    }                                                                                    \
    ATTR static void TILED(const T *x, const T *dy, const unsigned char *bits,    \
                                  ptrdiff_t pos, ptrdiff_t n, const T *m, const T *a,    \
                                  const T *b, const T *d, int training, T *dx, T *g) {   \
        BNFAST_GRAD_MASKED_BODY(T, BNFAST_TILE32(T, m), BNFAST_TILE32(T, a),             \
                                BNFAST_TILE32(T, b), BNFAST_TILE32(T, d),                \
                                m[i], a[i], b[i], d[i])                                  \
    }
#else
/* Plain loops (BNFAST_NO_SIMD or a compiler without vector extensions). */
#define BNFAST_DEFINE_CENTERED_DOT_MASKED(NAME, T, ATTR)                                 \
    static void NAME(const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos,   \
                     ptrdiff_t n, double shift, double *sy, double *sxy, T *g) {         \
        double a[8] = {0}, b[8] = {0}, v;                                                \
        ptrdiff_t i;                                                                     \
        for (i = 0; i < n; i++) {                                                        \
            v = BNFAST_BIT(bits, pos + i) ? (double)y[i] : 0.0;                          \
            if (g) g[i] = (T)v;                                                          \
            a[i % 8] += v;                                                               \
            b[i % 8] += ((double)x[i] - shift) * v;                                      \
        }                                                                                \
        *sy += BNFAST_COMBINE8(a);                                                       \
        *sxy += BNFAST_COMBINE8(b);                                                      \
    }
#define BNFAST_DEFINE_CENTERED_COLDOT_MASKED(NAME, T, ATTR)                              \
    static void NAME(const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos,   \
                     ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride, const double *shift, \
                     double *sy, double *sxy, T *g) {                                    \
        ptrdiff_t r = 0, j, group = BNFAST_ROW_GROUP(T, stride);                         \
        double w[4], e;                                                                  \
        int k;                                                                           \
        for (; group == 4 && r + 4 <= rows; r += 4) {                                    \
            for (j = 0; j < W; j++) {                                                    \
                for (k = 0; k < 4; k++) {                                                \
                    ptrdiff_t q = (r + k) * stride + j;                                  \
                    w[k] = BNFAST_BIT(bits, pos + q) ? (double)y[q] : 0.0;               \
                    if (g) g[q] = (T)w[k];                                               \
                }                                                                        \
                sy[j] += (w[0] + w[1]) + (w[2] + w[3]);                                  \
                sxy[j] += (((double)x[r * stride + j] - shift[j]) * w[0]                 \
                           + ((double)x[(r + 1) * stride + j] - shift[j]) * w[1])        \
                          + (((double)x[(r + 2) * stride + j] - shift[j]) * w[2]         \
                             + ((double)x[(r + 3) * stride + j] - shift[j]) * w[3]);     \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            for (j = 0; j < W; j++) {                                                    \
                ptrdiff_t q = r * stride + j;                                            \
                w[0] = BNFAST_BIT(bits, pos + q) ? (double)y[q] : 0.0;                   \
                if (g) g[q] = (T)w[0];                                                   \
                e = (double)x[q] - shift[j];                                             \
                sy[j] += w[0]; sxy[j] += e * w[0];                                       \
            }                                                                            \
        }                                                                                \
    }
#define BNFAST_GRAD_MASKED_LOOP(T, m_i, a_i, b_i, d_i)                                   \
    ptrdiff_t i;                                                                         \
    T v;                                                                                 \
    for (i = 0; i < n; i++) {                                                            \
        v = BNFAST_BIT(bits, pos + i) ? dy[i] : (T)0;                                    \
        if (g) g[i] = v;                                                                 \
        if (dx) dx[i] = training ? (v - d_i) * a_i + (x[i] - m_i) * b_i : v * a_i;       \
    }
#define BNFAST_DEFINE_GRAD_MASKED(SCALAR, TILED, T, ATTR)                                \
    static void SCALAR(const T *x, const T *dy, const unsigned char *bits,        \
                              ptrdiff_t pos, ptrdiff_t n, T m, T a, T b, T d,            \
                              int training, T *dx, T *g) {                               \
        BNFAST_GRAD_MASKED_LOOP(T, m, a, b, d)                                           \
    }                                                                                    \
    static void TILED(const T *x, const T *dy, const unsigned char *bits,         \
                             ptrdiff_t pos, ptrdiff_t n, const T *m, const T *a,         \
                             const T *b, const T *d, int training, T *dx, T *g) {        \
        BNFAST_GRAD_MASKED_LOOP(T, m[i], a[i], b[i], d[i])                               \
    }
#endif

/* ---------------------------------------------------------------------------
 * dot_lanes / dot_masked_lanes: the vector loop of centered_dot_runs (of
 * centered_dot_masked) over n8 values, n8 a multiple of 8, with its 8 lanes
 * carried in lanes[0..7] (sums of y, lane j taking i % 8 == j) and
 * lanes[8..15] (sums of (x - shift) * y).  A run summed in pieces of multiples
 * of 8 through these, its tail and combine done as BNFAST_DOT_FINISH_ARRAY does
 * (bnfast_dot_lanes_finish), gives the bits of one whole-run call: what lets
 * the half types stage long runs in small pieces (bnfast_backward_half.h).
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
#define BNFAST_DEFINE_DOT_LANES(NAME, MASKED_NAME, T, ATTR)                              \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t n8, double shift,            \
                          double *lanes) {                                               \
        bnfast_v4d a0 = *(bnfast_v4d *)lanes, a1 = *(bnfast_v4d *)(lanes + 4);           \
        bnfast_v4d b0 = *(bnfast_v4d *)(lanes + 8), b1 = *(bnfast_v4d *)(lanes + 12), u0, u1; \
        ptrdiff_t i;                                                                     \
        for (i = 0; i < n8; i += 8) {                                                    \
            u0 = BNFAST_LOAD4(T, y + i); u1 = BNFAST_LOAD4(T, y + i + 4);                \
            a0 += u0; a1 += u1;                                                          \
            b0 += (BNFAST_LOAD4(T, x + i) - shift) * u0;                                 \
            b1 += (BNFAST_LOAD4(T, x + i + 4) - shift) * u1;                             \
        }                                                                                \
        *(bnfast_v4d *)lanes = a0; *(bnfast_v4d *)(lanes + 4) = a1;                      \
        *(bnfast_v4d *)(lanes + 8) = b0; *(bnfast_v4d *)(lanes + 12) = b1;               \
    }                                                                                    \
    ATTR static void MASKED_NAME(const T *x, const T *y, const unsigned char *bits,      \
                                 ptrdiff_t pos, ptrdiff_t n8, double shift, double *lanes, \
                                 T *g) {                                                 \
        bnfast_v4d a0 = *(bnfast_v4d *)lanes, a1 = *(bnfast_v4d *)(lanes + 4);           \
        bnfast_v4d b0 = *(bnfast_v4d *)(lanes + 8), b1 = *(bnfast_v4d *)(lanes + 12), y0, y1; \
        ptrdiff_t i;                                                                     \
        unsigned byte;                                                                   \
        BNFAST_DOT_MASKED8_LOOP(T)                                                       \
        *(bnfast_v4d *)lanes = a0; *(bnfast_v4d *)(lanes + 4) = a1;                      \
        *(bnfast_v4d *)(lanes + 8) = b0; *(bnfast_v4d *)(lanes + 12) = b1;               \
    }
#else
#define BNFAST_DEFINE_DOT_LANES(NAME, MASKED_NAME, T, ATTR)                              \
    static void NAME(const T *x, const T *y, ptrdiff_t n8, double shift, double *lanes) { \
        ptrdiff_t i;                                                                     \
        for (i = 0; i < n8; i++) {                                                       \
            lanes[i % 8] += (double)y[i];                                                \
            lanes[8 + i % 8] += ((double)x[i] - shift) * (double)y[i];                   \
        }                                                                                \
    }                                                                                    \
    static void MASKED_NAME(const T *x, const T *y, const unsigned char *bits,           \
                            ptrdiff_t pos, ptrdiff_t n8, double shift, double *lanes,    \
                            T *g) {                                                      \
        ptrdiff_t i;                                                                     \
        double v;                                                                        \
        for (i = 0; i < n8; i++) {                                                       \
            v = BNFAST_BIT(bits, pos + i) ? (double)y[i] : 0.0;                          \
            if (g) g[i] = (T)v;                                                          \
            lanes[i % 8] += v;                                                           \
            lanes[8 + i % 8] += ((double)x[i] - shift) * v;                              \
        }                                                                                \
    }
#endif

/* The end of a run summed through dot_lanes: its t < 8 last values (y already
 * masked) into lanes 0.., then the fixed combine into *sy, *sxy. */
static inline void bnfast_dot_lanes_finish(const float *x, const float *y, ptrdiff_t t,
                                           double shift, double *lanes, double *sy,
                                           double *sxy) {
    ptrdiff_t i;
    for (i = 0; i < t; i++) {
        lanes[i] += (double)y[i];
        lanes[8 + i] += ((double)x[i] - shift) * (double)y[i];
    }
    *sy += BNFAST_COMBINE8(lanes);
    *sxy += BNFAST_COMBINE8(lanes + 8);
}

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
#if BNFAST_DISPATCH_AVX2
#include <immintrin.h>
/* AVX2: 32 floats -> one 32-bit store (the SSE2 loop is bound by its byte stores). */
BNFAST_AVX2_TARGET static ptrdiff_t bnfast_pack_positive_f32_avx2(const float *y, ptrdiff_t n,
                                                                  unsigned char *bits) {
    const __m256 z = _mm256_setzero_ps();
    ptrdiff_t i;
    for (i = 0; i + 32 <= n; i += 32) {
        unsigned b0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + i), z, _CMP_NLE_UQ));
        unsigned b1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + i + 8), z, _CMP_NLE_UQ));
        unsigned b2 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + i + 16), z, _CMP_NLE_UQ));
        unsigned b3 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + i + 24), z, _CMP_NLE_UQ));
        unsigned word = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
        bits[(i >> 3)] = (unsigned char)word;           /* byte stores: no alignment or */
        bits[(i >> 3) + 1] = (unsigned char)(word >> 8);  /* endianness assumption; GCC */
        bits[(i >> 3) + 2] = (unsigned char)(word >> 16); /* merges them into one store */
        bits[(i >> 3) + 3] = (unsigned char)(word >> 24);
    }
    return i;
}
#endif

static void bnfast_pack_positive_f32(const float *y, ptrdiff_t n, unsigned char *bits) {
    const __m128 z = _mm_setzero_ps();
    ptrdiff_t i = 0;
#if BNFAST_DISPATCH_AVX2
    if (bnfast_use_avx2()) i = bnfast_pack_positive_f32_avx2(y, n, bits);
#endif
    for (; i + 8 <= n; i += 8) {
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
        BNFAST_IVDEP for (i = 0; i < n; i++) {                                       \
            dx[i] = (dy[i] - d) * a + (x[i] - m) * b;                                    \
        }                                                                                \
    }
/* grad_scalar over `runs` consecutive runs of n values, run r with (m[r], a[r],
 * b[r], d[r]): one call for a block of channels (short runs: no per-run call). */
#define BNFAST_DEFINE_GRAD_RUNS(NAME, T, ATTR)                                           \
    ATTR static void NAME(const T *x, const T *dy, T *dx, ptrdiff_t runs, ptrdiff_t n,   \
                          const T *m, const T *a, const T *b, const T *d) {              \
        ptrdiff_t r, i;                                                                  \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xr = x + r * n, *yr = dy + r * n;                                   \
            T *zr = dx + r * n, mr = m[r], ar = a[r], br = b[r], dr = d[r];              \
            BNFAST_IVDEP for (i = 0; i < n; i++) {                                       \
                zr[i] = (yr[i] - dr) * ar + (xr[i] - mr) * br;                           \
            }                                                                            \
        }                                                                                \
    }
#define BNFAST_DEFINE_GRAD_TILED(NAME, T, ATTR)                                          \
    ATTR static void NAME(const T *x, const T *dy, T *dx, ptrdiff_t n,                   \
                          const T *m, const T *a, const T *b, const T *d) {              \
        ptrdiff_t i;                                                                     \
        BNFAST_IVDEP for (i = 0; i < n; i++) {                                       \
            dx[i] = (dy[i] - d[i]) * a[i] + (x[i] - m[i]) * b[i];                        \
        }                                                                                \
    }
#define BNFAST_DEFINE_SCALE_SCALAR(NAME, T, ATTR)                                        \
    ATTR static void NAME(const T *dy, T *dx, ptrdiff_t n, T a) {                        \
        ptrdiff_t i;                                                                     \
        BNFAST_IVDEP for (i = 0; i < n; i++) { dx[i] = dy[i] * a; }                  \
    }
#define BNFAST_DEFINE_SCALE_TILED(NAME, T, ATTR)                                         \
    ATTR static void NAME(const T *dy, T *dx, ptrdiff_t n, const T *a) {                 \
        ptrdiff_t i;                                                                     \
        BNFAST_IVDEP for (i = 0; i < n; i++) { dx[i] = dy[i] * a[i]; }               \
    }

#define BNFAST_BWD_LEAVES(SUFFIX, ATTR, DOT_FINISH)                                      \
    BNFAST_DEFINE_DOT_LANES(bnfast_dot_lanes_f32_##SUFFIX,                                \
                            bnfast_dot_masked_lanes_f32_##SUFFIX, float, ATTR)            \
    BNFAST_DEFINE_CENTERED_DOT_RUNS(bnfast_centered_dot_runs_f32_##SUFFIX, float, ATTR,  \
                                    DOT_FINISH)                                          \
    BNFAST_DEFINE_CENTERED_DOT_RUNS(bnfast_centered_dot_runs_f64_##SUFFIX, double, ATTR, \
                                    DOT_FINISH)                                          \
    BNFAST_DEFINE_CENTERED_COLDOT(bnfast_centered_coldot_f32_##SUFFIX, float, ATTR)      \
    BNFAST_DEFINE_CENTERED_COLDOT(bnfast_centered_coldot_f64_##SUFFIX, double, ATTR)     \
    BNFAST_DEFINE_CENTERED_DOT_MASKED(bnfast_centered_dot_masked_f32_##SUFFIX, float, ATTR) \
    BNFAST_DEFINE_CENTERED_DOT_MASKED(bnfast_centered_dot_masked_f64_##SUFFIX, double, ATTR) \
    BNFAST_DEFINE_CENTERED_COLDOT_MASKED(bnfast_centered_coldot_masked_f32_##SUFFIX, float, ATTR) \
    BNFAST_DEFINE_CENTERED_COLDOT_MASKED(bnfast_centered_coldot_masked_f64_##SUFFIX, double, ATTR) \
    BNFAST_DEFINE_GRAD_MASKED(bnfast_grad_masked_scalar_f32_##SUFFIX,                     \
                              bnfast_grad_masked_tiled_f32_##SUFFIX, float, ATTR)          \
    BNFAST_DEFINE_GRAD_MASKED(bnfast_grad_masked_scalar_f64_##SUFFIX,                     \
                              bnfast_grad_masked_tiled_f64_##SUFFIX, double, ATTR)         \
    BNFAST_DEFINE_GRAD_SCALAR(bnfast_grad_scalar_f32_##SUFFIX, float, ATTR)              \
    BNFAST_DEFINE_GRAD_RUNS(bnfast_grad_runs_f32_##SUFFIX, float, ATTR)                  \
    BNFAST_DEFINE_GRAD_RUNS(bnfast_grad_runs_f64_##SUFFIX, double, ATTR)                 \
    BNFAST_DEFINE_GRAD_SCALAR(bnfast_grad_scalar_f64_##SUFFIX, double, ATTR)             \
    BNFAST_DEFINE_GRAD_TILED(bnfast_grad_tiled_f32_##SUFFIX, float, ATTR)                \
    BNFAST_DEFINE_GRAD_TILED(bnfast_grad_tiled_f64_##SUFFIX, double, ATTR)               \
    BNFAST_DEFINE_SCALE_SCALAR(bnfast_scale_scalar_f32_##SUFFIX, float, ATTR)            \
    BNFAST_DEFINE_SCALE_SCALAR(bnfast_scale_scalar_f64_##SUFFIX, double, ATTR)           \
    BNFAST_DEFINE_SCALE_TILED(bnfast_scale_tiled_f32_##SUFFIX, float, ATTR)              \
    BNFAST_DEFINE_SCALE_TILED(bnfast_scale_tiled_f64_##SUFFIX, double, ATTR)

BNFAST_BWD_LEAVES(base, , BNFAST_DOT_FINISH_BASE)
#if BNFAST_DISPATCH_AVX2
BNFAST_BWD_LEAVES(avx2, BNFAST_AVX2_TARGET, BNFAST_DOT_FINISH_AVX)
#define BNFAST_BWD_PICK(name) BNFAST_PICK(name##_base, name##_avx2)
#else
#define BNFAST_BWD_PICK(name) name##_base
#endif

/* ---------------------------------------------------------------------------
 * Streaming (non-temporal) twins of the elementwise dx leaves, for outputs far
 * larger than the caches: the same arithmetic per element (so the same bits),
 * stored with movntps/movntpd once dx + i is 16-byte aligned.  That saves the
 * read-for-ownership of every dx line (a quarter of pass 2's traffic).  Call
 * bnfast_stream_fence() before another thread may read what was stored.
 * ------------------------------------------------------------------------- */
#if BNFAST_HAVE_SSE2_PACK
typedef float bnfast_v4f __attribute__((vector_size(16), aligned(4)));
typedef double bnfast_v2d __attribute__((vector_size(16), aligned(8)));
#define BNFAST_STREAM16_f32(p, v) _mm_stream_ps((p), (__m128)(v))
#define BNFAST_STREAM16_f64(p, v) _mm_stream_pd((p), (__m128d)(v))
#define BNFAST_LD16_f32(p) (*(const bnfast_v4f *)(p))
#define BNFAST_LD16_f64(p) (*(const bnfast_v2d *)(p))
#define BNFAST_L_f32 4
#define BNFAST_L_f64 2

/* The values of dx: SCALAR(i) one, VECTOR(LD) a vector at i read with LD.
 * Scalar stores up to the first 16-byte boundary, then 16-byte streamed ones;
 * WIDE (the AVX2 twins) streams 32 bytes at a time from the next 32-byte
 * boundary on (one 16-byte store first when needed: every store of the
 * aligned part non-temporal, no line written both ways). */
#define BNFAST_STREAM_LOOP(SFX, SCALAR, VECTOR, WIDE)                                    \
    ptrdiff_t i = 0;                                                                     \
    for (; i < n && ((size_t)(dx + i) & 15); i++) { dx[i] = SCALAR; }                    \
    WIDE(SFX, VECTOR)                                                                    \
    for (; i + BNFAST_L_##SFX <= n; i += BNFAST_L_##SFX) {                               \
        BNFAST_STREAM16_##SFX(dx + i, VECTOR(BNFAST_LD16_##SFX));                        \
    }                                                                                    \
    for (; i < n; i++) { dx[i] = SCALAR; }
#define BNFAST_STREAM_NARROW(SFX, VECTOR)

/* Per leaf: the scalar and the vector expression of one value / vector at i. */
#define BNFAST_GRAD_S(i) ((dy[i] - d) * a + (x[i] - m) * b)
#define BNFAST_GRAD_V(LD) ((LD(dy + i) - d) * a + (LD(x + i) - m) * b)
#define BNFAST_GRAD_TS(i) ((dy[i] - d[i]) * a[i] + (x[i] - m[i]) * b[i])
#define BNFAST_GRAD_TV(LD) ((LD(dy + i) - LD(d + i)) * LD(a + i) \
                            + (LD(x + i) - LD(m + i)) * LD(b + i))
#define BNFAST_SCALE_S(i) (dy[i] * a)
#define BNFAST_SCALE_V(LD) (LD(dy + i) * a)
#define BNFAST_SCALE_TS(i) (dy[i] * a[i])
#define BNFAST_SCALE_TV(LD) (LD(dy + i) * LD(a + i))

#define BNFAST_DEFINE_STREAM_LEAVES(SFX, T, VARIANT, ATTR, WIDE)                         \
    ATTR static void bnfast_grad_scalar_##SFX##_nt##VARIANT(const T *x, const T *dy, T *dx, \
                                                           ptrdiff_t n, T m, T a, T b, T d) { \
        BNFAST_STREAM_LOOP(SFX, BNFAST_GRAD_S(i), BNFAST_GRAD_V, WIDE)                   \
    }                                                                                    \
    ATTR static void bnfast_grad_tiled_##SFX##_nt##VARIANT(const T *x, const T *dy, T *dx, \
                                                          ptrdiff_t n, const T *m,       \
                                                          const T *a, const T *b,        \
                                                          const T *d) {                  \
        BNFAST_STREAM_LOOP(SFX, BNFAST_GRAD_TS(i), BNFAST_GRAD_TV, WIDE)                 \
    }                                                                                    \
    ATTR static void bnfast_scale_scalar_##SFX##_nt##VARIANT(const T *dy, T *dx, ptrdiff_t n, \
                                                            T a) {                       \
        BNFAST_STREAM_LOOP(SFX, BNFAST_SCALE_S(i), BNFAST_SCALE_V, WIDE)                 \
    }                                                                                    \
    ATTR static void bnfast_scale_tiled_##SFX##_nt##VARIANT(const T *dy, T *dx, ptrdiff_t n, \
                                                           const T *a) {                 \
        BNFAST_STREAM_LOOP(SFX, BNFAST_SCALE_TS(i), BNFAST_SCALE_TV, WIDE)               \
    }
BNFAST_DEFINE_STREAM_LEAVES(f32, float, _base, , BNFAST_STREAM_NARROW)
BNFAST_DEFINE_STREAM_LEAVES(f64, double, _base, , BNFAST_STREAM_NARROW)
#if BNFAST_DISPATCH_AVX2
/* AVX2: half the instructions per value (the training tile reads four
 * coefficient rows beside x and dy: SSE2 was bound by its loads, one thread
 * did pass 2 of (4096, 1024) float32 at ~1.1 values/ns). */
typedef float bnfast_v8f_u __attribute__((vector_size(32), aligned(4)));
typedef double bnfast_v4d_u __attribute__((vector_size(32), aligned(8)));
#define BNFAST_STREAM32_f32(p, v) _mm256_stream_ps((p), (__m256)(v))
#define BNFAST_STREAM32_f64(p, v) _mm256_stream_pd((p), (__m256d)(v))
#define BNFAST_LD32_f32(p) (*(const bnfast_v8f_u *)(p))
#define BNFAST_LD32_f64(p) (*(const bnfast_v4d_u *)(p))
#define BNFAST_STREAM_WIDE(SFX, VECTOR)                                                  \
    if (((size_t)(dx + i) & 31) && i + BNFAST_L_##SFX <= n) {                            \
        BNFAST_STREAM16_##SFX(dx + i, VECTOR(BNFAST_LD16_##SFX));                        \
        i += BNFAST_L_##SFX;                                                             \
    }                                                                                    \
    for (; i + 2 * BNFAST_L_##SFX <= n; i += 2 * BNFAST_L_##SFX) {                       \
        BNFAST_STREAM32_##SFX(dx + i, VECTOR(BNFAST_LD32_##SFX));                        \
    }
BNFAST_DEFINE_STREAM_LEAVES(f32, float, _avx2, BNFAST_AVX2_TARGET, BNFAST_STREAM_WIDE)
BNFAST_DEFINE_STREAM_LEAVES(f64, double, _avx2, BNFAST_AVX2_TARGET, BNFAST_STREAM_WIDE)
#endif
#define bnfast_grad_scalar_f32_nt BNFAST_BWD_PICK(bnfast_grad_scalar_f32_nt)
#define bnfast_grad_scalar_f64_nt BNFAST_BWD_PICK(bnfast_grad_scalar_f64_nt)
#define bnfast_grad_tiled_f32_nt BNFAST_BWD_PICK(bnfast_grad_tiled_f32_nt)
#define bnfast_grad_tiled_f64_nt BNFAST_BWD_PICK(bnfast_grad_tiled_f64_nt)
#define bnfast_scale_scalar_f32_nt BNFAST_BWD_PICK(bnfast_scale_scalar_f32_nt)
#define bnfast_scale_scalar_f64_nt BNFAST_BWD_PICK(bnfast_scale_scalar_f64_nt)
#define bnfast_scale_tiled_f32_nt BNFAST_BWD_PICK(bnfast_scale_tiled_f32_nt)
#define bnfast_scale_tiled_f64_nt BNFAST_BWD_PICK(bnfast_scale_tiled_f64_nt)
static inline void bnfast_stream_fence(void) { _mm_sfence(); }
#else
#define bnfast_grad_scalar_f32_nt bnfast_grad_scalar_f32
#define bnfast_grad_scalar_f64_nt bnfast_grad_scalar_f64
#define bnfast_grad_tiled_f32_nt bnfast_grad_tiled_f32
#define bnfast_grad_tiled_f64_nt bnfast_grad_tiled_f64
#define bnfast_scale_scalar_f32_nt bnfast_scale_scalar_f32
#define bnfast_scale_scalar_f64_nt bnfast_scale_scalar_f64
#define bnfast_scale_tiled_f32_nt bnfast_scale_tiled_f32
#define bnfast_scale_tiled_f64_nt bnfast_scale_tiled_f64
static inline void bnfast_stream_fence(void) {}
#endif

#define BNFAST_DISPATCH_MASKED(T, SFX)                                                   \
    static inline void bnfast_centered_dot_runs_##SFX(                                   \
            const T *x, const T *y, ptrdiff_t runs, ptrdiff_t n, const double *shift,    \
            double *sy, double *sxy) {                                                   \
        BNFAST_BWD_PICK(bnfast_centered_dot_runs_##SFX)(x, y, runs, n, shift, sy, sxy);  \
    }                                                                                    \
    static inline void bnfast_centered_dot_masked_##SFX(                                 \
            const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            double shift, double *sy, double *sxy, T *g) {                               \
        BNFAST_BWD_PICK(bnfast_centered_dot_masked_##SFX)(x, y, bits, pos, n, shift, sy, sxy, g); \
    }                                                                                    \
    static inline void bnfast_centered_coldot_##SFX(                                     \
            const T *x, const T *y, ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride,       \
            const double *shift, double *sy, double *sxy) {                              \
        BNFAST_BWD_PICK(bnfast_centered_coldot_##SFX)(x, y, rows, W, stride, shift, sy, sxy); \
    }                                                                                    \
    static inline void bnfast_centered_coldot_masked_##SFX(                              \
            const T *x, const T *y, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t rows, \
            ptrdiff_t W, ptrdiff_t stride, const double *shift, double *sy, double *sxy, \
            T *g) {                                                                      \
        BNFAST_BWD_PICK(bnfast_centered_coldot_masked_##SFX)(x, y, bits, pos, rows, W, stride, \
                                                             shift, sy, sxy, g);         \
    }                                                                                    \
    static inline void bnfast_grad_masked_scalar_##SFX(                                  \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            T m, T a, T b, T d, int training, T *dx, T *g) {                             \
        BNFAST_BWD_PICK(bnfast_grad_masked_scalar_##SFX)(x, dy, bits, pos, n, m, a, b, d, \
                                                           training, dx, g);             \
    }                                                                                    \
    static inline void bnfast_grad_masked_tiled_##SFX(                                   \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            const T *m, const T *a, const T *b, const T *d, int training, T *dx, T *g) { \
        BNFAST_BWD_PICK(bnfast_grad_masked_tiled_##SFX)(x, dy, bits, pos, n, m, a, b, d, \
                                                          training, dx, g);              \
    }
BNFAST_DISPATCH_MASKED(float, f32)
static inline void bnfast_dot_lanes_f32(const float *x, const float *y, ptrdiff_t n8,
                                        double shift, double *lanes) {
    BNFAST_BWD_PICK(bnfast_dot_lanes_f32)(x, y, n8, shift, lanes);
}
static inline void bnfast_dot_masked_lanes_f32(const float *x, const float *y,
                                               const unsigned char *bits, ptrdiff_t pos,
                                               ptrdiff_t n8, double shift, double *lanes,
                                               float *g) {
    BNFAST_BWD_PICK(bnfast_dot_masked_lanes_f32)(x, y, bits, pos, n8, shift, lanes, g);
}
BNFAST_DISPATCH_MASKED(double, f64)
static inline void bnfast_grad_runs_f32(const float *x, const float *dy, float *dx,
                                        ptrdiff_t runs, ptrdiff_t n, const float *m,
                                        const float *a, const float *b, const float *d) {
    BNFAST_BWD_PICK(bnfast_grad_runs_f32)(x, dy, dx, runs, n, m, a, b, d);
}
static inline void bnfast_grad_runs_f64(const double *x, const double *dy, double *dx,
                                        ptrdiff_t runs, ptrdiff_t n, const double *m,
                                        const double *a, const double *b, const double *d) {
    BNFAST_BWD_PICK(bnfast_grad_runs_f64)(x, dy, dx, runs, n, m, a, b, d);
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


/* ---------------------------------------------------------------------------
 * dx of one run, whatever the variant: masked (fused ReLU), training or eval,
 * cached or streaming stores.  SCALAR: one (m, a, b, d) for the run; TILED:
 * per-element tiles.  The Cython kernels call these two entries only.
 * ------------------------------------------------------------------------- */
#define BNFAST_DEFINE_GRAD_RUN_ENTRIES(SFX, T)                                                  \
    static inline void bnfast_grad_run_scalar_##SFX(                                       \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            T m, T a, T b, T d, int training, int stream, T *dx, T *g) {                   \
        if (bits != NULL)                                                                  \
            bnfast_grad_masked_scalar_##SFX(x, dy, bits, pos, n, m, a, b, d, training, dx, g); \
        else if (training && stream) bnfast_grad_scalar_##SFX##_nt(x, dy, dx, n, m, a, b, d); \
        else if (training) bnfast_grad_scalar_##SFX(x, dy, dx, n, m, a, b, d);             \
        else if (stream) bnfast_scale_scalar_##SFX##_nt(dy, dx, n, a);                     \
        else bnfast_scale_scalar_##SFX(dy, dx, n, a);                                      \
    }                                                                                      \
    static inline void bnfast_grad_run_tiled_##SFX(                                        \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            const T *m, const T *a, const T *b, const T *d, int training, int stream,      \
            T *dx, T *g) {                                                                 \
        if (bits != NULL)                                                                  \
            bnfast_grad_masked_tiled_##SFX(x, dy, bits, pos, n, m, a, b, d, training, dx, g); \
        else if (training && stream) bnfast_grad_tiled_##SFX##_nt(x, dy, dx, n, m, a, b, d); \
        else if (training) bnfast_grad_tiled_##SFX(x, dy, dx, n, m, a, b, d);              \
        else if (stream) bnfast_scale_tiled_##SFX##_nt(dy, dx, n, a);                      \
        else bnfast_scale_tiled_##SFX(dy, dx, n, a);                                       \
    }
BNFAST_DEFINE_GRAD_RUN_ENTRIES(f32, float)
BNFAST_DEFINE_GRAD_RUN_ENTRIES(f64, double)

#endif /* BNFAST_BACKWARD_SIMD_H */
