/*
 * The per-channel set-up of both directions, each in one pass over the
 * channels.  The forward's (_forward.pyx): from the mean, variance, weight,
 * bias and the mean's residual, the
 * coefficient rows (mean, invstd, scale, shift: what a backward reads) and the
 * apply table that _affine.pxd's top describes (double rows m, a, b; float
 * rows; the half rows; the flag saying whether float data may use the float
 * and half rows).
 *
 * Why C: as Cython it was eight loops over the channels, some of them scalar
 * (GCC could not rule out that the table overlaps the coefficient rows), others
 * 2 lanes wide in the portable build, each writing rows that the next one read
 * back: 7 ns a channel in an evaluation call, ~11 in a training forward, as
 * much as normalising (2, 4096) float32 data takes many times over.  One loop
 * computes each channel's values in registers and writes each once, as wide as
 * the CPU allows (AVX2 or AVX-512F, picked at run time).
 *
 * Every lane does the scalar code's operations (sqrt and division are
 * correctly rounded, no FMA: setup.py builds with -ffp-contract=off), so every
 * variant gives the same bits.  `mean` and `var` may be coef's own rows 0 and
 * 1 (each channel's inputs are read before its outputs are written).
 */
#ifndef BNFAST_TABLE_H
#define BNFAST_TABLE_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "bnfast_simd.h"

/* The distance between a table's rows (in values of the row's type): W plus
 * 16.  Rows exactly W apart put m[j], a[j], b[j] a multiple of 4 KiB apart for
 * wide tiles (W = 1024 float32), on one L1 set and aliasing the output's
 * stores: a (4096, 1024) float32 eval took 960 us on one thread, now 715. */
static inline ptrdiff_t bnfast_table_row(ptrdiff_t W) { return W + 16; }

/* Doubles in an apply table with W coefficients per row: three double rows,
 * three float rows, three half rows (floats), the flag. */
static inline ptrdiff_t bnfast_table_len(ptrdiff_t W) {
    ptrdiff_t R = bnfast_table_row(W);
    return 6 * R + 1;
}

/* A row's first C values (of `size` bytes each) repeated over the rest of its
 * W (a channels-last tile; _tiling.repeat_channels too): copies of the part
 * already written, doubling.  (row[j % C] took an integer division a value,
 * and row[j] = row[j - C] one value at a time for small C.) */
static inline void bnfast_repeat_row(void *row, size_t size, ptrdiff_t C, ptrdiff_t W) {
    char *p = (char *)row;
    ptrdiff_t done, n;
    for (done = C; done < W; done += n) {
        n = done < W - done ? done : W - done;
        memcpy(p + (size_t)done * size, p, (size_t)n * size);
    }
}

/* The channels' coefficients and table entries; without weight, bias,
 * residual (the has_ flags: constants where inlined, so each case is a loop of
 * its own, and the loads are unconditional) those are 1, 0, 0.  Returns nonzero
 * if some finite coefficient does not fit the float rows: a float m beyond
 * 2^100 (x - m could overflow for finite x), or a float a or b beyond float's
 * range.  Non-finite coefficients (a NaN or infinite channel, an infinite
 * weight) give the same NaN/inf either way and must not change the other
 * channels' bits. */
