/*
 * The forward's leaves for half-precision storage (float16, bfloat16), by
 * staging (bnfast_half.h): each one widens its input into float buffers, runs
 * the float32 leaf of the same job (bnfast_simd.h, bnfast_backward_simd.h) and
 * narrows what it writes.  One definition for both half types (the macro).
 * The exception is the hot pass, the normalise in float: staging costs two
 * more trips through L1 and a call per run (2x a copy for in-cache data), so
 * it converts in registers, 8 values at a time (bnfast_half.h's load8/store8:
 * F16C, or a shift for bfloat16), or 32 on AVX-512 (AVX512-BF16's two-source
 * vcvtne2ps2bf16, AVX512F's float16 conversions), with the float32 leaf's
 * arithmetic.
 *
 * Bits: the reductions stage whole calls' worth of values (a chunk of
 * <= BNFAST_REDUCE_STAGE), so half data gives exactly the sums of the same
 * values stored as float32.  (The training statistics widen in registers:
 * bnfast_stats.h.)  The elementwise leaves compute in
 * float (or double: the *d leaves, for tables float cannot carry) and round
 * once to the half type; chunking cannot change elementwise results.
 */
#ifndef BNFAST_HALF_LEAVES_H
#define BNFAST_HALF_LEAVES_H

#include <math.h>

#include "bnfast_half.h"
#include "bnfast_simd.h"
#include "bnfast_backward_simd.h"
#include "bnfast_float_sums.h"  /* BNFAST_W4_AVX */

/* Values per staged reduction call. */
#define BNFAST_REDUCE_STAGE 4096

#define BNFAST_MIN(a, b) ((a) < (b) ? (a) : (b))

#define BNFAST_DEFINE_HALF_LEAVES(H, T)                                                   \
    /* sy += sum(y), sxy += sum((x - shift) * y) */                                       \
    static inline void bnfast_centered_dot_##H(const T *x, const T *y, ptrdiff_t n, double shift, \
                                        double *sy, double *sxy) {                        \
        float xb[BNFAST_REDUCE_STAGE], yb[BNFAST_REDUCE_STAGE];                           \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_REDUCE_STAGE);                                   \
            bnfast_widen_##H(x + i, xb, k);                                               \
            bnfast_widen_##H(y + i, yb, k);                                               \
            bnfast_centered_dot_f32(xb, yb, k, shift, sy, sxy);                           \
        }                                                                                 \
    }                                                                                     \
    /* ... computed in double (a table float cannot carry) */                             \
    static inline void bnfast_affine_scalar_##H##d(const T *x, const T *add, T *y, ptrdiff_t n,   \
                                            double m, double a, double b, int relu) {     \
        float xb[BNFAST_STAGE], ab[BNFAST_STAGE];                                         \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_STAGE);                                          \
            bnfast_widen_##H(x + i, xb, k);                                               \
            if (add != NULL) bnfast_widen_##H(add + i, ab, k);                            \
            bnfast_affine_scalar_f32d(xb, add == NULL ? NULL : ab, xb, k, m, a, b, relu); \
            bnfast_narrow_##H(xb, y + i, k);                                              \
        }                                                                                 \
    }                                                                                     \
    BNFAST_DEFINE_HALF_TILED(H, T, d, double, bnfast_affine_tiled_f32d)                   \
    /* ReLU mask bits !(y <= 0) of n values (bits of 8 values per byte) */                \
    static inline void bnfast_pack_positive_##H(const T *y, ptrdiff_t n, unsigned char *bits) {   \
        float buf[BNFAST_STAGE];                                                          \
        ptrdiff_t i, k;                                                                   \
        for (i = 0; i < n; i += k) {                                                      \
            k = BNFAST_MIN(n - i, BNFAST_STAGE);                                          \
            bnfast_widen_##H(y + i, buf, k);                                              \
            bnfast_pack_positive_f32(buf, k, bits + i / 8);                               \
        }                                                                                 \
    }

/* The tiled affine (a channels-last tile of W coefficients, pieces of W values):
 * whole tiles per staged chunk when W fits, else chunks within each piece. */
#define BNFAST_DEFINE_HALF_TILED(H, T, SUFFIX, U, LEAF)                                   \
    static inline void bnfast_affine_tiled_##H##SUFFIX(const T *x, const T *add, T *y,            \
                                                ptrdiff_t total, ptrdiff_t W, const U *m, \
                                                const U *a, const U *b, int relu) {       \
        float xb[BNFAST_STAGE], ab[BNFAST_STAGE];                                         \
        ptrdiff_t i, j, k, piece;                                                         \
        ptrdiff_t span = W <= BNFAST_STAGE ? BNFAST_STAGE / W * W : W;                    \
        for (i = 0; i < total; i += span) {                                               \
            piece = BNFAST_MIN(total - i, span);                                          \
            for (j = 0; j < piece; j += k) {                                              \
                k = BNFAST_MIN(piece - j, BNFAST_STAGE);                                  \
                bnfast_widen_##H(x + i + j, xb, k);                                       \
                if (add != NULL) bnfast_widen_##H(add + i + j, ab, k);                    \
                if (W <= BNFAST_STAGE)                                                    \
                    LEAF(xb, add == NULL ? NULL : ab, xb, k, W, m, a, b, relu);           \
                else                                                                      \
                    LEAF(xb, add == NULL ? NULL : ab, xb, k, k, m + j, a + j, b + j, relu); \
                bnfast_narrow_##H(xb, y + i + j, k);                                      \
            }                                                                             \
        }                                                                                 \
    }

BNFAST_DEFINE_HALF_LEAVES(f16, bnfast_f16)
BNFAST_DEFINE_HALF_LEAVES(bf16, bnfast_bf16)

/* ---------------------------------------------------------------------------
 * The normalise pass in float, converting in registers:
 *   y = round(relu?(((float)x - m) * a + b [+ (float)add]))
 * with the float32 leaf's operations in its order (no FMA), so the result is
 * the float32 leaf's on the widened values, rounded once to the half type.
 * SCALAR: one (m, a, b); TILED: per element of a W-long tile, in pieces of W.
 * The variant's WIDE steps first (32 values at a time on AVX-512, below), then
 * eight at a time with load8/store8, the tail with the scalar conversions; the
 * epilogue branches are hoisted out of the loops.
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT
#define BNFAST_H8_RELU(v) ((bnfast_h8f)((bnfast_h8i)(v) & ~((v) < 0.0f)))
#define BNFAST_H8_COEF(p, i) (*(const bnfast_h8f *)((p) + (i)))
/* The addend's addition, v the first source (where both are NaN, v's payload:
 * the portable build's).  Pinned in a build whose own target has AVX
 * (-march=native): its base leaves are compiled for it, and GCC chose the
 * operand order differently in the channels-first and channels-last leaves
 * there (float16 NaN payloads, tests/test_layouts.py).  Elsewhere the plain
 * expression, as every variant has been measured and tested with. */
#if defined(__AVX__) && (defined(__x86_64__) || defined(__i386__))
#define BNFAST_H8_PLUS(v, w) ({                                                          \
        bnfast_h8f r_;                                                                   \
        __asm__("vaddps %2, %1, %0" : "=x"(r_) : "x"(v), "x"(w));                        \
        r_; })
#else
#define BNFAST_H8_PLUS(v, w) ((v) + (w))
#endif
/* Values [i, END) of the run, 8 at a time (END - i a multiple of 8), MV/AV/BV
 * giving the coefficient vectors at i. */
