/*
 * SIMD leaves with float64 accumulation (the backward's centered dot; the
 * training statistics' leaves are in bnfast_stats.h), the shared vector
 * types and run-time pick, and the float32/float64 normalise leaves.
 *
 * Why C: GCC (12) will not vectorise a float -> double widening reduction
 * without -ffast-math, which we refuse (NaN/Inf semantics, reproducibility).
 * Written with GCC/Clang vector extensions these leaves run 2x (SSE2) to 4x
 * (AVX2, picked at run time) faster than the scalar loop, and that is the
 * difference between compute-bound and memory-bound statistics.  Everything
 * around them (chunking, merging, threading) stays in Cython.
 *
 * Every variant keeps 8 lanes, lane j summing elements i with i % 8 == j, and
 * combines lanes in one fixed order, so SSE2, AVX2 and the scalar fallback
 * give bit-identical results.  No FMA: d * d + b must round the same way.
 */
#ifndef BNFAST_SIMD_H
#define BNFAST_SIMD_H

#include <stddef.h>

#if (defined(__GNUC__) || defined(__clang__)) && !defined(BNFAST_NO_SIMD)
#define BNFAST_VECTOR_EXT 1
typedef double bnfast_v4d __attribute__((vector_size(32), aligned(8)));
#else
#define BNFAST_VECTOR_EXT 0
#endif

/* The run-time picked variants, in every x86 build with vector extensions.
 * Also in a build whose own target has AVX2 (BNFAST_NATIVE=1, -march=native):
 * without them its base leaves were all it had, and several of those are
 * portable per-value code that only the picked variants replace (float16's
 * conversions, the checked addend sum): such a build ran float16 15-50x slower
 * (16x128x56x56 eval 0.58 -> 11.6 ms, backward 1.5 -> 24.9, fused eval 0.69 ->
 * 34 ms).  Their targets add to the build's own, so the variants stay valid. */
#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#define BNFAST_DISPATCH_AVX2 1
#define BNFAST_AVX2_TARGET __attribute__((target("avx2")))
/* float32 and float64 leaves in zmm (AVX-512F, picked at run time beside AVX2's:
 * bnfast_use_float_z), each lane the scalar code's operations; bnfast_v8d: eight
 * doubles, as the statistics' column sums widen float32 values. */
#define BNFAST_FLOAT_Z_TARGET __attribute__((target("avx2,avx512f")))
typedef double bnfast_v8d __attribute__((vector_size(64), aligned(8)));
#define BNFAST_L8_F32_Z(p) ((bnfast_v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p)))
#define BNFAST_L8_F64_Z(p) (*(const bnfast_v8d *)(p))
#else
#define BNFAST_DISPATCH_AVX2 0
#endif

#define BNFAST_COMBINE8(v) \
    ((((v)[0] + (v)[1]) + ((v)[2] + (v)[3])) + (((v)[4] + (v)[5]) + ((v)[6] + (v)[7])))

/* The same finish in registers (AVX; the x86 leaves' targets): a run's tail,
 * n - n8 < 8 values, by LANE(A, B, lane, i, ...) into constant lanes (a variable
 * lane would go through memory), then BNFAST_COMBINE8's order by vhaddpd and
 * 128-bit halves, for both sums at once: S1 = a's, S2 = b's.  Through arrays
 * the finish was half of a 49-value run's time (statistics and backward). */
#if BNFAST_VECTOR_EXT && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define BNFAST_TAIL_LANES(LANE, A0, A1, B0, B1, ...)                                   \
    if (n8 < n) {                                                                      \
        ptrdiff_t t_ = n - n8;                                                         \
        LANE(A0, B0, 0, 0, __VA_ARGS__)                                                \
        if (t_ > 1) LANE(A0, B0, 1, 1, __VA_ARGS__)                                    \
        if (t_ > 2) LANE(A0, B0, 2, 2, __VA_ARGS__)                                    \
        if (t_ > 3) LANE(A0, B0, 3, 3, __VA_ARGS__)                                    \
        if (t_ > 4) LANE(A1, B1, 0, 4, __VA_ARGS__)                                    \
        if (t_ > 5) LANE(A1, B1, 1, 5, __VA_ARGS__)                                    \
        if (t_ > 6) LANE(A1, B1, 2, 6, __VA_ARGS__)                                    \
    }