static inline __attribute__((always_inline)) int bnfast_table_channels_(
    const double *mean, const double *var, const double *weight, const double *bias,
    const double *residual, int has_weight, int has_bias, int has_residual, ptrdiff_t C,
    double eps, double *coef, double *table, ptrdiff_t R) {
    float *ft = (float *)(table + 3 * R);
    int unfit = 0;
    ptrdiff_t c;
    /* omp simd: the iterations are independent (mean and var may be coef's rows,
     * read at the index they are written).  Without it GCC would not vectorise
     * the loop, unable to rule out that the table overlaps the rows it reads, nor
     * if-convert the residual's select; setup.py builds with -fopenmp-simd, so
     * this holds without OpenMP too. */
#pragma omp simd reduction(| : unfit)
    for (c = 0; c < C; c++) {
        double m = mean[c];
        double invstd = 1.0 / sqrt(var[c] + eps);
        double a = has_weight ? invstd * weight[c] : invstd;
        double shift = has_bias ? bias[c] : 0.0;
        /* What the exact mean adds to the rounded one, folded into b (a zero
         * residual leaves b alone even where the scale is infinite). */
        double r = has_residual ? residual[c] : 0.0, folded = shift - r * a;
        double b = r != 0.0 ? folded : shift;
        float fm = (float)m, fa = (float)a;
        /* The float rows' m is rounded: what that lost is folded into b too (an
         * infinite m loses nothing: its NaN difference must not make b NaN). */
        double lost = m - (double)fm;
        float fb = (float)((lost != 0.0) & (lost == lost) ? b - lost * a : b);
        /* The half rows: the same map written about its zero z = m - b / a, as
         * (x - hz) * fa + hb with hz = z rounded and hb = b - (m - hz) * a (the
         * same map exactly; |hb| ~ |(hz - z) a| < 2^-24 |z a|, and z's own rounding,
         * 2^-53 |m| where |m| >> |b / a|, does not enter it: m - hz is exact there,
         * Sterbenz).  Float arithmetic then errs by a
         * few 2^-24 of |y| itself, where on the float rows it errs by 2^-24 of
         * (x - m) * a and b: more than half an ulp of a float16 y that cancels to
         * below 2^-12 of them (bfloat16: 2^-15).  (So x = m gives b within a few
         * 2^-24 of it, not b exactly as the float rows do: the same half value
         * unless b lies that close to a rounding boundary of the half type.)
         * Where z or hb is no float of reach (weight 0, a scale below float's
         * normals, |z| > 2^100), the float rows' m and b. */
        double z = m - b / a;
        float hz = (float)z, hb = (float)(b - (m - (double)hz) * a);
        int about_zero = (fabs(z) <= 0x1p100) & (fabsf(fa) >= 0x1p-126f)
                         & (fabsf(fa) <= 0x1.fffffep127f) & (fabsf(hb) <= 0x1.fffffep127f);
        coef[c] = m;
        coef[C + c] = invstd;
        coef[2 * C + c] = a;
        coef[3 * C + c] = shift;
        table[c] = m;
        table[R + c] = a;
        table[2 * R + c] = b;
        ft[c] = fm;
        ft[R + c] = fa;
        ft[2 * R + c] = fb;
        ft[3 * R + c] = about_zero ? hz : fm;
        ft[4 * R + c] = fa;
        ft[5 * R + c] = about_zero ? hb : fb;
        unfit |= ((fabsf(fm) > 0x1p100f) & (fabs(m) <= 0x1.fffffffffffffp1023))
                 | ((fabsf(fa) > 0x1.fffffep127f) & (fabs(a) <= 0x1.fffffffffffffp1023))
                 | ((fabsf(fb) > 0x1.fffffep127f) & (fabs(b) <= 0x1.fffffffffffffp1023));
    }
    return unfit;
}

#define BNFAST_TABLE_CASE_(w, b, r)                                                     \
    bnfast_table_channels_(mean, var, weight, bias, residual, w, b, r, C, eps, coef, table, R)

/* coef: 4 rows of C (mean, invstd, scale, shift); table: bnfast_table_len(W)
 * doubles for W = repeat * C, the channels repeated `repeat` times. */
#define BNFAST_DEFINE_FILL_TABLE(NAME, TARGET)                                          \
    TARGET static void NAME(const double *mean, const double *var, const double *weight, \
                            const double *bias, const double *residual, ptrdiff_t C,     \
                            double eps, ptrdiff_t repeat, double *coef, double *table) { \
        ptrdiff_t W = repeat * C, R = bnfast_table_row(W), row;                         \
        float *ft = (float *)(table + 3 * R);                                           \
        int unfit;                                                                      \
        switch ((weight != NULL) | (bias != NULL) << 1 | (residual != NULL) << 2) {     \
        case 0: unfit = BNFAST_TABLE_CASE_(0, 0, 0); break;                             \
        case 1: unfit = BNFAST_TABLE_CASE_(1, 0, 0); break;                             \
        case 2: unfit = BNFAST_TABLE_CASE_(0, 1, 0); break;                             \
        case 3: unfit = BNFAST_TABLE_CASE_(1, 1, 0); break;                             \
        case 4: unfit = BNFAST_TABLE_CASE_(0, 0, 1); break;                             \
        case 5: unfit = BNFAST_TABLE_CASE_(1, 0, 1); break;                             \
        case 6: unfit = BNFAST_TABLE_CASE_(0, 1, 1); break;                             \
        default: unfit = BNFAST_TABLE_CASE_(1, 1, 1); break;                            \
        }                                                                               \
        /* R = W + 16: the 16 values past W repeat the row's start, so a 16-value */ \
        /* step from any tile position reads its coefficients in one load.        */ \
        for (row = 0; row < 3; row++) {                                                 \
            bnfast_repeat_row(table + row * R, sizeof(double), C, R);                   \
            bnfast_repeat_row(ft + row * R, sizeof(float), C, R);                       \
            bnfast_repeat_row(ft + (row + 3) * R, sizeof(float), C, R);                 \
        }                                                                               \
        table[bnfast_table_len(W) - 1] = unfit ? 0.0 : 1.0;                             \
    }