#define BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, MV, AV, BV, END)                      \
    if (add == NULL && !relu) {                                                          \
        for (; i < (END); i += 8) STORE8(y + i, (LOAD8(x + i) - MV) * AV + BV);          \
    } else if (add == NULL) {                                                            \
        for (; i < (END); i += 8)                                                        \
            STORE8(y + i, BNFAST_H8_RELU((LOAD8(x + i) - MV) * AV + BV));                \
    } else if (!relu) {                                                                  \
        for (; i < (END); i += 8)                                                        \
            STORE8(y + i, BNFAST_H8_PLUS((LOAD8(x + i) - MV) * AV + BV, LOAD8(add + i)));  \
    } else {                                                                             \
        for (; i < (END); i += 8)                                                        \
            STORE8(y + i, BNFAST_H8_RELU(BNFAST_H8_PLUS((LOAD8(x + i) - MV) * AV + BV,     \
                                                        LOAD8(add + i))));               \
    }
#define BNFAST_HALF_N8(n) ((n) - (n) % 8)
#else
#define BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, MV, AV, BV, END)
#define BNFAST_HALF_N8(n) 0
#endif

/* The wide loops: values [i, ...) 32 at a time before the 8-wide loop, for the
 * variants whose conversion pays per 32 values (bnfast_half.h's store32).
 * WIDE(MV, AV, BV, MV16, AV16, BV16) is the variant's step: NO_WIDE for none,
 * <TYPE>_<VARIANT>_WIDE / _WIDE_NT for the AVX-512 ones (the streaming one first
 * goes 8 at a time to a 64-byte boundary: its 64-byte stores need one; the
 * caller's pieces start 16-byte aligned, so that is at most 3 steps). */
#define BNFAST_HALF_NO_WIDE(MV, AV, BV, MV16, AV16, BV16)
#if BNFAST_DISPATCH_AVX2
#define BNFAST_H16_RELU(v) ((bnfast_h16f)_mm512_maskz_mov_ps(                              \
        _mm512_cmp_ps_mask((__m512)(v), _mm512_setzero_ps(), _CMP_NLT_UQ), (__m512)(v)))
#define BNFAST_H16_COEF(p, i) (*(const bnfast_h16f *)((p) + (i)))
/* v + w with v the first source: where both are NaN the result is v's (quietened),
 * the bits the portable build gives.  GCC may swap the operands of a vector +
 * (it did in the float16 streaming leaf: other NaN payloads than the portable's). */
#define BNFAST_H16_ADD(v, w) ({                                                          \
        bnfast_h16f r_;                                                                  \
        __asm__("vaddps %2, %1, %0" : "=v"(r_) : "v"(v), "v"(w));                        \
        r_; })
/* The value of 16 lanes from j on; the rest (LOAD16, MV16, AV16, BV16, ADD,
 * RELU) is a step's context, ADD and RELU constants (0, 1). */
#define BNFAST_H16_VALUE(j, LOAD16, MV16, AV16, BV16, ADD, RELU) ({                      \
        bnfast_h16f v_ = (LOAD16(x + (j)) - MV16(j)) * AV16(j) + BV16(j);               \
        if (ADD) v_ = BNFAST_H16_ADD(v_, LOAD16(add + (j)));                             \
        if (RELU) v_ = BNFAST_H16_RELU(v_);                                              \
        v_; })
#define BNFAST_H16_AT(j, ...) BNFAST_H16_VALUE(j, __VA_ARGS__)
/* A 32-value step's two vectors A, B from j on, for its STORE32: SPLIT, values
 * j..j+15 and j+16..j+31 (every variant); EO, bfloat16 with one coefficient
 * (channels-first runs): the even and the odd values, widened from one load by
 * a shift and an and, stored by bnfast_store32eo_bf16_z's shift and ternary
 * logic -- two vector instructions a step fewer than two widening loads and a
 * vpermt2w (Xeon VM, in L1: 0.110 against 0.125 ns a value).  Each lane does
 * the same operations either way: the same bits. */
#define BNFAST_H32_SPLIT(j, A, B, ...)                                                   \
    A = BNFAST_H16_AT(j, __VA_ARGS__);                                                   \
    B = BNFAST_H16_AT((j) + 16, __VA_ARGS__);
#define BNFAST_H32_EO(j, A, B, LOAD16, MV16, AV16, BV16, ADD, RELU)                      \
    {                                                                                    \
        __m512i w_ = _mm512_loadu_si512((const void *)(x + (j)));                        \
        A = ((bnfast_h16f)_mm512_slli_epi32(w_, 16) - MV16(j)) * AV16(j) + BV16(j);      \
        B = ((bnfast_h16f)_mm512_and_si512(w_, BNFAST_BF16_Z_K_(512, 4)) - MV16(j))      \
            * AV16(j) + BV16(j);                                                         \
        if (ADD) {                                                                       \
            __m512i d_ = _mm512_loadu_si512((const void *)(add + (j)));                  \
            A = BNFAST_H16_ADD(A, (bnfast_h16f)_mm512_slli_epi32(d_, 16));               \
            B = BNFAST_H16_ADD(B, (bnfast_h16f)_mm512_and_si512(d_, BNFAST_BF16_Z_K_(512, 4))); \
        }                                                                                \
        if (RELU) {                                                                      \
            A = BNFAST_H16_RELU(A);                                                      \
            B = BNFAST_H16_RELU(B);                                                      \
        }                                                                                \
    }
/* One 32-value step: both vectors formed, then stored. */
#define BNFAST_H32_STEP(VALS32, STORE32, j, ...)                                         \
    {                                                                                    \
        bnfast_h16f step_a_, step_b_;  /* (names the store macros do not declare) */   \
        VALS32(j, step_a_, step_b_, __VA_ARGS__)                                         \
        STORE32(y + (j), step_a_, step_b_);                                              \
    }
/* Cached: 32 values a step; the last step (33 to 64 values left) takes the
 * last 32 too, overlapping, both loaded before either is stored (y may be x:
 * the overlap is written twice with the same bits); fewer than 32 in all: 16
 * if that many.  A 7x7 image's 49 values: 2 steps of 32 (6.2 ns a run took
 * 32 + 16 + 1 before, Zen 4).  Except where at most TAIL values would be left
 * after a 32 and a 16 (TAIL -1: never): those steps, then the scalar tail.
 * bfloat16's z variant (Intel, whose zmm work shares two ports) takes TAIL 4:
 * one thread, 32x2048x7x7 eval 673 -> 605 us, one vector fewer a run.  The
 * 8-value loop and the tail take what is left. */
