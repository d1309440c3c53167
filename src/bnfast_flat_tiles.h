/*
 * Streamed channels-last tiles on AVX-512 as one flat span, the normalise and
 * the backward's dx (bnfast_flat_runs.h's step bodies): a block of `total` values
 * from a tile's start, the coefficients of value i at position i % W of the
 * W-long tile (W >= 16), walked 32 values a step straight across the tiles'
 * ends.  Each 16-value vector's coefficients are one load from the tile, or,
 * where the vector crosses the tile's end, two masked loads (its end, its
 * start).  The leaves first go to the output's 64-byte line in masked cached
 * steps, then stream whole lines, the tail cached again.
 *
 * Why: the tiled leaves walk tile by tile, and their streaming twins store 16
 * bytes at a time (SSE2, bnfast_simd.h) or reach each tile's 64-byte line in
 * 8-value steps (bnfast_half_leaves.h).  One thread, 32x256x56x56 eval
 * streamed (W = 256): float32 13.6-13.9 -> 11.0-11.7 ms (the channels-first
 * runs: 10.7), float16 6.1 -> 5.7, bfloat16 8.0 -> 7.7.
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
/* Position j moved on by k <= W in the tile. */
#define BNFAST_TILE_ON(j, k) ((j) + (k) >= W ? (j) + (k) - W : (j) + (k))
/* A step's coefficients of row r for its two vectors (bnfast_flat_runs.h's CA,
 * CB): from positions j and j + 16 within the tile, or wrapping (jb_: j + 16
 * wrapped); a masked step's (the runs' r##0 names, BNFAST_FLAT_THIS). */
#define BNFAST_TILE_IN_A(r) (*(const bnfast_h16f *)((r) + j))
#define BNFAST_TILE_IN_B(r) (*(const bnfast_h16f *)((r) + j + 16))
#define BNFAST_TILE_WRAP_A(r) bnfast_tile_coef(r, j, W)
#define BNFAST_TILE_WRAP_B(r) bnfast_tile_coef(r, jb_, W)
#define BNFAST_TILE_HERE(r) bnfast_h16f r##0 = bnfast_tile_coef(r, j, W);

/* The walk over total values of output OUT from a tile's start: the head to
 * ALIGN bytes (1: none) and the tail in masked steps, MASKED(K, ...) (the first
 * k <= 16 values from p, K = 2^k - 1), 32-value steps STEP(CA, CB, ...) between
 * them: bnfast_flat_runs.h's bodies, with the coefficients of rows ROWS from
 * the tile.  Up the span, or (DOWN: bnfast_alias.h's bnfast_walk_down) the steps
 * down from the top and then the tail, the same bits. */
#define BNFAST_TILES_WALK(T, OUT, ALIGN, DOWN, ROWS, STEP, MASKED, ...)                  \
    {                                                                                    \
        ptrdiff_t p = 0, j = 0, k_;                                                      \
        ptrdiff_t head = (ptrdiff_t)(((size_t)0 - (size_t)(OUT)) & ((ALIGN) - 1))       \
                         / (ptrdiff_t)sizeof(T);                                         \
        if (head > total) head = total;                                                  \
        for (; p < head; p += k_, j = BNFAST_TILE_ON(j, k_)) {                           \
            ROWS(BNFAST_TILE_HERE)                                                       \
            k_ = BNFAST_MIN(head - p, 16);                                               \
            MASKED((__mmask16)((1u << k_) - 1u), __VA_ARGS__)                            \
        }                                                                                \
        if ((DOWN) && total - p >= 32) {  /* the steps down, then the tail below */     \
            ptrdiff_t low_ = p, end_ = p + (total - p) / 32 * 32, top_ = end_ % W;       \
            for (p = end_ - 32, j = top_; p >= low_; p -= 32) {                          \
                for (j -= 32; j < 0;) j += W;                                            \
                if (j + 32 <= W) {                                                       \
                    STEP(BNFAST_TILE_IN_A, BNFAST_TILE_IN_B, __VA_ARGS__)                \
                } else {                                                                 \
                    ptrdiff_t jb_ = BNFAST_TILE_ON(j, 16);                               \
                    STEP(BNFAST_TILE_WRAP_A, BNFAST_TILE_WRAP_B, __VA_ARGS__)            \
                }                                                                        \
            }                                                                            \
            p = end_;                                                                    \
            j = top_;                                                                    \
        }                                                                                \
        for (; total - p >= 32; p += 32) {                                               \
            if (j + 32 <= W) {  /* within the tile: plain loads */                       \
                STEP(BNFAST_TILE_IN_A, BNFAST_TILE_IN_B, __VA_ARGS__)                    \
                j = BNFAST_TILE_ON(j, 32);                                               \
            } else {                                                                     \
                ptrdiff_t jb_ = BNFAST_TILE_ON(j, 16);                                   \
                STEP(BNFAST_TILE_WRAP_A, BNFAST_TILE_WRAP_B, __VA_ARGS__)                \
                j = BNFAST_TILE_ON(jb_, 16);                                             \
            }                                                                            \
        }                                                                                \
        for (; p < total; p += k_, j = BNFAST_TILE_ON(j, k_)) {                          \
            ROWS(BNFAST_TILE_HERE)                                                       \
            k_ = BNFAST_MIN(total - p, 16);                                              \
            MASKED((__mmask16)((1u << k_) - 1u), __VA_ARGS__)                            \
        }                                                                                \
    }
