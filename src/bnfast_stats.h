/*
 * The training statistics' leaves: shifted sums in double, for every storage
 * type (float, double, float16, bfloat16).
 *
 *   shifted_sums_runs  per run of a block of consecutive runs (channels-first):
 *                      s1[r] = sum(x - shift[r]),  s2[r] = sum((x - shift[r])^2)
 *   shifted_colsums    per column of a block of rows, any row stride
 *                      (channels-last):  s1[j] = sum_r (x[r, j] - shift[j]),
 *                                        s2[j] = sum_r (...)^2
 *
 * One body per job and arithmetic (the macros), instantiated per storage type
 * with its loads and scalar conversions.  float32 and float64 data are widened
 * to double (L4: four values to four doubles, TOD: one) and summed in double:
 * the same values give the same bits in either type.  Half data is summed in
 * float, a few terms at a time, and folded into double (see "half data"
 * below): half the vector work, float32-exact.  The scalar build
 * (BNFAST_NO_SIMD) keeps the lanes, so it gives the same bits as the SIMD
 * variants, which are picked at run time (AVX2; F16C for float16; AVX-512F's
 * column sums).  No FMA: d * d + b must round the same way.
 *
 * Why not staging (widen a chunk into a float buffer, run the float32 leaf):
 * two more trips through L1 and a call per chunk made half statistics 1.3-1.6x
 * slower than float32's on the same shape; in registers they move half the
 * bytes.
 */
#ifndef BNFAST_STATS_H
#define BNFAST_STATS_H

#include <stddef.h>

#include "bnfast_float_sums.h"

#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

/* ---- widening, per storage type ---------------------------------------------- */
#define BNFAST_TOD_NATIVE(v) ((double)(v))
#define BNFAST_TOD_F16(v) ((double)bnfast_f16_to_float(v))
#define BNFAST_TOD_BF16(v) ((double)bnfast_bf16_to_float(v))

#if BNFAST_VECTOR_EXT
#define BNFAST_L4_F32(p) BNFAST_LOAD4(float, p)
#define BNFAST_L4_F64(p) BNFAST_LOAD4(double, p)
/* Portable half loads: the scalar conversions lane by lane (same values). */
#define BNFAST_L4_F16_PORTABLE(p) ((bnfast_v4d){BNFAST_TOD_F16((p)[0]), BNFAST_TOD_F16((p)[1]), \
                                                BNFAST_TOD_F16((p)[2]), BNFAST_TOD_F16((p)[3])})
#define BNFAST_L4_BF16_PORTABLE(p) ((bnfast_v4d){BNFAST_TOD_BF16((p)[0]), BNFAST_TOD_BF16((p)[1]), \
                                                 BNFAST_TOD_BF16((p)[2]), BNFAST_TOD_BF16((p)[3])})
#if defined(__x86_64__) || defined(__i386__)
/* F16C: vcvtph2ps of four halves (one 8-byte load), then vcvtps2pd. */
#define BNFAST_L4_F16_F16C(p) ((bnfast_v4d)_mm256_cvtps_pd(                               \
        _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p)))))
/* ... and one value (a run's shift, the tail): vcvtph2ps, the portable
 * conversion's values (NaN quietened alike); the portable one cost ~2 ns a
 * value, a tenth of a 49-value run's sums. */
#define BNFAST_TOD_F16_F16C(v) ((double)_cvtsh_ss((v).bits))
/* bfloat16 is float's top half: zero-extend to 32 bits, shift into place. */
#define BNFAST_L4_BF16_AVX2(p) ((bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32( \
        _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(p))), 16))))
#endif
#endif

/* ---- shifted_sums_runs --------------------------------------------------------
 * Runs r = 0..runs-1 of n values at x + r * n (channels-first: the runs of one
 * sample's block of channels), each against its own shift (a value from the
 * run: bounds the cancellation in s2 - s1^2/n).  Per run: 8 lanes, lane j
 * summing the values i with i % 8 == j, the tail into lanes 0.., one fixed
 * combine.  (Two runs interleaved in one loop, as the backward's dot does,
 * made it 3x slower here: 16 accumulators spill.)
 * ------------------------------------------------------------------------------ */
/* A run's shift: its first value, or 0 if that is not finite (inf - inf = NaN
 * would turn the run's +inf into NaN). */
#define BNFAST_RUN_SHIFT(v) ((v) - (v) == 0.0 ? (v) : 0.0)

#if BNFAST_VECTOR_EXT
/* A run's finish: its tail (values n8.. into lanes 0..) and the 8-lane combine,
 * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), for both sums.
 * FINISH_ARRAY through arrays (any target); FINISH_AVX in registers, the same
 * operations in the same order: the tail added lane by lane (constant lanes),
 * the combine by vhaddpd and 128-bit halves.  Short
 * runs pay the finish once per run: through arrays it was half of a 49-value
 * run's time. */
#define BNFAST_SUMS_FINISH_ARRAY(xr, k, A0, A1, B0, B1, S1, S2, TOD)                    \
    {                                                                                    \
        double a_[8], b_[8], d_;                                                         \
        ptrdiff_t i_;                                                                    \
        BNFAST_LANES8(a_, b_, A0, A1, B0, B1)                                            \
        for (i_ = n8; i_ < n; i_++) {                                                    \
            d_ = TOD((xr)[i_]) - (k); a_[i_ - n8] += d_; b_[i_ - n8] += d_ * d_;         \
        }                                                                                \
        (S1) = BNFAST_COMBINE8(a_);                                                      \
        (S2) = BNFAST_COMBINE8(b_);                                                      \
    }