#define BNFAST_HALF_WIDE_CACHED(TAIL, VALS32, STORE32, STORE16, ...)                     \
    if (n - i >= 32) {                                                                   \
        for (; n - i > 64; i += 32) BNFAST_H32_STEP(VALS32, STORE32, i, __VA_ARGS__)     \
        if (n - i > 32 && (n - i) % 16 > (TAIL)) {                                       \
            bnfast_h16f p0_, p1_, q0_, q1_;                                              \
            VALS32(i, p0_, p1_, __VA_ARGS__)                                             \
            VALS32(n - 32, q0_, q1_, __VA_ARGS__)                                        \
            STORE32(y + i, p0_, p1_);                                                    \
            STORE32(y + n - 32, q0_, q1_);                                               \
            i = n;                                                                       \
        } else {  /* 32 to 64 left: one or two steps of 32, then 16 if that many */       \
            BNFAST_H32_STEP(VALS32, STORE32, i, __VA_ARGS__)                             \
            i += 32;                                                                     \
            if (n - i == 32) {                                                           \
                BNFAST_H32_STEP(VALS32, STORE32, i, __VA_ARGS__)                         \
                i += 32;                                                                 \
            } else if (n - i >= 16) {                                                    \
                STORE16(y + i, BNFAST_H16_AT(i, __VA_ARGS__));                           \
                i += 16;                                                                 \
            }                                                                            \
        }                                                                                \
    } else if (n - i >= 16) {                                                            \
        STORE16(y + i, BNFAST_H16_AT(i, __VA_ARGS__));                                   \
        i += 16;                                                                         \
    }
/* Streamed (y + i 64-byte aligned): 32 values a step, then 16 if that many are
 * left (32-byte aligned), no overlap (its stores would not be aligned). */
#define BNFAST_HALF_WIDE_STREAMED(VALS32, STORE32, STORE16, ...)                         \
    for (; n - i >= 32; i += 32) BNFAST_H32_STEP(VALS32, STORE32, i, __VA_ARGS__)        \
    if (n - i >= 16) {                                                                   \
        STORE16(y + i, BNFAST_H16_AT(i, __VA_ARGS__));                                   \
        i += 16;                                                                         \
    }
/* BODY for each epilogue. */
#define BNFAST_HALF_WIDE_LOOPS(BODY, VALS32, LOAD16, STORE32, STORE16, MV16, AV16, BV16) \
    if (add == NULL && !relu) {                                                          \
        BODY(VALS32, STORE32, STORE16, LOAD16, MV16, AV16, BV16, 0, 0)                   \
    } else if (add == NULL) {                                                            \
        BODY(VALS32, STORE32, STORE16, LOAD16, MV16, AV16, BV16, 0, 1)                   \
    } else if (!relu) {                                                                  \
        BODY(VALS32, STORE32, STORE16, LOAD16, MV16, AV16, BV16, 1, 0)                   \
    } else {                                                                             \
        BODY(VALS32, STORE32, STORE16, LOAD16, MV16, AV16, BV16, 1, 1)                   \
    }
/* Streamed: 8 values a step to a 64-byte boundary first (LOAD8, STREAM8). */
#define BNFAST_HALF_ALIGN64(LOAD8, STREAM8, MV, AV, BV)                                  \
    {                                                                                    \
        ptrdiff_t a_ = i;                                                                \
        while (a_ < n8 && ((size_t)(y + a_) & 63) != 0) a_ += 8;                         \
        BNFAST_HALF_AFFINE_VECTORS(LOAD8, STREAM8, MV, AV, BV, a_)                       \
    }
/* The wide steps of variant V of half type H (bnfast_half.h's load16/store32/
 * store16 and stream32/stream16 of that name); streamed, LOAD8/STREAM8 first
 * reach the 64-byte boundary. */
#define BNFAST_HALF_CACHED_bf16_hw(...) BNFAST_HALF_WIDE_CACHED(-1, __VA_ARGS__)
#define BNFAST_HALF_CACHED_bf16_z(...) BNFAST_HALF_WIDE_CACHED(4, __VA_ARGS__)
#define BNFAST_HALF_CACHED_f16_z(...) BNFAST_HALF_WIDE_CACHED(-1, __VA_ARGS__)
#define BNFAST_HALF_WIDE_OF(H, V, MV16, AV16, BV16)                                      \
    BNFAST_HALF_WIDE_LOOPS(BNFAST_HALF_CACHED_##H##_##V, BNFAST_H32_SPLIT,               \
                           bnfast_load16_##H##_##V, bnfast_store32_##H##_##V,            \
                           bnfast_store16_##H##_##V, MV16, AV16, BV16)
#define BNFAST_HALF_WIDE_NT_OF(H, V, LOAD8, STREAM8, MV, AV, BV, MV16, AV16, BV16)       \
    BNFAST_HALF_ALIGN64(LOAD8, STREAM8, MV, AV, BV)                                      \
    BNFAST_HALF_WIDE_LOOPS(BNFAST_HALF_WIDE_STREAMED, BNFAST_H32_SPLIT,                  \
                           bnfast_load16_##H##_##V,                                      \
                           bnfast_stream32_##H##_##V, bnfast_stream16_##H##_##V, MV16, AV16, BV16)
#define BNFAST_HALF_BF16_HW_WIDE(MV, AV, BV, MV16, AV16, BV16)                           \
    BNFAST_HALF_WIDE_OF(bf16, hw, MV16, AV16, BV16)
#define BNFAST_HALF_BF16_HW_WIDE_NT(MV, AV, BV, MV16, AV16, BV16)                        \
    BNFAST_HALF_WIDE_NT_OF(bf16, hw, bnfast_load8_bf16_avx2, bnfast_stream8_bf16_hw,     \
                           MV, AV, BV, MV16, AV16, BV16)
/* bfloat16's z variant: even/odd steps with one coefficient (the SCALAR leaf's
 * BNFAST_HALF_SCALAR_M), split ones with a tile of them (TILED). */
#define BNFAST_HALF_BF16_Z_WIDE(MV, AV, BV, MV16, AV16, BV16)                            \
    BNFAST_HALF_BF16_Z_WIDE_##MV16(MV16, AV16, BV16)
#define BNFAST_HALF_BF16_Z_WIDE_BNFAST_HALF_SCALAR_M(MV16, AV16, BV16)                   \
    BNFAST_HALF_WIDE_LOOPS(BNFAST_HALF_CACHED_bf16_z, BNFAST_H32_EO, bnfast_load16_bf16_z, \
                           bnfast_store32eo_bf16_z, bnfast_store16_bf16_z, MV16, AV16, BV16)
#define BNFAST_HALF_BF16_Z_WIDE_BNFAST_HALF_TILED_M(MV16, AV16, BV16)                    \
    BNFAST_HALF_WIDE_OF(bf16, z, MV16, AV16, BV16)
#define BNFAST_HALF_BF16_Z_WIDE_NT(MV, AV, BV, MV16, AV16, BV16)                         \
    BNFAST_HALF_ALIGN64(bnfast_load8_bf16_avx2, bnfast_stream8_bf16_z, MV, AV, BV)       \
    BNFAST_HALF_BF16_Z_WIDE_NT_##MV16(MV16, AV16, BV16)
#define BNFAST_HALF_BF16_Z_WIDE_NT_BNFAST_HALF_SCALAR_M(MV16, AV16, BV16)                \
    BNFAST_HALF_WIDE_LOOPS(BNFAST_HALF_WIDE_STREAMED, BNFAST_H32_EO, bnfast_load16_bf16_z, \
                           bnfast_stream32eo_bf16_z, bnfast_stream16_bf16_z, MV16, AV16, BV16)
#define BNFAST_HALF_BF16_Z_WIDE_NT_BNFAST_HALF_TILED_M(MV16, AV16, BV16)                 \
    BNFAST_HALF_WIDE_LOOPS(BNFAST_HALF_WIDE_STREAMED, BNFAST_H32_SPLIT,                  \
                           bnfast_load16_bf16_z, bnfast_stream32_bf16_z,                 \
                           bnfast_stream16_bf16_z, MV16, AV16, BV16)
#define BNFAST_HALF_F16_Z_WIDE(MV, AV, BV, MV16, AV16, BV16)                             \
    BNFAST_HALF_WIDE_OF(f16, z, MV16, AV16, BV16)
#define BNFAST_HALF_F16_Z_WIDE_NT(MV, AV, BV, MV16, AV16, BV16)                          \
    BNFAST_HALF_WIDE_NT_OF(f16, z, bnfast_load8_f16_f16c, bnfast_stream8_f16_f16c,       \
                           MV, AV, BV, MV16, AV16, BV16)
#endif
#define BNFAST_HALF_SCALAR_M(j) m
#define BNFAST_HALF_SCALAR_A(j) a
#define BNFAST_HALF_SCALAR_B(j) b
#define BNFAST_HALF_TILED_M(j) BNFAST_H16_COEF(m, j)
#define BNFAST_HALF_TILED_A(j) BNFAST_H16_COEF(a, j)
#define BNFAST_HALF_TILED_B(j) BNFAST_H16_COEF(b, j)

/* LAST8 (the scalar leaf's, after the 8-value loop): BNFAST_HALF_LAST8 writes the
 * last values of a run whose length is not a multiple of 8 as the vector of its
 * last 8, overlapping (the overlap twice, the same bits), where y shares no
 * memory with x or the addend (in place, the values it would read again are
 * already written: the tail takes them).  F16C: 32x2048x7x7 float16 eval, one
 * thread, 368 -> 353 us.  (Loading that vector before the loop, to allow it in
 * place too, measured slower: 369 -> 404 us.)  NO_LAST8 for the other leaves:
 * bfloat16's AVX2 rounding of 8 values costs more than the tail, the streaming
 * twins' store would not be aligned, the AVX-512 ones have their own steps. */
#define BNFAST_HALF_NO_LAST8(LOAD8, STORE8, MV, AV, BV)
/* v + w, v the first source (x86 AVX targets; see BNFAST_H16_ADD). */
#define BNFAST_H8_ADD(v, w) ({                                                           \
        bnfast_h8f r_;                                                                   \
        __asm__("vaddps %2, %1, %0" : "=x"(r_) : "x"(v), "x"(w));                        \
        r_; })
