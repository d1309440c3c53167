/*
 * The backward's leaves for half-precision storage (float16, bfloat16).  One
 * definition for both half types (the macros below).
 *
 * In registers where the CPU converts (F16C for float16; bfloat16 is an unpack
 * under zeros, AVX2), picked at run time:
 *   pass 1, channels-first without a mask: float sums folded into double
 *     (bnfast_float_sums.h), float32-exact, at half the vector work;
 *   pass 1, channels-last and masked: the float32 leaves' bodies
 *     (bnfast_backward_simd.h) with half load kinds -- half -> float -> double
 *     is exact, so the same lanes, order and row groups (float's) give
 *     float32's sums bit for bit;
 *   pass 2 without a mask: dx = round((dy - d) * a + (x - m) * b) in float,
 *     non-temporal stores where asked (bnfast.backward.streams: 16 MiB and more).
 * Staged elsewhere (bnfast_half.h): widen into float buffers, run the float32
 * leaf of the same job, narrow what it writes -- the portable build's masked
 * pass 1 and the masked pass 2.  Channels-first runs are staged whole (short
 * runs) or in pieces of multiples of 8 through the float32 leaf's loop with its
 * 8 lanes carried and its own tail and combine (bnfast_dot_lanes_f32);
 * channels-last column sums stage multiples of four rows (the float32 leaf's
 * row group): the same bits again.
 *
 * dx is float32's dx of the same values, rounded once to the half type; a
 * masked gradient g is a copy of half values (or +0).
 *
 * Aliasing: each value (each staged chunk) is read before it is written, so
 * dx may be x or dy, and g may be dy, as for the float32 leaves.
 */
#ifndef BNFAST_BACKWARD_HALF_H
#define BNFAST_BACKWARD_HALF_H

#include <math.h>

#include "bnfast_float_sums.h"
#include "bnfast_half.h"
#include "bnfast_half_leaves.h"
#include "bnfast_backward_simd.h"

/* Values per staged piece of the channels-first dot leaves (a multiple of 8):
 * small, so that reading the next piece and summing this one overlap.  Runs up
 * to this long are staged whole (several per piece); longer ones in pieces
 * through the float32 leaves' carried lanes (bnfast_dot_lanes_f32). */
#ifndef BNFAST_DOT_STAGE
#define BNFAST_DOT_STAGE 256
#endif

/* Values per staged chunk of pass 2's leaves (three float buffers of it). */
#define BNFAST_GRAD_STAGE 1024

/* Channels-last pass 1 with a mask, staged (no F16C / AVX2): R rows of W
 * columns, R a multiple of 4 (the float32 column leaves' row group), about
 * BNFAST_COLDOT_BUDGET values a buffer (at least four rows), the staged rows
 * bnfast_coldot_stage_stride(W, stride) floats apart. */
#ifndef BNFAST_COLDOT_BUDGET
#define BNFAST_COLDOT_BUDGET 1024
#endif
static inline ptrdiff_t bnfast_coldot_stage_rows(ptrdiff_t W) {
    ptrdiff_t r = W > 0 ? (BNFAST_COLDOT_BUDGET / W) / 4 * 4 : 4;
    return r < 4 ? 4 : r;
}
/* The staged rows' stride: at least W, and grouped (BNFAST_ROW_GROUP) as the
 * source rows `stride` apart are, so the float32 leaf sums in their order.
 * Only rows under 512 floats (2 KiB) can be grouped by one: W < 512 then. */
static inline ptrdiff_t bnfast_coldot_stage_stride(ptrdiff_t W, ptrdiff_t stride) {
    if (BNFAST_ROW_GROUP(float, W) == BNFAST_ROW_GROUP(float, stride)) return W;
    return BNFAST_ROW_GROUP(float, stride) == 4 ? 512 : 128;
}
/* Floats of scratch one coldot call of W columns, rows stride apart, needs:
 * x and y buffers of R staged rows. */
static inline ptrdiff_t bnfast_coldot_stage_len(ptrdiff_t W, ptrdiff_t stride) {
    ptrdiff_t s = bnfast_coldot_stage_stride(W, stride);
    return 2 * bnfast_coldot_stage_rows(s) * s;
}

/* ---------------------------------------------------------------------------
 * Pass 2 without a mask, in registers (bnfast_half.h's load8/store8), as the
 * forward's normalise: the float32 leaves' arithmetic on the widened values,
 *   training  dx = round((dy - d) * a + (x - m) * b),   eval  dx = round(dy * a),
 * no staging (a store and a reload per value: pass 2 ran at ~0.9x float32's
 * time).  SCALAR: one (m, a, b, d); TILED: per element (a tile piece).
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
#define BNFAST_HALF_GRAD_VECTORS_TO(END, LOAD8, STORE8, MV, AV, BV, DV)                 \
    if (training) {                                                                      \
        for (; i < (END); i += 8)                                                        \
            STORE8(dx + i, (LOAD8(dy + i) - DV) * AV + (LOAD8(x + i) - MV) * BV);        \
    } else {                                                                             \
        for (; i < (END); i += 8) STORE8(dx + i, LOAD8(dy + i) * AV);                    \
    }
#else
#define BNFAST_HALF_GRAD_VECTORS_TO(END, LOAD8, STORE8, MV, AV, BV, DV)
#endif
#define BNFAST_HALF_GRAD_VECTORS(...) BNFAST_HALF_GRAD_VECTORS_TO(n8, __VA_ARGS__)
/* WIDE(coefficient forms): a variant's first steps before the 8-value loop.
 * bfloat16 with AVX512-BF16: 32 values a step, one vcvtne2ps2bf16 and one
 * denormal guard (bnfast_half.h's store32), both halves loaded before the
 * store (dx may be x or dy); the sums pinned as the normalise's (BNFAST_H16_ADD:
 * GCC may swap a vector +'s operands, and NaN payloads follow the order). */
#define BNFAST_HALF_GRAD_NO_WIDE(...)
#if BNFAST_DISPATCH_AVX2
#define BNFAST_HALF_GRAD16(j, M16, A16, B16, D16) ({                                     \
        bnfast_h16f y_ = bnfast_load16_bf16_hw(dy + (j));                                \
        bnfast_h16f g_;                                                                  \
        if (training)                                                                    \
            g_ = BNFAST_H16_ADD((y_ - D16(j)) * A16(j),                                  \
                                (bnfast_load16_bf16_hw(x + (j)) - M16(j)) * B16(j));     \
        else                                                                             \
            g_ = y_ * A16(j);                                                            \
        g_; })
#define BNFAST_HALF_GRAD_WIDE_OF(STORE32, M16, A16, B16, D16)                            \
    for (; i + 32 <= n8; i += 32) {                                                      \
        bnfast_h16f v0_ = BNFAST_HALF_GRAD16(i, M16, A16, B16, D16);                      \
        bnfast_h16f v1_ = BNFAST_HALF_GRAD16(i + 16, M16, A16, B16, D16);                 \
        STORE32(dx + i, v0_, v1_);                                                       \
    }
#define BNFAST_HALF_GRAD_WIDE_HW(...) BNFAST_HALF_GRAD_WIDE_OF(bnfast_store32_bf16_hw, __VA_ARGS__)
/* bfloat16's z variant with one coefficient set (the scalar and runs leaves):
 * even and odd values, as the normalise's BNFAST_H32_EO (the same bits); the
 * tiled leaves' coefficients are per value: split steps. */
#define BNFAST_HALF_GRAD_WIDE_Z(M16, A16, B16, D16)                                      \
    BNFAST_HALF_GRAD_WIDE_Z_##M16(M16, A16, B16, D16)
#define BNFAST_HALF_GRAD_WIDE_Z_BNFAST_HALF_M16T(...)                                    \
    BNFAST_HALF_GRAD_WIDE_OF(bnfast_store32_bf16_z, __VA_ARGS__)
#define BNFAST_HALF_GRAD_EO_(w, E) ((bnfast_h16f)((E) ? _mm512_slli_epi32(w, 16)          \
                                                 : _mm512_and_si512(w, BNFAST_BF16_Z_K_(512, 4))))
#define BNFAST_HALF_GRAD16_EO_(j, gw, xw, E, M16, A16, B16, D16) ({                       \
        bnfast_h16f y_ = BNFAST_HALF_GRAD_EO_(gw, E);                                    \
        bnfast_h16f g_;                                                                  \
        if (training)                                                                    \
            g_ = BNFAST_H16_ADD((y_ - D16(j)) * A16(j),                                  \
                                (BNFAST_HALF_GRAD_EO_(xw, E) - M16(j)) * B16(j));        \
        else                                                                             \
            g_ = y_ * A16(j);                                                            \
        g_; })
#define BNFAST_HALF_GRAD_EO_STEPS(STORE32EO, M16, A16, B16, D16)                        \
    for (; i + 32 <= n8; i += 32) {                                                      \
        __m512i gw_ = _mm512_loadu_si512((const void *)(dy + i));                        \
        __m512i xw_ = training ? _mm512_loadu_si512((const void *)(x + i)) : gw_;        \
        bnfast_h16f e_ = BNFAST_HALF_GRAD16_EO_(i, gw_, xw_, 1, M16, A16, B16, D16);       \
        bnfast_h16f o_ = BNFAST_HALF_GRAD16_EO_(i, gw_, xw_, 0, M16, A16, B16, D16);       \
        STORE32EO(dx + i, e_, o_);                                                       \
    }