#if defined(__x86_64__) || defined(__i386__)
#define BNFAST_SUMS_LANE(A, B, LANE, I, XR, K, TOD)                                      \
    { double d_ = TOD((XR)[n8 + (I)]) - (K); (A)[LANE] += d_; (B)[LANE] += d_ * d_; }
#define BNFAST_SUMS_FINISH_AVX(xr, k, A0, A1, B0, B1, S1, S2, TOD)                      \
    {                                                                                    \
        BNFAST_TAIL_LANES(BNFAST_SUMS_LANE, A0, A1, B0, B1, xr, k, TOD)                  \
        BNFAST_COMBINE8_AVX(A0, A1, B0, B1, S1, S2)                                       \
    }
#endif
#define BNFAST_DEFINE_SHIFTED_SUMS_RUNS(NAME, T, ATTR, L4, TOD, FINISH)                  \
    ATTR static void NAME(const T *x, ptrdiff_t runs, ptrdiff_t n, double *shift,        \
                          double *s1, double *s2) {                                      \
        ptrdiff_t r, i, n8 = n - n % 8;                                                  \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xp = x + r * n;                                                     \
            double kp = BNFAST_RUN_SHIFT(TOD((xp)[0]));                                  \
            shift[r] = kp;                                                               \
            bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, u0, u1;             \
            for (i = 0; i < n8; i += 8) {                                                \
                u0 = L4(xp + i) - kp; u1 = L4(xp + i + 4) - kp;                          \
                a0 += u0; a1 += u1; b0 += u0 * u0; b1 += u1 * u1;                        \
            }                                                                            \
            FINISH(xp, kp, a0, a1, b0, b1, s1[r], s2[r], TOD)                            \
        }                                                                                \
    }
#else
#define BNFAST_DEFINE_SHIFTED_SUMS_RUNS(NAME, T, ATTR, L4, TOD, FINISH)                  \
    static void NAME(const T *x, ptrdiff_t runs, ptrdiff_t n, double *shift,             \
                     double *s1, double *s2) {                                           \
        ptrdiff_t r, i;                                                                  \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xp = x + r * n;                                                     \
            double a[8] = {0}, b[8] = {0}, d;                                            \
            shift[r] = BNFAST_RUN_SHIFT(TOD(xp[0]));                                     \
            for (i = 0; i < n; i++) {                                                    \
                d = TOD(xp[i]) - shift[r]; a[i % 8] += d; b[i % 8] += d * d;             \
            }                                                                            \
            s1[r] = BNFAST_COMBINE8(a);                                                  \
            s2[r] = BNFAST_COMBINE8(b);                                                  \
        }                                                                                \
    }
#endif

/* ---- shifted_colsums ------------------------------------------------------------
 * Columns [0, W) of `rows` rows, row r at x + r * stride (a column tile of
 * channels-last rows): s1[j] = sum_r (x[r, j] - shift[j]), s2[j] = sum_r (...)^2.
 * Rows four at a time (their terms summed in registers before one update of
 * s1/s2, which stay in L1), leftover rows one at a time;
 * vector columns first, then the scalar part in the same per-column order (the
 * whole job without SIMD).  (The whole-row leaf this replaces went one row at a
 * time for rows of 512 B - 2 KiB, where four row streams inside one 4 KiB page
 * had halved its speed; over column tiles four rows at a time is as fast there
 * or faster, measured.)
 * ------------------------------------------------------------------------------ */
#define BNFAST_ZERO_COLUMNS for (j = 0; j < W; j++) s1[j] = s2[j] = 0.0;
#define BNFAST_COLSUMS_SCALAR(T, TOD, J0)                                                \
    {                                                                                    \
        double k, e0, e1, e2, e3;                                                        \
        for (r = 0; r + 4 <= rows; r += 4) {                                             \
            const T *p0 = x + r * stride, *p1 = p0 + stride;                             \
            const T *p2 = p1 + stride, *p3 = p2 + stride;                                \
            for (j = (J0); j < W; j++) {                                                 \
                k = TOD(shift[j]);                                                       \
                e0 = TOD(p0[j]) - k; e1 = TOD(p1[j]) - k;                                \
                e2 = TOD(p2[j]) - k; e3 = TOD(p3[j]) - k;                                \
                s1[j] += (e0 + e1) + (e2 + e3);                                          \
                s2[j] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3);                      \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {  /* leftover rows, all columns */                        \
            const T *p = x + r * stride;                                                 \
            for (j = 0; j < W; j++) {                                                    \
                e0 = TOD(p[j]) - TOD(shift[j]); s1[j] += e0; s2[j] += e0 * e0;           \
            }                                                                            \
        }                                                                                \
    }

#if BNFAST_VECTOR_EXT
/* The rows two groups ahead (8 rows, a line each), where rows are under 4 KiB:
 * the statistics pass reads a model's activations from memory, where the
 * hardware prefetchers follow four row streams that share pages badly (Xeon
 * VM, 2 threads, channels-last float32 forward with the caches emptied:
 * 16x64x28x28 425 -> 360 us, 16x128x14x14 250 -> 195, 16x512x4x4 130 -> 113;
 * unchanged from the caches).  Rows of a page or more have streams of their own
 * (BNFAST_SHARED_PAGES, bnfast_simd.h). */
#define BNFAST_COLSUMS_PREFETCH(o)                                                       \
    {                                                                                    \
        __builtin_prefetch(p0 + (o)); __builtin_prefetch(p1 + (o));                      \
        __builtin_prefetch(p2 + (o)); __builtin_prefetch(p3 + (o));                      \
    }
/* Columns j..j+N-1 of the group's four rows p0..p3 (V: N doubles, LV widens N
 * values of T to it); each lane the scalar column's operations. */
#define BNFAST_COLSUMS_STEP(V, LV)                                                       \
    {                                                                                    \
        V kv = LV(shift + j);                                                            \
        V d0 = LV(p0 + j) - kv, d1 = LV(p1 + j) - kv;                                    \
        V d2 = LV(p2 + j) - kv, d3 = LV(p3 + j) - kv;                                    \
        *(V *)(s1 + j) += (d0 + d1) + (d2 + d3);                                         \
        *(V *)(s2 + j) += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);                     \
    }
