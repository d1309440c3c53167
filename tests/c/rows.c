/* Driver of src/bnfast_rows.h (tests/test_rows.py): the register-row leaves beside
 * the table leaves they stand in for and the plain C expression, on values with
 * NaN payloads and infinities.
 *
 * Writes one int32 (1 if this CPU runs the AVX-512 leaves, else 0), then per row
 * width C = 16 K (K = 1..8) and epilogue (add, relu): rows x C float32 results of
 * the rows leaf (cached, then streamed), the tiled leaf and the expression; then
 * per C = 16 K (K = 1..6), the backward's: rows leaf (cached, streamed), tiled
 * leaf, expression.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_rows.h"

#define ROWS 7
#define MAXC 128

static uint32_t state = 12345;
static float next_value(void) {
    state = state * 1664525u + 1013904223u;
    uint32_t r = state >> 8;
    if (r % 29 == 0) {  /* a NaN with a payload */
        uint32_t bits = 0x7FC00000u | (r & 0xFFFF);
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    if (r % 31 == 0) return (r & 1) ? INFINITY : -INFINITY;
    return ((float)(r % 20001) - 10000.0f) / 1000.0f;
}

static void emit(const float *v, size_t n) { fwrite(v, sizeof(float), n, stdout); }

int main(void) {
    float *x = aligned_alloc(64, ROWS * MAXC * 4), *add = aligned_alloc(64, ROWS * MAXC * 4);
    float *dy = aligned_alloc(64, ROWS * MAXC * 4), *y = aligned_alloc(64, ROWS * MAXC * 4);
    float coef[4][MAXC];
    int32_t has = bnfast_affine_rows_f32_fits(16, y, 1);
    fwrite(&has, sizeof has, 1, stdout);
    for (int i = 0; i < ROWS * MAXC; i++) { x[i] = next_value(); add[i] = next_value(); dy[i] = next_value(); }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < MAXC; c++) coef[r][c] = next_value();
    for (int K = 1; K <= 8; K++) {
        ptrdiff_t C = 16 * K, n = ROWS * C;
        for (int e = 0; e < 4; e++) {
            const float *a_ = (e & 1) ? add : NULL;
            int relu = e >> 1;
            for (int stream = 0; stream < 2; stream++) {
                memset(y, 0, n * 4);
                if (has) bnfast_affine_rows_f32(x, a_, y, ROWS, C, coef[0], coef[1], coef[2], relu, stream);
                emit(y, n);
            }
            bnfast_affine_tiled_f32(x, a_, y, n, C, coef[0], coef[1], coef[2], relu);
            emit(y, n);
            for (ptrdiff_t i = 0; i < n; i++) {
                float v = (x[i] - coef[0][i % C]) * coef[1][i % C] + coef[2][i % C];
                if (a_) v = v + a_[i];
                if (relu) v = v < 0 ? 0.0f : v;
                y[i] = v;
            }
            emit(y, n);
        }
    }
    for (int K = 1; K <= 6; K++) {
        ptrdiff_t C = 16 * K, n = ROWS * C;
        for (int stream = 0; stream < 2; stream++) {
            memset(y, 0, n * 4);
            if (has) bnfast_grad_rows_f32(x, dy, y, ROWS, C, coef[0], coef[1], coef[2], coef[3], stream);
            emit(y, n);
        }
        for (ptrdiff_t r = 0; r < ROWS; r++)
            bnfast_grad_run_tiled_f32(x + r * C, dy + r * C, NULL, r * C, C, coef[0], coef[1],
                                      coef[2], coef[3], 1, 0, y + r * C, NULL);
        emit(y, n);
        for (ptrdiff_t i = 0; i < n; i++) {
            ptrdiff_t c = i % C;
            y[i] = (dy[i] - coef[3][c]) * coef[1][c] + (x[i] - coef[0][c]) * coef[2][c];
        }
        emit(y, n);
    }
    return 0;
}