BNFAST_DEFINE_FILL_TABLE(bnfast_fill_table_base, )
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_FILL_TABLE(bnfast_fill_table_avx2, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_FILL_TABLE(bnfast_fill_table_z, BNFAST_FLOAT_Z_TARGET)
#endif

static inline void bnfast_fill_table(const double *mean, const double *var,
                                     const double *weight, const double *bias,
                                     const double *residual, ptrdiff_t C, double eps,
                                     ptrdiff_t repeat, double *coef, double *table) {
    BNFAST_PICK_Z(bnfast_fill_table_base, bnfast_fill_table_avx2, bnfast_fill_table_z)(
        mean, var, weight, bias, residual, C, eps, repeat, coef, table);
}

/* ---------------------------------------------------------------------------
 * The backward's per-channel set-up (_backward.pyx), the same way: from the
 * forward's invstd, the weight and pass 1's sums,
 *   dx = (dy - dy_mean) * scale + (x - mean) * slope     (torch's formula:
 *   (dy - sum_dy/n - (x - mean) * invstd^2 * sum_xdy/n) * invstd * w),
 * grad_weight = sum_xdy * invstd and grad_bias = sum_dy (NULL: not wanted) in
 * the compute type T (float64 for float64 data, else float32); then pass 2's
 * table of m, a, b, d in T, rows R apart, the channels repeated `repeat` times:
 *   dx = (dy - d) * a + (x - m) * b,
 * the same map written about its terms' zeros: d = dy_mean and m = mean, each
 * rounded to T.  Where dy lies near its mean (dx cancels to ~0) dy - d is
 * exact (Sterbenz), as x - m is where x lies near its mean (mean 1e6, std 1),
 * and T's arithmetic errs by ~2^-24 of the terms, not of dy * a as the form
 * dy * a + (x - m) * b + offset did (3 ulps of a float16 dx near 0 where dy's
 * mean is 1).  With four rows only one zero's rounding can be made good, by
 * moving what it lost into the other zero: the one whose term is larger
 * (|dy_mean * a| against |mean * slope|), so what stays lost is 2^-24 of the
 * smaller; where the mean would move out of reach (slope 0, |m| > 2^100), the
 * mean's residual goes into d, as ever.  As Cython these were scalar loops (~4 ns
 * a channel at C = 4096). */
#define BNFAST_DEFINE_GRAD_LEAVES(SFX, T, TARGET)                                      \
    TARGET static void bnfast_grad_coefficients_##SFX(                                 \
        const double *invstd, const double *weight, const double *sum_dy,              \
        const double *sum_xdy, ptrdiff_t C, double inv_n,                              \
        double *scale, double *slope, double *dy_mean, T *grad_weight, T *grad_bias) { \
        ptrdiff_t c;                                                                   \
        if (weight != NULL) {                                                          \
            _Pragma("omp simd")                                                        \
            for (c = 0; c < C; c++) scale[c] = invstd[c] * weight[c];                  \
        } else {                                                                       \
            memcpy(scale, invstd, (size_t)C * sizeof(double));                         \
        }                                                                              \
        _Pragma("omp simd")                                                            \
        for (c = 0; c < C; c++) {                                                      \
            double a = scale[c], s = invstd[c] * invstd[c] * (sum_xdy[c] * inv_n);     \
            slope[c] = -(s * a);                                                       \
            dy_mean[c] = sum_dy[c] * inv_n;                                            \
        }                                                                              \
        if (grad_weight != NULL) {                                                     \
            _Pragma("omp simd")                                                        \
            for (c = 0; c < C; c++) grad_weight[c] = (T)(sum_xdy[c] * invstd[c]);     \
        }                                                                              \
        if (grad_bias != NULL) {                                                       \
            _Pragma("omp simd")                                                        \
            for (c = 0; c < C; c++) grad_bias[c] = (T)sum_dy[c];                       \
        }                                                                              \
    }                                                                                  \
    TARGET static void bnfast_grad_table_##SFX(                                        \
        const double *mean, const double *scale, const double *slope,                  \
        const double *dy_mean, ptrdiff_t C, ptrdiff_t repeat, ptrdiff_t R, T *table) { \
        ptrdiff_t c, row, W = repeat * C;                                              \
        _Pragma("omp simd")                                                            \
        for (c = 0; c < C; c++) {                                                      \
            double q = dy_mean[c], a = scale[c], s = slope[c], mu = mean[c];           \
            T d = (T)q;                                                                \
            double r = (q - (double)d) * a;                                            \
            double z = r != 0.0 ? mu + r / s : mu;                                     \
            /* false for NaN and inf too */                                            \
            int into_m = (fabs(q * a) >= fabs(mu * s)) & (fabs(z) <= 0x1p100);         \
            T m = (T)(into_m ? z : mu);                                                \
            double lost = (mu - (double)m) * s;                                        \
            /* (a NaN lost -- slope NaN or infinite -- leaves d alone: dx is NaN by */  \
            /* the x term anyway, and one NaN source keeps every variant's bits) */     \
            if (!into_m) d = (T)((lost != 0.0) & (lost == lost) ? q + lost / a : q);   \
            table[c] = m;                                                              \
            table[R + c] = (T)a;                                                       \
            table[2 * R + c] = (T)s;                                                   \
            table[3 * R + c] = d;                                                      \
        }                                                                              \
        for (row = 0; row < 4; row++)                                                  \
            bnfast_repeat_row(table + row * R, sizeof(T), C, W);                       \
    }