#define BNFAST_DEFINE_SHIFTED_COLSUMS(NAME, T, ATTR, V, N, LV, TOD)                      \
    ATTR static void NAME(const T *x, ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride,     \
                          const T *shift, double *s1, double *s2) {                      \
        ptrdiff_t r, j, jv = W - W % (N);                                                \
        BNFAST_ZERO_COLUMNS                                                              \
        for (r = 0; r + 4 <= rows; r += 4) {                                             \
            const T *p0 = x + r * stride, *p1 = p0 + stride;                             \
            const T *p2 = p1 + stride, *p3 = p2 + stride;                                \
            if (BNFAST_SHARED_PAGES(T, stride) && r + 12 <= rows) {                      \
                for (j = 0; j < jv; j += (N)) {                                          \
                    if (!((j * (ptrdiff_t)sizeof(T)) & 63))                              \
                        BNFAST_COLSUMS_PREFETCH(j + 8 * stride)                          \
                    BNFAST_COLSUMS_STEP(V, LV)                                           \
                }                                                                        \
            } else {  /* (a loop of its own: a test a step cost wide rows 5%) */         \
                for (j = 0; j < jv; j += (N)) BNFAST_COLSUMS_STEP(V, LV)                 \
            }                                                                            \
        }                                                                                \
        BNFAST_COLSUMS_SCALAR(T, TOD, jv)                                                \
    }
#else
#define BNFAST_DEFINE_SHIFTED_COLSUMS(NAME, T, ATTR, V, N, LV, TOD)                      \
    static void NAME(const T *x, ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride,          \
                     const T *shift, double *s1, double *s2) {                           \
        ptrdiff_t r, j;                                                                  \
        BNFAST_ZERO_COLUMNS                                                              \
        BNFAST_COLSUMS_SCALAR(T, TOD, 0)                                                 \
    }
#endif

/* ---- half data: float32 arithmetic, folded into double --------------------------
 * float16 and bfloat16 values are exact in float: their leaves sum x - shift
 * and its square in float and fold the sums into double.
 *
 *   runs:    bnfast_float_sums.h's run engine (16 float lanes, bursts of 256
 *            folded into the float32 leaf's eight double lanes; runs of at
 *            most 128 values finished in float).
 *   colsums: eight rows summed in float, ((d0 + d1) + (d2 + d3)) + ((d4 + d5) +
 *            (d6 + d7)), the sum added to the double column sums; leftover rows
 *            one at a time.
 *
 * Every float sum has at most 16 terms: within ~20 float32 ulps of the sum of
 * its terms' magnitudes - statistics as exact as the float32 values they are
 * stored in.  The portable build does the same operations in the same order.
 *
 * Range: float16's |d| <= 131008 and d^2 sums stay far inside float's range.
 * bfloat16 spans float's: d^2 overflows beyond 1.8e19 and underflows below
 * 1e-19, so a bfloat16 run or column whose s2 is not finite or below 2^-80
 * (BNFAST_HALF_EXACT_*) is summed again in double, exactly as the float32
 * leaf would (rare: inf/NaN data, huge or tiny values, constant runs).
 * ------------------------------------------------------------------------------ */
/* s2 that float arithmetic may have lost: not finite, or within reach of
 * float's underflow (terms below 2^-126 lose bits; 4096 of them lose < 2^-58
 * of an s2 >= 2^-80). */
#define BNFAST_HALF_S2_SUSPECT(v) (!(((v) >= 0x1p-80) & ((v) <= 0x1.fffffffffffffp+1023)))
/* float's run shift: the run's first value, or 0 if that is not finite. */
#define BNFAST_RUN_SHIFT_F(v) ((v) - (v) == 0.0f ? (v) : 0.0f)

/* The double recounts (portable, any build): a run into S1, S2; a column j. */
#define BNFAST_HALF_EXACT_NONE(...)
#define BNFAST_HALF_EXACT_RUN(xp, kp, S1, S2, TOD)                                       \
    if (BNFAST_HALF_S2_SUSPECT(S2)) {                                                    \
        double a_[8] = {0}, b_[8] = {0}, d_;                                             \
        ptrdiff_t i_;                                                                    \
        for (i_ = 0; i_ < n; i_++) {                                                     \
            d_ = TOD((xp)[i_]) - (kp); a_[i_ % 8] += d_; b_[i_ % 8] += d_ * d_;          \
        }                                                                                \
        (S1) = BNFAST_COMBINE8(a_);                                                      \
        (S2) = BNFAST_COMBINE8(b_);                                                      \
    }
/* Whether any of the W column sums s2 is suspect: one vectorised pass before the
 * per-column recount (tested one by one, the branches took a fifth of a
 * 32x2048x7x7 bfloat16 statistics pass). */