#define BNFAST_HALF_GRAD_WIDE_Z_BNFAST_HALF_M16S(M16, A16, B16, D16)                     \
    BNFAST_HALF_GRAD_EO_STEPS(bnfast_store32eo_bf16_z, M16, A16, B16, D16)
/* Streamed (bnfast_grad_vec_*_bf16_z_nt): 8 values a step to dx's 64-byte boundary
 * (its 64-byte stores need one; pieces start 16-byte aligned: at most 3 steps), then
 * the cached variant's 32-value steps with streaming stores: the same bits.  (The
 * 8-value leaf alone streamed, 4096x1024 bfloat16 took 1240 us against 1058 cached.) */
#define BNFAST_HALF_GRAD_ALIGN64(MV, AV, BV, DV)                                         \
    {                                                                                    \
        ptrdiff_t a_ = i;                                                                \
        while (a_ < n8 && ((size_t)(dx + a_) & 63) != 0) a_ += 8;                        \
        BNFAST_HALF_GRAD_VECTORS_TO(a_, bnfast_load8_bf16_avx2, bnfast_stream8_bf16_z,   \
                                    MV, AV, BV, DV)                                      \
    }
#define BNFAST_HALF_GRAD_WIDE_Z_NT(M16, A16, B16, D16)                                   \
    BNFAST_HALF_GRAD_WIDE_Z_NT_##M16(M16, A16, B16, D16)
#define BNFAST_HALF_GRAD_WIDE_Z_NT_BNFAST_HALF_M16T(...)                                 \
    BNFAST_HALF_GRAD_ALIGN64(BNFAST_H8_COEF(m, i), BNFAST_H8_COEF(a, i),                 \
                             BNFAST_H8_COEF(b, i), BNFAST_H8_COEF(d, i))                 \
    BNFAST_HALF_GRAD_WIDE_OF(bnfast_stream32_bf16_z, __VA_ARGS__)
#define BNFAST_HALF_GRAD_WIDE_Z_NT_BNFAST_HALF_M16S(M16, A16, B16, D16)                  \
    BNFAST_HALF_GRAD_ALIGN64(m, a, b, d)                                                 \
    BNFAST_HALF_GRAD_EO_STEPS(bnfast_stream32eo_bf16_z, M16, A16, B16, D16)
/* Coefficient forms at j: the scalar leaves' one value, the tiled leaves' tile. */
/* (set1: {0} + v would turn a -0 coefficient, d of a tiny negative dy mean, into +0) */
#define BNFAST_HALF_M16S(j) ((bnfast_h16f)_mm512_set1_ps(m))
#define BNFAST_HALF_A16S(j) ((bnfast_h16f)_mm512_set1_ps(a))
#define BNFAST_HALF_B16S(j) ((bnfast_h16f)_mm512_set1_ps(b))
#define BNFAST_HALF_D16S(j) ((bnfast_h16f)_mm512_set1_ps(d))
#define BNFAST_HALF_M16T(j) BNFAST_H16_COEF(m, j)
#define BNFAST_HALF_A16T(j) BNFAST_H16_COEF(a, j)
#define BNFAST_HALF_B16T(j) BNFAST_H16_COEF(b, j)
#define BNFAST_HALF_D16T(j) BNFAST_H16_COEF(d, j)
#endif
#define BNFAST_HALF_GRAD_TAIL(TOF, FROMF, MS, AS, BS, DS)                                \
    for (i = n8; i < n; i++)                                                             \
        dx[i] = FROMF(training ? (TOF(dy[i]) - DS) * AS + (TOF(x[i]) - MS) * BS          \
                               : TOF(dy[i]) * AS);

#define BNFAST_DEFINE_HALF_GRAD(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE)                \
    ATTR static void bnfast_grad_vec_scalar_##H##_##VARIANT(                             \
            const T *x, const T *dy, T *dx, ptrdiff_t n, float m, float a, float b,      \
            float d, int training) {                                                     \
        ptrdiff_t i = 0, n8 = BNFAST_HALF_N8(n);                                         \
        WIDE(BNFAST_HALF_M16S, BNFAST_HALF_A16S, BNFAST_HALF_B16S, BNFAST_HALF_D16S)     \
        BNFAST_HALF_GRAD_VECTORS(LOAD8, STORE8, m, a, b, d)                              \
        BNFAST_HALF_GRAD_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,  \
                              m, a, b, d)                                                \
    }                                                                                    \
    ATTR static void bnfast_grad_vec_tiled_##H##_##VARIANT(                              \
            const T *x, const T *dy, T *dx, ptrdiff_t n, const float *m, const float *a, \
            const float *b, const float *d, int training) {                              \
        ptrdiff_t i = 0, n8 = BNFAST_HALF_N8(n);                                         \
        WIDE(BNFAST_HALF_M16T, BNFAST_HALF_A16T, BNFAST_HALF_B16T, BNFAST_HALF_D16T)     \
        BNFAST_HALF_GRAD_VECTORS(LOAD8, STORE8, BNFAST_H8_COEF(m, i), BNFAST_H8_COEF(a, i), \
                                 BNFAST_H8_COEF(b, i), BNFAST_H8_COEF(d, i))             \
        BNFAST_HALF_GRAD_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,  \
                              m[i], a[i], b[i], d[i])                                    \
    }
/* Training, `runs` consecutive runs of n, run r with (m[r], a[r], b[r], d[r]): the
 * loop inside the target function (short runs: no dispatch per run). */
#define BNFAST_DEFINE_HALF_GRAD_RUNS(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE)           \
    ATTR static void bnfast_grad_vec_runs_##H##_##VARIANT(                               \
            const T *x0, const T *dy0, T *dx0, ptrdiff_t runs, ptrdiff_t n,              \
            const float *mr, const float *ar, const float *br, const float *dr) {        \
        ptrdiff_t r, i, n8 = BNFAST_HALF_N8(n);                                          \
        const int training = 1;                                                          \
        for (r = 0; r < runs; r++) {                                                     \
            const T *x = x0 + r * n, *dy = dy0 + r * n;                                  \
            T *dx = dx0 + r * n;                                                         \
            float m = mr[r], a = ar[r], b = br[r], d = dr[r];                            \
            i = 0;                                                                       \
            WIDE(BNFAST_HALF_M16S, BNFAST_HALF_A16S, BNFAST_HALF_B16S, BNFAST_HALF_D16S) \
            BNFAST_HALF_GRAD_VECTORS(LOAD8, STORE8, m, a, b, d)                          \
            BNFAST_HALF_GRAD_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT, \
                                  m, a, b, d)                                            \
        }                                                                                \
    }