#define BNFAST_HALF_APART(p, q) \
    ((size_t)((p) + n) <= (size_t)(q) || (size_t)((q) + n) <= (size_t)(p))
#define BNFAST_HALF_LAST8(LOAD8, STORE8, MV, AV, BV)                                     \
    if (i < n && n >= 8 && BNFAST_HALF_APART(y, x)                                      \
        && (add == NULL || BNFAST_HALF_APART(y, add))) {                                 \
        bnfast_h8f t_ = (LOAD8(x + n - 8) - MV) * AV + BV;                               \
        if (add != NULL) t_ = BNFAST_H8_ADD(t_, LOAD8(add + n - 8));                     \
        if (relu) t_ = BNFAST_H8_RELU(t_);                                               \
        STORE8(y + n - 8, t_);                                                           \
        i = n;                                                                           \
    }

/* Values [i, n) (i = n8, or n after an overlapping step), one at a time. */
#define BNFAST_HALF_AFFINE_TAIL(TO_F, FROM_F, MS, AS, BS)                               \
    for (; i < n; i++) {                                                                 \
        float v_ = (TO_F(x[i]) - MS) * AS + BS;                                          \
        if (add != NULL) v_ = v_ + TO_F(add[i]);                                         \
        if (relu) v_ = v_ < 0.0f ? 0.0f : v_;                                            \
        y[i] = FROM_F(v_);                                                               \
    }

/* SCALAR: one (m, a, b); TILED: a tile of them. */
#define BNFAST_DEFINE_HALF_AFFINE_SCALAR(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE, LAST8) \
    ATTR static void bnfast_affine_scalar_##H##_##VARIANT(const T *x, const T *add, T *y, \
                                                         ptrdiff_t n, float m, float a,  \
                                                         float b, int relu) {            \
        ptrdiff_t i = 0, n8 = BNFAST_HALF_N8(n);                                         \
        WIDE(m, a, b, BNFAST_HALF_SCALAR_M, BNFAST_HALF_SCALAR_A, BNFAST_HALF_SCALAR_B)  \
        BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, m, a, b, n8)                           \
        LAST8(LOAD8, STORE8, m, a, b)                                                    \
        BNFAST_HALF_AFFINE_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,    \
                                m, a, b)                                                 \
    }
#define BNFAST_DEFINE_HALF_AFFINE_TILED(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE)        \
    ATTR static void bnfast_affine_tiled_##H##_##VARIANT(const T *x0, const T *add0,     \
                                                        T *y0, ptrdiff_t total,          \
                                                        ptrdiff_t W, const float *m,     \
                                                        const float *a, const float *b,  \
                                                        int relu) {                      \
        ptrdiff_t i0, i, n, n8;                                                          \
        for (i0 = 0; i0 < total; i0 += W) {                                              \
            const T *x = x0 + i0;                                                        \
            const T *add = add0 == NULL ? NULL : add0 + i0;                              \
            T *y = y0 + i0;                                                              \
            n = total - i0 < W ? total - i0 : W;                                         \
            n8 = BNFAST_HALF_N8(n);                                                      \
            i = 0;                                                                       \
            WIDE(BNFAST_H8_COEF(m, i), BNFAST_H8_COEF(a, i), BNFAST_H8_COEF(b, i),       \
                 BNFAST_HALF_TILED_M, BNFAST_HALF_TILED_A, BNFAST_HALF_TILED_B)          \
            BNFAST_HALF_AFFINE_VECTORS(LOAD8, STORE8, BNFAST_H8_COEF(m, i),              \
                                       BNFAST_H8_COEF(a, i), BNFAST_H8_COEF(b, i), n8)   \
            BNFAST_HALF_AFFINE_TAIL(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT,    \
                                    m[i], a[i], b[i])                                    \
        }                                                                                \
    }

/* The scalar leaf and the runs of it (channels-first). */
#define BNFAST_DEFINE_HALF_AFFINE_RUNS(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE, LAST8)  \
    BNFAST_DEFINE_HALF_AFFINE_SCALAR(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE, LAST8)    \
    BNFAST_DEFINE_AFFINE_RUNS(bnfast_affine_runs_##H##_##VARIANT, T, ATTR,               \
                              bnfast_affine_scalar_##H##_##VARIANT)
#define BNFAST_DEFINE_HALF_AFFINE_ALL(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE, LAST8)   \
    BNFAST_DEFINE_HALF_AFFINE_RUNS(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE, LAST8)      \
    BNFAST_DEFINE_HALF_AFFINE_TILED(H, T, VARIANT, ATTR, LOAD8, STORE8, WIDE)

BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, base, , bnfast_load8_f16, bnfast_store8_f16,
                              BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, base, , bnfast_load8_bf16, bnfast_store8_bf16,
                              BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_NO_LAST8)
#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                              bnfast_store8_f16_f16c, BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, z, BNFAST_F16_Z_TARGET, bnfast_load8_f16_f16c,
                              bnfast_store8_f16_f16c, BNFAST_HALF_F16_Z_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, avx2, BNFAST_AVX2_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_store8_bf16_avx2, BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, hw, BNFAST_BF16_HW_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_store8_bf16_hw, BNFAST_HALF_BF16_HW_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, z, BNFAST_BF16_Z_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_store8_bf16_z, BNFAST_HALF_BF16_Z_WIDE,
                              BNFAST_HALF_NO_LAST8)
