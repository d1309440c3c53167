/*
 * The channels-last normalise and backward with the coefficients in registers.
 *
 * The tiled leaves (bnfast_simd.h, bnfast_half_leaves.h) load m[j], a[j] and
 * b[j] from the table for every vector of x: three loads beside the one the
 * data needs.  For a row of C <= 128 channels (C a multiple of 16) the whole
 * pattern fits in 3 * C / 16 zmm registers, and each row is x's loads and y's
 * stores alone, as the channels-first leaf's runs are.  One thread,
 * (16, 64, 56, 56) channels-last float32 eval, in one interleaved run (median):
 * 977 -> 691 us with warm caches, 1567 -> 1219 us cold (torch 972 / 1274);
 * (8, 64, 56, 56) cold 724 -> 557.  (Wider rows walked in 128-channel pieces
 * were slower than the table with warm caches, and pieces of several rows at a
 * time slower cold: the prefetchers lose the stream.)
 *
 *   normalise:  float32, float16 (AVX512F's conversions) and bfloat16 (AVX512-
 *               BF16's, two vectors a conversion as bnfast_half.h's store32, or
 *               AVX512F's integer rounding where the CPU lacks it);
 *   backward:   pass 2 (training, no mask), float32: dx = (dy - d) * a + (x - m)
 *               * b with its four rows in 4 * C / 16 registers, C <= 96.
 *
 * The same arithmetic as the tiled leaves, element by element ((x - m) * a + b,
 * then + addend, then the ReLU's select, rounded once to the storage type; no
 * FMA), the additions pinned with BNFAST_H16_ADD to the operand order whose NaN
 * the other leaves return where both are NaN (the backward's: (dy - d) * a
 * before (x - m) * b, as GCC compiled the plain table leaf at -O3 when this was
 * written: the backward's payloads where both terms are NaN are not specified,
 * tests/c/drivers.h), so the same bits, payloads included (tests/c/rows.c).  AVX-512 only (32 registers; AVX2's 16
 * would hold 32 channels): elsewhere the tables.
 */
#ifndef BNFAST_ROWS_H
#define BNFAST_ROWS_H

#include "bnfast_half_leaves.h"

/* The widest rows held in registers: 8 zmm vectors a coefficient row (normalise,
 * 3 rows), 6 (backward, 4 rows). */
#define BNFAST_ROWS_MAX_C 128
#define BNFAST_GRAD_ROWS_MAX_C 96

#if BNFAST_DISPATCH_AVX2
/* float32's 16-value load and stores, in bnfast_half.h's names (the pairs: two). */
#define bnfast_load16_f32_z(p) (*(const bnfast_h16f *)(p))
#define bnfast_store16_f32_z(p, v) (*(bnfast_h16f *)(p) = (v))
#define bnfast_stream16_f32_z(p, v) _mm512_stream_ps((float *)(p), (__m512)(v))
#define bnfast_store32_f32_z(p, v0, v1) \
    (bnfast_store16_f32_z(p, v0), bnfast_store16_f32_z((p) + 16, v1))
#define bnfast_stream32_f32_z(p, v0, v1) \
    (bnfast_stream16_f32_z(p, v0), bnfast_stream16_f32_z((p) + 16, v1))

/* Every leaf: NAME(x, z, y, rows, m, a, b, d, relu, stream) with the rows m, a,
 * b, d (16 K floats each) in the registers M, A, B, D, then LOOP(K, LOAD16,
 * STORE32, STORE16) with cached or streamed stores.  z: the addend (normalise) or
 * dy (backward); x, z, y of the storage type T. */
#define BNFAST_DEFINE_ROWS_LEAF(NAME, T, SFX, VARIANT, ATTR, K, LOOP)                    \
    ATTR static void NAME(const T *x, const T *z, T *y, ptrdiff_t rows, const float *m,  \
                          const float *a, const float *b, const float *d, int relu,      \
                          int stream) {                                                  \
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
            LOOP(K, bnfast_load16_##SFX##_##VARIANT, bnfast_stream32_##SFX##_##VARIANT,  \
                 bnfast_stream16_##SFX##_##VARIANT)                                      \
        } else {                                                                         \
            LOOP(K, bnfast_load16_##SFX##_##VARIANT, bnfast_store32_##SFX##_##VARIANT,   \
                 bnfast_store16_##SFX##_##VARIANT)                                       \
        }                                                                                \
    }

/* The normalise: rows of (x - M) * A + B (+ z) (ReLU), two vectors a store. */
#define BNFAST_ROWS_VALUE(j, LOAD16, ADD, RELU) ({                                       \
        bnfast_h16f v_ = BNFAST_H16_ADD((LOAD16(x + 16 * (j)) - M[j]) * A[j], B[j]);     \
        if (ADD) v_ = BNFAST_H16_ADD(v_, LOAD16(z + 16 * (j)));                          \
        if (RELU) v_ = BNFAST_H16_RELU(v_);                                              \
        v_; })