BNFAST_DEFINE_HALF_GRAD(f16, bnfast_f16, base, , bnfast_load8_f16, bnfast_store8_f16,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD_RUNS(f16, bnfast_f16, base, , bnfast_load8_f16, bnfast_store8_f16,
                             BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, base, , bnfast_load8_bf16, bnfast_store8_bf16,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD_RUNS(bf16, bnfast_bf16, base, , bnfast_load8_bf16, bnfast_store8_bf16,
                             BNFAST_HALF_GRAD_NO_WIDE)
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_HALF_GRAD(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                        bnfast_store8_f16_f16c,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD_RUNS(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                             bnfast_store8_f16_f16c,
                             BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, avx2, BNFAST_AVX2_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_store8_bf16_avx2,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD_RUNS(bf16, bnfast_bf16, avx2, BNFAST_AVX2_TARGET, bnfast_load8_bf16_avx2,
                             bnfast_store8_bf16_avx2,
                             BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, hw, BNFAST_BF16_HW_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_store8_bf16_hw,
                        BNFAST_HALF_GRAD_WIDE_HW)
BNFAST_DEFINE_HALF_GRAD_RUNS(bf16, bnfast_bf16, hw, BNFAST_BF16_HW_TARGET, bnfast_load8_bf16_avx2,
                             bnfast_store8_bf16_hw,
                             BNFAST_HALF_GRAD_WIDE_HW)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, z, BNFAST_BF16_Z_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_store8_bf16_z,
                        BNFAST_HALF_GRAD_WIDE_Z)
BNFAST_DEFINE_HALF_GRAD_RUNS(bf16, bnfast_bf16, z, BNFAST_BF16_Z_TARGET, bnfast_load8_bf16_avx2,
                             bnfast_store8_bf16_z,
                             BNFAST_HALF_GRAD_WIDE_Z)
BNFAST_DEFINE_HALF_GRAD(f16, bnfast_f16, f16c_nt, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                        bnfast_stream8_f16_f16c,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, avx2_nt, BNFAST_AVX2_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_stream8_bf16_avx2,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, hw_nt, BNFAST_BF16_HW_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_stream8_bf16_hw,
                        BNFAST_HALF_GRAD_NO_WIDE)
BNFAST_DEFINE_HALF_GRAD(bf16, bnfast_bf16, z_nt, BNFAST_BF16_Z_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_stream8_bf16_z,
                        BNFAST_HALF_GRAD_WIDE_Z_NT)
#else
#define bnfast_grad_vec_scalar_f16_f16c_nt bnfast_grad_vec_scalar_f16_base
#define bnfast_grad_vec_tiled_f16_f16c_nt bnfast_grad_vec_tiled_f16_base
#define bnfast_grad_vec_scalar_bf16_avx2_nt bnfast_grad_vec_scalar_bf16_base
#define bnfast_grad_vec_tiled_bf16_avx2_nt bnfast_grad_vec_tiled_bf16_base
#define bnfast_grad_vec_scalar_bf16_hw_nt bnfast_grad_vec_scalar_bf16_base
#define bnfast_grad_vec_tiled_bf16_hw_nt bnfast_grad_vec_tiled_bf16_base
#define bnfast_grad_vec_scalar_bf16_z_nt bnfast_grad_vec_scalar_bf16_base
#define bnfast_grad_vec_tiled_bf16_z_nt bnfast_grad_vec_tiled_bf16_base
#endif
/* The leaves, picked at run time; STREAM (dx 16-byte aligned) the non-temporal
 * ones where the CPU has a vector store (the portable leaves store plainly). */
#define bnfast_grad_vec_scalar_f16(STREAM)                                                \
    ((STREAM) ? BNFAST_PICK_F16C(bnfast_grad_vec_scalar_f16_base,                         \
                                 bnfast_grad_vec_scalar_f16_f16c_nt)                      \
              : BNFAST_PICK_F16C(bnfast_grad_vec_scalar_f16_base,                         \
                                 bnfast_grad_vec_scalar_f16_f16c))
#define bnfast_grad_vec_tiled_f16(STREAM)                                                 \
    ((STREAM) ? BNFAST_PICK_F16C(bnfast_grad_vec_tiled_f16_base,                          \
                                 bnfast_grad_vec_tiled_f16_f16c_nt)                       \
              : BNFAST_PICK_F16C(bnfast_grad_vec_tiled_f16_base,                          \
                                 bnfast_grad_vec_tiled_f16_f16c))
#define bnfast_grad_vec_scalar_bf16(STREAM)                                               \
    ((STREAM) ? BNFAST_PICK_BF16(bnfast_grad_vec_scalar_bf16_base,                        \
                                 bnfast_grad_vec_scalar_bf16_avx2_nt,                     \
                                 bnfast_grad_vec_scalar_bf16_z_nt,                       \
                                 bnfast_grad_vec_scalar_bf16_hw_nt)                       \
              : BNFAST_PICK_BF16(bnfast_grad_vec_scalar_bf16_base,                        \
                                 bnfast_grad_vec_scalar_bf16_avx2,                        \
                                 bnfast_grad_vec_scalar_bf16_z,                          \
                                 bnfast_grad_vec_scalar_bf16_hw))
#define bnfast_grad_vec_tiled_bf16(STREAM)                                                \
    ((STREAM) ? BNFAST_PICK_BF16(bnfast_grad_vec_tiled_bf16_base,                         \
                                 bnfast_grad_vec_tiled_bf16_avx2_nt,                      \
                                 bnfast_grad_vec_tiled_bf16_z_nt,                        \
                                 bnfast_grad_vec_tiled_bf16_hw_nt)                        \
              : BNFAST_PICK_BF16(bnfast_grad_vec_tiled_bf16_base,                         \
                                 bnfast_grad_vec_tiled_bf16_avx2,                         \
                                 bnfast_grad_vec_tiled_bf16_z,                           \
                                 bnfast_grad_vec_tiled_bf16_hw))
#define bnfast_grad_vec_runs_f16 \
    BNFAST_PICK_F16C(bnfast_grad_vec_runs_f16_base, bnfast_grad_vec_runs_f16_f16c)
#define bnfast_grad_vec_runs_bf16 \
    BNFAST_PICK_BF16(bnfast_grad_vec_runs_bf16_base, bnfast_grad_vec_runs_bf16_avx2, \
                     bnfast_grad_vec_runs_bf16_z, bnfast_grad_vec_runs_bf16_hw)

/* ---------------------------------------------------------------------------
 * Pass 1 without a mask, in registers.  Channels-first runs: float sums (see
 * BNFAST_DEFINE_HALF_DOT_RUNS below).  Channels-last columns: the float32
 * leaves' bodies (bnfast_backward_simd.h's *_K macros) with the half types'
 * load kinds, which widen half -> float -> double exactly (F16C's vcvtph2ps; a
 * shift for bfloat16): the same lanes, order and row groups (float's), so the
 * sums are float32's on the same values -- without the staging buffers' extra
 * trip through L1 (the staged pass 1 ran at ~0.75x float32's time).
 * ------------------------------------------------------------------------- */
#define BNFAST_WIDE8_f16 0
#define BNFAST_WIDE8_bf16 0
#define BNFAST_WIDE8_f16c 1
#define BNFAST_WIDE8_bf16avx2 1
#define BNFAST_PF4_f16 0
#define BNFAST_PF4_bf16 0
#define BNFAST_PF4_f16c 0
#define BNFAST_PF4_bf16avx2 0
#define BNFAST_TOD_f16(v) ((double)bnfast_f16_to_float(v))
#define BNFAST_TOD_f16c(v) ((double)_cvtsh_ss((v).bits))
#define BNFAST_TOD_bf16(v) ((double)bnfast_bf16_to_float(v))
#define BNFAST_TOD_bf16avx2(v) ((double)bnfast_bf16_to_float(v))
#if BNFAST_VECTOR_EXT
#define BNFAST_LD4_f16(p) ((bnfast_v4d){BNFAST_TOD_f16((p)[0]), BNFAST_TOD_f16((p)[1]), \
                                        BNFAST_TOD_f16((p)[2]), BNFAST_TOD_f16((p)[3])})
#define BNFAST_LD4_bf16(p) ((bnfast_v4d){BNFAST_TOD_bf16((p)[0]), BNFAST_TOD_bf16((p)[1]), \
                                         BNFAST_TOD_bf16((p)[2]), BNFAST_TOD_bf16((p)[3])})
#define BNFAST_LD8_f16(p, LO, HI) ((LO) = BNFAST_LD4_f16(p), (HI) = BNFAST_LD4_f16((p) + 4))
#define BNFAST_LD8_bf16(p, LO, HI) ((LO) = BNFAST_LD4_bf16(p), (HI) = BNFAST_LD4_bf16((p) + 4))
#endif
#if BNFAST_DISPATCH_AVX2
#define BNFAST_LD4_f16c(p) ((bnfast_v4d)_mm256_cvtps_pd(                                  \
        _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(const void *)(p)))))
/* bfloat16: the 16 bits under 16 zero bits (an unpack) are the float. */
#define BNFAST_LD4_bf16avx2(p) ((bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(             \
        _mm_unpacklo_epi16(_mm_setzero_si128(),                                          \
                           _mm_loadl_epi64((const __m128i *)(const void *)(p))))))
/* Eight at once: one 8-wide widening to float, then two float -> double. */
#define BNFAST_LD8_F_(f, LO, HI) ((LO) = (bnfast_v4d)_mm256_cvtps_pd(_mm256_castps256_ps128(f)), \
                                  (HI) = (bnfast_v4d)_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)))
#define BNFAST_LD8_f16c(p, LO, HI) do {                                                    \
        __m256 f_ = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p)));  \
        BNFAST_LD8_F_(f_, LO, HI);                                                         \
    } while (0)
#define BNFAST_LD8_bf16avx2(p, LO, HI) do {                                                \
        __m128i h_ = _mm_loadu_si128((const __m128i *)(const void *)(p));                  \
        (LO) = (bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(                               \
            _mm_unpacklo_epi16(_mm_setzero_si128(), h_)));                                 \
        (HI) = (bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(                               \
            _mm_unpackhi_epi16(_mm_setzero_si128(), h_)));                                 \
    } while (0)
#endif

/* ---------------------------------------------------------------------------
 * Channels-first pass 1, half data: bnfast_float_sums.h's run engine, terms
 * y and (x - kf) * y with kf the shift rounded to float, then
 * sxy += (kf - shift) * sy in double (exact algebra).  A run whose float sums
 * float may have lost goes again through the double leaf's arithmetic
 * (BNFAST_DOT_FLOAT_OK): a sum not finite (inf/NaN data, bfloat16 beyond
 * float's square range, a shift not finite), or sxy below 2^-90 but for exact
 * zeros of both sums (a run of zero gradients stays on the fast path).  Above
 * 2^-90, products lost to underflow (at most 2^-150 each) are below 2^-48 of
 * sxy.  float16's range never gets there: its terms lie in [3.6e-27, 8.6e9].
 * ------------------------------------------------------------------------- */
/* Bitwise & and |: one branch, not one per (sign-dependent, unpredictable) test. */
#define BNFAST_DOT_FLOAT_OK(sy, sxy)                                                     \
    ((fabs(sy) <= 0x1.fffffffffffffp+1023)                                               \
     & (((fabs(sxy) >= 0x1p-90) & (fabs(sxy) <= 0x1.fffffffffffffp+1023))                \
        | (((sxy) == 0.0) & ((sy) == 0.0))))