#define BNFAST_COMBINE8_AVX(A0, A1, B0, B1, S1, S2)                                    \
    {   /* pairs (l0+l1, l4+l5, l2+l3, l6+l7) of a and of b */                         \
        __m256d pa_ = _mm256_hadd_pd((__m256d)(A0), (__m256d)(A1));                    \
        __m256d pb_ = _mm256_hadd_pd((__m256d)(B0), (__m256d)(B1));                    \
        /* (a: (l0+l1)+(l2+l3), (l4+l5)+(l6+l7), b: the same) */                       \
        __m256d q_ = _mm256_add_pd(_mm256_permute2f128_pd(pa_, pb_, 0x20),             \
                                   _mm256_permute2f128_pd(pa_, pb_, 0x31));            \
        __m256d t_ = _mm256_hadd_pd(q_, q_);                                           \
        (S1) = _mm256_cvtsd_f64(t_);                                                   \
        (S2) = _mm_cvtsd_f64(_mm256_extractf128_pd(t_, 1));                            \
    }
#endif

/* Two sums' 8 lanes, each held as two 4-lane vectors (A0, A1 | B0, B1), into the
 * arrays a_[8], b_[8] that a run's tail and BNFAST_COMBINE8 then finish. */
#define BNFAST_LANES8(a_, b_, A0, A1, B0, B1)                                          \
    {                                                                                  \
        ptrdiff_t l_;                                                                  \
        for (l_ = 0; l_ < 4; l_++) {                                                   \
            (a_)[l_] = (A0)[l_]; (a_)[l_ + 4] = (A1)[l_];                              \
            (b_)[l_] = (B0)[l_]; (b_)[l_ + 4] = (B1)[l_];                              \
        }                                                                              \
    }

/* Rows four at a time, except where four row streams would interleave inside
 * one 4 KiB page (rows of 512 B up to 2 KiB): that confuses the hardware
 * prefetchers and halves the speed, so such rows go one at a time.  Depends on
 * W and the type only, so sums still depend on the shape only. */
#define BNFAST_ROW_GROUP(T, W) \
    (((size_t)(W) * sizeof(T) < 512 || (size_t)(W) * sizeof(T) >= 2048) ? 4 : 1)
/* Rows `stride` values of T apart share 4 KiB pages: where grouped row streams
 * are prefetched in software (rows of a page or more have streams of their own). */
#define BNFAST_SHARED_PAGES(T, stride) ((stride) * (ptrdiff_t)sizeof(T) < 4096)

#if BNFAST_VECTOR_EXT
/* Load 4 values of type T as doubles (the compiler emits the widening load). */
#define BNFAST_LOAD4(T, p) ((bnfast_v4d){(double)(p)[0], (double)(p)[1], (double)(p)[2], (double)(p)[3]})

/* sy += sum(y), sxy += sum((x - shift) * y) */
#define BNFAST_DEFINE_CENTERED_DOT(NAME, T, ATTR)                                   \
    ATTR static void NAME(const T *x, const T *y, ptrdiff_t n, double shift,        \
                          double *sy, double *sxy) {                                \
        bnfast_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, y0, y1;            \
        double a[8], b[8];                                                          \
        ptrdiff_t i, n8 = n - n % 8;                                                \
        for (i = 0; i < n8; i += 8) {                                               \
            y0 = BNFAST_LOAD4(T, y + i); y1 = BNFAST_LOAD4(T, y + i + 4);           \
            a0 += y0; a1 += y1;                                                     \
            b0 += (BNFAST_LOAD4(T, x + i) - shift) * y0;                            \
            b1 += (BNFAST_LOAD4(T, x + i + 4) - shift) * y1;                        \
        }                                                                           \
        for (i = 0; i < 4; i++) {                                                   \
            a[i] = a0[i]; a[i + 4] = a1[i]; b[i] = b0[i]; b[i + 4] = b1[i];         \
        }                                                                           \
        for (i = n8; i < n; i++) {                                                  \
            a[i - n8] += (double)y[i];                                              \
            b[i - n8] += ((double)x[i] - shift) * (double)y[i];                     \
        }                                                                           \
        *sy += BNFAST_COMBINE8(a);                                                  \
        *sxy += BNFAST_COMBINE8(b);                                                 \
    }