/* The normalise of total values from a tile's start, rows m, a, b of W >= 16
 * floats. */
#define BNFAST_TILES_AFFINE_BODY(T, ALIGN, ADD, RELU, ...)                                \
    BNFAST_TILES_WALK(T, y, ALIGN, bnfast_walk_down(y, x, add), BNFAST_FLAT_AFFINE_ROWS,  \
                      BNFAST_FLAT_AFFINE_STEP,                                           \
                      BNFAST_FLAT_AFFINE_MASKED, __VA_ARGS__, ADD, RELU)
#define BNFAST_DEFINE_FLAT_TILES(NAME, T, ALIGN, ...)                                     \
    BNFAST_FLAT_TARGET static void NAME(const T *x, const T *add, T *y, ptrdiff_t total, \
                                        ptrdiff_t W, const float *m, const float *a,     \
                                        const float *b, int relu) {                      \
        if (add == NULL && !relu)                                                        \
            BNFAST_TILES_AFFINE_BODY(T, ALIGN, 0, 0, __VA_ARGS__)                        \
        else if (add == NULL)                                                            \
            BNFAST_TILES_AFFINE_BODY(T, ALIGN, 0, 1, __VA_ARGS__)                        \
        else if (!relu)                                                                  \
            BNFAST_TILES_AFFINE_BODY(T, ALIGN, 1, 0, __VA_ARGS__)                        \
        else                                                                             \
            BNFAST_TILES_AFFINE_BODY(T, ALIGN, 1, 1, __VA_ARGS__)                        \
    }
/* The backward's dx (bnfast_flat_runs.h's, TRAINING 1 or 0), rows m, a, b, d
 * (evaluation reads a only). */
#define BNFAST_DEFINE_FLAT_TILES_GRAD(NAME, T, ALIGN, TRAINING, ...)                      \
    BNFAST_FLAT_TARGET static void NAME(const T *x, const T *dy, T *dx, ptrdiff_t total, \
                                        ptrdiff_t W, const float *m, const float *a,     \
                                        const float *b, const float *d)                  \
        BNFAST_TILES_WALK(T, dx, ALIGN, bnfast_walk_down(dx, dy, TRAINING ? x : NULL),   \
                          BNFAST_FLAT_GRAD_ROWS_##TRAINING,                              \
                          BNFAST_FLAT_GRAD_STEP, BNFAST_FLAT_GRAD_MASKED, __VA_ARGS__,   \
                          TRAINING)

/* bfloat16 split in halves (the even/odd form needs one coefficient a vector). */
#define BNFAST_FLAT_LOAD32_BF16_SPLIT(p, A, B) \
    BNFAST_FLAT_SPLIT_LOAD32(bnfast_load16_bf16_z, p, A, B)