#define BNFAST_DOT_STEP(i, F, G, KEEP, L8F, TOF, K, FINISH)                              \
    {                                                                                    \
        bnfast_h8f v_ = (bnfast_h8f)((bnfast_h8i)L8F(yp + (i)) & (KEEP));                \
        bnfast_h8f w_ = (bnfast_h8f)((bnfast_h8i)(L8F(xp + (i)) - kv) & (KEEP));         \
        F += v_; G += w_ * v_;                                                           \
    }
#define BNFAST_DOT_STEP1(i, F, G, KEEP, L8F, TOF, K, FINISH)                             \
    {                                                                                    \
        float v_ = (KEEP) ? TOF(yp[i]) : 0.0f, w_ = (KEEP) ? TOF(xp[i]) - kf : 0.0f;     \
        F += v_; G += w_ * v_;                                                           \
    }
#define BNFAST_DOT_TAIL(a0, a1, b0, b1, S1, S2, L8F, TOF, K, FINISH)                     \
    if (n8 > n16) {                                                                      \
        bnfast_v4d u0, u1, w0, w1;                                                       \
        BNFAST_LD8_##K(yp + n16, u0, u1);                                                \
        BNFAST_LD8_##K(xp + n16, w0, w1);                                                \
        a0 += u0; a1 += u1; b0 += (w0 - kp) * u0; b1 += (w1 - kp) * u1;                  \
    }                                                                                    \
    (S1) = 0.0; (S2) = 0.0;                                                              \
    FINISH(K, xp, yp, kp, a0, a1, b0, b1, &(S1), &(S2))
#define BNFAST_DOT_TAIL1(a, b, S1, S2, L8F, TOF, K, FINISH)                              \
    for (; i < n; i++) {                                                                 \
        double v_ = BNFAST_TOD_##K(yp[i]);                                               \
        a[i % 8] += v_; b[i % 8] += (BNFAST_TOD_##K(xp[i]) - kp) * v_;                   \
    }                                                                                    \
    (S1) = 0.0; (S2) = 0.0;  /* += as the vector finish does (the sign of a zero) */    \
    (S1) += BNFAST_COMBINE8(a);                                                          \
    (S2) += BNFAST_COMBINE8(b);
/* A run in double (a shift that is not finite): the double leaf's arithmetic. */
#define BNFAST_DOT_RUN_DOUBLE(K)                                                         \
    {                                                                                    \
        double a_[8] = {0}, b_[8] = {0};                                                 \
        ptrdiff_t i_;                                                                    \
        for (i_ = 0; i_ < n; i_++) {                                                     \
            a_[i_ % 8] += BNFAST_TOD_##K(yp[i_]);                                        \
            b_[i_ % 8] += (BNFAST_TOD_##K(xp[i_]) - k) * BNFAST_TOD_##K(yp[i_]);         \
        }                                                                                \
        sy[r] += BNFAST_COMBINE8(a_);                                                    \
        sxy[r] += BNFAST_COMBINE8(b_);                                                   \
    }
#define BNFAST_DEFINE_HALF_DOT_RUNS(NAME, T, ATTR, L8F, TOF, K, FINISH, OPS)             \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t runs, ptrdiff_t n,           \
                          const double *shift, double *sy, double *sxy) {                \
        ptrdiff_t r;                                                                     \
        BNFAST_FLOAT_RUN_ANY_DECLS                                                       \
        for (r = 0; r < runs; r++) {                                                     \
            const T *xp = x + r * n, *yp = y + r * n;                                    \
            double k = shift[r], run_sy, run_sxy, kp;                                    \
            float kf = (float)k;                                                         \
            BNFAST_FLOAT_SHIFT_VECTOR(kf)                                                \
            kp = (double)kf;                                                             \
            BNFAST_FLOAT_RUN_ANY(BNFAST_DOT_STEP, BNFAST_DOT_STEP1, BNFAST_DOT_TAIL,       \
                                 BNFAST_DOT_TAIL1, OPS, run_sy, run_sxy,                 \
                                 L8F, TOF, K, FINISH)                                    \
            if (!BNFAST_DOT_FLOAT_OK(run_sy, run_sxy)) {                                 \
                BNFAST_DOT_RUN_DOUBLE(K)                                                 \
                continue;                                                                \
            }                                                                            \
            sy[r] += run_sy;                                                             \
            sxy[r] += run_sxy + (kp - k) * run_sy;                                       \
        }                                                                                \
    }
#if BNFAST_VECTOR_EXT && defined(__AVX__)
#define BNFAST_HALF_OPS_BASE AVX
#else
#define BNFAST_HALF_OPS_BASE VEC
#endif

/* ---------------------------------------------------------------------------
 * Channels-last pass 1 without a mask, half data: per column, groups of four
 * rows (the last group the rows left) summed in float -- s = sum(y), q =
 * sum((x - kf) * y), kf the column's shift rounded to float; four rows as
 * (0 + 1) + (2 + 3), fewer one after another -- then sy += s and sxy += q +
 * (kf - shift) * s in double.  A column whose group sums fail
 * BNFAST_DOT_FLOAT_OK takes that group in double (its rows in order).  The
 * scalar columns (and the portable build's all) do the same.  (Groups of
 * eight rows were 1.3x slower on rows 4 KiB apart: sixteen streams in one L1
 * set of eight ways.)
 * ------------------------------------------------------------------------- */
/* Columns a chunk (a multiple of 16): each column's shift as a float (kf) and
 * that float's excess over it (dks[j] = kf - shift[j], in double) made once a
 * chunk, not once per group of rows and step, where they were a tenth of a
 * step's instructions.  GROUP_ADD reads dks, the steps kfs and dks. */
#define BNFAST_COLDOT_CHUNK 1024
#define BNFAST_COLDOT_GROUP_DOUBLE(K, jj)                                                \
    {                                                                                    \
        double k_ = shift[jj], v_;                                                       \
        ptrdiff_t i_;                                                                    \
        for (i_ = 0; i_ < m; i_++) {                                                     \
            v_ = BNFAST_TOD_##K(yg[i_ * stride + (jj)]);                                 \
            sy[jj] += v_;                                                                \
            sxy[jj] += (BNFAST_TOD_##K(xg[i_ * stride + (jj)]) - k_) * v_;               \
        }                                                                                \
    }
#define BNFAST_COLDOT_GROUP_ADD(jj, s_, q_)                                              \
    {                                                                                    \
        sy[jj] += (double)(s_);                                                          \
        sxy[jj] += (double)(q_) + dks[jj] * (double)(s_);                                \
    }
/* One column jj of the group in float (values through TOF). */
#define BNFAST_COLDOT_COLUMN(K, TOF, jj)                                                 \
    {                                                                                    \
        float kf_ = kfs[jj], y_[4] = {0}, p_[4] = {0}, s_, q_;                           \
        ptrdiff_t i_;                                                                    \
        for (i_ = 0; i_ < m; i_++) {                                                     \
            y_[i_] = TOF(yg[i_ * stride + (jj)]);                                        \
            p_[i_] = (TOF(xg[i_ * stride + (jj)]) - kf_) * y_[i_];                       \
        }                                                                                \
        if (m == 4) {                                                                    \
            s_ = (y_[0] + y_[1]) + (y_[2] + y_[3]);                                      \
            q_ = (p_[0] + p_[1]) + (p_[2] + p_[3]);                                      \
        } else {                                                                         \
            for (s_ = y_[0], q_ = p_[0], i_ = 1; i_ < m; i_++) { s_ += y_[i_]; q_ += p_[i_]; } \
        }                                                                                \
        if (BNFAST_DOT_FLOAT_OK(s_, q_)) BNFAST_COLDOT_GROUP_ADD(jj, s_, q_)            \
        else BNFAST_COLDOT_GROUP_DOUBLE(K, jj)                                           \
    }
#if BNFAST_VECTOR_EXT
/* Row i of the group, the vector's columns from j: y, and (x - kf) * y. */
#define BNFAST_COLDOT_TERM(LOAD, i, Y, P)                                                \
    Y = LOAD(yg + (i) * stride + j); P = (LOAD(xg + (i) * stride + j) - kf) * Y;
/* s = sum(y), q = sum((x - kf) * y) of the group's rows, V lanes of columns j..
 * (LOAD widens them to float): four rows as (0 + 1) + (2 + 3), fewer one after
 * another, as the scalar column. */
#define BNFAST_COLDOT_SUMS(V, LOAD)                                                      \
    {                                                                                    \
        V y0, y1, p0, p1;                                                                \
        ptrdiff_t i;                                                                     \
        if (!(j & 31)) /* the next group's lines (see BNFAST_COLDOT_PREFETCH) */         \
            for (i = 4; i < 8; i++) {                                                    \
                __builtin_prefetch(xg + i * stride + j);                                 \
                __builtin_prefetch(yg + i * stride + j);                                 \
            }                                                                            \
        if (m == 4) {                                                                    \
            V y2, y3, p2, p3;                                                            \
            BNFAST_COLDOT_TERM(LOAD, 0, y0, p0) BNFAST_COLDOT_TERM(LOAD, 1, y1, p1)      \
            BNFAST_COLDOT_TERM(LOAD, 2, y2, p2) BNFAST_COLDOT_TERM(LOAD, 3, y3, p3)      \
            s = (y0 + y1) + (y2 + y3); q = (p0 + p1) + (p2 + p3);                        \
        } else {                                                                         \
            BNFAST_COLDOT_TERM(LOAD, 0, s, q)                                            \
            for (i = 1; i < m; i++) { BNFAST_COLDOT_TERM(LOAD, i, y0, p0) s += y0; q += p0; } \
        }                                                                                \
    }
/* Lanes 0..N-1 of (s, q) one by one, as the scalar columns (some lane failed
 * BNFAST_DOT_FLOAT_OK). */
#define BNFAST_COLDOT_LANES(K, N)                                                        \
    {                                                                                    \
        int l_;                                                                          \
        for (l_ = 0; l_ < (N); l_++) {                                                   \
            if (BNFAST_DOT_FLOAT_OK(s[l_], q[l_]))                                       \
                BNFAST_COLDOT_GROUP_ADD(j + l_, s[l_], q[l_])                            \
            else BNFAST_COLDOT_GROUP_DOUBLE(K, j + l_)                                   \
        }                                                                                \
    }
#define BNFAST_COLDOT_VEC8(K, L8F, OPS)                                                  \
    {                                                                                    \
        bnfast_h8f kf = *(const bnfast_h8f *)(kfs + j), s, q;                            \
        BNFAST_COLDOT_SUMS(bnfast_h8f, L8F)                                              \
        if (BNFAST_ALL8_##OPS(BNFAST_DOT_FLOAT_OK8(s, q))) {                             \
            *(bnfast_v4d *)(sy + j) += BNFAST_W4_##OPS(s, 0);                            \
            *(bnfast_v4d *)(sy + j + 4) += BNFAST_W4_##OPS(s, 1);                        \
            *(bnfast_v4d *)(sxy + j) += BNFAST_W4_##OPS(q, 0)                            \
                + *(const bnfast_v4d *)(dks + j) * BNFAST_W4_##OPS(s, 0);                \
            *(bnfast_v4d *)(sxy + j + 4) += BNFAST_W4_##OPS(q, 1)                        \
                + *(const bnfast_v4d *)(dks + j + 4) * BNFAST_W4_##OPS(s, 1);            \
        } else {                                                                         \
            BNFAST_COLDOT_LANES(K, 8)                                                    \
        }                                                                                \
    }
/* BNFAST_DOT_FLOAT_OK on eight float lanes: an int vector, -1 where it holds. */
#define BNFAST_DOT_FLOAT_OK8(s, q) ({                                                    \
        bnfast_h8f as_ = (bnfast_h8f)((bnfast_h8i)(s) & 0x7fffffff);                     \
        bnfast_h8f aq_ = (bnfast_h8f)((bnfast_h8i)(q) & 0x7fffffff);                     \
        (as_ <= 0x1.fffffep+127f) & (((aq_ >= 0x1p-90f) & (aq_ <= 0x1.fffffep+127f))     \
                                     | ((aq_ == 0.0f) & (as_ == 0.0f))); })
