/*
 * Float sums of half-precision data, folded into double: the run engine that
 * the statistics (bnfast_stats.h) and the backward's pass 1
 * (bnfast_backward_half.h) share.
 *
 * Half values are exact in float, so a leaf can form its terms and sum them in
 * float, a few at a time, and fold the float sums into double: half the vector
 * work of widening every value to double (which had left the half leaves as
 * slow as float32's, arithmetic-bound at half the bytes).
 *
 * A run of n values, two sums (F of the terms STEP puts first, G second):
 *   n < 8:            lane i takes value i (arrays), then the eight lanes combined
 *                     in float;
 *   n <= SHORT (128): 16 float lanes (lane l: values i % 16 == l), the last
 *                     n % 8 values as a full vector of the run's last eight
 *                     with those already counted masked to +0, then the two
 *                     halves added and eight lanes combined in float in
 *                     BNFAST_COMBINE8's order (7x7 and 8x8 images: a run's
 *                     fixed cost was most of its time);
 *   longer:           16 float lanes for BURST (256) values at a time, each
 *                     burst folded into eight double lanes (lane j +=
 *                     (double)f[j] + (double)f[j + 8]); the last n % 16
 *                     values by the job's double TAIL, which also finishes.
 * Every float sum has at most 16 terms (short: 13 roundings in all), so each
 * sum is within ~20 float32 ulps of the sum of its terms' magnitudes: float32-
 * exact.  The portable build (BNFAST_NO_SIMD) does the same operations in the
 * same order: the same bits.
 *
 * Why not double: summed in double the variance of half data is exact (~2^-51
 * against ~2^-24 here, a bias: half values' squares often tie and ties round
 * to an even partial sum), but on Zen 4 widening alone (vcvtph2ps, vcvtps2pd:
 * 0.092-0.102 ns a value, one thread) takes longer than this whole engine
 * (0.069-0.079): a double run leaf took the statistics of 32x512x28x28
 * float16 from 0.63 to 1.11-1.23 ms, float32's time (session 24, README).
 */
#ifndef BNFAST_FLOAT_SUMS_H
#define BNFAST_FLOAT_SUMS_H

#include "bnfast_half.h"

#define BNFAST_HALF_BURST 256
#define BNFAST_HALF_SHORT 128

/* A run of n < 8 values: lane i takes value i (STEP1), the eight lanes combined
 * in float, in BNFAST_COMBINE8's order. */
#define BNFAST_FLOAT_TINY(STEP1, S1, S2, ...)                                            \
    {                                                                                    \
        float F_[8] = {0}, G_[8] = {0};                                                  \
        ptrdiff_t t_;                                                                    \
        for (t_ = 0; t_ < n; t_++) STEP1(t_, F_[t_], G_[t_], 1, __VA_ARGS__)             \
        (S1) = (double)BNFAST_COMBINE8(F_);                                              \
        (S2) = (double)BNFAST_COMBINE8(G_);                                              \
    }

#if BNFAST_VECTOR_EXT
/* W4(f, h): the low (h = 0) or high (h = 1) four floats of eight, widened;
 * by vcvtps2pd where the target has AVX (GCC's lowering of the portable form
 * went through the stack: a quarter of a 49-value run's time). */
#define BNFAST_W4_VEC(f, h) __builtin_convertvector(                                    \
        __builtin_shufflevector(f, f, 4 * (h), 4 * (h) + 1, 4 * (h) + 2, 4 * (h) + 3), bnfast_v4d)
/* The float finish of a short run: lanes F and G (eight each) combined in
 * BNFAST_COMBINE8's order, in float, then widened. */
#define BNFAST_COMBINE8F_VEC(F, G, S1, S2)                                               \
    {                                                                                    \
        bnfast_h8f F_ = (F), G_ = (G);                                                   \
        float a_[8], b_[8];                                                              \
        int l_;                                                                          \
        for (l_ = 0; l_ < 8; l_++) { a_[l_] = F_[l_]; b_[l_] = G_[l_]; }                 \
        (S1) = (double)BNFAST_COMBINE8(a_);                                              \
        (S2) = (double)BNFAST_COMBINE8(b_);                                              \
    }
