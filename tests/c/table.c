/* Driver of src/bnfast_table.h (tests/test_table.py): the per-channel set-up,
 * every leaf, on five value sets (see value(): the float rows'
 * limits crossed and just kept), each with NaN, infinite and negative inputs, for every choice of weight / bias / residual present and two
 * tile repeats.
 *
 * Writes two int32 (1 if this CPU runs the AVX2, the AVX-512 leaf, else 0), then
 * per value set its five input rows (mean, var, weight, bias, residual: C
 * doubles each), then per (value set, case 0-7: bit 0 weight, bit 1 bias, bit 2
 * residual, repeat 1 and 3, leaf: portable, AVX2, AVX-512 (zeros where the CPU
 * lacks it), the picked one with mean and var given as the coefficient rows
 * they become) the 4 C
 * coefficient doubles and the bnfast_table_len(repeat * C) table doubles (the
 * table zeroed first, so its padding is 0); then the backward's leaves (see
 * below).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_table.h"

#define C 37
#define EPS 1e-5
#define SETS 5

static uint32_t state = 12345;
static double uniform(void) {  /* in [0, 1) */
    state = state * 1664525u + 1013904223u;
    return (double)(state >> 8) / 16777216.0;
}

/* Row r of value set v, channel c: ordinary values, and special ones in fixed
 * channels (NaN, infinities, a negative variance, zero residuals). */
static double value(int v, int r, int c) {
    double u = uniform() * 4.0 - 2.0;
    if (c == 3) return NAN;
    if (c == 5) return r == 1 ? 0.0 : INFINITY;   /* variance 0: invstd 1/sqrt(eps) */
    if (c == 7) return r == 1 ? -1.0 : -INFINITY; /* a negative variance: NaN */
    if (c == 8 && r == 2) return INFINITY;        /* an infinite scale ... */
    if (c == 12 && (r == 3 || r == 4)) return -0.0;  /* a bias of -0.0 ... */
    if (r == 4 && c % 4 == 0) return 0.0;         /* ... whose residual 0 leaves b alone */
    /* Sets 1-3: one coefficient beyond the float rows (with weight, bias and
     * residual present): m beyond 2^100, a beyond float, b beyond float.  Set 4:
     * each just within (m = 2^100, a and b rounding down to FLT_MAX). */
    if (v == 1 && c == 11 && r == 0) return 0x1p100 * 1.5;
    if (v == 2 && c == 13 && r == 2) return 3.4028236e38 / 316.2;  /* x invstd 316.2... */
    if (v == 2 && c == 13 && r == 1) return 0.0;
    if (v == 3 && c == 17 && r == 3) return 3.4028236e38;
    if (v == 4 && c == 11 && r == 0) return 0x1p100;
    if (v == 4 && c == 13 && r == 2) return 3.4e38 / 316.3;  /* a ~3.4e38, below FLT_MAX */
    if (v == 4 && c == 13 && r == 1) return 0.0;
    if (v == 4 && c == 17 && r == 3) return 3.4028235e38;
    if (v == 4 && c == 17 && r == 4) return 0.0;
    /* The half rows' other cases (where a weight is given): a weight of 0 (no
     * zero to write the map about), a scale below float's normals. */
    if (c == 19 && r == 2) return 0.0;
    if (c == 23 && r == 2) return 1e-40;
    if (r == 1) return uniform() * 9.0;           /* a variance */
    if (r == 4) return u * 1e-17;                 /* a residual */
    return u * 3.0;
}

static void emit(const void *p, size_t bytes) { fwrite(p, 1, bytes, stdout); }

