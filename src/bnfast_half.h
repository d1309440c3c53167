/*
 * Half-precision storage (float16, bfloat16): the types, exact conversions,
 * and the staging that lets every half-precision kernel run the float32 leaves.
 *
 * Types: two distinct structs around the 16 bits, so the Cython fused type
 * real_t (src/_dtypes.pxd) tells them apart and nothing converts implicitly.
 *
 * Conversions:
 *   widen   half -> float, exact (every float16 and bfloat16 value is a float).
 *   narrow  float -> half, round to nearest even; overflow gives +-inf, NaN
 *           stays NaN (quietened, as F16C's vcvtps2ph does).
 *   bnfast_double_to_*  double -> half rounded ONCE: round to odd into float,
 *           then to nearest even (float's 24 bits > 2 * 11 + 2: no double rounding).
 * The bulk converters pick F16C (float16) / AVX2 (bfloat16: a shift) at run
 * time, like bnfast_simd.h's leaves; the portable code gives the same bits
 * (tests/test_half_conversions.py checks every float16 and bfloat16 value and
 * float32 rounding cases against NumPy / ml_dtypes).
 *
 * Staging: a half-precision leaf converts BNFAST_STAGE values at a time into
 * float buffers on the stack (L1), runs the float32 leaf of the same job on
 * them, and narrows the result: one kernel body per job, whatever the storage,
 * and the memory traffic is that of the half-precision data.
 */
#ifndef BNFAST_HALF_H
#define BNFAST_HALF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bnfast_simd.h"

typedef struct { uint16_t bits; } bnfast_f16;
typedef struct { uint16_t bits; } bnfast_bf16;

/* Values per staged chunk: a multiple of 8 (ReLU mask bytes) and of 64. */
#define BNFAST_STAGE 512

static inline uint32_t bnfast_float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bnfast_bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- scalar conversions (the portable definitions) ---------------------- */

static inline float bnfast_f16_to_float(bnfast_f16 h) {
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t em = h.bits & 0x7fffu;
    if (em >= 0x7c00u)  /* inf, NaN (quietened, as vcvtph2ps does) */
        return bnfast_bits_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13)
                                 | (em > 0x7c00u ? 0x00400000u : 0u));
    if (em >= 0x0400u)  /* normal: rebias the exponent */
        return bnfast_bits_float(sign | ((em << 13) + ((uint32_t)(127 - 15) << 23)));
    /* zero and subnormals: em * 2^-24, exact in float */
    return bnfast_bits_float(sign | bnfast_float_bits((float)em * 5.9604644775390625e-8f));
}

static inline bnfast_f16 bnfast_float_to_f16(float f) {
    uint32_t u = bnfast_float_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    bnfast_f16 h;
    if (a > 0x7f800000u) {            /* NaN: quiet, payload's top bits kept */
        h.bits = (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    } else if (a >= 0x477ff000u) {    /* >= 65520 (or inf): rounds to inf */
        h.bits = (uint16_t)(sign | 0x7c00u);
    } else if (a >= 0x38800000u) {    /* >= 2^-14: normal half, round to nearest even */
        a += ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u);
        h.bits = (uint16_t)(sign | (a >> 13));
    } else {                          /* subnormal or zero: let the FPU round (to even) */
        float r = bnfast_bits_float(a) + 0.5f;  /* 0.5 = 2^-1: ulp there is 2^-24 */
        h.bits = (uint16_t)(sign | (bnfast_float_bits(r) - 0x3f000000u));
    }
    return h;
}

static inline float bnfast_bf16_to_float(bnfast_bf16 h) {
    return bnfast_bits_float((uint32_t)h.bits << 16);
}

static inline bnfast_bf16 bnfast_float_to_bf16(float f) {
    uint32_t u = bnfast_float_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    bnfast_bf16 h;
    /* A select (not a branch), so the bulk loop vectorises. */
    h.bits = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
    return h;
}

/* double -> float rounded to odd: what float->half needs to round once. */
static inline float bnfast_double_to_float_odd(double d) {
    float f = (float)d;
    uint32_t u = bnfast_float_bits(f);
    if ((double)f != d && d - d == 0.0 && f - f == 0.0f && !(u & 1u)) {
        /* rounded to an even neighbour: take the odd one on d's side (sign and
         * magnitude: one step in magnitude; f is not 0 when stepping down) */
        double fd = (double)f;
        u += (d < 0.0 ? -d : d) > (fd < 0.0 ? -fd : fd) ? 1u : (uint32_t)-1;
        f = bnfast_bits_float(u);
    }
    return f;
}