/* ALL8(m): every lane of the int vector m is nonzero. */
#define BNFAST_ALL8_VEC(m) ({                                                            \
        bnfast_h8i m_ = (m); int l_, a_ = 1;                                             \
        for (l_ = 0; l_ < 8; l_++) a_ &= m_[l_] != 0;                                    \
        a_; })
#if defined(__x86_64__) || defined(__i386__)
#define BNFAST_ALL8_AVX(m) (_mm256_movemask_ps((__m256)(m)) == 0xff)
#define BNFAST_W4_AVX(f, h) ((bnfast_v4d)_mm256_cvtps_pd(                                 \
        (h) ? _mm256_extractf128_ps((__m256)(f), 1) : _mm256_castps256_ps128((__m256)(f))))
#define BNFAST_COMBINE8F_AVX(F, G, S1, S2)                                               \
    {   /* (F0+F1, F2+F3, G0+G1, G2+G3 | F4+F5, F6+F7, G4+G5, G6+G7), then pairs */     \
        __m256 h_ = _mm256_hadd_ps((__m256)(F), (__m256)(G));                            \
        h_ = _mm256_hadd_ps(h_, h_);                                                     \
        __m128 q_ = _mm_add_ps(_mm256_castps256_ps128(h_), _mm256_extractf128_ps(h_, 1)); \
        (S1) = (double)_mm_cvtss_f32(q_);                                                \
        (S2) = (double)_mm_cvtss_f32(_mm_movehdup_ps(q_));                               \
    }
#endif

/* One run (the caller's n, n8 = n - n % 8, n16 = n - n % 16, i, e, lane) into
 * S1, S2.  STEP(i, F, G, KEEP) adds the terms of values i..i+7 into the float
 * vectors F, G, the lanes where the int vector KEEP is 0 as +0 (KEEP -1 for
 * all), STEP1 the same for one value (the runs of n < 8); TAIL(a0, a1, b0, b1, S1, S2, ...)
 * adds values n16.. into the double lanes and finishes; each also gets the
 * leaf's own arguments (...: its loads and conversions).  OPS: AVX or VEC. */
#define BNFAST_FLOAT_RUN(STEP, STEP1, TAIL, OPS, S1, S2, ...)                            \
    if (n < 8) {                                                                         \
        BNFAST_FLOAT_TINY(STEP1, S1, S2, __VA_ARGS__)                                    \
    } else if (n <= BNFAST_HALF_SHORT) {                                                 \
        bnfast_h8f f0 = {0}, f1 = f0, g0 = f0, g1 = f0;                                  \
        for (i = 0; i < n16; i += 16) {                                                  \
            STEP(i, f0, g0, all_, __VA_ARGS__) STEP(i + 8, f1, g1, all_, __VA_ARGS__)    \
        }                                                                                \
        if (n - i >= 8) { STEP(i, f0, g0, all_, __VA_ARGS__) i += 8; }                   \
        if (i < n) {  /* the last eight, those counted masked off */                     \
            STEP(n - 8, f1, g1, lane_ >= (bnfast_h8i){0} + (int)(8 - (n - i)), __VA_ARGS__) \
        }                                                                                \
        BNFAST_COMBINE8F_##OPS(f0 + f1, g0 + g1, S1, S2)                                 \
    } else {                                                                             \
        bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0;                         \
        for (i = 0; i < n16;) {                                                          \
            bnfast_h8f f0 = {0}, f1 = f0, g0 = f0, g1 = f0;                              \
            for (e = i + BNFAST_HALF_BURST < n16 ? i + BNFAST_HALF_BURST : n16;          \
                 i < e; i += 16) {                                               \
                STEP(i, f0, g0, all_, __VA_ARGS__) STEP(i + 8, f1, g1, all_, __VA_ARGS__) \
            }                                                                            \
            a0 += BNFAST_W4_##OPS(f0, 0) + BNFAST_W4_##OPS(f1, 0);                       \
            a1 += BNFAST_W4_##OPS(f0, 1) + BNFAST_W4_##OPS(f1, 1);                       \
            b0 += BNFAST_W4_##OPS(g0, 0) + BNFAST_W4_##OPS(g1, 0);                       \
            b1 += BNFAST_W4_##OPS(g0, 1) + BNFAST_W4_##OPS(g1, 1);                       \
        }                                                                                \
        TAIL(a0, a1, b0, b1, S1, S2, __VA_ARGS__)                                        \
    }