#else
#define BNFAST_DEFINE_CENTERED_DOT(NAME, T, ATTR)                                   \
    static void NAME(const T *x, const T *y, ptrdiff_t n, double shift,             \
                     double *sy, double *sxy) {                                     \
        double a[8] = {0}, b[8] = {0};                                              \
        ptrdiff_t i;                                                                \
        for (i = 0; i < n; i++) {                                                   \
            a[i % 8] += (double)y[i];                                               \
            b[i % 8] += ((double)x[i] - shift) * (double)y[i];                      \
        }                                                                           \
        *sy += BNFAST_COMBINE8(a);                                                  \
        *sxy += BNFAST_COMBINE8(b);                                                 \
    }
#endif

BNFAST_DEFINE_CENTERED_DOT(bnfast_centered_dot_f32_base, float, )
BNFAST_DEFINE_CENTERED_DOT(bnfast_centered_dot_f64_base, double, )

/* ---------------------------------------------------------------------------
 * Elementwise normalise with the fused epilogue, computed in U and rounded to
 * the storage type T once:
 *   y = relu?((T)(((U)x - m) * a + b  [+ (U)addend]))
 * SCALAR: one (m, a, b) for the whole run (channels-first).
 * TILED:  per-element m[i], a[i], b[i] (a channels-last tile).
 * U = T, except the f32d leaves: float32 data computed in double, for tables
 * that float32 cannot carry (_affine.pxd chooses per call): a mean beyond
 * 2^100, where x - m could overflow float32 (values near +-3e38), or a scale
 * beyond float32's range (a constant channel with eps=1e-300 scales by 1e150:
 * 0 * 1e150 + b is exactly b, where float32 gave 0 * inf).  Double costs ~3x
 * the float arithmetic (the conversions), visible when the data is in cache,
 * so float32 data keeps the float leaves whenever the table allows.
 * The four epilogue variants are separate loops so each vectorises; ivdep
 * because y may be x or addend itself (same index: no loop-carried dependence).
 * The ReLU acts on the rounded value (the same as rounding the ReLU's result, up
 * to the sign of a zero; in T so that GCC vectorises the select).
 * relu keeps NaN (v < 0 is false for NaN), as torch.relu does.  No FMA (the
 * AVX2 target does not enable it), so every variant rounds the same way.
 * ------------------------------------------------------------------------- */
#if defined(__clang__)
#define BNFAST_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define BNFAST_IVDEP _Pragma("GCC ivdep")
#else
#define BNFAST_IVDEP
#endif

#define BNFAST_EPILOGUE_LOOPS(T, U, AFFINE)                                          \
    ptrdiff_t i;                                                                     \
    T v;                                                                             \
    if (add == NULL && !relu) {                                                      \
        BNFAST_IVDEP for (i = 0; i < n; i++) { y[i] = (T)(AFFINE); }                 \
    } else if (add == NULL) {                                                        \
        BNFAST_IVDEP for (i = 0; i < n; i++) { v = (T)(AFFINE); y[i] = v < 0 ? (T)0 : v; } \
    } else if (!relu) {                                                              \
        BNFAST_IVDEP for (i = 0; i < n; i++) { y[i] = (T)(AFFINE + (U)add[i]); }     \
    } else {                                                                         \
        BNFAST_IVDEP for (i = 0; i < n; i++) {                                       \
            v = (T)(AFFINE + (U)add[i]); y[i] = v < 0 ? (T)0 : v;                    \
        }                                                                            \
    }

#define BNFAST_DEFINE_AFFINE_SCALAR(NAME, T, U, ATTR)                                \
    ATTR static void NAME(const T *x, const T *add, T *y, ptrdiff_t n,               \
                          U m, U a, U b, int relu) {                                 \
        BNFAST_EPILOGUE_LOOPS(T, U, ((U)x[i] - m) * a + b)                           \
    }

/* TILED walks `total` values as consecutive pieces of W (the tile's length),
 * the last one possibly shorter: one call per block, not per piece.  PIECES
 * runs BODY on each piece as (x, add, y, n), the tile indexed from 0. */
#define BNFAST_TILED_PIECES(T, BODY)                                                 \
    ptrdiff_t i0, n;                                                                 \
    for (i0 = 0; i0 < total; i0 += W) {                                              \
        const T *x = x0 + i0;                                                        \
        const T *add = add0 == NULL ? NULL : add0 + i0;                              \
        T *y = y0 + i0;                                                              \
        n = total - i0 < W ? total - i0 : W;                                         \
        { BODY }                                                                     \
    }
