/*
 * The channels-last float32 normalise with the coefficients in registers.
 *
 * The tiled leaf (bnfast_simd.h) loads m[j], a[j] and b[j] from the table for
 * every vector of x: three loads beside the one the data needs.  For a row of
 * C <= 128 channels (C a multiple of 16) the whole pattern fits in 3 * C / 16
 * zmm registers, and each row is x's loads and y's stores alone, as the
 * channels-first leaf's runs are.  One thread, (16, 64, 56, 56) channels-last
 * eval, in one interleaved run (median): 977 -> 691 us with warm caches,
 * 1567 -> 1219 us cold (torch 972 / 1274); (8, 64, 56, 56) cold 724 -> 557.
 * (Wider rows walked in 128-channel pieces were slower than the table with warm
 * caches, and pieces of several rows at a time slower cold: the prefetchers
 * lose the stream.)
 *
 * The backward's pass 2 (training, no mask) likewise: dx = (dy * a + (x - m)
 * * b) + d with its four rows in 4 * C / 16 registers, C <= 96.
 *
 * The same arithmetic as the tiled leaves, element by element ((x - m) * a + b,
 * then + addend, then the ReLU's select; no FMA), the additions pinned with
 * BNFAST_H16_ADD to the operand order whose NaN the other leaves return where
 * both are NaN (the backward's: (x - m) * b before dy * a, as GCC compiles the
 * plain expression), so the same bits, payloads included (tests/c/rows.c).  AVX512F only (32 registers; AVX2's 16 would hold 32 channels):
 * elsewhere the tables.
 */
#ifndef BNFAST_ROWS_H
#define BNFAST_ROWS_H

#include "bnfast_half_leaves.h"

/* The widest rows held in registers: 8 zmm vectors a coefficient row (normalise,
 * 3 rows), 6 (backward, 4 rows). */
#define BNFAST_ROWS_MAX_C 128
#define BNFAST_GRAD_ROWS_MAX_C 96

#if BNFAST_DISPATCH_AVX2
#define BNFAST_F32_Z_TARGET __attribute__((target("avx2,avx512f")))
#define BNFAST_ROWS_STORE(p, v) (*(bnfast_h16f *)(p) = (v))
#define BNFAST_ROWS_STREAM(p, v) _mm512_stream_ps((float *)(p), (__m512)(v))
/* Both leaves: NAME(x, z, y, rows, m, a, b, d, relu, stream) with the rows m,
 * a, b, d (16 K floats each) in the registers M, A, B, D, then LOOP(K, STORE)
 * with cached or streamed stores.  z: the addend (normalise) or dy (backward). */
#define BNFAST_DEFINE_ROWS_LEAF(NAME, K, LOOP)                                           \
    BNFAST_F32_Z_TARGET static void NAME(const float *x, const float *z, float *y,       \
                                         ptrdiff_t rows, const float *m, const float *a, \
                                         const float *b, const float *d, int relu,       \
                                         int stream) {                                   \
        const ptrdiff_t C = 16 * (K);                                                    \
        bnfast_h16f M[K], A[K], B[K], D[K];                                              \
        ptrdiff_t r;                                                                     \
        int j;                                                                           \
        for (j = 0; j < (K); j++) {                                                      \
            M[j] = *(const bnfast_h16f *)(m + 16 * j);                                   \
            A[j] = *(const bnfast_h16f *)(a + 16 * j);                                   \
            B[j] = *(const bnfast_h16f *)(b + 16 * j);                                   \
            D[j] = *(const bnfast_h16f *)(d + 16 * j);                                   \
        }                                                                                \
        (void)D; (void)relu;                                                             \
        if (stream) {                                                                    \
            LOOP(K, BNFAST_ROWS_STREAM)                                                  \
        } else {                                                                         \
            LOOP(K, BNFAST_ROWS_STORE)                                                   \
        }                                                                                \
    }

/* The normalise: rows of (x - M) * A + B (+ z) (ReLU). */
#define BNFAST_ROWS_LOOP(K, STORE, ADD, RELU)                                            \
    for (r = 0; r < rows; r++, x += C, y += C, z += (ADD) ? C : 0) {                     \
        _Pragma("GCC unroll 8") for (j = 0; j < (K); j++) {                             \
            bnfast_h16f v_ = (*(const bnfast_h16f *)(x + 16 * j) - M[j]) * A[j];         \
            v_ = BNFAST_H16_ADD(v_, B[j]);                                               \
            if (ADD) v_ = BNFAST_H16_ADD(v_, *(const bnfast_h16f *)(z + 16 * j));        \
            if (RELU) v_ = BNFAST_H16_RELU(v_);                                          \
            STORE(y + 16 * j, v_);                                                       \
        }                                                                                \
    }
#define BNFAST_ROWS_EPILOGUES(K, STORE)                                                  \
    if (z == NULL && !relu) { BNFAST_ROWS_LOOP(K, STORE, 0, 0) }                         \
    else if (z == NULL) { BNFAST_ROWS_LOOP(K, STORE, 0, 1) }                             \
    else if (!relu) { BNFAST_ROWS_LOOP(K, STORE, 1, 0) }                                 \
    else { BNFAST_ROWS_LOOP(K, STORE, 1, 1) }
