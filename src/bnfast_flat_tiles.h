/*
 * Streamed channels-last tiles on AVX-512 as one flat span: a block of `total` values
 * from a tile's start, the coefficients of value i at position i % W of the
 * W-long tile (W >= 16), walked 32 values a step straight across the tiles'
 * ends.  Each 16-value vector's coefficients are one load from the tile, or,
 * where the vector crosses the tile's end, two masked loads (its end, its
 * start).  The leaves first go to the output's 64-byte line in masked cached
 * steps, then stream whole lines, the tail cached again.
 *
 * Why: the tiled leaves walk tile by tile, and their streaming twins store 16
 * bytes at a time (SSE2, bnfast_simd.h) or reach each tile's 64-byte line in
 * 8-value steps (bnfast_half_leaves.h).  A channels-last output streamed in
 * whole 64-byte lines: one thread, 32x256x56x56 float32 eval (W = 256), 14.2
 * ms with 16-byte streaming stores against 10.5 ms with 64-byte ones, as fast
 * as the channels-first runs (10.4 ms).
 *
 * Bits: every lane computes what the tiled leaves compute for it,
 * ((float)x - m) * a + b, the addend added as BNFAST_H16_ADD, the ReLU as
 * BNFAST_H16_RELU, rounded by the same conversion (tests/c/flat_tiles.c).
 *
 * A storage type gives (as in bnfast_flat_runs.h) LOAD32(p, A, B), the first and
 * last 16 of 32 values, STORE32/STREAM32(p, A, B), LOAD16M(k, p)/STORE16M(k, p, v)
 * under a mask.
 */
#ifndef BNFAST_FLAT_TILES_H
#define BNFAST_FLAT_TILES_H

#include "bnfast_flat_runs.h"

#if BNFAST_DISPATCH_AVX2

/* 16 coefficients of row r from tile position j (0 <= j < W, W >= 16), wrapping
 * to the tile's start past its end (masked-off lanes are not read). */
BNFAST_FLAT_TARGET static inline bnfast_h16f bnfast_tile_coef(const float *r, ptrdiff_t j,
                                                              ptrdiff_t W) {
    __mmask16 in_tile;
    if (j + 16 <= W) return (bnfast_h16f)_mm512_loadu_ps(r + j);
    in_tile = (__mmask16)((1u << (W - j)) - 1u);
    return (bnfast_h16f)_mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(in_tile, r + j),
                                             (__mmask16)~in_tile, r + j - W);
}
/* Position j moved on by 16 in the tile. */
#define BNFAST_TILE_NEXT(j) ((j) + 16 >= W ? (j) + 16 - W : (j) + 16)

/* v = relu?(((float)x - m) * a + b [+ (float)add]) with the coefficients from j,
 * COEF: bnfast_tile_coef, or TILE_IN where the 16 lie within the tile. */
#define BNFAST_TILE_IN(r, j, W) (*(const bnfast_h16f *)((r) + (j)))
#define BNFAST_TILES_AFFINE(v, X, COEF, J, ADD, RELU, D)                                  \
    v = ((X) - COEF(m, J, W)) * COEF(a, J, W) + COEF(b, J, W);                           \
    if (ADD) v = BNFAST_H16_ADD(v, D);                                                   \
    if (RELU) v = BNFAST_H16_RELU(v);
/* The first k <= 16 values from p under the mask K = 2^k - 1, j moved on by k. */
#define BNFAST_TILES_MASKED(K, k, LOAD16M, STORE16M, ADD, RELU)                          \
    {                                                                                    \
        bnfast_h16f v_;                                                                  \
        BNFAST_TILES_AFFINE(v_, LOAD16M(K, x + p), bnfast_tile_coef, j, ADD, RELU,       \
                            (ADD ? LOAD16M(K, add + p) : v_))                            \
        STORE16M(K, y + p, v_);                                                          \
        j = j + (k) >= W ? j + (k) - W : j + (k);                                        \
    }
/* The walk: the head to ALIGN bytes (1: none) and the tail in masked steps,
 * 32-value steps between them. */