#define BNFAST_DEFINE_AFFINE_TILED(NAME, T, U, ATTR)                                 \
    ATTR static void NAME(const T *x0, const T *add0, T *y0, ptrdiff_t total,        \
                          ptrdiff_t W, const U *m, const U *a, const U *b, int relu) { \
        BNFAST_TILED_PIECES(T, BNFAST_EPILOGUE_LOOPS(T, U, ((U)x[i] - m[i]) * a[i] + b[i])) \
    }


/* RUNS: consecutive channels-first runs of S values, run t with channel
 * (c + t) % C's coefficients, each run by SCALAR, the same target's leaf (so it
 * inlines): a 7x7 image is 49 values, and a call plus the run-time pick per
 * run cost ~9 ns, a third of the run's time. */
#define BNFAST_DEFINE_AFFINE_RUNS(NAME, T, ATTR, SCALAR)                             \
    ATTR static void NAME(const T *x, const T *add, T *y, ptrdiff_t runs, ptrdiff_t S, \
                          ptrdiff_t c, ptrdiff_t C, const float *m, const float *a,  \
                          const float *b, int relu) {                                \
        ptrdiff_t t;                                                                 \
        for (t = 0; t < runs; t++) {                                                 \
            SCALAR(x + t * S, add == NULL ? NULL : add + t * S, y + t * S, S,        \
                   m[c], a[c], b[c], relu);                                          \
            if (++c == C) c = 0;                                                     \
        }                                                                            \
    }

BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f32_base, float, float, )
BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f32d_base, float, double, )
BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f64_base, double, double, )
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f32_base, float, float, )
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f32d_base, float, double, )
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f64_base, double, double, )
BNFAST_DEFINE_AFFINE_RUNS(bnfast_affine_runs_f32_base, float, , bnfast_affine_scalar_f32_base)

#if BNFAST_DISPATCH_AVX2
BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f32_avx2, float, float, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f32d_avx2, float, double, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_SCALAR(bnfast_affine_scalar_f64_avx2, double, double, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f32_avx2, float, float, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f32d_avx2, float, double, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f64_avx2, double, double, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_AFFINE_RUNS(bnfast_affine_runs_f32_avx2, float, BNFAST_AVX2_TARGET,
                          bnfast_affine_scalar_f32_avx2)
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f32_z, float, float, BNFAST_FLOAT_Z_TARGET)
BNFAST_DEFINE_AFFINE_TILED(bnfast_affine_tiled_f64_z, double, double, BNFAST_FLOAT_Z_TARGET)
BNFAST_DEFINE_CENTERED_DOT(bnfast_centered_dot_f32_avx2, float, BNFAST_AVX2_TARGET)
BNFAST_DEFINE_CENTERED_DOT(bnfast_centered_dot_f64_avx2, double, BNFAST_AVX2_TARGET)

/* bnfast_use_NAME(): whether this CPU runs NAME's leaves (TEST, from
 * BNFAST_CPU's feature names), asked once a process (a benign race: every
 * thread writes the same value). */
#define BNFAST_CPU(feature) __builtin_cpu_supports(feature)
#define BNFAST_DEFINE_CPU_CHECK(NAME, TEST)                                              \
    static int bnfast_has_##NAME = -1;                                                   \
    static int bnfast_use_##NAME(void) {                                                 \
        if (bnfast_has_##NAME < 0) {                                                     \
            __builtin_cpu_init();                                                        \
            bnfast_has_##NAME = (TEST) ? 1 : 0;                                          \
        }                                                                                \
        return bnfast_has_##NAME;                                                        \
    }
BNFAST_DEFINE_CPU_CHECK(avx2, BNFAST_CPU("avx2"))
BNFAST_DEFINE_CPU_CHECK(float_z, BNFAST_CPU("avx2") && BNFAST_CPU("avx512f"))
#define BNFAST_PICK(base, avx2) (bnfast_use_avx2() ? (avx2) : (base))
#define BNFAST_PICK_Z(base, avx2, z) (bnfast_use_float_z() ? (z) : BNFAST_PICK(base, avx2))
#else
#define BNFAST_PICK(base, avx2) (base)
#define BNFAST_PICK_Z(base, avx2, z) (base)
#endif

static inline void bnfast_centered_dot_f32(const float *x, const float *y, ptrdiff_t n,
                                           double shift, double *sy, double *sxy) {
    BNFAST_PICK(bnfast_centered_dot_f32_base, bnfast_centered_dot_f32_avx2)(x, y, n, shift, sy, sxy);
}
static inline void bnfast_centered_dot_f64(const double *x, const double *y, ptrdiff_t n,
                                           double shift, double *sy, double *sxy) {
    BNFAST_PICK(bnfast_centered_dot_f64_base, bnfast_centered_dot_f64_avx2)(x, y, n, shift, sy, sxy);
}