/* The backward: rows of dx = ((x - M) * B + dy * A) + D. */
#define BNFAST_GRAD_ROWS_LOOP(K, STORE)                                                  \
    for (r = 0; r < rows; r++, x += C, z += C, y += C) {                                 \
        _Pragma("GCC unroll 8") for (j = 0; j < (K); j++) {                             \
            bnfast_h16f v_ = BNFAST_H16_ADD(                                             \
                (*(const bnfast_h16f *)(x + 16 * j) - M[j]) * B[j],                      \
                *(const bnfast_h16f *)(z + 16 * j) * A[j]);                              \
            STORE(y + 16 * j, BNFAST_H16_ADD(v_, D[j]));                                 \
        }                                                                                \
    }
/* One leaf per row width C = 16 K (the coefficients' registers are K-indexed
 * arrays that GCC keeps in zmm once the loop over j is unrolled). */
#define BNFAST_DEFINE_ROWS_LEAVES(K)                                                     \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows##K##_f32_z, K, BNFAST_ROWS_EPILOGUES)     \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_grad_rows##K##_f32_z, K, BNFAST_GRAD_ROWS_LOOP)
BNFAST_DEFINE_ROWS_LEAVES(1)
BNFAST_DEFINE_ROWS_LEAVES(2)
BNFAST_DEFINE_ROWS_LEAVES(3)
BNFAST_DEFINE_ROWS_LEAVES(4)
BNFAST_DEFINE_ROWS_LEAVES(5)
BNFAST_DEFINE_ROWS_LEAVES(6)
BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows7_f32_z, 7, BNFAST_ROWS_EPILOGUES)
BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows8_f32_z, 8, BNFAST_ROWS_EPILOGUES)

typedef void (*bnfast_rows_leaf)(const float *, const float *, float *, ptrdiff_t,
                                 const float *, const float *, const float *, const float *,
                                 int, int);
static const bnfast_rows_leaf bnfast_affine_rows_f32_z[8] = {
    bnfast_affine_rows1_f32_z, bnfast_affine_rows2_f32_z, bnfast_affine_rows3_f32_z,
    bnfast_affine_rows4_f32_z, bnfast_affine_rows5_f32_z, bnfast_affine_rows6_f32_z,
    bnfast_affine_rows7_f32_z, bnfast_affine_rows8_f32_z};
static const bnfast_rows_leaf bnfast_grad_rows_f32_z[6] = {
    bnfast_grad_rows1_f32_z, bnfast_grad_rows2_f32_z, bnfast_grad_rows3_f32_z,
    bnfast_grad_rows4_f32_z, bnfast_grad_rows5_f32_z, bnfast_grad_rows6_f32_z};

/* Whether rows of C channels go to bnfast_affine_rows_f32 (this CPU, this C);
 * streamed (non-temporal 64-byte stores), y must be 64-byte aligned too. */
static inline int bnfast_affine_rows_f32_fits(ptrdiff_t C, const float *y, int stream) {
    return C % 16 == 0 && C <= BNFAST_ROWS_MAX_C && bnfast_use_f16_z()
           && (!stream || ((size_t)y & 63) == 0);
}
/* relu?((x - m) * a + b + addend?) over rows rows of C values (fits(C) true);
 * m, a, b: C floats each. */
static inline void bnfast_affine_rows_f32(const float *x, const float *add, float *y,
                                          ptrdiff_t rows, ptrdiff_t C, const float *m,
                                          const float *a, const float *b, int relu,
                                          int stream) {
    bnfast_affine_rows_f32_z[C / 16 - 1](x, add, y, rows, m, a, b, b, relu, stream);
}
/* The same for the backward's rows (dx as y). */
static inline int bnfast_grad_rows_f32_fits(ptrdiff_t C, const float *dx, int stream) {
    return C % 16 == 0 && C <= BNFAST_GRAD_ROWS_MAX_C && bnfast_use_f16_z()
           && (!stream || ((size_t)dx & 63) == 0);
}
/* dx = (dy * a + (x - m) * b) + d over rows rows of C values (fits(C) true). */
static inline void bnfast_grad_rows_f32(const float *x, const float *dy, float *dx,
                                        ptrdiff_t rows, ptrdiff_t C, const float *m,
                                        const float *a, const float *b, const float *d,
                                        int stream) {
    bnfast_grad_rows_f32_z[C / 16 - 1](x, dy, dx, rows, m, a, b, d, 0, stream);
}
#else
static inline int bnfast_affine_rows_f32_fits(ptrdiff_t C, const float *y, int stream) {
    (void)C; (void)y; (void)stream;
    return 0;
}
static inline void bnfast_affine_rows_f32(const float *x, const float *add, float *y,
                                          ptrdiff_t rows, ptrdiff_t C, const float *m,
                                          const float *a, const float *b, int relu,
                                          int stream) {
    (void)x; (void)add; (void)y; (void)rows; (void)C; (void)m; (void)a; (void)b;
    (void)relu; (void)stream;
}
static inline int bnfast_grad_rows_f32_fits(ptrdiff_t C, const float *dx, int stream) {
    (void)C; (void)dx; (void)stream;
    return 0;
}
static inline void bnfast_grad_rows_f32(const float *x, const float *dy, float *dx,
                                        ptrdiff_t rows, ptrdiff_t C, const float *m,
                                        const float *a, const float *b, const float *d,
                                        int stream) {
    (void)x; (void)dy; (void)dx; (void)rows; (void)C; (void)m; (void)a; (void)b; (void)d;
    (void)stream;
}
#endif

#endif /* BNFAST_ROWS_H */