static inline int bnfast_half_any_suspect(const double *s2, ptrdiff_t W) {
    int any = 0;
    ptrdiff_t j;
    for (j = 0; j < W; j++) any |= BNFAST_HALF_S2_SUSPECT(s2[j]);
    return any;
}
#define BNFAST_HALF_EXACT_COLS(TOD)                                                      \
    if (bnfast_half_any_suspect(s2, W)) {                                                \
        for (j = 0; j < W; j++) {                                                        \
            if (BNFAST_HALF_S2_SUSPECT(s2[j])) {                                         \
                double k_ = TOD(shift[j]), d_;                                           \
                s1[j] = s2[j] = 0.0;                                                     \
                for (r = 0; r < rows; r++) {                                             \
                    d_ = TOD(x[r * stride + j]) - k_; s1[j] += d_; s2[j] += d_ * d_;     \
                }                                                                        \
            }                                                                            \
        }                                                                                \
    }

/* The run engine's job (bnfast_float_sums.h): terms x - shift and their
 * squares; runs of fewer than eight values through arrays, the last values
 * of long runs in double. */
#define BNFAST_STATS_STEP(i, F, G, KEEP, L8F, TOF, L4, TOD, FINISH)                      \
    {                                                                                    \
        bnfast_h8f d_ = (bnfast_h8f)((bnfast_h8i)(L8F(xp + (i)) - kv) & (KEEP));         \
        F += d_; G += d_ * d_;                                                           \
    }
#define BNFAST_STATS_STEP1(i, F, G, KEEP, L8F, TOF, L4, TOD, FINISH)                     \
    { float d_ = (KEEP) ? TOF(xp[i]) - kf : 0.0f; F += d_; G += d_ * d_; }
#define BNFAST_STATS_TAIL(a0, a1, b0, b1, S1, S2, L8F, TOF, L4, TOD, FINISH)             \
    if (n8 > n16) {                                                                      \
        bnfast_v4d u0 = L4(xp + n16) - kp, u1 = L4(xp + n16 + 4) - kp;                   \
        a0 += u0; a1 += u1; b0 += u0 * u0; b1 += u1 * u1;                                \
    }                                                                                    \
    FINISH(xp, kp, a0, a1, b0, b1, S1, S2, TOD)
#define BNFAST_STATS_TAIL1(a, b, S1, S2, L8F, TOF, L4, TOD, FINISH)                      \
    for (; i < n; i++) {                                                                 \
        double d_ = TOD(xp[i]) - kp; a[i % 8] += d_; b[i % 8] += d_ * d_;                \
    }                                                                                    \
    (S1) = BNFAST_COMBINE8(a);                                                           \
    (S2) = BNFAST_COMBINE8(b);

#define BNFAST_DEFINE_HALF_SUMS_RUNS(NAME, T, ATTR, L8F, TOF, L4, TOD, FINISH, OPS,     \
                                     EXACT)                                              \
    ATTR static void NAME(const T *x, ptrdiff_t runs, ptrdiff_t n, double *shift,        \
                          double *s1, double *s2) {                                      \
        ptrdiff_t r;                                                                     \
        BNFAST_FLOAT_RUN_ANY_DECLS                                                       \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xp = x + r * n;                                                     \
            float kf = BNFAST_RUN_SHIFT_F(TOF(xp[0]));                                   \
            double kp = (double)kf;                                                      \
            BNFAST_FLOAT_SHIFT_VECTOR(kf)                                                \
            shift[r] = kp;                                                               \
            BNFAST_FLOAT_RUN_ANY(BNFAST_STATS_STEP, BNFAST_STATS_STEP1, BNFAST_STATS_TAIL,   \
                                 BNFAST_STATS_TAIL1, OPS, s1[r], s2[r],                  \
                                 L8F, TOF, L4, TOD, FINISH)                              \
            EXACT(xp, kp, s1[r], s2[r], TOD)                                             \
        }                                                                                \
    }

/* A group's sums of its eight rows' terms d0..d7 (scalars or vectors): S of the
 * terms, Q of their squares, in the one order every variant keeps (the same bits). */
#define BNFAST_HALF_COLS_SUMS8(S, Q, d0, d1, d2, d3, d4, d5, d6, d7)                     \
    S = (((d0) + (d1)) + ((d2) + (d3))) + (((d4) + (d5)) + ((d6) + (d7)));               \
    Q = (((d0) * (d0) + (d1) * (d1)) + ((d2) * (d2) + (d3) * (d3)))                      \
        + (((d4) * (d4) + (d5) * (d5)) + ((d6) * (d6) + (d7) * (d7)));
/* Columns J0.. of a group of eight rows (p0 = the group's first) and of one
 * leftover row, in float, added to the double sums: the scalar part (and the
 * whole job without SIMD) in the vector part's order. */
#define BNFAST_HALF_COLS8_SCALAR(TOF, J0)                                                \
    for (j = (J0); j < W; j++) {                                                         \
        float k = TOF(shift[j]), e[8], s, q;                                             \
        int m;                                                                           \
        for (m = 0; m < 8; m++) e[m] = TOF(p0[m * stride + j]) - k;                      \
        BNFAST_HALF_COLS_SUMS8(s, q, e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7])     \
        s1[j] += (double)s; s2[j] += (double)q;                                          \
    }