/* Streaming twins (bnfast_half.h's stream8: the same rounding, non-temporal
 * stores), for outputs far beyond the caches.  As bnfast_simd.h's float32 ones:
 * the caller streams only pieces that start 16-byte aligned and span whole
 * 16-byte groups (8 values), so the plain-stored tail is at most the array's
 * last values, and calls bnfast_nt_fence() after a block. */
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, f16c_nt, BNFAST_F16C_TARGET,
                              bnfast_load8_f16_f16c, bnfast_stream8_f16_f16c, BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(f16, bnfast_f16, z_nt, BNFAST_F16_Z_TARGET,
                              bnfast_load8_f16_f16c, bnfast_stream8_f16_f16c, BNFAST_HALF_F16_Z_WIDE_NT,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, avx2_nt, BNFAST_AVX2_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_stream8_bf16_avx2,
                              BNFAST_HALF_NO_WIDE,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, hw_nt, BNFAST_BF16_HW_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_stream8_bf16_hw,
                              BNFAST_HALF_BF16_HW_WIDE_NT,
                              BNFAST_HALF_NO_LAST8)
BNFAST_DEFINE_HALF_AFFINE_ALL(bf16, bnfast_bf16, z_nt, BNFAST_BF16_Z_TARGET,
                              bnfast_load8_bf16_avx2, bnfast_stream8_bf16_z,
                              BNFAST_HALF_BF16_Z_WIDE_NT,
                              BNFAST_HALF_NO_LAST8)
#endif

#if BNFAST_DISPATCH_AVX2
/* float32 channels-first runs on AVX-512VL: the 8-value steps above on float32
 * itself, and the run's last values (fewer than 8) as one masked step instead
 * of the scalar tail (masked-off lanes neither read nor written: in place is
 * fine).  The auto-vectorised leaf (bnfast_simd.h) ends each run with scalar
 * values behind its alias checks; on a 7x7 image's 49 values this is ~9%
 * faster (one thread, 32x2048x7x7 eval, 1080 -> 983 us).  The same operations,
 * so the same bits: the tail's addition pinned as the wide steps' (BNFAST_H8_ADD),
 * the 8-value loop's the plain expression, as GCC compiles the float32 leaf's
 * (the layout tests hold both to the channels-last leaves' NaN payloads). */
BNFAST_DEFINE_CPU_CHECK(f32_masked, BNFAST_CPU("avx2") && BNFAST_CPU("avx512f")
                                    && BNFAST_CPU("avx512vl"))
#define BNFAST_F32_MASKED_TARGET __attribute__((target("avx2,avx512f,avx512vl")))
#define bnfast_load8_f32_masked(p) (*(const bnfast_h8f *)(p))
#define bnfast_store8_f32_masked(p, v) (*(bnfast_h8f *)(p) = (v))
#define BNFAST_TOF_f32_masked(v) (v)
#define BNFAST_FROMF_f32_masked(v) (v)
#define BNFAST_F32_MASKED_LAST(LOAD8, STORE8, MV, AV, BV)                                \
    if (i < n) {                                                                         \
        __mmask8 k_ = (__mmask8)((1u << (n - i)) - 1);                                   \
        bnfast_h8f t_ = ((bnfast_h8f)_mm256_maskz_loadu_ps(k_, x + i) - MV) * AV + BV;   \
        if (add != NULL) t_ = BNFAST_H8_ADD(t_, (bnfast_h8f)_mm256_maskz_loadu_ps(k_, add + i)); \
        if (relu) t_ = BNFAST_H8_RELU(t_);                                               \
        _mm256_mask_storeu_ps(y + i, k_, (__m256)t_);                                    \
        i = n;                                                                           \
    }
BNFAST_DEFINE_HALF_AFFINE_RUNS(f32, float, masked, BNFAST_F32_MASKED_TARGET,
                               bnfast_load8_f32_masked, bnfast_store8_f32_masked,
                               BNFAST_HALF_NO_WIDE, BNFAST_F32_MASKED_LAST)
#endif
/* The leaves, picked at run time: NT is empty (cached stores) or _nt (streamed);
 * a CPU without the vector store, and the portable build, get the portable
 * leaves, which store plainly (the PICK macros drop the others' names there). */
#define BNFAST_DEFINE_HALF_AFFINE_PICKS(NT)                                              \
    static inline void bnfast_affine_runs_f16##NT(                                       \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t runs,   \
            ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,       \
            const float *b, int relu) {                                                  \
        BNFAST_PICK_F16(S, bnfast_affine_runs_f16_base, bnfast_affine_runs_f16_f16c##NT, \
                        bnfast_affine_runs_f16_z##NT)(                                   \
            x, add, y, runs, S, c, C, m, a, b, relu);                                    \
    }                                                                                    \
    static inline void bnfast_affine_runs_bf16##NT(                                      \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t runs, \
            ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,       \
            const float *b, int relu) {                                                  \
        BNFAST_PICK_BF16(bnfast_affine_runs_bf16_base, bnfast_affine_runs_bf16_avx2##NT, \
                         bnfast_affine_runs_bf16_z##NT, bnfast_affine_runs_bf16_hw##NT)( \
            x, add, y, runs, S, c, C, m, a, b, relu);                                    \
    }                                                                                    \
    static inline void bnfast_affine_scalar_f16##NT(                                     \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t n,      \
            float m, float a, float b, int relu) {                                       \
        BNFAST_PICK_F16(n, bnfast_affine_scalar_f16_base,                                \
                        bnfast_affine_scalar_f16_f16c##NT,                               \
                        bnfast_affine_scalar_f16_z##NT)(                                 \
            x, add, y, n, m, a, b, relu);                                                \
    }                                                                                    \
    static inline void bnfast_affine_tiled_f16##NT(                                      \
            const bnfast_f16 *x, const bnfast_f16 *add, bnfast_f16 *y, ptrdiff_t n,      \
            ptrdiff_t W, const float *m, const float *a, const float *b, int relu) {     \
        BNFAST_PICK_F16(W, bnfast_affine_tiled_f16_base, bnfast_affine_tiled_f16_f16c##NT, \
                        bnfast_affine_tiled_f16_z##NT)(                                  \
            x, add, y, n, W, m, a, b, relu);                                             \
    }                                                                                    \
    static inline void bnfast_affine_scalar_bf16##NT(                                    \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t n,   \
            float m, float a, float b, int relu) {                                       \
        BNFAST_PICK_BF16(bnfast_affine_scalar_bf16_base, bnfast_affine_scalar_bf16_avx2##NT, \
                         bnfast_affine_scalar_bf16_z##NT, bnfast_affine_scalar_bf16_hw##NT)( \
            x, add, y, n, m, a, b, relu);                                                \
    }                                                                                    \
    static inline void bnfast_affine_tiled_bf16##NT(                                     \
            const bnfast_bf16 *x, const bnfast_bf16 *add, bnfast_bf16 *y, ptrdiff_t n,   \
            ptrdiff_t W, const float *m, const float *a, const float *b, int relu) {     \
        BNFAST_PICK_BF16(bnfast_affine_tiled_bf16_base, bnfast_affine_tiled_bf16_avx2##NT, \
                         bnfast_affine_tiled_bf16_z##NT, bnfast_affine_tiled_bf16_hw##NT)( \
            x, add, y, n, W, m, a, b, relu);                                             \
    }