#define BNFAST_ROWS_LOOP(K, LOAD16, STORE32, STORE16, ADD, RELU)                         \
    for (r = 0; r < rows; r++, x += C, y += C, z += (ADD) ? C : 0) {                     \
        _Pragma("GCC unroll 8") for (j = 0; j + 1 < (K); j += 2)                         \
            STORE32(y + 16 * j, BNFAST_ROWS_VALUE(j, LOAD16, ADD, RELU),                  \
                    BNFAST_ROWS_VALUE(j + 1, LOAD16, ADD, RELU));                         \
        if ((K) % 2)                                                                     \
            STORE16(y + 16 * ((K) - 1), BNFAST_ROWS_VALUE((K) - 1, LOAD16, ADD, RELU));  \
    }
#define BNFAST_ROWS_EPILOGUES(K, LOAD16, STORE32, STORE16)                               \
    if (z == NULL && !relu) { BNFAST_ROWS_LOOP(K, LOAD16, STORE32, STORE16, 0, 0) }      \
    else if (z == NULL) { BNFAST_ROWS_LOOP(K, LOAD16, STORE32, STORE16, 0, 1) }          \
    else if (!relu) { BNFAST_ROWS_LOOP(K, LOAD16, STORE32, STORE16, 1, 0) }              \
    else { BNFAST_ROWS_LOOP(K, LOAD16, STORE32, STORE16, 1, 1) }
/* The backward: rows of dx = (dy - D) * A + (x - M) * B (float32). */
#define BNFAST_GRAD_ROWS_LOOP(K, LOAD16, STORE32, STORE16)                               \
    for (r = 0; r < rows; r++, x += C, z += C, y += C) {                                 \
        _Pragma("GCC unroll 8") for (j = 0; j < (K); j++) {                             \
            STORE16(y + 16 * j, BNFAST_H16_ADD((LOAD16(z + 16 * j) - D[j]) * A[j],       \
                                               (LOAD16(x + 16 * j) - M[j]) * B[j]));     \
        }                                                                                \
    }

/* One leaf per row width C = 16 K (the coefficients' registers are K-indexed
 * arrays that GCC keeps in zmm once the loops over j are unrolled). */
#define BNFAST_DEFINE_AFFINE_ROWS(K)                                                     \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows##K##_f32_z, float, f32, z,                \
                            BNFAST_FLOAT_Z_TARGET, K, BNFAST_ROWS_EPILOGUES)             \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows##K##_f16_z, bnfast_f16, f16, z,           \
                            BNFAST_F16_Z_TARGET, K, BNFAST_ROWS_EPILOGUES)               \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows##K##_bf16_hw, bnfast_bf16, bf16, hw,      \
                            BNFAST_BF16_HW_TARGET, K, BNFAST_ROWS_EPILOGUES)             \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_affine_rows##K##_bf16_z, bnfast_bf16, bf16, z,        \
                            BNFAST_BF16_Z_TARGET, K, BNFAST_ROWS_EPILOGUES)
#define BNFAST_DEFINE_GRAD_ROWS(K)                                                       \
    BNFAST_DEFINE_ROWS_LEAF(bnfast_grad_rows##K##_f32_z, float, f32, z,                  \
                            BNFAST_FLOAT_Z_TARGET, K, BNFAST_GRAD_ROWS_LOOP)
#define BNFAST_DEFINE_ALL_ROWS(K) BNFAST_DEFINE_AFFINE_ROWS(K) BNFAST_DEFINE_GRAD_ROWS(K)
BNFAST_DEFINE_ALL_ROWS(1)
BNFAST_DEFINE_ALL_ROWS(2)
BNFAST_DEFINE_ALL_ROWS(3)
BNFAST_DEFINE_ALL_ROWS(4)
BNFAST_DEFINE_ALL_ROWS(5)
BNFAST_DEFINE_ALL_ROWS(6)
BNFAST_DEFINE_AFFINE_ROWS(7)
BNFAST_DEFINE_AFFINE_ROWS(8)

/* The leaves of one kind, by K - 1: NAME[C / 16 - 1] takes rows of C channels. */
#define BNFAST_ROWS_TABLE(T, NAME, N)                                                    \
    typedef void (*NAME##_leaf)(const T *, const T *, T *, ptrdiff_t, const float *,     \
                                const float *, const float *, const float *, int, int);  \
    static const NAME##_leaf NAME[N]
#define BNFAST_ROWS_K6(P, S) P##1##S, P##2##S, P##3##S, P##4##S, P##5##S, P##6##S
#define BNFAST_ROWS_K8(P, S) BNFAST_ROWS_K6(P, S), P##7##S, P##8##S
BNFAST_ROWS_TABLE(float, bnfast_affine_rows_f32_z, 8) = {
    BNFAST_ROWS_K8(bnfast_affine_rows, _f32_z)};
BNFAST_ROWS_TABLE(bnfast_f16, bnfast_affine_rows_f16_z, 8) = {
    BNFAST_ROWS_K8(bnfast_affine_rows, _f16_z)};