#define BNFAST_HALF_COLDOT_VECTOR_COLUMNS(W) ((W) - (W) % 8)
#else
#define BNFAST_COLDOT_VEC8(K, L8F, OPS) {}
#define BNFAST_HALF_COLDOT_VECTOR_COLUMNS(W) 0
#endif
/* Sixteen columns j..j+15 on AVX-512 (zmm): the eight-column step's operations
 * lane for lane (the same bits: tests/c/backward_half_leaves.c), one
 * instruction for sixteen lanes.  The AVX2 step left this pass compute-bound on
 * a Xeon VM exposing AVX-512 without AVX512-BF16 (bfloat16 (4096, 1024): as
 * long as float32's); with it the whole backward, 2 threads, float16 1082-1090
 * -> 935-948 us, bfloat16 1150-1154 -> 947-951 us (one thread 2.1-2.5 -> 1.85
 * ms). */
#if BNFAST_DISPATCH_AVX2
/* BNFAST_DOT_FLOAT_OK8 on sixteen lanes: the mask of the lanes where it holds. */
#define BNFAST_DOT_FLOAT_OK16(s, q) ({                                                   \
        __m512 as_ = _mm512_castsi512_ps(_mm512_and_epi32(                               \
            _mm512_castps_si512((__m512)(s)), _mm512_set1_epi32(0x7fffffff)));           \
        __m512 aq_ = _mm512_castsi512_ps(_mm512_and_epi32(                               \
            _mm512_castps_si512((__m512)(q)), _mm512_set1_epi32(0x7fffffff)));           \
        __m512 big_ = _mm512_set1_ps(0x1.fffffep+127f), zero_ = _mm512_setzero_ps();     \
        (__mmask16)(_mm512_cmp_ps_mask(as_, big_, _CMP_LE_OQ)                            \
                    & ((_mm512_cmp_ps_mask(aq_, _mm512_set1_ps(0x1p-90f), _CMP_GE_OQ)    \
                        & _mm512_cmp_ps_mask(aq_, big_, _CMP_LE_OQ))                     \
                       | (_mm512_cmp_ps_mask(aq_, zero_, _CMP_EQ_OQ)                     \
                          & _mm512_cmp_ps_mask(as_, zero_, _CMP_EQ_OQ)))); })
#define BNFAST_COLDOT_VEC16(K, L16F)                                                     \
    {                                                                                    \
        bnfast_h16f kf = (bnfast_h16f)_mm512_loadu_ps(kfs + j), s, q;                    \
        BNFAST_COLDOT_SUMS(bnfast_h16f, L16F)                                            \
        if (BNFAST_DOT_FLOAT_OK16(s, q) == 0xffff) {                                     \
            __m512d s0 = BNFAST_W8_Z(s, 0), s1 = BNFAST_W8_Z(s, 1);                      \
            _mm512_storeu_pd(sy + j, _mm512_add_pd(_mm512_loadu_pd(sy + j), s0));        \
            _mm512_storeu_pd(sy + j + 8, _mm512_add_pd(_mm512_loadu_pd(sy + j + 8), s1)); \
            _mm512_storeu_pd(sxy + j, _mm512_add_pd(_mm512_loadu_pd(sxy + j),            \
                _mm512_add_pd(BNFAST_W8_Z(q, 0), _mm512_mul_pd(_mm512_loadu_pd(dks + j), s0)))); \
            _mm512_storeu_pd(sxy + j + 8, _mm512_add_pd(_mm512_loadu_pd(sxy + j + 8),    \
                _mm512_add_pd(BNFAST_W8_Z(q, 1),                                         \
                              _mm512_mul_pd(_mm512_loadu_pd(dks + j + 8), s1))));        \
        } else {                                                                         \
            BNFAST_COLDOT_LANES(K, 16)                                                   \
        }                                                                                \
    }
#endif
/* The columns of each group of rows: STEPS (the vector steps: j from 0 up to the
 * last multiple of 8), then the rest one column at a time. */
#define BNFAST_DEFINE_HALF_COLDOT_OF(NAME, T, ATTR, TOF, K, STEPS)                       \
    ATTR static inline void NAME##_chunk(const T *x, const T *y, ptrdiff_t rows,         \
                                         ptrdiff_t W, ptrdiff_t stride,                  \
                                         const double *shift, const float *kfs,          \
                                         const double *dks, double *sy, double *sxy) {   \
        ptrdiff_t r, m, j, j8 = BNFAST_HALF_COLDOT_VECTOR_COLUMNS(W);                    \
        for (r = 0; r < rows; r += m) {                                                  \
            const T *xg = x + r * stride, *yg = y + r * stride;                          \
            m = rows - r < 4 ? rows - r : 4;                                             \
            j = 0;                                                                       \
            STEPS                                                                        \
            for (j = j8; j < W; j++) BNFAST_COLDOT_COLUMN(K, TOF, j)                     \
        }                                                                                \
    }                                                                                    \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t rows, ptrdiff_t W,           \
                          ptrdiff_t stride, const double *shift, double *sy,             \
                          double *sxy) {                                                 \
        float kfs[BNFAST_COLDOT_CHUNK] __attribute__((aligned(64)));                     \
        double dks[BNFAST_COLDOT_CHUNK] __attribute__((aligned(64)));                    \
        ptrdiff_t c, w, j;                                                               \
        for (c = 0; c < W; c += w) {                                                     \
            w = W - c < BNFAST_COLDOT_CHUNK ? W - c : BNFAST_COLDOT_CHUNK;               \
            for (j = 0; j < w; j++) {                                                    \
                kfs[j] = (float)shift[c + j];                                            \
                dks[j] = (double)kfs[j] - shift[c + j];                                  \
            }                                                                            \
            NAME##_chunk(x + c, y + c, rows, w, stride, shift + c, kfs, dks, sy + c,     \
                         sxy + c);                                                       \
        }                                                                                \
    }
#define BNFAST_DEFINE_HALF_COLDOT(NAME, T, ATTR, L8F, TOF, K, OPS)                       \
    BNFAST_DEFINE_HALF_COLDOT_OF(NAME, T, ATTR, TOF, K,                                  \
                                 for (; j < j8; j += 8) BNFAST_COLDOT_VEC8(K, L8F, OPS))