BNFAST_DEFINE_HALF_AFFINE_PICKS()
BNFAST_DEFINE_HALF_AFFINE_PICKS(_nt)

/* ---------------------------------------------------------------------------
 * The addend's sum for half data, checked (_affine.pxd: every half call with an
 * addend whose table fits the float rows).  In float, as the leaves above,
 *   t = ((float)x - hz) * fa + hb,   v = t + (float)add,
 * errs by a few 2^-24 of |t| + |add| (the half rows keep t's error to its own
 * scale, but the addend may cancel t): more than half an ulp of a half output
 * near 0 (2 ulps of float16 seen, 85 of bfloat16).  Where |v| falls below 2^-9
 * of |t| the value is taken again from the double rows,
 *   v = (float)(((double)x - m) * a + b + (double)add),
 * which errs by 2^-53 of the terms; elsewhere float's error, at most ~4 * 2^-24
 * of |t| and 2^-24 of |v|, stays under 2^-13 |v|, a quarter of a float16 ulp
 * (|add| < |t| + |v|: no check of its own).  Then the ReLU
 * and one rounding to the half type.  The check is the value's own, so every
 * variant gives the same bits: 16 lanes a step on AVX-512, 8 on AVX2 (the
 * double pass only for a step with a checked lane: ~2% of 16-lane steps on
 * unit-scale data), one value at a time in the portable leaf and for the last
 * values.  The streamed head assumes y element-aligned (the callers check).
 * ------------------------------------------------------------------------- */
#define BNFAST_SUM_CHECK 0x1p-9f

/* One value; PLUS(t, w) adds with t the first source (where both are NaN, t's
 * payload, as BNFAST_H16_ADD: GCC put the addend first here, at -O3). */
#define BNFAST_CHECKED_SUM_(PLUS, xf, af, hz, fa, hb, m, a, b) ({                        \
        float t_ = ((xf) - (hz)) * (fa) + (hb), v_ = PLUS(t_, (af));                     \
        if (fabsf(v_) < BNFAST_SUM_CHECK * fabsf(t_))                                    \
            v_ = (float)((((double)(xf) - (m)) * (a) + (b)) + (double)(af));             \
        v_; })
#if defined(__x86_64__) && defined(__AVX__)
#define BNFAST_PLUS_PLAIN(t, w) ({                                                       \
        float r_;                                                                        \
        __asm__("vaddss %2, %1, %0" : "=x"(r_) : "x"(t), "x"(w));                        \
        r_; })
#elif defined(__x86_64__)
#define BNFAST_PLUS_PLAIN(t, w) ({                                                       \
        float r_ = (t);                                                                  \
        __asm__("addss %1, %0" : "+x"(r_) : "x"(w));                                     \
        r_; })
#else
#define BNFAST_PLUS_PLAIN(t, w) ((t) + (w))
#endif
#if BNFAST_DISPATCH_AVX2
#define BNFAST_PLUS_AVX(t, w) ({                                                         \
        float r_;                                                                        \
        __asm__("vaddss %2, %1, %0" : "=x"(r_) : "x"(t), "x"(w));                        \
        r_; })
#endif
#define BNFAST_CHECKED_ONE(TOF, FROMF, PLUS, i, HZ, FA, HB, M, A, B)                     \
    {                                                                                    \
        float v_ = BNFAST_CHECKED_SUM_(PLUS, TOF(x[i]), TOF(add[i]), HZ, FA, HB, M, A, B); \
        y[i] = FROMF(relu && v_ < 0.0f ? 0.0f : v_);                                     \
    }
#define BNFAST_DEFINE_CHECKED_ONES(H, T, VARIANT, TARGET)                                \
    TARGET static void bnfast_checked_scalar_##H##_##VARIANT(                            \
            const T *x, const T *add, T *y, ptrdiff_t n, float hz, float fa, float hb,   \
            double m, double a, double b, int relu) {                                    \
        ptrdiff_t i;                                                                     \
        for (i = 0; i < n; i++)                                                          \
            BNFAST_CHECKED_ONE(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT, \
                               BNFAST_PLUS_PLAIN, i, hz, fa, hb, m, a, b)                \
    }                                                                                    \
    TARGET static void bnfast_checked_tiled_##H##_##VARIANT(                             \
            const T *x0, const T *add0, T *y0, ptrdiff_t total, ptrdiff_t W,             \
            const float *hz, const float *fa, const float *hb, const double *m,          \
            const double *a, const double *b, int relu) {                                \
        ptrdiff_t i0, i, n;                                                              \
        for (i0 = 0; i0 < total; i0 += W) {                                              \
            const T *x = x0 + i0, *add = add0 + i0;                                      \
            T *y = y0 + i0;                                                              \
            n = total - i0 < W ? total - i0 : W;                                         \
            for (i = 0; i < n; i++)                                                      \
                BNFAST_CHECKED_ONE(BNFAST_TOF_##H##_##VARIANT, BNFAST_FROMF_##H##_##VARIANT, \
                                   BNFAST_PLUS_PLAIN, i, hz[i], fa[i], hb[i], m[i], a[i],  \
                                   b[i])                                                 \
        }                                                                                \
    }
BNFAST_DEFINE_CHECKED_ONES(f16, bnfast_f16, base, )
BNFAST_DEFINE_CHECKED_ONES(bf16, bnfast_bf16, base, )

#if BNFAST_DISPATCH_AVX2
/* Lanes 0-7 (H 0) or 8-15 (H 1) of the step in double: its x (XF) and addend (AF). */
#define BNFAST_CHECKED_D8_(XF, AF, H, M, A, B)                                           \
    _mm512_cvtpd_ps(_mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(                           \
        _mm512_sub_pd(BNFAST_W8_Z(XF, H), M), A), B), BNFAST_W8_Z(AF, H)))
/* Sixteen values from i: the float rows' vectors HZ, FA, HB, the double rows'
 * for lanes 0-7 (M0, A0, B0) and 8-15 (M1, A1, B1), loaded only when needed. */
#define BNFAST_CHECKED_16_(LOAD16, STORE16, HZ, FA, HB, M0, A0, B0, M1, A1, B1)           \
    {                                                                                    \
        bnfast_h16f xf_ = LOAD16(x + i), af_ = LOAD16(add + i);                          \
        bnfast_h16f t_ = (xf_ - (HZ)) * (FA) + (HB), v_ = BNFAST_H16_ADD(t_, af_);        \
        __mmask16 k_ = _mm512_cmp_ps_mask(                                               \
            _mm512_abs_ps((__m512)v_),                                                   \
            _mm512_mul_ps(_mm512_set1_ps(BNFAST_SUM_CHECK), _mm512_abs_ps((__m512)t_)),  \
            _CMP_LT_OQ);                                                                 \
        if (__builtin_expect(k_ != 0, 0)) {                                              \
            __m256 lo_ = BNFAST_CHECKED_D8_(xf_, af_, 0, M0, A0, B0);                    \
            __m256 hi_ = BNFAST_CHECKED_D8_(xf_, af_, 1, M1, A1, B1);                    \
            v_ = (bnfast_h16f)_mm512_mask_blend_ps(k_, (__m512)v_, _mm512_castpd_ps(     \
                _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo_)),        \
                                   _mm256_castps_pd(hi_), 1)));                          \
        }                                                                                \
        if (relu) v_ = BNFAST_H16_RELU(v_);                                              \
        STORE16(y + i, v_);                                                              \
    }