int main(void) {
    double in[SETS][5][C];
    int32_t has[2] = {0, 0};
#if BNFAST_DISPATCH_AVX2
    has[0] = bnfast_use_avx2();
    has[1] = bnfast_use_float_z();
#endif
    emit(has, sizeof has);
    for (int v = 0; v < SETS; v++)
        for (int r = 0; r < 5; r++)
            for (int c = 0; c < C; c++) in[v][r][c] = value(v, r, c);
    emit(in, sizeof in);
    double *coef = malloc(4 * C * sizeof(double));
    double *table = malloc(bnfast_table_len(3 * C) * sizeof(double));
    for (int v = 0; v < SETS; v++)
        for (int k = 0; k < 8; k++)
            for (int repeat = 1; repeat <= 3; repeat += 2)
                for (int leaf = 0; leaf < 4; leaf++) {
                    size_t len = (size_t)bnfast_table_len(repeat * C);
                    const double *w = (k & 1) ? in[v][2] : NULL;
                    const double *b = (k & 2) ? in[v][3] : NULL;
                    const double *res = (k & 4) ? in[v][4] : NULL;
                    memset(coef, 0, 4 * C * sizeof(double));
                    memset(table, 0, len * sizeof(double));
                    if (leaf == 3) {  /* in place, as _forward.pyx calls it */
                        memcpy(coef, in[v][0], C * sizeof(double));
                        memcpy(coef + C, in[v][1], C * sizeof(double));
                        bnfast_fill_table(coef, coef + C, w, b, res, C, EPS, repeat, coef, table);
                    } else if (leaf == 0)
                        bnfast_fill_table_base(in[v][0], in[v][1], w, b, res, C, EPS, repeat,
                                               coef, table);
#if BNFAST_DISPATCH_AVX2
                    else if (leaf == 1 && has[0])
                        bnfast_fill_table_avx2(in[v][0], in[v][1], w, b, res, C, EPS, repeat,
                                               coef, table);
                    else if (leaf == 2 && has[1])
                        bnfast_fill_table_z(in[v][0], in[v][1], w, b, res, C, EPS, repeat,
                                            coef, table);
#endif
                    emit(coef, 4 * C * sizeof(double));
                    emit(table, len * sizeof(double));
                }
    /* The backward's: per (value set, case 0-3: bit 0 weight, bit 1 grad_weight and
     * grad_bias wanted, inv_n 1/7 then 0 (evaluation), compute type float then
     * double, repeat 1 and 3, leaf as above but the last: the picked one) scale,
     * slope, dy_mean (C doubles each), grad_weight, grad_bias (C of the compute type
     * each, zeros when not wanted) and the table (4 rows W + 8 apart, zeroed
     * first).  Inputs: a set's rows as mean, invstd, weight, sum_dy, sum_xdy. */
    double *rows3 = malloc(3 * C * sizeof(double));
    double *grads = malloc(2 * C * sizeof(double));
    double *gtable = malloc(4 * (3 * C + 8) * sizeof(double));
    for (int v = 0; v < SETS; v++)
        for (int k = 0; k < 4; k++)
            for (int z = 0; z < 2; z++)
                for (int dbl = 0; dbl < 2; dbl++)
                    for (int repeat = 1; repeat <= 3; repeat += 2)
                        for (int leaf = 0; leaf < 4; leaf++) {
                            const double *w = (k & 1) ? in[v][2] : NULL;
                            double inv_n = z ? 0.0 : 1.0 / 7.0;
                            ptrdiff_t R = repeat * C + 8;
                            size_t size = dbl ? sizeof(double) : sizeof(float);
                            void *gw = (k & 2) ? (void *)grads : NULL;
                            void *gb = (k & 2) ? (void *)((char *)grads + C * size) : NULL;
                            memset(rows3, 0, 3 * C * sizeof(double));
                            memset(grads, 0, 2 * C * sizeof(double));
                            memset(gtable, 0, 4 * (3 * C + 8) * sizeof(double));
#define GRAD_CASE(SFX, T, COEF, TABLE)                                                  \
    {                                                                                  \
        COEF(in[v][1], w, in[v][3], in[v][4], C, inv_n, rows3, rows3 + C,              \
             rows3 + 2 * C, (T *)gw, (T *)gb);                                         \
        TABLE(in[v][0], rows3, rows3 + C, rows3 + 2 * C, C, repeat, R, (T *)gtable);    \
    }
#define GRAD_LEAF(SFX, T, V) \
    GRAD_CASE(SFX, T, bnfast_grad_coefficients_##SFX##_##V, bnfast_grad_table_##SFX##_##V)
                            if (leaf == 3) {
                                if (dbl) GRAD_CASE(f64, double, bnfast_grad_coefficients_f64, bnfast_grad_table_f64)
                                else GRAD_CASE(f32, float, bnfast_grad_coefficients_f32, bnfast_grad_table_f32)
                            } else if (leaf == 0) {
                                if (dbl) GRAD_LEAF(f64, double, base)
                                else GRAD_LEAF(f32, float, base)
                            }
#if BNFAST_DISPATCH_AVX2
                            else if (leaf == 1 && has[0]) {
                                if (dbl) GRAD_LEAF(f64, double, avx2)
                                else GRAD_LEAF(f32, float, avx2)
                            } else if (leaf == 2 && has[1]) {
                                if (dbl) GRAD_LEAF(f64, double, z)
                                else GRAD_LEAF(f32, float, z)
                            }
#endif
                            emit(rows3, 3 * C * sizeof(double));
                            emit(grads, 2 * C * size);
                            emit(gtable, 4 * (size_t)R * size);
                        }
    free(rows3);
    free(grads);
    free(gtable);
    free(coef);
    free(table);
    return 0;
}