/* The engine's constants, declared once per leaf. */
#define BNFAST_FLOAT_RUN_DECLS                                                           \
    ptrdiff_t i, e, n8 = n - n % 8, n16 = n - n % 16;                                    \
    const bnfast_h8i lane_ = {0, 1, 2, 3, 4, 5, 6, 7}, all_ = lane_ >= 0;                \
    (void)n8;
#endif

/* The portable engine: STEP1(i, F, G, KEEP) adds value i's terms into the
 * floats F, G (+0 if !KEEP); TAIL1(a, b, S1, S2) adds values i.. into the
 * double lanes a[i % 8], b[i % 8] and combines. */
#define BNFAST_FLOAT_RUN_SCALAR(STEP1, TAIL1, S1, S2, ...)                               \
    if (n < 8) {                                                                         \
        BNFAST_FLOAT_TINY(STEP1, S1, S2, __VA_ARGS__)                                    \
    } else if (n <= BNFAST_HALF_SHORT) {                                                 \
        float f_[16] = {0}, g_[16] = {0}, F_[8], G_[8];                                  \
        for (i = 0; i < n16; i++) STEP1(i, f_[i % 16], g_[i % 16], 1, __VA_ARGS__)       \
        if (n - i >= 8) {                                                                \
            for (l = 0; l < 8; l++) STEP1(i + l, f_[l], g_[l], 1, __VA_ARGS__)           \
            i += 8;                                                                      \
        }                                                                                \
        if (i < n) {                                                                     \
            for (l = 0; l < 8; l++)                                                      \
                STEP1(n - 8 + l, f_[8 + l], g_[8 + l], l >= 8 - (n - i), __VA_ARGS__)    \
        }                                                                                \
        for (l = 0; l < 8; l++) { F_[l] = f_[l] + f_[l + 8]; G_[l] = g_[l] + g_[l + 8]; } \
        (S1) = (double)BNFAST_COMBINE8(F_);                                              \
        (S2) = (double)BNFAST_COMBINE8(G_);                                              \
    } else {                                                                             \
        double a_[8] = {0}, b_[8] = {0};                                                 \
        for (i = 0; i < n16;) {                                                          \
            float f_[16] = {0}, g_[16] = {0};                                            \
            for (e = i + BNFAST_HALF_BURST < n16 ? i + BNFAST_HALF_BURST : n16; i < e; i++) \
                STEP1(i, f_[i % 16], g_[i % 16], 1, __VA_ARGS__)                         \
            for (l = 0; l < 8; l++) {                                                    \
                a_[l] += (double)f_[l] + (double)f_[l + 8];                              \
                b_[l] += (double)g_[l] + (double)g_[l + 8];                              \
            }                                                                            \
        }                                                                                \
        TAIL1(a_, b_, S1, S2, __VA_ARGS__)                                               \
    }
#define BNFAST_FLOAT_RUN_SCALAR_DECLS ptrdiff_t i, e, l, n16 = n - n % 16;

/* The engine of this build, for one leaf definition serving both: ANY takes
 * both steps and both tails; SHIFT_VECTOR(kf) declares the vector kv of the
 * shift kf where there are vectors. */
#if BNFAST_VECTOR_EXT
#define BNFAST_FLOAT_RUN_ANY(STEP, STEP1, TAIL, TAIL1, OPS, S1, S2, ...)                 \
    BNFAST_FLOAT_RUN(STEP, STEP1, TAIL, OPS, S1, S2, __VA_ARGS__)
#define BNFAST_FLOAT_RUN_ANY_DECLS BNFAST_FLOAT_RUN_DECLS
#define BNFAST_FLOAT_SHIFT_VECTOR(kf) bnfast_h8f kv = (bnfast_h8f){0} + (kf);
#else
#define BNFAST_FLOAT_RUN_ANY(STEP, STEP1, TAIL, TAIL1, OPS, S1, S2, ...)                 \
    BNFAST_FLOAT_RUN_SCALAR(STEP1, TAIL1, S1, S2, __VA_ARGS__)
#define BNFAST_FLOAT_RUN_ANY_DECLS BNFAST_FLOAT_RUN_SCALAR_DECLS
#define BNFAST_FLOAT_SHIFT_VECTOR(kf)
#endif

#endif /* BNFAST_FLOAT_SUMS_H */