/* Values [i, n): K (16 or 8) a step, the rest one at a time; NEXT after each
 * value or step.  NT 1: non-temporal stores from y's first 64-byte line
 * boundary on, 32 values (a line) a step (a line both streamed and stored
 * plainly is very slow: the head's and the tail's lines are stored plainly),
 * for spans of 1024 values and more; the caller fences. */
#define BNFAST_CHECKED_SPAN_(NT, K, ONE, STEP, NEXT, LOAD, STORE, STREAM)               \
    if (NT && n - i >= 1024) {                                                           \
        for (; ((size_t)(y + i) & (2 * (K) - 1)) != 0; i++) { ONE NEXT(1) }              \
        while (((size_t)(y + i) & 63) != 0) { STEP(LOAD, STORE) i += (K); NEXT(K) }      \
        while (i + 32 <= n) {                                                            \
            int s_;                                                                      \
            for (s_ = 0; s_ < 32 / (K); s_++) { STEP(LOAD, STREAM) i += (K); NEXT(K) }   \
        }                                                                                \
    }                                                                                    \
    for (; i + (K) <= n; i += (K)) { STEP(LOAD, STORE) NEXT(K) }                         \
    for (; i < n; i++) { ONE NEXT(1) }
#define BNFAST_CHECKED_NO_NEXT(k)
/* The tile position j of value i: j = i % W, stepped. */
#define BNFAST_CHECKED_NEXT_J(k) j += (k); while (j >= W) j -= W;
/* A variant's scalar and tiled leaves, K lanes a step: DECLS declares the
 * scalar leaf's broadcast coefficients, STEP_S and STEP_T are the two leaves'
 * steps, CONV names the scalar conversions (BNFAST_TOF_<type>_<CONV>). */
#define BNFAST_DEFINE_CHECKED_VEC(H, T, VARIANT, TARGET, K, CONV, DECLS, STEP_S, STEP_T,  \
                                  LOAD, STORE, STREAM, NT)                               \
    TARGET static void bnfast_checked_scalar_##H##_##VARIANT(                            \
            const T *x, const T *add, T *y, ptrdiff_t n, float hz, float fa, float hb,   \
            double m, double a, double b, int relu) {                                    \
        DECLS                                                                            \
        ptrdiff_t i = 0;                                                                 \
        BNFAST_CHECKED_SPAN_(NT, K,                                                      \
            BNFAST_CHECKED_ONE(BNFAST_TOF_##H##_##CONV, BNFAST_FROMF_##H##_##CONV,       \
                               BNFAST_PLUS_AVX, i, hz, fa, hb, m, a, b),                 \
            STEP_S, BNFAST_CHECKED_NO_NEXT, LOAD, STORE, STREAM)                         \
    }                                                                                    \
    /* The block [0, total) flat, its tile position j stepped: a step's K     */         \
    /* coefficients from j on (the rows' 16 values past W repeat their start). */        \
    TARGET static void bnfast_checked_tiled_##H##_##VARIANT(                             \
            const T *x, const T *add, T *y, ptrdiff_t n, ptrdiff_t W,                    \
            const float *hz, const float *fa, const float *hb, const double *m,          \
            const double *a, const double *b, int relu) {                                \
        ptrdiff_t i = 0, j = 0;                                                          \
        BNFAST_CHECKED_SPAN_(NT, K,                                                      \
            BNFAST_CHECKED_ONE(BNFAST_TOF_##H##_##CONV, BNFAST_FROMF_##H##_##CONV,       \
                               BNFAST_PLUS_AVX, i, hz[j], fa[j], hb[j], m[j], a[j], b[j]), \
            STEP_T, BNFAST_CHECKED_NEXT_J, LOAD, STORE, STREAM)                          \
    }
/* (set1: {0} + v would turn a -0 coefficient into +0) */
#define BNFAST_CHECKED_DECLS16_                                                          \
    bnfast_h16f hzv = (bnfast_h16f)_mm512_set1_ps(hz);                                   \
    bnfast_h16f fav = (bnfast_h16f)_mm512_set1_ps(fa);                                   \
    bnfast_h16f hbv = (bnfast_h16f)_mm512_set1_ps(hb);                                   \
    __m512d mv = _mm512_set1_pd(m), av = _mm512_set1_pd(a), bv = _mm512_set1_pd(b);
#define BNFAST_DEFINE_CHECKED_Z(H, T, VARIANT, TARGET, LOAD16, STORE16, STREAM16, NT)    \
    BNFAST_DEFINE_CHECKED_VEC(H, T, VARIANT, TARGET, 16, z, BNFAST_CHECKED_DECLS16_,     \
                              BNFAST_CHECKED_STEP_S_, BNFAST_CHECKED_STEP_T_, LOAD16,    \
                              STORE16, STREAM16, NT)
#define BNFAST_CHECKED_STEP_S_(LOAD16, STORE)                                            \
    BNFAST_CHECKED_16_(LOAD16, STORE, hzv, fav, hbv, mv, av, bv, mv, av, bv)
#define BNFAST_CHECKED_STEP_T_(LOAD16, STORE)                                            \
    BNFAST_CHECKED_16_(LOAD16, STORE, BNFAST_H16_COEF(hz, j), BNFAST_H16_COEF(fa, j),    \
                       BNFAST_H16_COEF(hb, j), _mm512_loadu_pd(m + j),                   \
                       _mm512_loadu_pd(a + j), _mm512_loadu_pd(b + j),                   \
                       _mm512_loadu_pd(m + j + 8), _mm512_loadu_pd(a + j + 8),           \
                       _mm512_loadu_pd(b + j + 8))
BNFAST_DEFINE_CHECKED_Z(f16, bnfast_f16, z, BNFAST_F16_Z_TARGET, bnfast_load16_f16_z,
                        bnfast_store16_f16_z, bnfast_stream16_f16_z, 0)
BNFAST_DEFINE_CHECKED_Z(f16, bnfast_f16, z_nt, BNFAST_F16_Z_TARGET, bnfast_load16_f16_z,
                        bnfast_store16_f16_z, bnfast_stream16_f16_z, 1)
BNFAST_DEFINE_CHECKED_Z(bf16, bnfast_bf16, hw, BNFAST_BF16_HW_TARGET, bnfast_load16_bf16_hw,
                        bnfast_store16_bf16_hw, bnfast_stream16_bf16_hw, 0)
BNFAST_DEFINE_CHECKED_Z(bf16, bnfast_bf16, hw_nt, BNFAST_BF16_HW_TARGET, bnfast_load16_bf16_hw,
                        bnfast_store16_bf16_hw, bnfast_stream16_bf16_hw, 1)
BNFAST_DEFINE_CHECKED_Z(bf16, bnfast_bf16, z, BNFAST_BF16_Z_TARGET, bnfast_load16_bf16_z,
                        bnfast_store16_bf16_z, bnfast_stream16_bf16_z, 0)
BNFAST_DEFINE_CHECKED_Z(bf16, bnfast_bf16, z_nt, BNFAST_BF16_Z_TARGET, bnfast_load16_bf16_z,
                        bnfast_store16_bf16_z, bnfast_stream16_bf16_z, 1)
