/*
 * Every float32 bit pattern through each vector rounding to bfloat16 of
 * src/bnfast_half.h this CPU runs, against the scalar one
 * (bnfast_float_to_bf16: round to nearest even, NaN quietened with its
 * payload's top bits).  The vector roundings are taken on their own, outside
 * the leaves, so that every pattern reaches each one, ties and NaNs included:
 * the leaves' arithmetic rarely lands on a tie.
 *
 * stdout, binary: the scalar rounding (uint16) of every SAMPLE-th pattern,
 * which tests/test_bf16_rounding.py checks against ml_dtypes (so the reference
 * does not rest on this header alone), then for each of the NVAR variants its
 * count of patterns checked (0 where this CPU lacks it) and of mismatches
 * (uint64 each).
 *
 * Variants: 0 portable vector (8 values), 1 AVX2 (8), 2 AVX-512 ymm (8),
 * 3 zmm (16), 4 two zmm as values 0-15 and 16-31, 5 two zmm as the even and
 * odd values (its word rounding without NaNs, its lane rounding with any), 6
 * the same with a NaN in one odd lane (each step then takes the lane
 * rounding, and 15 of its 16 odd lanes are still checked).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bnfast_half.h"

#define NVAR 7
#define BLOCK 4096          /* patterns a block: a multiple of every step */
#define SAMPLE 4099         /* prime: the sample meets every low-bit pattern */
#define PORTABLE_EVERY 4    /* the portable variant: every 4th block (SSE2: slow) */

static void compare(int v, const uint16_t *got, const uint16_t *want, size_t n,
                    uint64_t *checked, uint64_t *mismatched) {
    size_t i;
    checked[v] += n;
    if (memcmp(got, want, n * sizeof *got) != 0)
        for (i = 0; i < n; i++) mismatched[v] += got[i] != want[i];
}

/* A NaN with every payload bit set (the words' add must not carry it into the
 * sign): the odd lane 7 of variant 6. */
#define NAN_LANE 7
#define NAN_BITS 0xffffffffu

#if BNFAST_VECTOR_EXT && BNFAST_DISPATCH_AVX2
static void portable8(const uint32_t *u, uint16_t *h) {
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 8) bnfast_store8_bf16(h + i, *(const bnfast_h8f *)(u + i));
}
BNFAST_AVX2_TARGET static void avx2_8(const uint32_t *u, uint16_t *h) {
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 8) bnfast_store8_bf16_avx2(h + i, *(const bnfast_h8f *)(u + i));
}
BNFAST_BF16_Z_TARGET static void z8(const uint32_t *u, uint16_t *h) {
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 8) bnfast_store8_bf16_z(h + i, *(const bnfast_h8f *)(u + i));
}
BNFAST_BF16_Z_TARGET static void z16(const uint32_t *u, uint16_t *h) {
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 16) bnfast_store16_bf16_z(h + i, _mm512_loadu_ps(u + i));
}
BNFAST_BF16_Z_TARGET static void z32(const uint32_t *u, uint16_t *h) {
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 32)
        bnfast_store32_bf16_z(h + i, _mm512_loadu_ps(u + i), _mm512_loadu_ps(u + i + 16));
}
/* Even and odd lanes from 32 consecutive patterns, as the EO leaves' loads. */
BNFAST_BF16_Z_TARGET static void z32eo(const uint32_t *u, uint16_t *h, int nan) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    ptrdiff_t i;
    for (i = 0; i < BLOCK; i += 32) {
        __m512i lo = _mm512_loadu_si512(u + i), hi = _mm512_loadu_si512(u + i + 16);
        __m512i e = _mm512_permutex2var_epi32(lo, even, hi);
        __m512i o = _mm512_permutex2var_epi32(lo, odd, hi);
        if (nan) o = _mm512_mask_set1_epi32(o, 1 << NAN_LANE, (int)NAN_BITS);
        bnfast_store32eo_bf16_z(h + i, (bnfast_h16f)e, (bnfast_h16f)o);
    }
}
#endif

/* The patterns from base on and their scalar rounding (an AVX2 build of the
 * same code where the CPU has it: 2^32 patterns take 3x longer in SSE2). */
#define REFERENCE(NAME, TARGET)                                                           \
    TARGET static void NAME(uint64_t base, uint32_t *u, uint16_t *want) {                \
        ptrdiff_t i;                                                                      \
        _Pragma("omp simd")                                                               \
        for (i = 0; i < BLOCK; i++) u[i] = (uint32_t)(base + (uint64_t)i);               \
        _Pragma("omp simd")                                                               \
        for (i = 0; i < BLOCK; i++) want[i] = bnfast_float_to_bf16(bnfast_bits_float(u[i])).bits; \
    }
REFERENCE(reference, )
#if BNFAST_DISPATCH_AVX2
REFERENCE(reference_avx2, BNFAST_AVX2_TARGET)
#endif

/* The vector variants over the block of patterns from base on. */
static void sweep_block(uint64_t base, uint64_t *checked, uint64_t *mismatched) {
    uint32_t u[BLOCK] __attribute__((aligned(64)));
    uint16_t want[BLOCK], got[BLOCK];
#if BNFAST_DISPATCH_AVX2
    if (bnfast_use_avx2()) reference_avx2(base, u, want); else
#endif
    reference(base, u, want);
#if BNFAST_VECTOR_EXT && BNFAST_DISPATCH_AVX2
    if (base / BLOCK % PORTABLE_EVERY == 0) {
        portable8(u, got);
        compare(0, got, want, BLOCK, checked, mismatched);
    }
    if (bnfast_use_avx2()) {
        avx2_8(u, got);
        compare(1, got, want, BLOCK, checked, mismatched);
    }
    if (bnfast_use_bf16_z()) {
        ptrdiff_t i;
        z8(u, got);
        compare(2, got, want, BLOCK, checked, mismatched);
        z16(u, got);
        compare(3, got, want, BLOCK, checked, mismatched);
        z32(u, got);
        compare(4, got, want, BLOCK, checked, mismatched);
        z32eo(u, got, 0);
        compare(5, got, want, BLOCK, checked, mismatched);
        z32eo(u, got, 1);
        for (i = 0; i < BLOCK; i += 32) {  /* the NaN's own value, 2 * NAN_LANE + 1, skipped */
            got[i + 2 * NAN_LANE + 1] = want[i + 2 * NAN_LANE + 1];
            checked[6] -= 1;
        }
        compare(6, got, want, BLOCK, checked, mismatched);
    }
#else
    (void)checked; (void)mismatched;
#endif
}

int main(void) {
    uint64_t checked[NVAR] = {0}, mismatched[NVAR] = {0}, p;
    int64_t block;
    int v;
#pragma omp parallel for schedule(static) reduction(+ : checked[:NVAR], mismatched[:NVAR])
    for (block = 0; block < (int64_t)((1ull << 32) / BLOCK); block++)
        sweep_block((uint64_t)block * BLOCK, checked, mismatched);
    for (p = 0; p < (1ull << 32); p += SAMPLE) {
        uint16_t h = bnfast_float_to_bf16(bnfast_bits_float((uint32_t)p)).bits;
        fwrite(&h, 2, 1, stdout);
    }
    for (v = 0; v < NVAR; v++) {
        fwrite(&checked[v], 8, 1, stdout);
        fwrite(&mismatched[v], 8, 1, stdout);
    }
    return 0;
}