static inline bnfast_f16 bnfast_double_to_f16(double d) {
    return bnfast_float_to_f16(bnfast_double_to_float_odd(d));
}

static inline bnfast_bf16 bnfast_double_to_bf16(double d) {
    return bnfast_float_to_bf16(bnfast_double_to_float_odd(d));
}

/* ---- eight values in registers (the in-register leaves) ------------------- */
#if BNFAST_VECTOR_EXT
/* Unaligned (element-aligned) and may_alias: loaded from and stored to the data
 * arrays directly.  Vector casts between them reinterpret bits in registers
 * (memcpy there went through the stack: a store-forwarding stall per vector). */
typedef float bnfast_h8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t bnfast_h8i __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint32_t bnfast_h8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t bnfast_h8h __attribute__((vector_size(16), aligned(2), may_alias));

/* Macros (statement expressions), not functions: a 32-byte vector passed by
 * value outside an AVX target changes the ABI (-Wpsabi). */
/* bfloat16: a shift each way (portable vector code; any target). */
#define bnfast_load8_bf16(p) \
    ((bnfast_h8f)(__builtin_convertvector(*(const bnfast_h8h *)(p), bnfast_h8u) << 16))
#define bnfast_store8_bf16(p, f) do {                                                \
        bnfast_h8u u_ = (bnfast_h8u)(f), r_, nan_;                                   \
        r_ = (u_ + 0x7fffu + ((u_ >> 16) & 1u)) >> 16;  /* bnfast_float_to_bf16 */   \
        nan_ = (bnfast_h8u)((u_ & 0x7fffffffu) > 0x7f800000u);                       \
        r_ = (r_ & ~nan_) | (((u_ >> 16) | 0x40u) & nan_);                           \
        *(bnfast_h8h *)(p) = __builtin_convertvector(r_, bnfast_h8h);                \
    } while (0)

/* float16 without F16C: the scalar conversions, lane by lane (same bits). */
#define bnfast_load8_f16(p) ({                                                      \
        bnfast_h8f f_; int k_;                                                       \
        for (k_ = 0; k_ < 8; k_++) f_[k_] = bnfast_f16_to_float((p)[k_]);           \
        f_; })
#define bnfast_store8_f16(p, f) do {                                                 \
        bnfast_h8f v_ = (f); int k_;                                                 \
        for (k_ = 0; k_ < 8; k_++) (p)[k_] = bnfast_float_to_f16(v_[k_]);           \
    } while (0)
#endif

/* ---- bulk conversions ----------------------------------------------------- */

static void bnfast_widen_f16_base(const bnfast_f16 *src, float *dst, ptrdiff_t n) {
    ptrdiff_t i;
    for (i = 0; i < n; i++) dst[i] = bnfast_f16_to_float(src[i]);
}
static void bnfast_narrow_f16_base(const float *src, bnfast_f16 *dst, ptrdiff_t n) {
    ptrdiff_t i;
    for (i = 0; i < n; i++) dst[i] = bnfast_float_to_f16(src[i]);
}
#define BNFAST_DEFINE_BF16_BULK(SUFFIX, ATTR)                                        \
    ATTR static void bnfast_widen_bf16_##SUFFIX(const bnfast_bf16 *src, float *dst,   \
                                                ptrdiff_t n) {                        \
        ptrdiff_t i;                                                                  \
        for (i = 0; i < n; i++) dst[i] = bnfast_bf16_to_float(src[i]);                \
    }                                                                                 \
    ATTR static void bnfast_narrow_bf16_##SUFFIX(const float *src, bnfast_bf16 *dst,  \
                                                 ptrdiff_t n) {                       \
        ptrdiff_t i;                                                                  \
        for (i = 0; i < n; i++) dst[i] = bnfast_float_to_bf16(src[i]);                \
    }
BNFAST_DEFINE_BF16_BULK(base, )