/* AVX2 (float16 with F16C): eight values a step, each lane the same
 * operations (the double pass in two four-lane halves, only for a step with a
 * checked lane): the bits of the portable leaf.  (Without it an AVX2-only CPU
 * ran the portable leaf, one value at a time: 30-40x slower.) */
#define BNFAST_CHECKED_D4_(XF, AF, H, M, A, B)                                           \
    _mm256_cvtpd_ps((bnfast_v4d)((BNFAST_W4_AVX(XF, H) - (M)) * (A) + (B))               \
                    + BNFAST_W4_AVX(AF, H))
#define BNFAST_CHECKED_8_(LOAD8, STORE8, HZ, FA, HB, M0, A0, B0, M1, A1, B1)             \
    {                                                                                    \
        bnfast_h8f xf_ = LOAD8(x + i), af_ = LOAD8(add + i);                             \
        bnfast_h8f t_ = (xf_ - (HZ)) * (FA) + (HB), v_ = BNFAST_H8_ADD(t_, af_);          \
        const __m256 abs_ = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));          \
        __m256 k_ = _mm256_cmp_ps(                                                       \
            _mm256_and_ps((__m256)v_, abs_),                                             \
            _mm256_mul_ps(_mm256_set1_ps(BNFAST_SUM_CHECK), _mm256_and_ps((__m256)t_, abs_)), \
            _CMP_LT_OQ);                                                                 \
        if (__builtin_expect(_mm256_movemask_ps(k_) != 0, 0)) {                          \
            __m128 lo_ = BNFAST_CHECKED_D4_(xf_, af_, 0, M0, A0, B0);                    \
            __m128 hi_ = BNFAST_CHECKED_D4_(xf_, af_, 1, M1, A1, B1);                    \
            v_ = (bnfast_h8f)_mm256_blendv_ps(                                           \
                (__m256)v_, _mm256_insertf128_ps(_mm256_castps128_ps256(lo_), hi_, 1), k_); \
        }                                                                                \
        if (relu) v_ = BNFAST_H8_RELU(v_);                                               \
        STORE8(y + i, v_);                                                               \
    }
#define BNFAST_CHECKED_DECLS8_                                                           \
    bnfast_h8f hzv = (bnfast_h8f)_mm256_set1_ps(hz);                                     \
    bnfast_h8f fav = (bnfast_h8f)_mm256_set1_ps(fa);                                     \
    bnfast_h8f hbv = (bnfast_h8f)_mm256_set1_ps(hb);                                     \
    bnfast_v4d mv = (bnfast_v4d)_mm256_set1_pd(m), av = (bnfast_v4d)_mm256_set1_pd(a);   \
    bnfast_v4d bv = (bnfast_v4d)_mm256_set1_pd(b);
#define BNFAST_DEFINE_CHECKED_Y(H, T, VARIANT, TARGET, LOAD8, STORE8, STREAM8, NT)       \
    BNFAST_DEFINE_CHECKED_VEC(H, T, VARIANT, TARGET, 8, VARIANT, BNFAST_CHECKED_DECLS8_, \
                              BNFAST_CHECKED_STEP8_S_, BNFAST_CHECKED_STEP8_T_, LOAD8,   \
                              STORE8, STREAM8, NT)
#define BNFAST_CHECKED_STEP8_S_(LOAD8, STORE)                                            \
    BNFAST_CHECKED_8_(LOAD8, STORE, hzv, fav, hbv, mv, av, bv, mv, av, bv)
#define BNFAST_CHECKED_STEP8_T_(LOAD8, STORE)                                            \
    BNFAST_CHECKED_8_(LOAD8, STORE, BNFAST_H8_COEF(hz, j), BNFAST_H8_COEF(fa, j),        \
                      BNFAST_H8_COEF(hb, j), BNFAST_LOAD4(double, m + j),                \
                      BNFAST_LOAD4(double, a + j), BNFAST_LOAD4(double, b + j),          \
                      BNFAST_LOAD4(double, m + j + 4), BNFAST_LOAD4(double, a + j + 4),  \
                      BNFAST_LOAD4(double, b + j + 4))
BNFAST_DEFINE_CHECKED_Y(f16, bnfast_f16, f16c, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                        bnfast_store8_f16_f16c, bnfast_stream8_f16_f16c, 0)
BNFAST_DEFINE_CHECKED_Y(f16, bnfast_f16, f16c_nt, BNFAST_F16C_TARGET, bnfast_load8_f16_f16c,
                        bnfast_store8_f16_f16c, bnfast_stream8_f16_f16c, 1)
BNFAST_DEFINE_CHECKED_Y(bf16, bnfast_bf16, avx2, BNFAST_AVX2_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_store8_bf16_avx2, bnfast_stream8_bf16_avx2, 0)
BNFAST_DEFINE_CHECKED_Y(bf16, bnfast_bf16, avx2_nt, BNFAST_AVX2_TARGET, bnfast_load8_bf16_avx2,
                        bnfast_store8_bf16_avx2, bnfast_stream8_bf16_avx2, 1)
/* A leaf's variant for this CPU, streamed or not, from its stem. */
#define BNFAST_CHECKED_NT_(name, stream) ((stream) ? name##_nt : name)
#define BNFAST_PICK_CHECKED_f16(stem, stream)                                            \
    (bnfast_use_f16_z() ? BNFAST_CHECKED_NT_(stem##_z, stream)                           \
     : bnfast_use_f16c() ? BNFAST_CHECKED_NT_(stem##_f16c, stream) : stem##_base)
#define BNFAST_PICK_CHECKED_bf16(stem, stream)                                           \
    (bnfast_use_bf16_hw() ? BNFAST_CHECKED_NT_(stem##_hw, stream)                        \
     : bnfast_use_bf16_z() ? BNFAST_CHECKED_NT_(stem##_z, stream)                        \
     : bnfast_use_avx2() ? BNFAST_CHECKED_NT_(stem##_avx2, stream) : stem##_base)
#else
#define BNFAST_PICK_CHECKED_f16(stem, stream) stem##_base
#define BNFAST_PICK_CHECKED_bf16(stem, stream) stem##_base
#endif

/* The entries (add not NULL; stream: non-temporal stores where the CPU's
 * variant has them, the caller fencing). */
#define BNFAST_DEFINE_CHECKED_ENTRIES(H, T)                                              \
    static inline void bnfast_checked_scalar_##H(                                        \
            const T *x, const T *add, T *y, ptrdiff_t n, float hz, float fa, float hb,   \
            double m, double a, double b, int relu, int stream) {                        \
        BNFAST_PICK_CHECKED_##H(bnfast_checked_scalar_##H, stream)(                      \
            x, add, y, n, hz, fa, hb, m, a, b, relu);                                    \
    }                                                                                    \
    static inline void bnfast_checked_tiled_##H(                                         \
            const T *x, const T *add, T *y, ptrdiff_t n, ptrdiff_t W, const float *hz,   \
            const float *fa, const float *hb, const double *m, const double *a,          \
            const double *b, int relu, int stream) {                                     \
        BNFAST_PICK_CHECKED_##H(bnfast_checked_tiled_##H, stream)(                       \
            x, add, y, n, W, hz, fa, hb, m, a, b, relu);                                 \
    }
BNFAST_DEFINE_CHECKED_ENTRIES(f16, bnfast_f16)
BNFAST_DEFINE_CHECKED_ENTRIES(bf16, bnfast_bf16)

#endif /* BNFAST_HALF_LEAVES_H */