/* Each type's streamed leaves: the normalise, dx in training and in evaluation. */
#define BNFAST_DEFINE_FLAT_TILES_OF(H, T, LOAD32, STREAM32, LOAD16M, STORE16M)            \
    BNFAST_DEFINE_FLAT_TILES(bnfast_flat_tiles_##H##_nt, T, 64, LOAD32, STREAM32,        \
                             LOAD16M, STORE16M)                                          \
    BNFAST_DEFINE_FLAT_TILES_GRAD(bnfast_flat_tiles_grad_##H##_nt, T, 64, 1, LOAD32,     \
                                  STREAM32, LOAD16M, STORE16M)                           \
    BNFAST_DEFINE_FLAT_TILES_GRAD(bnfast_flat_tiles_scale_##H##_nt, T, 64, 0, LOAD32,    \
                                  STREAM32, LOAD16M, STORE16M)
BNFAST_DEFINE_FLAT_TILES_OF(f32, float, BNFAST_FLAT_LOAD32_F32, BNFAST_FLAT_STREAM32_F32,
                            BNFAST_FLAT_LOAD16M_F32, BNFAST_FLAT_STORE16M_F32)
BNFAST_DEFINE_FLAT_TILES_OF(f16, bnfast_f16, BNFAST_FLAT_LOAD32_F16, bnfast_stream32_f16_z,
                            BNFAST_FLAT_LOAD16M_F16, BNFAST_FLAT_STORE16M_F16)
BNFAST_DEFINE_FLAT_TILES_OF(bf16, bnfast_bf16, BNFAST_FLAT_LOAD32_BF16_SPLIT,
                            bnfast_stream32_bf16_z, BNFAST_FLAT_LOAD16M_BF16,
                            BNFAST_FLAT_STORE16M_BF16)

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

/* The backward's streamed dx (no mask) for the Cython layer (src/_backward.pyx),
 * training or evaluation by a flag: the flat leaves, or (builds without the
 * dispatch: never taken there, see above) tile by tile. */
#define BNFAST_FLAT_TILES_GRAD_ENTRY(H, T)                                                \
    static inline void bnfast_flat_tiles_grad_##H##_s(const T *x, const T *dy, T *dx,    \
                                                      ptrdiff_t n, ptrdiff_t W,          \
                                                      const float *m, const float *a,    \
                                                      const float *b, const float *d,    \
                                                      int training) {                    \
        BNFAST_FLAT_TILES_GRAD_BODY_##H                                                  \
    }
#if BNFAST_DISPATCH_AVX2
#define BNFAST_FLAT_TILES_GRAD_FLAT(H)                                                    \
    (training ? bnfast_flat_tiles_grad_##H##_nt : bnfast_flat_tiles_scale_##H##_nt)(    \
        x, dy, dx, n, W, m, a, b, d);
#define BNFAST_FLAT_TILES_GRAD_BODY_f32 BNFAST_FLAT_TILES_GRAD_FLAT(f32)
#define BNFAST_FLAT_TILES_GRAD_BODY_f16 BNFAST_FLAT_TILES_GRAD_FLAT(f16)
#define BNFAST_FLAT_TILES_GRAD_BODY_bf16 BNFAST_FLAT_TILES_GRAD_FLAT(bf16)
#else
#define BNFAST_FLAT_TILES_GRAD_BODY_f32                                                   \
    ptrdiff_t i;                                                                         \
    for (i = 0; i < n; i += W)                                                           \
        bnfast_grad_run_tiled_f32(x + i, dy + i, NULL, 0, BNFAST_MIN(W, n - i), m, a, b, \
                                  d, training, 1, dx + i, NULL);
#define BNFAST_FLAT_TILES_GRAD_BODY_f16 \
    bnfast_grad_tiles_f16(x, dy, NULL, 0, n, W, m, a, b, d, training, 1, dx, NULL);
#define BNFAST_FLAT_TILES_GRAD_BODY_bf16 \
    bnfast_grad_tiles_bf16(x, dy, NULL, 0, n, W, m, a, b, d, training, 1, dx, NULL);
#endif
BNFAST_FLAT_TILES_GRAD_ENTRY(f32, float)
BNFAST_FLAT_TILES_GRAD_ENTRY(f16, bnfast_f16)
BNFAST_FLAT_TILES_GRAD_ENTRY(bf16, bnfast_bf16)

#endif /* BNFAST_FLAT_TILES_H */