#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
/* The loads of eight halves as floats, for the leaves compiled for F16C / AVX2:
 * the run-time picked ones below, and the base leaves of a build whose own
 * target has them (-march=native: bnfast_stats.h's *_BASE loads). */
/* float16 with F16C (vcvtps2ph with imm 0: round to nearest even). */
#define bnfast_load8_f16_f16c(p) \
    ((bnfast_h8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))

/* bfloat16 with AVX2 intrinsics: the same bits as the portable macros, in fewer
 * instructions (one widening load; the pack without a mask; a byte blend). */
#define bnfast_load8_bf16_avx2(p) ((bnfast_h8f)_mm256_slli_epi32(                        \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#endif

#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_BF16_BULK(avx2, BNFAST_AVX2_TARGET)

#define BNFAST_F16C_TARGET __attribute__((target("avx2,f16c")))
BNFAST_F16C_TARGET static void bnfast_widen_f16_f16c(const bnfast_f16 *src, float *dst,
                                                      ptrdiff_t n) {
    ptrdiff_t i, n8 = n - n % 8;
    for (i = 0; i < n8; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = bnfast_f16_to_float(src[i]);
}
BNFAST_F16C_TARGET static void bnfast_narrow_f16_f16c(const float *src, bnfast_f16 *dst,
                                                       ptrdiff_t n) {
    ptrdiff_t i, n8 = n - n % 8;
    for (i = 0; i < n8; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = bnfast_float_to_f16(src[i]);
}

/* The rounding, once per conversion: pack8 gives the __m128i of 8 rounded
 * halves; store8 writes it (cached), stream8 writes it non-temporally (p
 * 16-byte aligned; see bnfast_simd.h's streaming leaves for the caller's part:
 * whole 16-byte groups, and bnfast_nt_fence() before another thread reads). */
#define bnfast_pack8_f16_f16c(f) _mm256_cvtps_ph((__m256)(f), _MM_FROUND_TO_NEAREST_INT)
#define bnfast_pack8_bf16_avx2(f) ({                                                      \
        __m256i u_ = (__m256i)(f), top_ = _mm256_srli_epi32(u_, 16);                     \
        __m256i r_ = _mm256_srli_epi32(_mm256_add_epi32(                                 \
            _mm256_add_epi32(u_, _mm256_set1_epi32(0x7fff)),                             \
            _mm256_and_si256(top_, _mm256_set1_epi32(1))), 16);                          \
        __m256i nan_ = _mm256_cmpgt_epi32(_mm256_and_si256(u_, _mm256_set1_epi32(0x7fffffff)), \
                                          _mm256_set1_epi32(0x7f800000));                 \
        r_ = _mm256_blendv_epi8(r_, _mm256_or_si256(top_, _mm256_set1_epi32(0x40)), nan_); \
        _mm_packus_epi32(_mm256_castsi256_si128(r_), _mm256_extracti128_si256(r_, 1)); })

/* bfloat16 with AVX512-BF16's vcvtneps2bf16: round to nearest even, NaN as ours,
 * but denormals flushed (measured on all 2^32 floats: only nonzero float
 * denormals differ), so a vector holding one takes the AVX2 rounding (vfpclassps). */
#define BNFAST_BF16_HW_TARGET __attribute__((target("avx2,f16c,avx512f,avx512vl,avx512dq,avx512bf16")))
#define bnfast_pack8_bf16_hw(f) ({                                                        \
        __m256 v_ = (__m256)(f);                                                          \
        __m128i h_;                                                                       \
        if (__builtin_expect(_mm256_fpclass_ps_mask(v_, 0x20) != 0, 0))                   \
            h_ = bnfast_pack8_bf16_avx2(v_);                                              \
        else                                                                              \
            h_ = (__m128i)_mm256_cvtneps_pbh(v_);                                         \
        h_; })

/* Thirty-two values, two zmm vectors v0 (the first 16) and v1, with one guard and
 * one vcvtne2ps2bf16 (the hw variant's main loop): on Zen 4 that runs 1.6x the
 * rate of vcvtneps2bf16 on ymm vectors with a guard each (0.075 against 0.125 ns a
 * value in L1, as fast as F16C's float16), the conversion and the guard's
 * vfpclassps + kortest + branch paid once per 32 values instead of per 8.
 * store32 writes 64 bytes (cached); stream32 streams them (p 64-byte aligned). */
