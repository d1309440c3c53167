/*
 * The normalise pass's entries for the Cython layer (src/_affine.pxd): one per
 * leaf kind and storage type, taking `stream` (non-temporal stores: outputs
 * far beyond the caches) as an argument, so that the Cython code branches on
 * the type only.  The cached and streaming leaves give the same bits.
 */
#ifndef BNFAST_AFFINE_ENTRIES_H
#define BNFAST_AFFINE_ENTRIES_H

#include "bnfast_simd.h"
#include "bnfast_half_leaves.h"
#include "bnfast_flat_runs.h"
#include "bnfast_flat_tiles.h"

/* SCALAR: one (m, a, b) of type U; TILED: a W-long tile of them (streamed: the
 * flat leaves of bnfast_flat_tiles.h where bnfast_flat_tiles_taken_SFX(W) says
 * so; they stream from any element-aligned start, see src/_affine.pxd's
 * apply_last); RUNS: runs of S values from channel c on, float rows. */
#define BNFAST_AFFINE_ENTRIES(SFX, T, U)                                                 \
    static inline void bnfast_affine_scalar_##SFX##_s(const T *x, const T *add, T *y,    \
                                                      ptrdiff_t n, U m, U a, U b,        \
                                                      int relu, int stream) {            \
        if (stream) bnfast_affine_scalar_##SFX##_nt(x, add, y, n, m, a, b, relu);        \
        else bnfast_affine_scalar_##SFX(x, add, y, n, m, a, b, relu);                    \
    }                                                                                    \
    static inline void bnfast_affine_tiled_##SFX##_s(const T *x, const T *add, T *y,     \
                                                     ptrdiff_t n, ptrdiff_t W, const U *m, \
                                                     const U *a, const U *b, int relu,   \
                                                     int stream) {                       \
        if (stream && bnfast_flat_tiles_taken_##SFX(W))                                  \
            bnfast_flat_tiles_##SFX##_nt(x, add, y, n, W, m, a, b, relu);                \
        else if (stream) bnfast_affine_tiled_##SFX##_nt(x, add, y, n, W, m, a, b, relu); \
        else bnfast_affine_tiled_##SFX(x, add, y, n, W, m, a, b, relu);                  \
    }
/* Runs: the flat leaves (bnfast_flat_runs.h) where bnfast_flat_runs_taken_SFX(S)
 * says so; they stream from any element-aligned start, so that also decides
 * which outputs may stream (src/_affine.pxd's apply_first). */
#define BNFAST_AFFINE_RUNS_ENTRY(SFX, T)                                                 \
    static inline void bnfast_affine_runs_##SFX##_s(const T *x, const T *add, T *y,      \
                                                    ptrdiff_t runs, ptrdiff_t S,         \
                                                    ptrdiff_t c, ptrdiff_t C,            \
                                                    const float *m, const float *a,      \
                                                    const float *b, int relu, int stream) { \
        if (bnfast_flat_runs_taken_##SFX(S)) {                                           \
            if (stream) bnfast_flat_runs_##SFX##_nt(x, add, y, runs, S, c, C, m, a, b, relu); \
            else bnfast_flat_runs_##SFX(x, add, y, runs, S, c, C, m, a, b, relu);       \
        } else if (stream) {                                                             \
            bnfast_affine_runs_##SFX##_nt(x, add, y, runs, S, c, C, m, a, b, relu);      \
        } else {                                                                         \
            bnfast_affine_runs_##SFX##_cached(x, add, y, runs, S, c, C, m, a, b, relu);  \
        }                                                                                \
    }

BNFAST_AFFINE_ENTRIES(f32, float, float)
BNFAST_AFFINE_ENTRIES(f64, double, double)
BNFAST_AFFINE_ENTRIES(f16, bnfast_f16, float)
BNFAST_AFFINE_ENTRIES(bf16, bnfast_bf16, float)
/* float32's cached runs: the masked leaf where the CPU has AVX-512VL. */
#if BNFAST_DISPATCH_AVX2
#define bnfast_affine_runs_f32_cached(...)                                               \
    (bnfast_use_f32_masked() ? bnfast_affine_runs_f32_masked : bnfast_affine_runs_f32)(__VA_ARGS__)
#else
#define bnfast_affine_runs_f32_cached bnfast_affine_runs_f32
#endif
#define bnfast_affine_runs_f16_cached bnfast_affine_runs_f16
#define bnfast_affine_runs_bf16_cached bnfast_affine_runs_bf16
BNFAST_AFFINE_RUNS_ENTRY(f32, float)
BNFAST_AFFINE_RUNS_ENTRY(f16, bnfast_f16)
BNFAST_AFFINE_RUNS_ENTRY(bf16, bnfast_bf16)

#endif /* BNFAST_AFFINE_ENTRIES_H */