/* AVX-512: sixteen columns a step, then eight. */
#define BNFAST_DEFINE_HALF_COLDOT_Z(NAME, T, ATTR, L16F, L8F, TOF, K)                    \
    BNFAST_DEFINE_HALF_COLDOT_OF(NAME, T, ATTR, TOF, K,                                  \
                                 for (; j + 16 <= j8; j += 16) BNFAST_COLDOT_VEC16(K, L16F) \
                                 for (; j < j8; j += 8) BNFAST_COLDOT_VEC8(K, L8F, AVX))

BNFAST_DEFINE_HALF_DOT_RUNS(bnfast_dot_runs_f16_base, bnfast_f16, , bnfast_load8_f16,
                            bnfast_f16_to_float, f16, BNFAST_DOT_FINISH_BASE,
                            BNFAST_HALF_OPS_BASE)
BNFAST_DEFINE_HALF_DOT_RUNS(bnfast_dot_runs_bf16_base, bnfast_bf16, , bnfast_load8_bf16,
                            bnfast_bf16_to_float, bf16, BNFAST_DOT_FINISH_BASE,
                            BNFAST_HALF_OPS_BASE)
BNFAST_DEFINE_HALF_COLDOT(bnfast_coldot_f16_base, bnfast_f16, , bnfast_load8_f16,
                          bnfast_f16_to_float, f16, BNFAST_HALF_OPS_BASE)
BNFAST_DEFINE_HALF_COLDOT(bnfast_coldot_bf16_base, bnfast_bf16, , bnfast_load8_bf16,
                          bnfast_bf16_to_float, bf16, BNFAST_HALF_OPS_BASE)
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_HALF_DOT_RUNS(bnfast_dot_runs_f16_f16c, bnfast_f16, BNFAST_F16C_TARGET,
                            bnfast_load8_f16_f16c, BNFAST_TOF_f16_f16c, f16c,
                            BNFAST_DOT_FINISH_AVX, AVX)
BNFAST_DEFINE_HALF_DOT_RUNS(bnfast_dot_runs_bf16_avx2, bnfast_bf16, BNFAST_AVX2_TARGET,
                            bnfast_load8_bf16_avx2, bnfast_bf16_to_float, bf16avx2,
                            BNFAST_DOT_FINISH_AVX, AVX)
BNFAST_DEFINE_HALF_COLDOT(bnfast_coldot_f16_f16c, bnfast_f16, BNFAST_F16C_TARGET,
                          bnfast_load8_f16_f16c, BNFAST_TOF_f16_f16c, f16c, AVX)
BNFAST_DEFINE_HALF_COLDOT(bnfast_coldot_bf16_avx2, bnfast_bf16, BNFAST_AVX2_TARGET,
                          bnfast_load8_bf16_avx2, bnfast_bf16_to_float, bf16avx2, AVX)
#endif
#define bnfast_dot_runs_f16 BNFAST_PICK_F16C(bnfast_dot_runs_f16_base, bnfast_dot_runs_f16_f16c)
#define bnfast_dot_runs_bf16 BNFAST_PICK(bnfast_dot_runs_bf16_base, bnfast_dot_runs_bf16_avx2)
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_HALF_COLDOT_Z(bnfast_coldot_f16_z, bnfast_f16, BNFAST_F16_Z_TARGET,
                            bnfast_load16_f16_z, bnfast_load8_f16_f16c, BNFAST_TOF_f16_f16c, f16c)
BNFAST_DEFINE_HALF_COLDOT_Z(bnfast_coldot_bf16_z, bnfast_bf16, BNFAST_BF16_Z_TARGET,
                            bnfast_load16_bf16_z, bnfast_load8_bf16_avx2, bnfast_bf16_to_float,
                            bf16avx2)
#define bnfast_coldot_f16                                                                \
    (bnfast_use_f16_z() ? bnfast_coldot_f16_z                                            \
     : BNFAST_PICK_F16C(bnfast_coldot_f16_base, bnfast_coldot_f16_f16c))
#define bnfast_coldot_bf16                                                               \
    (bnfast_use_bf16_z() ? bnfast_coldot_bf16_z                                          \
     : BNFAST_PICK(bnfast_coldot_bf16_base, bnfast_coldot_bf16_avx2))
#else
#define bnfast_coldot_f16 bnfast_coldot_f16_base
#define bnfast_coldot_bf16 bnfast_coldot_bf16_base
#endif

/* ---------------------------------------------------------------------------
 * Pass 1 with the ReLU mask (fused), in registers where the CPU converts
 * (F16C / AVX2; elsewhere, and in the no-SIMD build, the staged leaves below):
 * bnfast_backward_simd.h's masked float32 leaves, step for step, on the half
 * values.  The mask selects on the 16-bit lanes (a cleared lane is +0, as the
 * float32 select gives +0.0), g receives those lanes, and they widen exactly.
 * ------------------------------------------------------------------------- */
#if BNFAST_DISPATCH_AVX2
/* Lanes of 8 halves whose bit in `byte` is set (bit k for lane k). */
#define BNFAST_HMASK8(byte)                                                              \
    ((__m128i)((bnfast_h8h)((((bnfast_h8h){byte, byte, byte, byte, byte, byte, byte, byte}) \
                             & (bnfast_h8h){1, 2, 4, 8, 16, 32, 64, 128}) != 0)))
/* Four halves at p (lanes 0-3 of an __m128i), masked by the nibble. */
#define BNFAST_HSEL4(p, nib) _mm_and_si128(                                             \
        _mm_loadl_epi64((const __m128i *)(const void *)(p)), BNFAST_HMASK8(nib))
/* Widen lanes 0-7 (W8: to LO, HI) or 0-3 (W4) of a register of halves. */
#define BNFAST_W8_f16c(h, LO, HI) do {                                                   \
        __m256 f_ = _mm256_cvtph_ps(h);                                                  \
        BNFAST_LD8_F_(f_, LO, HI);                                                       \
    } while (0)
#define BNFAST_W4_f16c(h) ((bnfast_v4d)_mm256_cvtps_pd(_mm_cvtph_ps(h)))
#define BNFAST_W8_bf16avx2(h, LO, HI) do {                                               \
        (LO) = (bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(                             \
            _mm_unpacklo_epi16(_mm_setzero_si128(), h)));                                \
        (HI) = (bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(                             \
            _mm_unpackhi_epi16(_mm_setzero_si128(), h)));                                \
    } while (0)
#define BNFAST_W4_bf16avx2(h) ((bnfast_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(           \
        _mm_unpacklo_epi16(_mm_setzero_si128(), h))))