typedef float bnfast_h16f __attribute__((vector_size(64), aligned(4), may_alias));
/* Doubles of float lanes 0-7 (H 0) or 8-15 (H 1) of f. */
#define BNFAST_W8_Z(f, H) _mm512_cvtps_pd(_mm256_castpd_ps(                              \
        _mm512_extractf64x4_pd(_mm512_castps_pd((__m512)(f)), (H))))
#define bnfast_load16_bf16_hw(p) ((bnfast_h16f)_mm512_slli_epi32(                           \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define BNFAST_BF16_HW_32_(p, v0, v1, WIDE, EIGHT) do {                                  \
        __m512 a_ = (__m512)(v0), b_ = (__m512)(v1);                                     \
        if (__builtin_expect((_mm512_fpclass_ps_mask(a_, 0x20)                           \
                              | _mm512_fpclass_ps_mask(b_, 0x20)) != 0, 0)) {            \
            EIGHT((p), bnfast_pack8_bf16_avx2(_mm512_castps512_ps256(a_)));              \
            EIGHT((p) + 8, bnfast_pack8_bf16_avx2(_mm512_extractf32x8_ps(a_, 1)));       \
            EIGHT((p) + 16, bnfast_pack8_bf16_avx2(_mm512_castps512_ps256(b_)));         \
            EIGHT((p) + 24, bnfast_pack8_bf16_avx2(_mm512_extractf32x8_ps(b_, 1)));      \
        } else {                                                                         \
            WIDE((void *)(p), (__m512i)_mm512_cvtne2ps_pbh(b_, a_));                     \
        }                                                                                \
    } while (0)
/* Sixteen values (v0): one vcvtneps2bf16 (zmm), 32 bytes (streamed: aligned). */
#define BNFAST_BF16_HW_16_(p, v0, WIDE, EIGHT) do {                                      \
        __m512 a_ = (__m512)(v0);                                                        \
        if (__builtin_expect(_mm512_fpclass_ps_mask(a_, 0x20) != 0, 0)) {                \
            EIGHT((p), bnfast_pack8_bf16_avx2(_mm512_castps512_ps256(a_)));              \
            EIGHT((p) + 8, bnfast_pack8_bf16_avx2(_mm512_extractf32x8_ps(a_, 1)));       \
        } else {                                                                         \
            WIDE((void *)(p), (__m256i)_mm512_cvtneps_pbh(a_));                          \
        }                                                                                \
    } while (0)
#define bnfast_store16_bf16_hw(p, v0) \
    BNFAST_BF16_HW_16_(p, v0, _mm256_storeu_si256, BNFAST_STORE8_HALF_)
#define bnfast_stream16_bf16_hw(p, v0) \
    BNFAST_BF16_HW_16_(p, v0, _mm256_stream_si256, BNFAST_STREAM8_HALF_)
#define bnfast_store32_bf16_hw(p, v0, v1) \
    BNFAST_BF16_HW_32_(p, v0, v1, _mm512_storeu_si512, BNFAST_STORE8_HALF_)
#define bnfast_stream32_bf16_hw(p, v0, v1) \
    BNFAST_BF16_HW_32_(p, v0, v1, _mm512_stream_si512, BNFAST_STREAM8_HALF_)

/* bfloat16 on AVX-512 without AVX512-BF16 (Intel from Skylake-X to Ice Lake):
 * the portable rounding in integer steps on 16 lanes, with the carry the
 * rounding needs, u + 0x7fff + bit 16 of u, as an add and a masked add (the
 * test mask), NaN lanes found by one unordered compare and quietened by one
 * masked or, and bfloat16 left in the high halves: 32 values leave as one
 * vpermt2w of two vectors' high halves, 16 (or 8, ymm) as a shift and vpmovdw.
 * On a Xeon VM (no AVX512-BF16) 0.080 ns a value in L1 against 0.105 for the
 * shift + and + add + add + vpmovdw form per 16 (and AVX2's 11 instructions per
 * 8 values).
 * The same bits as the portable rounding, denormals included (no flush here, so
 * no guard). */