#define BNFAST_HALF_COLS1_SCALAR(TOF, J0)                                                \
    for (j = (J0); j < W; j++) {                                                         \
        float e0 = TOF(p0[j]) - TOF(shift[j]);                                           \
        s1[j] += (double)e0; s2[j] += (double)(e0 * e0);                                 \
    }

#if BNFAST_VECTOR_EXT
#define BNFAST_HALF_ADD8(S, j, f, W4)                                                    \
    *(bnfast_v4d *)((S) + (j)) += W4(f, 0);                                              \
    *(bnfast_v4d *)((S) + (j) + 4) += W4(f, 1);
/* The vector steps, columns j.. of a group of eight rows (p0 its first) or of one
 * leftover row: V holds the vector type's lanes (8: bnfast_h8f, or 16 on
 * AVX-512: bnfast_h16f), LOAD widens V values to float, ADD(S, j, f) adds
 * float lanes f to the double sums S + j.  Each lane does the scalar column's
 * operations, in its order. */
/* The next group's eight rows at column j, a line each, where rows share pages
 * (pf: BNFAST_SHARED_PAGES and a next group), as the float leaves do: two
 * threads, 32x64x56x56 channels-last statistics (in L3 here), float16 815-844
 * -> 723-747 us, bfloat16 953-964 -> 785-798; from memory float16 1190-1296 ->
 * 1026-1224, bfloat16 1316-1366 -> 1054-1218. */
#define BNFAST_HALF_COLS_PREFETCH                                                        \
    if (pf && !((j * (ptrdiff_t)sizeof(*p0)) & 63)) {                                    \
        int f_;                                                                          \
        for (f_ = 8; f_ < 16; f_++) __builtin_prefetch(p0 + f_ * stride + j);            \
    }
#define BNFAST_HALF_COLS_GROUP_STEP(V, LOAD, ADD)                                       \
    {                                                                                    \
        BNFAST_HALF_COLS_PREFETCH                                                        \
        __typeof__(p0) p = p0 + j;                                                       \
        V kv = LOAD(shift + j);                                                          \
        V d0 = LOAD(p) - kv, d1 = LOAD(p + stride) - kv;                                 \
        V d2 = LOAD(p + 2 * stride) - kv, d3 = LOAD(p + 3 * stride) - kv;                \
        V d4 = LOAD(p + 4 * stride) - kv, d5 = LOAD(p + 5 * stride) - kv;                \
        V d6 = LOAD(p + 6 * stride) - kv, d7 = LOAD(p + 7 * stride) - kv;                \
        V s, q;                                                                          \
        BNFAST_HALF_COLS_SUMS8(s, q, d0, d1, d2, d3, d4, d5, d6, d7)                     \
        ADD(s1, j, s)                                                                    \
        ADD(s2, j, q)                                                                    \
    }
#define BNFAST_HALF_COLS_ROW_STEP(V, LOAD, ADD)                                         \
    {                                                                                    \
        V d0 = LOAD(p0 + j) - LOAD(shift + j);                                           \
        ADD(s1, j, d0)                                                                   \
        ADD(s2, j, d0 * d0)                                                              \
    }
#define BNFAST_HALF_ADD8_AVX(S, j, f) BNFAST_HALF_ADD8(S, j, f, BNFAST_W4_AVX)
#define BNFAST_HALF_ADD8_VEC(S, j, f) BNFAST_HALF_ADD8(S, j, f, BNFAST_W4_VEC)
/* WIDE(STEP): a variant's wider steps over columns j.. before the 8-lane ones
 * (NO_WIDE: none; AVX-512: 16 lanes, below). */