#define BNFAST_DEFINE_HALF_MASKED(H, T, V, ATTR)                                         \
    /* bnfast_centered_dot_masked_f32's job and arithmetic */                            \
    ATTR static void bnfast_dot_masked_##H##_##V(const T *x, const T *y,                 \
                                                 const unsigned char *bits, ptrdiff_t pos, \
                                                 ptrdiff_t n, double shift, double *sy,  \
                                                 double *sxy, T *g) {                    \
        bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, y0, y1, w0, w1;         \
        double a[8], b[8], v;                                                            \
        ptrdiff_t i, n8 = n - n % 8;                                                     \
        unsigned byte;                                                                   \
        int on;                                                                          \
        for (i = 0; i < n8; i += 8) {                                                    \
            byte = BNFAST_BYTE_AT(bits, pos + i);                                        \
            __m128i h_ = _mm_and_si128(_mm_loadu_si128((const __m128i *)(const void *)(y + i)), \
                                       BNFAST_HMASK8(byte));                             \
            if (g) _mm_storeu_si128((__m128i *)(void *)(g + i), h_);                     \
            BNFAST_W8_##V(h_, y0, y1);                                                   \
            a0 += y0; a1 += y1;                                                          \
            BNFAST_LD8_##V(x + i, w0, w1);                                               \
            b0 += (w0 - shift) * y0;                                                     \
            b1 += (w1 - shift) * y1;                                                     \
        }                                                                                \
        for (i = 0; i < 4; i++) {                                                        \
            a[i] = a0[i]; a[i + 4] = a1[i]; b[i] = b0[i]; b[i + 4] = b1[i];              \
        }                                                                                \
        for (i = n8; i < n; i++) {                                                       \
            on = BNFAST_BIT(bits, pos + i);                                              \
            v = on ? BNFAST_TOD_##V(y[i]) : 0.0;                                         \
            if (g) g[i].bits = on ? y[i].bits : 0;                                       \
            a[i - n8] += v;                                                              \
            b[i - n8] += (BNFAST_TOD_##V(x[i]) - shift) * v;                             \
        }                                                                                \
        *sy += BNFAST_COMBINE8(a);                                                       \
        *sxy += BNFAST_COMBINE8(b);                                                      \
    }                                                                                    \
    /* bnfast_centered_coldot_masked_f32's job and arithmetic (float's row groups) */    \
    ATTR static void bnfast_coldot_masked_##H##_##V(const T *x, const T *y,              \
                                                    const unsigned char *bits,           \
                                                    ptrdiff_t pos, ptrdiff_t rows,       \
                                                    ptrdiff_t W, ptrdiff_t stride,        \
                                                    const double *shift, double *sy,      \
                                                    double *sxy, T *g) {                  \
        ptrdiff_t r = 0, j, j4 = W - W % 4, q, group = BNFAST_ROW_GROUP(float, stride);   \
        double e, f;                                                                     \
        int on;                                                                          \
        for (; group == 4 && r + 4 <= rows; r += 4) {                                    \
            BNFAST_POS4(q, pos + r * stride, stride);                                     \
            BNFAST_ROWS4(T, x, x + r * stride, stride);                                   \
            BNFAST_ROWS4(T, y, y + r * stride, stride);                                   \
            for (j = 0; j < j4; j += 4) {                                                \
                bnfast_v4d kv = *(const bnfast_v4d *)(shift + j);                        \
                __m128i s0 = BNFAST_HSEL4(y0 + j, BNFAST_NIBBLE_AT(bits, q0 + j));       \
                __m128i s1 = BNFAST_HSEL4(y1 + j, BNFAST_NIBBLE_AT(bits, q1 + j));       \
                __m128i s2 = BNFAST_HSEL4(y2 + j, BNFAST_NIBBLE_AT(bits, q2 + j));       \
                __m128i s3 = BNFAST_HSEL4(y3 + j, BNFAST_NIBBLE_AT(bits, q3 + j));       \
                bnfast_v4d v0 = BNFAST_W4_##V(s0), v1 = BNFAST_W4_##V(s1);               \
                bnfast_v4d v2 = BNFAST_W4_##V(s2), v3 = BNFAST_W4_##V(s3);               \
                bnfast_v4d d0 = BNFAST_LD4_##V(x0 + j) - kv;                             \
                bnfast_v4d d1 = BNFAST_LD4_##V(x1 + j) - kv;                             \
                bnfast_v4d d2 = BNFAST_LD4_##V(x2 + j) - kv;                             \
                bnfast_v4d d3 = BNFAST_LD4_##V(x3 + j) - kv;                             \
                if (!(j & 31)) BNFAST_COLDOT_PREFETCH(j + BNFAST_PF_DIST(stride))         \
                if (g) {                                                                 \
                    T *g0 = g + r * stride + j;                                           \
                    _mm_storel_epi64((__m128i *)(void *)g0, s0);                         \
                    _mm_storel_epi64((__m128i *)(void *)(g0 + stride), s1);               \
                    _mm_storel_epi64((__m128i *)(void *)(g0 + 2 * stride), s2);           \
                    _mm_storel_epi64((__m128i *)(void *)(g0 + 3 * stride), s3);           \
                }                                                                        \
                *(bnfast_v4d *)(sy + j) += (v0 + v1) + (v2 + v3);                        \
                *(bnfast_v4d *)(sxy + j) += (d0 * v0 + d1 * v1) + (d2 * v2 + d3 * v3);   \
            }                                                                            \
            for (j = j4; j < W; j++) {                                                   \
                uint16_t h0 = BNFAST_BIT(bits, q0 + j) ? y0[j].bits : 0;                 \
                uint16_t h1 = BNFAST_BIT(bits, q1 + j) ? y1[j].bits : 0;                 \
                uint16_t h2 = BNFAST_BIT(bits, q2 + j) ? y2[j].bits : 0;                 \
                uint16_t h3 = BNFAST_BIT(bits, q3 + j) ? y3[j].bits : 0;                 \
                double w0 = h0 ? BNFAST_TOD_##V(y0[j]) : 0.0;                            \
                double w1 = h1 ? BNFAST_TOD_##V(y1[j]) : 0.0;                            \
                double w2 = h2 ? BNFAST_TOD_##V(y2[j]) : 0.0;                            \
                double w3 = h3 ? BNFAST_TOD_##V(y3[j]) : 0.0;                            \
                double e0 = BNFAST_TOD_##V(x0[j]) - shift[j];                            \
                double e1 = BNFAST_TOD_##V(x1[j]) - shift[j];                            \
                double e2 = BNFAST_TOD_##V(x2[j]) - shift[j];                            \
                double e3 = BNFAST_TOD_##V(x3[j]) - shift[j];                            \
                if (g) {                                                                 \
                    g[r * stride + j].bits = h0; g[(r + 1) * stride + j].bits = h1;       \
                    g[(r + 2) * stride + j].bits = h2; g[(r + 3) * stride + j].bits = h3; \
                }                                                                        \
                sy[j] += (w0 + w1) + (w2 + w3);                                          \
                sxy[j] += (e0 * w0 + e1 * w1) + (e2 * w2 + e3 * w3);                     \
            }                                                                            \
        }                                                                                \
        for (; r < rows; r++) {                                                          \
            for (j = 0; j < j4; j += 4) {                                                \
                q = r * stride + j;                                                       \
                __m128i s0 = BNFAST_HSEL4(y + q, BNFAST_NIBBLE_AT(bits, pos + q));       \
                bnfast_v4d v0 = BNFAST_W4_##V(s0);                                       \
                if (g) _mm_storel_epi64((__m128i *)(void *)(g + q), s0);                 \
                *(bnfast_v4d *)(sy + j) += v0;                                           \
                *(bnfast_v4d *)(sxy + j) +=                                              \
                    (BNFAST_LD4_##V(x + q) - *(const bnfast_v4d *)(shift + j)) * v0;     \
            }                                                                            \
            for (j = j4; j < W; j++) {                                                   \
                q = r * stride + j;                                                       \
                on = BNFAST_BIT(bits, pos + q);                                          \
                f = on ? BNFAST_TOD_##V(y[q]) : 0.0;                                     \
                e = BNFAST_TOD_##V(x[q]) - shift[j];                                     \
                if (g) g[q].bits = on ? y[q].bits : 0;                                   \
                sy[j] += f; sxy[j] += e * f;                                             \
            }                                                                            \
        }                                                                                \
    }
BNFAST_DEFINE_HALF_MASKED(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET)
BNFAST_DEFINE_HALF_MASKED(bf16, bnfast_bf16, bf16avx2, BNFAST_AVX2_TARGET)
#define BNFAST_HALF_MASKED_IN_REGISTERS_f16 bnfast_use_f16c()
#define BNFAST_HALF_MASKED_IN_REGISTERS_bf16 bnfast_use_avx2()
#define bnfast_dot_masked_f16_reg bnfast_dot_masked_f16_f16c
#define bnfast_dot_masked_bf16_reg bnfast_dot_masked_bf16_bf16avx2
#define bnfast_coldot_masked_f16_reg bnfast_coldot_masked_f16_f16c
#define bnfast_coldot_masked_bf16_reg bnfast_coldot_masked_bf16_bf16avx2
#else
#define BNFAST_HALF_MASKED_IN_REGISTERS_f16 0
#define BNFAST_HALF_MASKED_IN_REGISTERS_bf16 0
#define bnfast_dot_masked_f16_reg(...) ((void)0)
#define bnfast_dot_masked_bf16_reg(...) ((void)0)
#define bnfast_coldot_masked_f16_reg(...) ((void)0)
#define bnfast_coldot_masked_bf16_reg(...) ((void)0)
#endif

/* Non-temporal stores for this dx piece: asked for, and 16-byte aligned. */
#define BNFAST_HALF_STREAMS(stream, p) ((stream) && ((size_t)(p) & 15) == 0)

#define BNFAST_DEFINE_BACKWARD_HALF_LEAVES(H, T)                                          \
    /* sy[r] += sum(y_r), sxy[r] += sum((x_r - shift[r]) * y_r): runs of n, consecutive */ \
    static inline void bnfast_centered_dot_runs_##H(const T *x, const T *y, ptrdiff_t runs, \
                                                    ptrdiff_t n, const double *shift,     \
                                                    double *sy, double *sxy) {            \
        bnfast_dot_runs_##H(x, y, runs, n, shift, sy, sxy);                               \
    }                                                                                     \
    /* The same of one run with y masked by bits (from bit pos); g = masked y if g */     \
    static inline void bnfast_centered_dot_masked_##H(const T *x, const T *y,             \
                                                      const unsigned char *bits,          \
                                                      ptrdiff_t pos, ptrdiff_t n,         \
                                                      double shift, double *sy,           \
                                                      double *sxy, T *g) {                \
        float xb[BNFAST_DOT_STAGE], yb[BNFAST_DOT_STAGE];                                 \
        ptrdiff_t i, k, t, n8 = n - n % 8;                                                \
        double lanes[16];                                                                 \
        if (BNFAST_HALF_MASKED_IN_REGISTERS_##H) {                                        \
            bnfast_dot_masked_##H##_reg(x, y, bits, pos, n, shift, sy, sxy, g);           \
            return;                                                                       \
        }                                                                                 \
        if (n <= 0) return; /* (nothing to add; and GCC then sees xb, yb written) */     \
        if (n <= BNFAST_DOT_STAGE) { /* the whole run in one staged call */               \
            bnfast_widen_##H(x, xb, n);                                                   \
            bnfast_widen_##H(y, yb, n);                                                   \
            /* g: the masked y into yb itself (g may be y, as for float32 data) */        \
            bnfast_centered_dot_masked_f32(xb, yb, bits, pos, n, shift, sy, sxy,          \
                                           g == NULL ? NULL : yb);                        \
            if (g != NULL) bnfast_narrow_##H(yb, g, n);                                   \
            return;                                                                       \
        }                                                                                 \
        for (i = 0; i < 16; i++) lanes[i] = 0.0;                                          \
        for (i = 0; i < n8; i += k) {                                                     \
            k = BNFAST_MIN(n8 - i, BNFAST_DOT_STAGE);                                     \
            bnfast_widen_##H(x + i, xb, k);                                               \
            bnfast_widen_##H(y + i, yb, k);                                               \
            bnfast_dot_masked_lanes_f32(xb, yb, bits, pos + i, k, shift, lanes,           \
                                        g == NULL ? NULL : yb);                           \
            if (g != NULL) bnfast_narrow_##H(yb, g + i, k);                               \
        }                                                                                 \
        t = n - n8;                                                                       \
        bnfast_widen_##H(x + n8, xb, t);                                                  \
        bnfast_widen_##H(y + n8, yb, t);                                                  \
        for (i = 0; i < t; i++)                                                           \
            if (!BNFAST_BIT(bits, pos + n8 + i)) yb[i] = 0.0f;                            \
        if (g != NULL) bnfast_narrow_##H(yb, g + n8, t);                                  \
        bnfast_dot_lanes_finish(xb, yb, t, shift, lanes, sy, sxy);                        \
    }                                                                                     \
    /* Column sums of (rows, W) blocks, rows stride apart, plain (bits NULL) or           \
     * masked; stage: the floats of bnfast_coldot_stage_len(W, stride) (masked only;      \
     * may be NULL without a mask).  Staged: the float32 leaf on the masked values        \
     * (what its masked twin computes: a select, then the same sums), g copied. */        \
    static inline void bnfast_centered_coldot_any_##H(const T *x, const T *y,             \
                                                      const unsigned char *bits,          \
                                                      ptrdiff_t pos, ptrdiff_t rows,      \
                                                      ptrdiff_t W, ptrdiff_t stride,      \
                                                      const double *shift, double *sy,    \
                                                      double *sxy, T *g, float *stage) {  \
        ptrdiff_t s = bnfast_coldot_stage_stride(W, stride);                              \
        ptrdiff_t R = bnfast_coldot_stage_rows(s), r, k, i, j, q;                         \
        float *xb, *yb;                                                                   \
        int on;                                                                           \
        if (bits == NULL) { /* in registers */                                            \
            bnfast_coldot_##H(x, y, rows, W, stride, shift, sy, sxy);                     \
            return;                                                                       \
        }                                                                                 \
        if (BNFAST_HALF_MASKED_IN_REGISTERS_##H) {                                        \
            bnfast_coldot_masked_##H##_reg(x, y, bits, pos, rows, W, stride, shift, sy,   \
                                           sxy, g);                                       \
            return;                                                                       \
        }                                                                                 \
        xb = stage;                                                                       \
        yb = stage + R * s;                                                               \
        for (r = 0; r < rows; r += k) {                                                   \
            k = BNFAST_MIN(rows - r, R);                                                  \
            for (i = 0; i < k; i++) {                                                     \
                q = (r + i) * stride;                                                     \
                bnfast_widen_##H(x + q, xb + i * s, W);                                   \
                bnfast_widen_##H(y + q, yb + i * s, W);                                   \
                for (j = 0; j < W; j++) {                                                 \
                    on = BNFAST_BIT(bits, pos + q + j);                                   \
                    if (!on) yb[i * s + j] = 0.0f;                                        \
                    if (g != NULL) g[q + j].bits = on ? y[q + j].bits : 0;                \
                }                                                                         \
            }                                                                             \
            bnfast_centered_coldot_f32(xb, yb, k, W, s, shift, sy, sxy);                  \
        }                                                                                 \
    }                                                                                     \
    /* dx of `runs` consecutive runs of n values, run r with (m[r], a[r], b[r], d[r]) */  \
    static inline void bnfast_grad_runs_##H(const T *x, const T *dy, T *dx, ptrdiff_t runs, \
                                            ptrdiff_t n, const float *m, const float *a,  \
                                            const float *b, const float *d) {             \
        bnfast_grad_vec_runs_##H(x, dy, dx, runs, n, m, a, b, d);                         \
    }                                                                                     \
    /* dx (and g) of one run with one (m, a, b, d): bnfast_grad_run_scalar_f32's job */   \
    static inline void bnfast_grad_run_scalar_##H(                                        \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            float m, float a, float b, float d, int training, int stream, T *dx, T *g) {  \
        float xb[BNFAST_GRAD_STAGE], yb[BNFAST_GRAD_STAGE], gb[BNFAST_GRAD_STAGE];        \
        ptrdiff_t i, k;                                                                   \
        if (bits == NULL) { /* no mask, so no g: in registers */                          \
            if (dx != NULL)                                                               \
                bnfast_grad_vec_scalar_##H(BNFAST_HALF_STREAMS(stream, dx))(              \
                    x, dy, dx, n, m, a, b, d, training);                                  \
            return;                                                                       \
        }                                                                                 \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_GRAD_STAGE);                                     \
            BNFAST_HALF_GRAD_STAGE_IN(H, i, k)                                            \
            bnfast_grad_run_scalar_f32(xb, yb, bits, pos + i, k, m, a, b, d, training, 0, \
                                       dx == NULL ? NULL : xb, g == NULL ? NULL : gb);    \
            BNFAST_HALF_GRAD_STAGE_OUT(H, i, k)                                           \
        }                                                                                 \
    }                                                                                     \
    /* dx (and g) of n values from a tile-aligned start, the tile rows m, a, b, d of W    \
     * values repeating: whole tiles per staged chunk when W fits, else chunks of tiles; \
     * each tile piece is bnfast_grad_run_tiled_f32's job. */                            \
    static inline void bnfast_grad_tiles_##H(                                             \
            const T *x, const T *dy, const unsigned char *bits, ptrdiff_t pos, ptrdiff_t n, \
            ptrdiff_t W, const float *m, const float *a, const float *b, const float *d,  \
            int training, int stream, T *dx, T *g) {                                      \
        float xb[BNFAST_GRAD_STAGE], yb[BNFAST_GRAD_STAGE], gb[BNFAST_GRAD_STAGE];        \
        ptrdiff_t i, j, k, q, piece;                                                      \
        ptrdiff_t span = W <= BNFAST_GRAD_STAGE ? BNFAST_GRAD_STAGE / W * W : W;          \
        if (bits == NULL) { /* no mask, so no g: in registers, a tile piece at a time */  \
            for (i = 0; dx != NULL && i < n; i += W)                                      \
                bnfast_grad_vec_tiled_##H(BNFAST_HALF_STREAMS(stream, dx + i))(           \
                    x + i, dy + i, dx + i, BNFAST_MIN(W, n - i), m, a, b, d, training);   \
            return;                                                                       \
        }                                                                                 \
        for (i = 0; i < n; i += span) {                                                   \
            piece = BNFAST_MIN(n - i, span);                                              \
            for (j = 0; j < piece; j += k) { /* once when W fits the stage */             \
                k = BNFAST_MIN(piece - j, BNFAST_GRAD_STAGE);                             \
                BNFAST_HALF_GRAD_STAGE_IN(H, i + j, k)                                    \
                if (W <= BNFAST_GRAD_STAGE) {                                             \
                    for (q = 0; q < k; q += W)                                            \
                        bnfast_grad_run_tiled_f32(xb + q, yb + q, bits, pos + i + j + q,  \
                                                  BNFAST_MIN(W, k - q), m, a, b, d,       \
                                                  training, 0,                            \
                                                  dx == NULL ? NULL : xb + q,             \
                                                  g == NULL ? NULL : gb + q);             \
                } else {                                                                  \
                    bnfast_grad_run_tiled_f32(xb, yb, bits, pos + i + j, k, m + j, a + j, \
                                              b + j, d + j, training, 0,                  \
                                              dx == NULL ? NULL : xb,                     \
                                              g == NULL ? NULL : gb);                     \
                }                                                                         \
                BNFAST_HALF_GRAD_STAGE_OUT(H, i + j, k)                                   \
            }                                                                             \
        }                                                                                 \
    }

/* Staging of pass 2: x only when dx needs it (training), dy always; out: dx, g. */
#define BNFAST_HALF_GRAD_STAGE_IN(H, at, count)                                            \
    if (training && dx != NULL) bnfast_widen_##H(x + (at), xb, (count));                  \
    bnfast_widen_##H(dy + (at), yb, (count));
#define BNFAST_HALF_GRAD_STAGE_OUT(H, at, count)                                           \
    if (dx != NULL) bnfast_narrow_##H(xb, dx + (at), (count));                            \
    if (g != NULL) bnfast_narrow_##H(gb, g + (at), (count));

BNFAST_DEFINE_BACKWARD_HALF_LEAVES(f16, bnfast_f16)
BNFAST_DEFINE_BACKWARD_HALF_LEAVES(bf16, bnfast_bf16)

#endif /* BNFAST_BACKWARD_HALF_H */