#define BNFAST_BF16_Z_TARGET __attribute__((target("avx2,f16c,avx512f,avx512vl,avx512bw")))
/* The rounded bfloat16 in the high half of each lane of the float vector f.  The
 * constants are broadcast from memory (a load, no vector ALU work): as
 * immediates GCC rebuilt each (mov + vpbroadcastd from a register) once per run
 * of a channels-first call, a tenth of a 7x7 run's instructions. */
static const int32_t bnfast_bf16_z_k_[8] __attribute__((aligned(32))) = {
    0x7fff, 0x10000, 1, 0x400000, (int32_t)0xffff0000, 0xffff, 0x10001, (int32_t)0x80008000};
#define BNFAST_BF16_Z_K_(W, n) ({                                                         \
        __m##W##i k_;                                                                     \
        __asm__("vpbroadcastd %1, %0" : "=v"(k_) : "m"(bnfast_bf16_z_k_[n]));             \
        k_; })
#define BNFAST_BF16_Z_HIGH_(W, f) ({                                                      \
        __m##W f_ = (__m##W)(f);                                                          \
        __m##W##i u_ = (__m##W##i)f_;                                                     \
        __m##W##i s_ = _mm##W##_add_epi32(u_, BNFAST_BF16_Z_K_(W, 0));                    \
        s_ = _mm##W##_mask_add_epi32(                                                     \
            s_, _mm##W##_test_epi32_mask(u_, BNFAST_BF16_Z_K_(W, 1)), s_,                 \
            BNFAST_BF16_Z_K_(W, 2));                                                      \
        _mm##W##_mask_or_epi32(s_, _mm##W##_cmp_ps_mask(f_, f_, _CMP_UNORD_Q), u_,        \
                               BNFAST_BF16_Z_K_(W, 3)); })
#define bnfast_pack16_bf16_z(f) \
    _mm512_cvtepi32_epi16(_mm512_srli_epi32(BNFAST_BF16_Z_HIGH_(512, f), 16))
#define bnfast_pack8_bf16_z(f) \
    _mm256_cvtepi32_epi16(_mm256_srli_epi32(BNFAST_BF16_Z_HIGH_(256, f), 16))
/* Thirty-two values in two vectors a and b, rounded as 32 words where no lane
 * is NaN (one unordered compare of a with b finds any): the truncated bfloat16
 * words TRUNC(a, b) go up by one where the bits below them, BELOW(a, b), plus
 * their own last bit exceed 0x8000 (the carry of u + 0x7fff + bit 16 of u); for
 * a last bit of 0 or 1 that sum exceeds 0x8000 exactly where (below | last
 * bit) does as an unsigned word: one ternary logic op, a compare and a masked
 * add for 32 values, against an add, a test, a masked add, a compare and a
 * masked or for 16 lane by lane.  With a NaN, LANES(a, b), the lanes' rounding
 * (a word's add would carry an all-ones payload into the sign).  The same
 * bits: every float32 pattern, tests/c/bf16_rounding.c.  The flat bfloat16
 * normalise's 32-value step went from twenty vector instructions to fifteen:
 * S = 49 in L2, 13.5-14.5 -> 12.1-12.5 cycles a run (Xeon VM, no
 * AVX512-BF16). */
#define BNFAST_BF16_Z_WORDS_(a, b, TRUNC, BELOW, LANES) ({                                \
        __m512 a_ = (__m512)(a), b_ = (__m512)(b);                                        \
        __m512i words_;                                                                   \
        if (__builtin_expect(!_mm512_cmp_ps_mask(a_, b_, _CMP_UNORD_Q), 1)) {             \
            __m512i ones_ = BNFAST_BF16_Z_K_(512, 6), trunc_ = TRUNC(a_, b_);             \
            __m512i key_ = _mm512_ternarylogic_epi32(BELOW(a_, b_), trunc_, ones_, 0xf8); \
            words_ = _mm512_mask_add_epi16(                                               \
                trunc_, _mm512_cmpgt_epu16_mask(key_, BNFAST_BF16_Z_K_(512, 7)), trunc_,  \
                ones_);                                                                   \
        } else {                                                                          \
            words_ = LANES(a_, b_);                                                       \
        }                                                                                 \
        words_; })
/* Values 0-15 in v0, 16-31 in v1: the words gathered by one vpermt2w each. */
#define BNFAST_BF16_Z_ODD_WORDS_                                                          \
    _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,     \
                     31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1)