static inline void bnfast_affine_scalar_f32(const float *x, const float *add, float *y, ptrdiff_t n,
                                            float m, float a, float b, int relu) {
    BNFAST_PICK(bnfast_affine_scalar_f32_base, bnfast_affine_scalar_f32_avx2)(x, add, y, n, m, a, b, relu);
}
static inline void bnfast_affine_runs_f32(const float *x, const float *add, float *y,
                                          ptrdiff_t runs, ptrdiff_t S, ptrdiff_t c, ptrdiff_t C,
                                          const float *m, const float *a, const float *b,
                                          int relu) {
    BNFAST_PICK(bnfast_affine_runs_f32_base, bnfast_affine_runs_f32_avx2)(
        x, add, y, runs, S, c, C, m, a, b, relu);
}
static inline void bnfast_affine_scalar_f32d(const float *x, const float *add, float *y, ptrdiff_t n,
                                             double m, double a, double b, int relu) {
    BNFAST_PICK(bnfast_affine_scalar_f32d_base, bnfast_affine_scalar_f32d_avx2)(x, add, y, n, m, a, b, relu);
}
static inline void bnfast_affine_scalar_f64(const double *x, const double *add, double *y, ptrdiff_t n,
                                            double m, double a, double b, int relu) {
    BNFAST_PICK(bnfast_affine_scalar_f64_base, bnfast_affine_scalar_f64_avx2)(x, add, y, n, m, a, b, relu);
}
static inline void bnfast_affine_tiled_f32(const float *x, const float *add, float *y, ptrdiff_t n,
                                           ptrdiff_t W, const float *m, const float *a,
                                           const float *b, int relu) {
    BNFAST_PICK_Z(bnfast_affine_tiled_f32_base, bnfast_affine_tiled_f32_avx2,
                  bnfast_affine_tiled_f32_z)(x, add, y, n, W, m, a, b, relu);
}
static inline void bnfast_affine_tiled_f32d(const float *x, const float *add, float *y, ptrdiff_t n,
                                            ptrdiff_t W, const double *m, const double *a,
                                            const double *b, int relu) {
    BNFAST_PICK(bnfast_affine_tiled_f32d_base, bnfast_affine_tiled_f32d_avx2)(x, add, y, n, W, m, a, b, relu);
}
static inline void bnfast_affine_tiled_f64(const double *x, const double *add, double *y, ptrdiff_t n,
                                           ptrdiff_t W, const double *m, const double *a,
                                           const double *b, int relu) {
    BNFAST_PICK_Z(bnfast_affine_tiled_f64_base, bnfast_affine_tiled_f64_avx2,
                  bnfast_affine_tiled_f64_z)(x, add, y, n, W, m, a, b, relu);
}

/* ---------------------------------------------------------------------------
 * Streaming (non-temporal) twins of the float32 / float64 normalise leaves, for
 * outputs of _forward.pyx's STREAM_BYTES (4 MiB) and more.  movntps/movntpd skip the read for
 * ownership of every output line, a third of the pass's traffic: a normalise
 * of 12.8 MB went from 24 to 46 GB/s on one core (np.copyto streams too).
 * The same arithmetic per element in 16-byte SSE2 vectors (every x86-64), so
 * the same bits.  The caller streams only pieces that start 16-byte aligned
 * and span whole 16-byte groups (a line written partly by movnt and partly by
 * plain stores is very slow), and calls bnfast_nt_fence() before another
 * thread may read the output.  Elsewhere: the plain leaves.
 * ------------------------------------------------------------------------- */