#define BNFAST_TILES_BODY(T, ALIGN, LOAD32, STORE32, LOAD16M, STORE16M, ADD, RELU)        \
    {                                                                                    \
        ptrdiff_t p = 0, j = 0, k_;                                                      \
        ptrdiff_t head = (ptrdiff_t)(((size_t)0 - (size_t)y) & ((ALIGN) - 1))            \
                         / (ptrdiff_t)sizeof(T);                                         \
        if (head > total) head = total;                                                  \
        for (; p < head; p += k_) {                                                      \
            k_ = BNFAST_MIN(head - p, 16);                                               \
            BNFAST_TILES_MASKED((__mmask16)((1u << k_) - 1u), k_, LOAD16M, STORE16M,     \
                                ADD, RELU)                                               \
        }                                                                                \
        for (; total - p >= 32; p += 32) {                                               \
            bnfast_h16f xa_, xb_, da_ = {0}, db_ = {0};                                  \
            LOAD32(x + p, xa_, xb_);                                                     \
            if (ADD) LOAD32(add + p, da_, db_);                                          \
            if (j + 32 <= W) {  /* within the tile: plain loads */                       \
                BNFAST_TILES_AFFINE(xa_, xa_, BNFAST_TILE_IN, j, ADD, RELU, da_)          \
                BNFAST_TILES_AFFINE(xb_, xb_, BNFAST_TILE_IN, j + 16, ADD, RELU, db_)     \
                j += 32;                                                                 \
            } else {                                                                     \
                ptrdiff_t j16_ = BNFAST_TILE_NEXT(j);                                    \
                BNFAST_TILES_AFFINE(xa_, xa_, bnfast_tile_coef, j, ADD, RELU, da_)        \
                BNFAST_TILES_AFFINE(xb_, xb_, bnfast_tile_coef, j16_, ADD, RELU, db_)     \
                j = BNFAST_TILE_NEXT(j16_);                                              \
            }                                                                            \
            STORE32(y + p, xa_, xb_);                                                    \
        }                                                                                \
        for (; p < total; p += k_) {                                                     \
            k_ = BNFAST_MIN(total - p, 16);                                              \
            BNFAST_TILES_MASKED((__mmask16)((1u << k_) - 1u), k_, LOAD16M, STORE16M,     \
                                ADD, RELU)                                               \
        }                                                                                \
    }
/* total values from a tile's start, rows m, a, b of W >= 16 floats. */
#define BNFAST_DEFINE_FLAT_TILES(NAME, T, ALIGN, ...)                                     \
    BNFAST_FLAT_TARGET static void NAME(const T *x, const T *add, T *y, ptrdiff_t total, \
                                        ptrdiff_t W, const float *m, const float *a,     \
                                        const float *b, int relu) {                      \
        if (add == NULL && !relu)                                                        \
            BNFAST_TILES_BODY(T, ALIGN, __VA_ARGS__, 0, 0)                               \
        else if (add == NULL)                                                            \
            BNFAST_TILES_BODY(T, ALIGN, __VA_ARGS__, 0, 1)                               \
        else if (!relu)                                                                  \
            BNFAST_TILES_BODY(T, ALIGN, __VA_ARGS__, 1, 0)                               \
        else                                                                             \
            BNFAST_TILES_BODY(T, ALIGN, __VA_ARGS__, 1, 1)                               \
    }

/* bfloat16 split in halves (the even/odd form needs one coefficient a vector). */
#define BNFAST_FLAT_LOAD32_BF16_SPLIT(p, A, B) \
    BNFAST_FLAT_SPLIT_LOAD32(bnfast_load16_bf16_z, p, A, B)
BNFAST_DEFINE_FLAT_TILES(bnfast_flat_tiles_f32_nt, float, 64, BNFAST_FLAT_LOAD32_F32,
                         BNFAST_FLAT_STREAM32_F32, BNFAST_FLAT_LOAD16M_F32,
                         BNFAST_FLAT_STORE16M_F32)
BNFAST_DEFINE_FLAT_TILES(bnfast_flat_tiles_f16_nt, bnfast_f16, 64, BNFAST_FLAT_LOAD32_F16,
                         bnfast_stream32_f16_z, BNFAST_FLAT_LOAD16M_F16,
                         BNFAST_FLAT_STORE16M_F16)
BNFAST_DEFINE_FLAT_TILES(bnfast_flat_tiles_bf16_nt, bnfast_bf16, 64,
                         BNFAST_FLAT_LOAD32_BF16_SPLIT, bnfast_stream32_bf16_z,
                         BNFAST_FLAT_LOAD16M_BF16, BNFAST_FLAT_STORE16M_BF16)

/* Whether streamed tiles of W values take the flat leaves: on AVX-512 (F, VL,
 * BW), bfloat16 where AVX512-BF16's conversion is not there (as the flat runs);
 * float64 never. */
#define bnfast_flat_tiles_taken_f32(W) ((W) >= 16 && bnfast_use_flat())
#define bnfast_flat_tiles_taken_f16 bnfast_flat_tiles_taken_f32
#define bnfast_flat_tiles_taken_bf16(W) (bnfast_flat_tiles_taken_f32(W) && !bnfast_use_bf16_hw())
#else
#define bnfast_flat_tiles_taken_f32 BNFAST_FLAT_NONE
#define bnfast_flat_tiles_taken_f16 BNFAST_FLAT_NONE
#define bnfast_flat_tiles_taken_bf16 BNFAST_FLAT_NONE
#define bnfast_flat_tiles_f32_nt bnfast_affine_tiled_f32_nt
#define bnfast_flat_tiles_f16_nt bnfast_affine_tiled_f16_nt
#define bnfast_flat_tiles_bf16_nt bnfast_affine_tiled_bf16_nt
#endif
#define bnfast_flat_tiles_taken_f64(W) 0
#define bnfast_flat_tiles_f64_nt bnfast_affine_tiled_f64_nt

#endif /* BNFAST_FLAT_TILES_H */