#define BNFAST_BF16_Z_EVEN_WORDS_                                                         \
    _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,     \
                     30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0)
#define BNFAST_BF16_Z_PAIR_TRUNC_(v0, v1) \
    _mm512_permutex2var_epi16((__m512i)(v0), BNFAST_BF16_Z_ODD_WORDS_, (__m512i)(v1))
#define BNFAST_BF16_Z_PAIR_BELOW_(v0, v1) \
    _mm512_permutex2var_epi16((__m512i)(v0), BNFAST_BF16_Z_EVEN_WORDS_, (__m512i)(v1))
#define BNFAST_BF16_Z_PAIR_LANES_(v0, v1)                                                 \
    _mm512_permutex2var_epi16(BNFAST_BF16_Z_HIGH_(512, v0), BNFAST_BF16_Z_ODD_WORDS_,    \
                              BNFAST_BF16_Z_HIGH_(512, v1))
#define BNFAST_BF16_Z_PAIR_(v0, v1)                                                       \
    BNFAST_BF16_Z_WORDS_(v0, v1, BNFAST_BF16_Z_PAIR_TRUNC_, BNFAST_BF16_Z_PAIR_BELOW_,    \
                         BNFAST_BF16_Z_PAIR_LANES_)
#define bnfast_load16_bf16_z bnfast_load16_bf16_hw
#define bnfast_store16_bf16_z(p, v0) \
    _mm256_storeu_si256((__m256i *)(void *)(p), bnfast_pack16_bf16_z(v0))
#define bnfast_stream16_bf16_z(p, v0) \
    _mm256_stream_si256((__m256i *)(void *)(p), bnfast_pack16_bf16_z(v0))
#define bnfast_store32_bf16_z(p, v0, v1) \
    _mm512_storeu_si512((void *)(p), BNFAST_BF16_Z_PAIR_(v0, v1))
#define bnfast_stream32_bf16_z(p, v0, v1) \
    _mm512_stream_si512((void *)(p), BNFAST_BF16_Z_PAIR_(v0, v1))
/* The even values in e, the odd ones in o: e's high halves shifted down, o's
 * kept, merged by one ternary logic op (0xd8: the mask's bits from o, the
 * others from e); the low halves the same way, the other way round. */
#define BNFAST_BF16_Z_EO_TRUNC_(e, o)                                                     \
    _mm512_ternarylogic_epi32(_mm512_srli_epi32((__m512i)(e), 16), (__m512i)(o),          \
                              BNFAST_BF16_Z_K_(512, 4), 0xd8)
#define BNFAST_BF16_Z_EO_BELOW_(e, o)                                                     \
    _mm512_ternarylogic_epi32(_mm512_slli_epi32((__m512i)(o), 16), (__m512i)(e),          \
                              BNFAST_BF16_Z_K_(512, 5), 0xf8)
#define BNFAST_BF16_Z_EO_LANES_(e, o)                                                     \
    BNFAST_BF16_Z_EO_TRUNC_(_mm512_castsi512_ps(BNFAST_BF16_Z_HIGH_(512, e)),             \
                            _mm512_castsi512_ps(BNFAST_BF16_Z_HIGH_(512, o)))
#define BNFAST_BF16_Z_EO_(e, o)                                                           \
    BNFAST_BF16_Z_WORDS_(e, o, BNFAST_BF16_Z_EO_TRUNC_, BNFAST_BF16_Z_EO_BELOW_,          \
                         BNFAST_BF16_Z_EO_LANES_)
#define bnfast_store32eo_bf16_z(p, e, o) \
    _mm512_storeu_si512((void *)(p), BNFAST_BF16_Z_EO_(e, o))
#define bnfast_stream32eo_bf16_z(p, e, o) \
    _mm512_stream_si512((void *)(p), BNFAST_BF16_Z_EO_(e, o))

/* float16 on zmm vectors (AVX512F's vcvtph2ps / vcvtps2ph, the same rounding as
 * F16C's): 0.075 ns a value against F16C's 0.082 on Zen 4, and a 7x7 image's
 * run in two 32-value steps (bnfast_half_leaves.h). */