#define BNFAST_HALF_COLS_NO_WIDE(STEP)
#define BNFAST_DEFINE_HALF_COLSUMS_OF(NAME, T, ATTR, L8F, TOF, OPS, WIDE, ...)          \
    ATTR static void NAME(const T *x, ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride,     \
                          const T *shift, double *s1, double *s2) {                      \
        ptrdiff_t r, j, j8 = W - W % 8;                                                  \
        BNFAST_ZERO_COLUMNS                                                              \
        for (r = 0; r + 8 <= rows; r += 8) {                                             \
            const T *p0 = x + r * stride;                                                \
            int pf = BNFAST_SHARED_PAGES(T, stride) && r + 16 <= rows;                   \
            j = 0;                                                                       \
            WIDE(BNFAST_HALF_COLS_GROUP_STEP)                                            \
            for (; j < j8; j += 8)                                                       \
                BNFAST_HALF_COLS_GROUP_STEP(bnfast_h8f, L8F, BNFAST_HALF_ADD8_##OPS)     \
            BNFAST_HALF_COLS8_SCALAR(TOF, j8)                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            const T *p0 = x + r * stride;                                                \
            j = 0;                                                                       \
            WIDE(BNFAST_HALF_COLS_ROW_STEP)                                              \
            for (; j < j8; j += 8)                                                       \
                BNFAST_HALF_COLS_ROW_STEP(bnfast_h8f, L8F, BNFAST_HALF_ADD8_##OPS)       \
            BNFAST_HALF_COLS1_SCALAR(TOF, j8)                                            \
        }                                                                                \
        __VA_ARGS__ /* the recount, EXACT */                                             \
    }
#define BNFAST_DEFINE_HALF_COLSUMS(NAME, T, ATTR, L8F, TOF, TOD, OPS, ...)               \
    BNFAST_DEFINE_HALF_COLSUMS_OF(NAME, T, ATTR, L8F, TOF, OPS, BNFAST_HALF_COLS_NO_WIDE, \
                                  __VA_ARGS__)
#else
#define BNFAST_DEFINE_HALF_COLSUMS(NAME, T, ATTR, L8F, TOF, TOD, OPS, EXACT)             \
    static void NAME(const T *x, ptrdiff_t rows, ptrdiff_t W, ptrdiff_t stride,          \
                     const T *shift, double *s1, double *s2) {                           \
        ptrdiff_t r, j;                                                                  \
        BNFAST_ZERO_COLUMNS                                                              \
        for (r = 0; r + 8 <= rows; r += 8) {                                             \
            const T *p0 = x + r * stride;                                                \
            BNFAST_HALF_COLS8_SCALAR(TOF, 0)                                             \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            const T *p0 = x + r * stride;                                                \
            BNFAST_HALF_COLS1_SCALAR(TOF, 0)                                             \
        }                                                                                \
        EXACT                                                                            \
    }
#endif

/* ---- instances, and the run-time pick ------------------------------------------ */
#define BNFAST_DEFINE_STATS_LEAVES(SUFFIX, ATTR, ATTR_F16, L4_F16, L8_F16, TOD_F16,       \
                                   TOF_F16, ATTR_BF16, L4_BF16, L8_BF16, FINISH, OPS)      \
    BNFAST_DEFINE_SHIFTED_SUMS_RUNS(bnfast_shifted_sums_runs_f32_##SUFFIX, float, ATTR,    \
                                    BNFAST_L4_F32, BNFAST_TOD_NATIVE, FINISH)              \
    BNFAST_DEFINE_SHIFTED_SUMS_RUNS(bnfast_shifted_sums_runs_f64_##SUFFIX, double, ATTR,   \
                                    BNFAST_L4_F64, BNFAST_TOD_NATIVE, FINISH)              \
    BNFAST_DEFINE_HALF_SUMS_RUNS(bnfast_shifted_sums_runs_f16_##SUFFIX, bnfast_f16,        \
                                 ATTR_F16, L8_F16, TOF_F16, L4_F16, TOD_F16, FINISH, OPS,  \
                                 BNFAST_HALF_EXACT_NONE)                                   \
    BNFAST_DEFINE_HALF_SUMS_RUNS(bnfast_shifted_sums_runs_bf16_##SUFFIX, bnfast_bf16,      \
                                 ATTR_BF16, L8_BF16, bnfast_bf16_to_float, L4_BF16,        \
                                 BNFAST_TOD_BF16, FINISH, OPS, BNFAST_HALF_EXACT_RUN)      \
    BNFAST_DEFINE_SHIFTED_COLSUMS(bnfast_shifted_colsums_f32_##SUFFIX, float, ATTR,        \
                                  bnfast_v4d, 4, BNFAST_L4_F32, BNFAST_TOD_NATIVE)         \
    BNFAST_DEFINE_SHIFTED_COLSUMS(bnfast_shifted_colsums_f64_##SUFFIX, double, ATTR,       \
                                  bnfast_v4d, 4, BNFAST_L4_F64, BNFAST_TOD_NATIVE)         \
    BNFAST_DEFINE_HALF_COLSUMS(bnfast_shifted_colsums_f16_##SUFFIX, bnfast_f16, ATTR_F16,  \
                               L8_F16, TOF_F16, TOD_F16, OPS, )                            \
    BNFAST_DEFINE_HALF_COLSUMS(bnfast_shifted_colsums_bf16_##SUFFIX, bnfast_bf16,          \
                               ATTR_BF16, L8_BF16, bnfast_bf16_to_float, BNFAST_TOD_BF16,  \
                               OPS, BNFAST_HALF_EXACT_COLS(BNFAST_TOD_BF16))

/* The base variants: the compiler's own target (with F16C / AVX2 when the build
 * enables them, e.g. -march=native), else the portable half loads. */
#if BNFAST_VECTOR_EXT && defined(__F16C__)
#define BNFAST_L4_F16_BASE BNFAST_L4_F16_F16C
#define BNFAST_L8_F16_BASE bnfast_load8_f16_f16c
#define BNFAST_TOD_F16_BASE BNFAST_TOD_F16_F16C
#define BNFAST_TOF_F16_BASE BNFAST_TOF_f16_f16c
#else
#define BNFAST_L4_F16_BASE BNFAST_L4_F16_PORTABLE
#define BNFAST_L8_F16_BASE bnfast_load8_f16
#define BNFAST_TOD_F16_BASE BNFAST_TOD_F16
#define BNFAST_TOF_F16_BASE bnfast_f16_to_float
#endif
#if BNFAST_VECTOR_EXT && defined(__AVX2__)
#define BNFAST_L4_BF16_BASE BNFAST_L4_BF16_AVX2
#define BNFAST_L8_BF16_BASE bnfast_load8_bf16_avx2
#else
#define BNFAST_L4_BF16_BASE BNFAST_L4_BF16_PORTABLE
#define BNFAST_L8_BF16_BASE bnfast_load8_bf16
#endif
#if BNFAST_VECTOR_EXT && defined(__AVX__)
#define BNFAST_SUMS_FINISH_BASE BNFAST_SUMS_FINISH_AVX
#define BNFAST_OPS_BASE AVX
#else
#define BNFAST_SUMS_FINISH_BASE BNFAST_SUMS_FINISH_ARRAY
#define BNFAST_OPS_BASE VEC
#endif
BNFAST_DEFINE_STATS_LEAVES(base, , , BNFAST_L4_F16_BASE, BNFAST_L8_F16_BASE, BNFAST_TOD_F16_BASE,
                           BNFAST_TOF_F16_BASE, , BNFAST_L4_BF16_BASE, BNFAST_L8_BF16_BASE,
                           BNFAST_SUMS_FINISH_BASE, BNFAST_OPS_BASE)

#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_STATS_LEAVES(avx2, BNFAST_AVX2_TARGET, BNFAST_F16C_TARGET, BNFAST_L4_F16_F16C,
                           bnfast_load8_f16_f16c, BNFAST_TOD_F16_F16C, BNFAST_TOF_f16_f16c,
                           BNFAST_AVX2_TARGET, BNFAST_L4_BF16_AVX2, bnfast_load8_bf16_avx2,
                           BNFAST_SUMS_FINISH_AVX, AVX)