BNFAST_ROWS_TABLE(bnfast_bf16, bnfast_affine_rows_bf16_hw, 8) = {
    BNFAST_ROWS_K8(bnfast_affine_rows, _bf16_hw)};
BNFAST_ROWS_TABLE(bnfast_bf16, bnfast_affine_rows_bf16_z, 8) = {
    BNFAST_ROWS_K8(bnfast_affine_rows, _bf16_z)};
BNFAST_ROWS_TABLE(float, bnfast_grad_rows_f32_z, 6) = {BNFAST_ROWS_K6(bnfast_grad_rows, _f32_z)};

/* Whether rows of C channels of T go to a register leaf: C a multiple of 16 up to
 * MAX, the CPU's instructions there (HAS), and when streamed (non-temporal stores
 * of 64 bytes, or 32 for float16's) every row of y starting on their boundary. */
#define BNFAST_ROWS_FIT(C, MAX, HAS, y, T, ALIGN, stream)                                \
    ((C) % 16 == 0 && (C) <= (MAX) && (HAS)                                              \
     && (!(stream) || ((size_t)(y) % (ALIGN) == 0 && ((C) * sizeof(T)) % (ALIGN) == 0)))
static inline int bnfast_affine_rows_f32_fits(ptrdiff_t C, const float *y, int stream) {
    return BNFAST_ROWS_FIT(C, BNFAST_ROWS_MAX_C, bnfast_use_float_z(), y, float, 64, stream);
}
static inline int bnfast_affine_rows_f16_fits(ptrdiff_t C, const bnfast_f16 *y, int stream) {
    return BNFAST_ROWS_FIT(C, BNFAST_ROWS_MAX_C, bnfast_use_f16_z(), y, bnfast_f16, 32, stream);
}
static inline int bnfast_affine_rows_bf16_fits(ptrdiff_t C, const bnfast_bf16 *y, int stream) {
    return BNFAST_ROWS_FIT(C, BNFAST_ROWS_MAX_C, bnfast_use_bf16_hw() || bnfast_use_bf16_z(), y,
                           bnfast_bf16, 64, stream);
}
static inline int bnfast_grad_rows_f32_fits(ptrdiff_t C, const float *dx, int stream) {
    return BNFAST_ROWS_FIT(C, BNFAST_GRAD_ROWS_MAX_C, bnfast_use_float_z(), dx, float, 64,
                           stream);
}
/* relu?((x - m) * a + b + addend?) over rows rows of C values (fits(C) true);
 * m, a, b: C floats each. */
#define BNFAST_DEFINE_AFFINE_ROWS_ENTRY(T, SFX, LEAVES)                                  \
    static inline void bnfast_affine_rows_##SFX(const T *x, const T *add, T *y,          \
                                                ptrdiff_t rows, ptrdiff_t C,             \
                                                const float *m, const float *a,          \
                                                const float *b, int relu, int stream) {  \
        LEAVES[C / 16 - 1](x, add, y, rows, m, a, b, b, relu, stream);                   \
    }
BNFAST_DEFINE_AFFINE_ROWS_ENTRY(float, f32, bnfast_affine_rows_f32_z)
BNFAST_DEFINE_AFFINE_ROWS_ENTRY(bnfast_f16, f16, bnfast_affine_rows_f16_z)
BNFAST_DEFINE_AFFINE_ROWS_ENTRY(bnfast_bf16, bf16,
                                (bnfast_use_bf16_hw() ? bnfast_affine_rows_bf16_hw
                                                      : bnfast_affine_rows_bf16_z))
/* dx = (dy - d) * a + (x - m) * b over rows rows of C values (fits(C) true). */
static inline void bnfast_grad_rows_f32(const float *x, const float *dy, float *dx,
                                        ptrdiff_t rows, ptrdiff_t C, const float *m,
                                        const float *a, const float *b, const float *d,
                                        int stream) {
    bnfast_grad_rows_f32_z[C / 16 - 1](x, dy, dx, rows, m, a, b, d, 0, stream);
}
#else
/* Portable builds: the tables. */
#define BNFAST_DEFINE_NO_ROWS(T, SFX)                                                    \
    static inline int bnfast_affine_rows_##SFX##_fits(ptrdiff_t C, const T *y, int s) {  \
        (void)C; (void)y; (void)s;                                                       \
        return 0;                                                                        \
    }                                                                                    \
    static inline void bnfast_affine_rows_##SFX(const T *x, const T *add, T *y,          \
                                                ptrdiff_t rows, ptrdiff_t C,             \
                                                const float *m, const float *a,          \
                                                const float *b, int relu, int stream) {  \
        (void)x; (void)add; (void)y; (void)rows; (void)C; (void)m; (void)a; (void)b;     \
        (void)relu; (void)stream;                                                        \
    }
BNFAST_DEFINE_NO_ROWS(float, f32)
BNFAST_DEFINE_NO_ROWS(bnfast_f16, f16)
BNFAST_DEFINE_NO_ROWS(bnfast_bf16, bf16)
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