#define BNFAST_F16_Z_TARGET __attribute__((target("avx2,f16c,avx512f")))
#define bnfast_load16_f16_z(p) \
    ((bnfast_h16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define bnfast_pack16_f16_z(v) _mm512_cvtps_ph((__m512)(v), _MM_FROUND_TO_NEAREST_INT)
#define bnfast_store16_f16_z(p, v0) \
    _mm256_storeu_si256((__m256i *)(void *)(p), bnfast_pack16_f16_z(v0))
#define bnfast_stream16_f16_z(p, v0) \
    _mm256_stream_si256((__m256i *)(void *)(p), bnfast_pack16_f16_z(v0))
#define bnfast_store32_f16_z(p, v0, v1) do {                                             \
        __m256i h0_ = bnfast_pack16_f16_z(v0), h1_ = bnfast_pack16_f16_z(v1);             \
        _mm256_storeu_si256((__m256i *)(void *)(p), h0_);                                \
        _mm256_storeu_si256((__m256i *)(void *)((p) + 16), h1_);                         \
    } while (0)
#define bnfast_stream32_f16_z(p, v0, v1) do {                                            \
        __m256i h0_ = bnfast_pack16_f16_z(v0), h1_ = bnfast_pack16_f16_z(v1);             \
        _mm256_stream_si256((__m256i *)(void *)(p), h0_);                                \
        _mm256_stream_si256((__m256i *)(void *)((p) + 16), h1_);                         \
    } while (0)

#define BNFAST_STORE8_HALF_(p, v128) _mm_storeu_si128((__m128i *)(void *)(p), (v128))
#define BNFAST_STREAM8_HALF_(p, v128) _mm_stream_si128((__m128i *)(void *)(p), (v128))
#define bnfast_store8_f16_f16c(p, f) BNFAST_STORE8_HALF_(p, bnfast_pack8_f16_f16c(f))
#define bnfast_store8_bf16_avx2(p, f) BNFAST_STORE8_HALF_(p, bnfast_pack8_bf16_avx2(f))
#define bnfast_store8_bf16_hw(p, f) BNFAST_STORE8_HALF_(p, bnfast_pack8_bf16_hw(f))
#define bnfast_stream8_f16_f16c(p, f) BNFAST_STREAM8_HALF_(p, bnfast_pack8_f16_f16c(f))
#define bnfast_stream8_bf16_avx2(p, f) BNFAST_STREAM8_HALF_(p, bnfast_pack8_bf16_avx2(f))
#define bnfast_stream8_bf16_hw(p, f) BNFAST_STREAM8_HALF_(p, bnfast_pack8_bf16_hw(f))
#define bnfast_store8_bf16_z(p, f) BNFAST_STORE8_HALF_(p, bnfast_pack8_bf16_z(f))
#define bnfast_stream8_bf16_z(p, f) BNFAST_STREAM8_HALF_(p, bnfast_pack8_bf16_z(f))

BNFAST_DEFINE_CPU_CHECK(bf16_hw, BNFAST_CPU("avx2") && BNFAST_CPU("avx512f") && BNFAST_CPU("avx512vl")
                                 && BNFAST_CPU("avx512dq") && BNFAST_CPU("avx512bf16"))
BNFAST_DEFINE_CPU_CHECK(bf16_z, BNFAST_CPU("avx2") && BNFAST_CPU("avx512f") && BNFAST_CPU("avx512vl")
                                && BNFAST_CPU("avx512bw"))
/* bfloat16's leaves: AVX512-BF16's conversion, else AVX-512's integer rounding,
 * else AVX2's, else portable. */
#define BNFAST_PICK_BF16(base, avx2, z, hw)                                              \
    (bnfast_use_bf16_hw() ? (hw) : bnfast_use_bf16_z() ? (z)                             \
     : bnfast_use_avx2() ? (avx2) : (base))

BNFAST_DEFINE_CPU_CHECK(f16c, BNFAST_CPU("avx2") && BNFAST_CPU("f16c"))
#define BNFAST_PICK_F16C(base, f16c) (bnfast_use_f16c() ? (f16c) : (base))