/* Half column sums on AVX-512: sixteen columns a step before the eight-lane
 * steps, each lane the same operations (the same bits: tests/c/stats_leaves.c).
 * The AVX2 step left this pass compute-bound on a Xeon VM without AVX512-BF16. */
#define BNFAST_HALF_ADD16(S, j, f)                                                       \
    _mm512_storeu_pd((S) + (j), _mm512_add_pd(_mm512_loadu_pd((S) + (j)), BNFAST_W8_Z(f, 0))); \
    _mm512_storeu_pd((S) + (j) + 8,                                                      \
                     _mm512_add_pd(_mm512_loadu_pd((S) + (j) + 8), BNFAST_W8_Z(f, 1)));
#define BNFAST_HALF_COLS_F16_Z(STEP)                                                     \
    for (; j + 16 <= j8; j += 16) STEP(bnfast_h16f, bnfast_load16_f16_z, BNFAST_HALF_ADD16)
/* bfloat16: 32 columns a step first, each row one load widened to its even and
 * odd columns (a shift, an and: two instructions where two widening loads took
 * four), the float sums put back in column order (one vpermt2ps each) and added
 * as BNFAST_HALF_ADD16 adds them: each column the same operations, the same
 * bits. */
#define BNFAST_HALF_EO_LOAD_(p) _mm512_loadu_si512((const void *)(p))
#define BNFAST_HALF_EO_E_(w) ((bnfast_h16f)_mm512_slli_epi32(w, 16))
#define BNFAST_HALF_EO_O_(w) ((bnfast_h16f)_mm512_and_si512(w, BNFAST_BF16_Z_K_(512, 4)))
#define BNFAST_HALF_EO_COLUMNS_(S, jj, e, o)                                             \
    {                                                                                    \
        __m512 e_ = (__m512)(e), o_ = (__m512)(o);                                       \
        BNFAST_HALF_ADD16(S, jj, _mm512_permutex2var_ps(e_, _mm512_set_epi32(           \
            23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), o_))                \
        BNFAST_HALF_ADD16(S, (jj) + 16, _mm512_permutex2var_ps(e_, _mm512_set_epi32(    \
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8), o_))          \
    }
/* The group step's sums of the even (PART E) or odd (O) columns of rows w_[8]. */
#define BNFAST_HALF_EO_GROUP_SUMS_(PART, S, Q)                                           \
    {                                                                                    \
        bnfast_h16f kv_ = BNFAST_HALF_EO_##PART##_(k_);                                  \
        bnfast_h16f d0 = BNFAST_HALF_EO_##PART##_(w_[0]) - kv_;                          \
        bnfast_h16f d1 = BNFAST_HALF_EO_##PART##_(w_[1]) - kv_;                          \
        bnfast_h16f d2 = BNFAST_HALF_EO_##PART##_(w_[2]) - kv_;                          \
        bnfast_h16f d3 = BNFAST_HALF_EO_##PART##_(w_[3]) - kv_;                          \
        bnfast_h16f d4 = BNFAST_HALF_EO_##PART##_(w_[4]) - kv_;                          \
        bnfast_h16f d5 = BNFAST_HALF_EO_##PART##_(w_[5]) - kv_;                          \
        bnfast_h16f d6 = BNFAST_HALF_EO_##PART##_(w_[6]) - kv_;                          \
        bnfast_h16f d7 = BNFAST_HALF_EO_##PART##_(w_[7]) - kv_;                          \
        BNFAST_HALF_COLS_SUMS8(S, Q, d0, d1, d2, d3, d4, d5, d6, d7)                     \
    }
#define BNFAST_HALF_COLS_EO_BNFAST_HALF_COLS_GROUP_STEP                                  \
    {                                                                                    \
        BNFAST_HALF_COLS_PREFETCH                                                        \
        __typeof__(p0) p = p0 + j;                                                       \
        __m512i k_ = BNFAST_HALF_EO_LOAD_(shift + j), w_[8];                             \
        bnfast_h16f se_, so_, qe_, qo_;                                                  \
        int r_;                                                                          \
        for (r_ = 0; r_ < 8; r_++) w_[r_] = BNFAST_HALF_EO_LOAD_(p + r_ * stride);       \
        BNFAST_HALF_EO_GROUP_SUMS_(E, se_, qe_)                                          \
        BNFAST_HALF_EO_GROUP_SUMS_(O, so_, qo_)                                          \
        BNFAST_HALF_EO_COLUMNS_(s1, j, se_, so_)                                         \
        BNFAST_HALF_EO_COLUMNS_(s2, j, qe_, qo_)                                         \
    }