#if BNFAST_VECTOR_EXT && defined(__SSE2__)
#include <emmintrin.h>
#include <stdint.h>
typedef float bnfast_ntv_float __attribute__((vector_size(16), aligned(4)));
typedef int32_t bnfast_nti_float __attribute__((vector_size(16)));
typedef double bnfast_ntv_double __attribute__((vector_size(16), aligned(8)));
typedef int64_t bnfast_nti_double __attribute__((vector_size(16)));
#define BNFAST_NT_STORE_float(p, v) _mm_stream_ps((p), (__m128)(v))
#define BNFAST_NT_STORE_double(p, v) _mm_stream_pd((p), (__m128d)(v))
#define BNFAST_NT_LD(T, p) (*(const bnfast_ntv_##T *)(p))
/* ReLU of a vector: 0 where v < 0, else v (NaN and -0.0 kept, as the scalar select). */
#define BNFAST_NT_RELU(T, v) \
    ((bnfast_ntv_##T)((bnfast_nti_##T)(v) & ~(bnfast_nti_##T)((v) < (bnfast_ntv_##T){0})))

/* The epilogue loops of BNFAST_EPILOGUE_LOOPS (T = U), vectors streamed, the
 * last n % lanes values plain. */
#define BNFAST_NT_EPILOGUE_LOOPS(T, AFFINE, AFFINE_V)                                \
    ptrdiff_t i, nv = n - n % (ptrdiff_t)(16 / sizeof(T));                           \
    T v;                                                                             \
    bnfast_ntv_##T w;                                                                \
    if (add == NULL && !relu) {                                                      \
        for (i = 0; i < nv; i += 16 / sizeof(T)) BNFAST_NT_STORE_##T(y + i, AFFINE_V); \
        for (; i < n; i++) y[i] = AFFINE;                                            \
    } else if (add == NULL) {                                                        \
        for (i = 0; i < nv; i += 16 / sizeof(T)) {                                   \
            w = AFFINE_V; BNFAST_NT_STORE_##T(y + i, BNFAST_NT_RELU(T, w));          \
        }                                                                            \
        for (; i < n; i++) { v = AFFINE; y[i] = v < 0 ? (T)0 : v; }                  \
    } else if (!relu) {                                                              \
        for (i = 0; i < nv; i += 16 / sizeof(T))                                     \
            BNFAST_NT_STORE_##T(y + i, (AFFINE_V) + BNFAST_NT_LD(T, add + i));       \
        for (; i < n; i++) y[i] = AFFINE + add[i];                                   \
    } else {                                                                         \
        for (i = 0; i < nv; i += 16 / sizeof(T)) {                                   \
            w = (AFFINE_V) + BNFAST_NT_LD(T, add + i);                               \
            BNFAST_NT_STORE_##T(y + i, BNFAST_NT_RELU(T, w));                        \
        }                                                                            \
        for (; i < n; i++) { v = AFFINE + add[i]; y[i] = v < 0 ? (T)0 : v; }         \
    }

#define BNFAST_DEFINE_AFFINE_NT(T, SFX)                                              \
    static void bnfast_affine_scalar_##SFX##_nt(const T *x, const T *add, T *y,      \
                                                ptrdiff_t n, T m, T a, T b, int relu) { \
        BNFAST_NT_EPILOGUE_LOOPS(T, (x[i] - m) * a + b,                              \
                                 (BNFAST_NT_LD(T, x + i) - m) * a + b)               \
    }                                                                                \
    static void bnfast_affine_tiled_##SFX##_nt(const T *x0, const T *add0, T *y0,    \
                                               ptrdiff_t total, ptrdiff_t W,         \
                                               const T *m, const T *a, const T *b,   \
                                               int relu) {                           \
        BNFAST_TILED_PIECES(T, BNFAST_NT_EPILOGUE_LOOPS(                             \
            T, (x[i] - m[i]) * a[i] + b[i],                                          \
            (BNFAST_NT_LD(T, x + i) - BNFAST_NT_LD(T, m + i)) * BNFAST_NT_LD(T, a + i) \
            + BNFAST_NT_LD(T, b + i)))                                               \
    }
BNFAST_DEFINE_AFFINE_NT(float, f32)
BNFAST_DEFINE_AFFINE_NT(double, f64)
BNFAST_DEFINE_AFFINE_RUNS(bnfast_affine_runs_f32_nt, float, , bnfast_affine_scalar_f32_nt)
static inline void bnfast_nt_fence(void) { _mm_sfence(); }
#else
#define bnfast_affine_scalar_f32_nt bnfast_affine_scalar_f32
#define bnfast_affine_scalar_f64_nt bnfast_affine_scalar_f64
#define bnfast_affine_tiled_f32_nt bnfast_affine_tiled_f32
#define bnfast_affine_tiled_f64_nt bnfast_affine_tiled_f64
#define bnfast_affine_runs_f32_nt bnfast_affine_runs_f32
static inline void bnfast_nt_fence(void) {}
#endif

#endif /* BNFAST_SIMD_H */