BNFAST_DEFINE_CPU_CHECK(f16_z, bnfast_use_f16c() && BNFAST_CPU("avx512f"))
/* The normalise's float16 leaves for runs (or tiles) of LEN values: AVX512F
 * (zmm) for long ones, else F16C, else portable.  On Zen 4 (zmm work split in
 * two 256-bit halves) the zmm leaf is 5% faster from 128 values on (0.078
 * against 0.082 ns a value in L2) but 12% slower on a 7x7 image's 49 (5.9
 * against 5.2 ns a run); on the Xeon VM (512-bit ports), one thread,
 * 32x2048xS eval, it is 14% faster for S = 36, 7% for 49 and 81, 2-3% slower
 * for 64, 100 and 112.  So from 128 values on AMD's cores, from 32 on the
 * others. */
BNFAST_DEFINE_CPU_CHECK(amd, __builtin_cpu_is("amd"))
#define BNFAST_F16_Z_MIN (bnfast_use_amd() ? 128 : 32)
#define BNFAST_PICK_F16(LEN, base, f16c, z)                                              \
    ((LEN) >= BNFAST_F16_Z_MIN && bnfast_use_f16_z() ? (z)                               \
     : bnfast_use_f16c() ? (f16c) : (base))
#else
#define BNFAST_PICK_F16C(base, f16c) (base)
#define BNFAST_PICK_F16(LEN, base, f16c, z) (base)
#define BNFAST_PICK_BF16(base, avx2, z, hw) (base)
#endif

static inline void bnfast_widen_f16(const bnfast_f16 *src, float *dst, ptrdiff_t n) {
    BNFAST_PICK_F16C(bnfast_widen_f16_base, bnfast_widen_f16_f16c)(src, dst, n);
}
static inline void bnfast_narrow_f16(const float *src, bnfast_f16 *dst, ptrdiff_t n) {
    BNFAST_PICK_F16C(bnfast_narrow_f16_base, bnfast_narrow_f16_f16c)(src, dst, n);
}
static inline void bnfast_widen_bf16(const bnfast_bf16 *src, float *dst, ptrdiff_t n) {
    BNFAST_PICK(bnfast_widen_bf16_base, bnfast_widen_bf16_avx2)(src, dst, n);
}
static inline void bnfast_narrow_bf16(const float *src, bnfast_bf16 *dst, ptrdiff_t n) {
    BNFAST_PICK(bnfast_narrow_bf16_base, bnfast_narrow_bf16_avx2)(src, dst, n);
}

/* Scalar conversions per leaf variant (the vector leaves' tails): F16C's
 * vcvtph2ps/vcvtps2ph where the target has them, the portable ones' values
 * (these cost ~2 ns a value: the one-value tail of a 7x7 image's run made a
 * float16 normalise 1.45x slower than 48-value runs), else the portable ones
 * (bfloat16's are a shift and a rounding). */
#define BNFAST_TOF_f16_base bnfast_f16_to_float
#define BNFAST_FROMF_f16_base bnfast_float_to_f16
#define BNFAST_TOF_f16_f16c(h) _cvtsh_ss((h).bits)
#define BNFAST_FROMF_f16_f16c(f) ((bnfast_f16){_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT)})
#define BNFAST_TOF_f16_f16c_nt BNFAST_TOF_f16_f16c
#define BNFAST_FROMF_f16_f16c_nt BNFAST_FROMF_f16_f16c
#define BNFAST_TOF_f16_z BNFAST_TOF_f16_f16c
#define BNFAST_FROMF_f16_z BNFAST_FROMF_f16_f16c
#define BNFAST_TOF_f16_z_nt BNFAST_TOF_f16_f16c
#define BNFAST_FROMF_f16_z_nt BNFAST_FROMF_f16_f16c
#define BNFAST_TOF_bf16_base bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_base bnfast_float_to_bf16
#define BNFAST_TOF_bf16_avx2 bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_avx2 bnfast_float_to_bf16
#define BNFAST_TOF_bf16_hw bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_hw bnfast_float_to_bf16
#define BNFAST_TOF_bf16_avx2_nt bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_avx2_nt bnfast_float_to_bf16
#define BNFAST_TOF_bf16_hw_nt bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_hw_nt bnfast_float_to_bf16
#define BNFAST_TOF_bf16_z bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_z bnfast_float_to_bf16
#define BNFAST_TOF_bf16_z_nt bnfast_bf16_to_float
#define BNFAST_FROMF_bf16_z_nt bnfast_float_to_bf16

#endif /* BNFAST_HALF_H */