#define BNFAST_HALF_COLS_EO_BNFAST_HALF_COLS_ROW_STEP                                    \
    {                                                                                    \
        __m512i k_ = BNFAST_HALF_EO_LOAD_(shift + j), w_ = BNFAST_HALF_EO_LOAD_(p0 + j); \
        bnfast_h16f de_ = BNFAST_HALF_EO_E_(w_) - BNFAST_HALF_EO_E_(k_);                 \
        bnfast_h16f do_ = BNFAST_HALF_EO_O_(w_) - BNFAST_HALF_EO_O_(k_);                 \
        BNFAST_HALF_EO_COLUMNS_(s1, j, de_, do_)                                         \
        BNFAST_HALF_EO_COLUMNS_(s2, j, de_ * de_, do_ * do_)                             \
    }
#define BNFAST_HALF_COLS_BF16_Z(STEP)                                                    \
    for (; j + 32 <= j8; j += 32) BNFAST_HALF_COLS_EO_##STEP                             \
    for (; j + 16 <= j8; j += 16) STEP(bnfast_h16f, bnfast_load16_bf16_z, BNFAST_HALF_ADD16)
BNFAST_DEFINE_HALF_COLSUMS_OF(bnfast_shifted_colsums_f16_z, bnfast_f16, BNFAST_F16_Z_TARGET,
                              bnfast_load8_f16_f16c, BNFAST_TOF_f16_f16c, AVX,
                              BNFAST_HALF_COLS_F16_Z, )
BNFAST_DEFINE_HALF_COLSUMS_OF(bnfast_shifted_colsums_bf16_z, bnfast_bf16, BNFAST_BF16_Z_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_bf16_to_float, AVX,
                              BNFAST_HALF_COLS_BF16_Z, BNFAST_HALF_EXACT_COLS(BNFAST_TOD_BF16))
/* float32 and float64 column sums on AVX-512: eight columns a step, each lane
 * the scalar column's operations (the same bits).  The AVX2 step's widening
 * and double arithmetic left this pass compute-bound on hot data (~4 values/ns:
 * GCC splits a vector-extension widening into 128-bit halves, hence the
 * intrinsic load).  Xeon VM, float32 training forward, interleaved runs:
 * (256, 1024) one thread 125-133 -> 114-123 us; 32x2048x7x7 channels-last,
 * two threads, 845-910 -> 822-833 us. */
BNFAST_DEFINE_SHIFTED_COLSUMS(bnfast_shifted_colsums_f32_z, float, BNFAST_FLOAT_Z_TARGET,
                              bnfast_v8d, 8, BNFAST_L8_F32_Z, BNFAST_TOD_NATIVE)
BNFAST_DEFINE_SHIFTED_COLSUMS(bnfast_shifted_colsums_f64_z, double, BNFAST_FLOAT_Z_TARGET,
                              bnfast_v8d, 8, BNFAST_L8_F64_Z, BNFAST_TOD_NATIVE)
#define BNFAST_STATS_PICK(T) BNFAST_PICK(bnfast_##T##_base, bnfast_##T##_avx2)
#define BNFAST_STATS_PICK_COLS(T) BNFAST_PICK_Z(bnfast_##T##_base, bnfast_##T##_avx2, bnfast_##T##_z)
#define BNFAST_STATS_PICK_F16(T) BNFAST_PICK_F16C(bnfast_##T##_base, bnfast_##T##_avx2)
#define BNFAST_STATS_PICK_F16_COLS(T) \
    (bnfast_use_f16_z() ? bnfast_##T##_z : BNFAST_STATS_PICK_F16(T))
#define BNFAST_STATS_PICK_BF16_COLS(T) \
    (bnfast_use_bf16_z() ? bnfast_##T##_z : BNFAST_STATS_PICK(T))
#else
#define BNFAST_STATS_PICK(T) bnfast_##T##_base
#define BNFAST_STATS_PICK_F16(T) bnfast_##T##_base
#define BNFAST_STATS_PICK_COLS(T) bnfast_##T##_base
#define BNFAST_STATS_PICK_F16_COLS(T) bnfast_##T##_base
#define BNFAST_STATS_PICK_BF16_COLS(T) bnfast_##T##_base
#endif

#define BNFAST_DEFINE_STATS_ENTRIES(H, T, PICK, PICK_COLS)                               \
    static inline void bnfast_shifted_sums_runs_##H(const T *x, ptrdiff_t runs, ptrdiff_t n, \
                                                    double *shift, double *s1,           \
                                                    double *s2) {                        \
        PICK(shifted_sums_runs_##H)(x, runs, n, shift, s1, s2);                          \
    }                                                                                    \
    static inline void bnfast_shifted_colsums_##H(const T *x, ptrdiff_t rows, ptrdiff_t W, \
                                                  ptrdiff_t stride, const T *shift,      \
                                                  double *s1, double *s2) {              \
        PICK_COLS(shifted_colsums_##H)(x, rows, W, stride, shift, s1, s2);               \
    }
BNFAST_DEFINE_STATS_ENTRIES(f32, float, BNFAST_STATS_PICK, BNFAST_STATS_PICK_COLS)
BNFAST_DEFINE_STATS_ENTRIES(f64, double, BNFAST_STATS_PICK, BNFAST_STATS_PICK_COLS)
BNFAST_DEFINE_STATS_ENTRIES(f16, bnfast_f16, BNFAST_STATS_PICK_F16, BNFAST_STATS_PICK_F16_COLS)
BNFAST_DEFINE_STATS_ENTRIES(bf16, bnfast_bf16, BNFAST_STATS_PICK, BNFAST_STATS_PICK_BF16_COLS)

#endif /* BNFAST_STATS_H */