BNFAST_DEFINE_GRAD_LEAVES(f32_base, float, )
BNFAST_DEFINE_GRAD_LEAVES(f64_base, double, )
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_GRAD_LEAVES(f32_avx2, float, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_GRAD_LEAVES(f64_avx2, double, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_GRAD_LEAVES(f32_z, float, BNFAST_FLOAT_Z_TARGET)
BNFAST_DEFINE_GRAD_LEAVES(f64_z, double, BNFAST_FLOAT_Z_TARGET)
#endif

/* The entries: the leaves this CPU runs. */
#define BNFAST_DEFINE_GRAD_ENTRIES(SFX, T)                                             \
    static inline void bnfast_grad_coefficients_##SFX(                                 \
        const double *invstd, const double *weight, const double *sum_dy,              \
        const double *sum_xdy, ptrdiff_t C, double inv_n,                              \
        double *scale, double *slope, double *dy_mean, T *grad_weight, T *grad_bias) { \
        BNFAST_PICK_Z(bnfast_grad_coefficients_##SFX##_base,                           \
                      bnfast_grad_coefficients_##SFX##_avx2,                           \
                      bnfast_grad_coefficients_##SFX##_z)(                             \
            invstd, weight, sum_dy, sum_xdy, C, inv_n, scale, slope, dy_mean,          \
            grad_weight, grad_bias);                                                   \
    }                                                                                  \
    static inline void bnfast_grad_table_##SFX(                                        \
        const double *mean, const double *scale, const double *slope,                  \
        const double *dy_mean, ptrdiff_t C, ptrdiff_t repeat, ptrdiff_t R, T *table) { \
        BNFAST_PICK_Z(bnfast_grad_table_##SFX##_base, bnfast_grad_table_##SFX##_avx2,  \
                      bnfast_grad_table_##SFX##_z)(                                    \
            mean, scale, slope, dy_mean, C, repeat, R, table);                         \
    }
BNFAST_DEFINE_GRAD_ENTRIES(f32, float)
BNFAST_DEFINE_GRAD_ENTRIES(f64, double)

#endif
