/*
 * Channels-first runs on AVX-512 as one flat span: `runs` runs of S values
 * each (channel c, c + 1, ... modulo C) are contiguous, so they are walked 32
 * values a step straight across the runs' ends.  A step that straddles an end
 * takes each lane's coefficients from its own channel (a masked blend of the
 * two channels' broadcasts per coefficient and vector); S >= 32, so a step
 * meets at most one end, and the last (< 32) values all lie in the last run:
 * masked 16-value steps.  Three bodies share the walk: the forward's normalise,
 * the backward's dx in training, and that dx under the fused ReLU's mask.
 *
 * Why: a run-by-run leaf ends every run with a partial vector or a scalar
 * tail, and pays its loop set-up per run.  A 7x7 image's 49 values took two
 * overlapping 32-value steps (float16) or 32 + 16 + one scalar value
 * (bfloat16).  Walked flat, 49 values cost 49 lanes.  One thread, Xeon VM,
 * bfloat16 eval in L2, cycles a run: S = 36 22.1 -> 12.1, 49 17.3 -> 14.6,
 * 100 39.5 -> 27.8, 196 67 -> 62.
 *
 * Bits: every lane computes what the run-by-run leaves compute for it,
 * ((float)x - m) * a + b, the addend added as their BNFAST_H16_ADD, the ReLU
 * as their BNFAST_H16_RELU, and is rounded by the same conversion: the same
 * bits whatever the span (tests/test_flat_runs.py, tests/test_half_leaves.py,
 * tests/test_layouts.py).
 *
 * Alignment: loads and cached stores take any address; the streamed leaves
 * (_nt) go to the 64-byte line in masked steps first, which needs an output
 * aligned to its itemsize (the callers check: an out= view may not be).
 *
 * A storage type gives LOAD32(p, A, B), two float vectors of 32 values (the
 * even and odd ones for bfloat16, whose widening is then a shift and an and;
 * the first and last 16 for the others), MASKS(d, KA, KB), the lanes of A and
 * B at or after the step's d-th value, STORE32/STREAM32(p, A, B),
 * LOAD16M(k, p)/STORE16M(k, p, v), 16 values under a mask, and for the masked
 * dx LOAD32M (LOAD32 with masked-off values +0) and COPY32M/COPY16M (the
 * masked values' bits copied).
 */
#ifndef BNFAST_FLAT_RUNS_H
#define BNFAST_FLAT_RUNS_H

#include "bnfast_alias.h"
#include "bnfast_half_leaves.h"
#include "bnfast_backward_half.h"

#if BNFAST_DISPATCH_AVX2

#define BNFAST_FLAT_BCAST(v) ((bnfast_h16f)_mm512_set1_ps(v))
#define BNFAST_FLAT_BLEND(k, u, v) ((bnfast_h16f)_mm512_mask_blend_ps((k), (__m512)(u), (__m512)(v)))
/* Per coefficient row r (ROWS(X) applies X to each): its vectors for this
 * channel (r##0) and the next (r##1); a straddling step's per-lane ones for its
 * two vectors (r##A, r##B); the move to the next channel. */
#define BNFAST_FLAT_DECLARE(r) bnfast_h16f r##0 = BNFAST_FLAT_BCAST(r[c]), r##1 = BNFAST_FLAT_BCAST(r[cn]);
#define BNFAST_FLAT_SPLIT_ROW(r)                                                         \
    bnfast_h16f r##A = BNFAST_FLAT_BLEND(ka_, r##0, r##1), r##B = BNFAST_FLAT_BLEND(kb_, r##0, r##1);
#define BNFAST_FLAT_SHIFT(r) r##0 = r##1; r##1 = BNFAST_FLAT_BCAST(r[cn]);
/* The down walk's: channel cn into r##0 or r##1; the move to the channel below. */
#define BNFAST_FLAT_AT0(r) r##0 = BNFAST_FLAT_BCAST(r[cn]);
#define BNFAST_FLAT_AT1(r) r##1 = BNFAST_FLAT_BCAST(r[cn]);
#define BNFAST_FLAT_SHIFT_DOWN(r) r##1 = r##0; r##0 = BNFAST_FLAT_BCAST(r[cn]);
/* A step's coefficient of row r for one of its vectors: this channel's, or the
 * per-lane ones. */
#define BNFAST_FLAT_THIS(r) r##0
#define BNFAST_FLAT_UPPER(r) r##1
#define BNFAST_FLAT_IN_A(r) r##A
#define BNFAST_FLAT_IN_B(r) r##B

/* The walk over runs * S values of output OUT: the head to ALIGN bytes (1: none)
 * and the tail in masked steps of their channel, MASKED(K, ...) for the first k
 * <= 16 values from p (K = 2^k - 1; both lie within one run: fewer than 32 <= S
 * values); between them STEP(CA, CB, ...), the 32 values from p, CA/CB giving
 * its two vectors' coefficients; MASKS(d, KA, KB): the lanes from the step's
 * d-th value on, where the next channel starts within the step.  Up the span,
 * or (DOWN: bnfast_alias.h's bnfast_walk_down) the steps down from the top and
 * then the tail: each value computed by the same step either way.
 * Per row r, r##0 holds the lower channel and r##1 the upper one of the two a
 * step can meet. */
#define BNFAST_FLAT_WALK(T, OUT, ALIGN, DOWN, ROWS, MASKS, STEP, MASKED, ...)            \
    {                                                                                    \
        ptrdiff_t total = runs * S, p = 0, next = S, cn = c + 1 == C ? 0 : c + 1, k_;    \
        ptrdiff_t head = (ptrdiff_t)(((size_t)0 - (size_t)(OUT)) & ((ALIGN) - 1))       \
                         / (ptrdiff_t)sizeof(T);                                         \
        ROWS(BNFAST_FLAT_DECLARE)                                                        \
        if (head > total) head = total;                                                  \
        for (; p < head; p += k_) {                                                      \
            k_ = BNFAST_MIN(head - p, 16);                                               \
            MASKED((__mmask16)((1u << k_) - 1u), __VA_ARGS__)                            \
        }                                                                                \
        if ((DOWN) && total - p >= 32) {                                                 \
            ptrdiff_t low_ = p, end_ = p + (total - p) / 32 * 32, start_;                \
            /* the top step's last value: in channel cn + 1 (r##1), whose run */         \
            /* starts at start_; r##0 the channel below */                               \
            start_ = (end_ - 1) / S * S;                                                 \
            cn = (ptrdiff_t)((c + (end_ - 1) / S) % C);                                  \
            ROWS(BNFAST_FLAT_AT1)                                                        \
            if (cn-- == 0) cn = C - 1;                                                   \
            ROWS(BNFAST_FLAT_AT0)                                                        \
            for (p = end_ - 32; p >= low_; p -= 32) {                                    \
                if (start_ <= p) {                                                       \
                    STEP(BNFAST_FLAT_UPPER, BNFAST_FLAT_UPPER, __VA_ARGS__)              \
                } else {                                                                 \
                    __mmask16 ka_, kb_;                                                  \
                    MASKS((unsigned)(start_ - p), ka_, kb_);                             \
                    ROWS(BNFAST_FLAT_SPLIT_ROW)                                          \
                    STEP(BNFAST_FLAT_IN_A, BNFAST_FLAT_IN_B, __VA_ARGS__)                \
                }                                                                        \
                if (start_ >= p) {  /* the next step down lies below this run */         \
                    if (cn-- == 0) cn = C - 1;                                           \
                    ROWS(BNFAST_FLAT_SHIFT_DOWN)                                         \
                    start_ -= S;                                                         \
                }                                                                        \
            }                                                                            \
            /* then the tail below, in the last run's channel */                         \
            cn = (ptrdiff_t)((c + (total - 1) / S) % C);                                 \
            ROWS(BNFAST_FLAT_AT0)                                                        \
            p = end_;                                                                    \
        }                                                                                \
        for (; total - p >= 32; p += 32) {                                               \
            if (next - p >= 32) {                                                        \
                STEP(BNFAST_FLAT_THIS, BNFAST_FLAT_THIS, __VA_ARGS__)                    \
            } else {                                                                     \
                __mmask16 ka_, kb_;                                                      \
                MASKS((unsigned)(next - p), ka_, kb_);                                   \
                ROWS(BNFAST_FLAT_SPLIT_ROW)                                              \
                STEP(BNFAST_FLAT_IN_A, BNFAST_FLAT_IN_B, __VA_ARGS__)                    \
            }                                                                            \
            if (next - p <= 32) {  /* the next step starts in the next channel */        \
                if (++cn == C) cn = 0;                                                   \
                ROWS(BNFAST_FLAT_SHIFT)                                                  \
                next += S;                                                               \
            }                                                                            \
        }                                                                                \
        for (; p < total; p += k_) {                                                     \
            k_ = BNFAST_MIN(total - p, 16);                                              \
            MASKED((__mmask16)((1u << k_) - 1u), __VA_ARGS__)                            \
        }                                                                                \
    }

/* The normalise: y = relu?(((float)x - m) * a + b [+ (float)add]). */
#define BNFAST_FLAT_AFFINE_ROWS(X) X(m) X(a) X(b)
/* The + b with the product as the first source (BNFAST_H16_ADD): the NaN payload
 * the run-by-run leaves give where both are NaN.  GCC swapped the operands when
 * the walk gained its down loop (bfloat16 NaN data and NaN bias: b's payload,
 * tests/test_layouts.py). */
#define BNFAST_FLAT_AFFINE(v, X, CO, ADD, RELU, D)                                        \
    v = BNFAST_H16_ADD(((X) - CO(m)) * CO(a), CO(b));                                    \
    if (ADD) v = BNFAST_H16_ADD(v, D);                                                   \
    if (RELU) v = BNFAST_H16_RELU(v);
#define BNFAST_FLAT_AFFINE_STEP(CA, CB, LOAD32, STORE32, LOAD16M, STORE16M, ADD, RELU)    \
    {                                                                                    \
        bnfast_h16f xa_, xb_, da_ = {0}, db_ = {0};                                      \
        LOAD32(x + p, xa_, xb_);                                                         \
        if (ADD) LOAD32(add + p, da_, db_);                                              \
        BNFAST_FLAT_AFFINE(xa_, xa_, CA, ADD, RELU, da_)                                 \
        BNFAST_FLAT_AFFINE(xb_, xb_, CB, ADD, RELU, db_)                                 \
        STORE32(y + p, xa_, xb_);                                                        \
    }
#define BNFAST_FLAT_AFFINE_MASKED(k, LOAD32, STORE32, LOAD16M, STORE16M, ADD, RELU)       \
    {                                                                                    \
        bnfast_h16f v_;                                                                  \
        BNFAST_FLAT_AFFINE(v_, LOAD16M(k, x + p), BNFAST_FLAT_THIS, ADD, RELU,           \
                           (ADD ? LOAD16M(k, add + p) : v_))                             \
        STORE16M(k, y + p, v_);                                                          \
    }
#define BNFAST_FLAT_AFFINE_BODY(T, ALIGN, MASKS, ADD, RELU, ...)                          \
    BNFAST_FLAT_WALK(T, y, ALIGN, bnfast_walk_down(y, x, add), BNFAST_FLAT_AFFINE_ROWS,  \
                     MASKS, BNFAST_FLAT_AFFINE_STEP,                                     \
                     BNFAST_FLAT_AFFINE_MASKED, __VA_ARGS__, ADD, RELU)
/* runs of S values from channel c on (of C, wrapping), rows m, a, b of C floats. */
#define BNFAST_DEFINE_FLAT_RUNS(NAME, T, TARGET, MASKS, ALIGN, ...)                       \
    TARGET static inline void NAME(const T *x, const T *add, T *y, ptrdiff_t runs,       \
                                   ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, \
                                   const float *a, const float *b, int relu) {           \
        if (add == NULL && !relu)                                                        \
            BNFAST_FLAT_AFFINE_BODY(T, ALIGN, MASKS, 0, 0, __VA_ARGS__)                  \
        else if (add == NULL)                                                            \
            BNFAST_FLAT_AFFINE_BODY(T, ALIGN, MASKS, 0, 1, __VA_ARGS__)                  \
        else if (!relu)                                                                  \
            BNFAST_FLAT_AFFINE_BODY(T, ALIGN, MASKS, 1, 0, __VA_ARGS__)                  \
        else                                                                             \
            BNFAST_FLAT_AFFINE_BODY(T, ALIGN, MASKS, 1, 1, __VA_ARGS__)                  \
    }

/* The backward's dx: in training (TRAINING 1) ((float)dy - d) * a + ((float)x - m)
 * * b, the addition in the run-by-run leaves' operand order (BNFAST_H16_ADD); in
 * evaluation (0) (float)dy * a, x unread.  Rows per TRAINING. */
#define BNFAST_FLAT_GRAD_ROWS_1(X) X(m) X(a) X(b) X(d)
/* (x's vectors in evaluation, where they stay unread.) */
#define BNFAST_FLAT_UNREAD __attribute__((unused))
#define BNFAST_FLAT_GRAD_ROWS_0(X) X(a)
#define BNFAST_FLAT_DX_1(v, G, X, CO)                                                     \
    v = BNFAST_H16_ADD(((G) - CO(d)) * CO(a), ((X) - CO(m)) * CO(b));
#define BNFAST_FLAT_DX_0(v, G, X, CO) v = (G) * CO(a);
#define BNFAST_FLAT_GRAD_STEP(CA, CB, LOAD32, STORE32, LOAD16M, STORE16M, TRAINING)       \
    {                                                                                    \
        bnfast_h16f ga_, gb_;                                                            \
        bnfast_h16f xa_ BNFAST_FLAT_UNREAD = {0}, xb_ BNFAST_FLAT_UNREAD = {0};            \
        LOAD32(dy + p, ga_, gb_);                                                        \
        if (TRAINING) LOAD32(x + p, xa_, xb_);                                           \
        BNFAST_FLAT_DX_##TRAINING(ga_, ga_, xa_, CA)                                     \
        BNFAST_FLAT_DX_##TRAINING(gb_, gb_, xb_, CB)                                     \
        STORE32(dx + p, ga_, gb_);                                                       \
    }
#define BNFAST_FLAT_GRAD_MASKED(k, LOAD32, STORE32, LOAD16M, STORE16M, TRAINING)          \
    {                                                                                    \
        bnfast_h16f v_;                                                                  \
        BNFAST_FLAT_DX_##TRAINING(v_, LOAD16M(k, dy + p), LOAD16M(k, x + p),             \
                                  BNFAST_FLAT_THIS)                                      \
        STORE16M(k, dx + p, v_);                                                         \
    }
/* runs of S values from channel c on (of C, wrapping), rows m, a, b, d of C floats
 * (evaluation reads a only). */
#define BNFAST_DEFINE_FLAT_GRAD(NAME, T, TARGET, MASKS, ALIGN, TRAINING, ...)             \
    TARGET static inline void NAME(const T *x, const T *dy, T *dx, ptrdiff_t runs,      \
                                   ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, \
                                   const float *a, const float *b, const float *d)       \
        BNFAST_FLAT_WALK(T, dx, ALIGN, bnfast_walk_down(dx, dy, TRAINING ? x : NULL),    \
                         BNFAST_FLAT_GRAD_ROWS_##TRAINING, MASKS,                        \
                         BNFAST_FLAT_GRAD_STEP, BNFAST_FLAT_GRAD_MASKED, __VA_ARGS__, TRAINING)

/* The same with the fused ReLU's mask: dy where bit pos + i of bits is set, else
 * +0 (the run-by-run leaves' (T)0), and that masked dy's bits copied into g
 * when g is not NULL (g may be dy: each step reads dy before it writes g).
 * Cached stores only (the masked backward does not stream). */
#define BNFAST_FLAT_MGRAD_STEP(CA, CB, LOAD32, STORE32, LOAD16M, STORE16M, LOAD32M,       \
                               COPY32M, COPY16M, TRAINING)                                \
    {                                                                                    \
        uint32_t on_ = bnfast_flat_bits(bits, pos + p, 32);                              \
        bnfast_h16f ga_, gb_;                                                            \
        bnfast_h16f xa_ BNFAST_FLAT_UNREAD = {0}, xb_ BNFAST_FLAT_UNREAD = {0};            \
        LOAD32M(on_, dy + p, ga_, gb_);                                                  \
        if (TRAINING) LOAD32(x + p, xa_, xb_);                                           \
        if (g != NULL) COPY32M(on_, dy + p, g + p);                                      \
        BNFAST_FLAT_DX_##TRAINING(ga_, ga_, xa_, CA)                                     \
        BNFAST_FLAT_DX_##TRAINING(gb_, gb_, xb_, CB)                                     \
        STORE32(dx + p, ga_, gb_);                                                       \
    }
#define BNFAST_FLAT_MGRAD_MASKED(k, LOAD32, STORE32, LOAD16M, STORE16M, LOAD32M, COPY32M, \
                                 COPY16M, TRAINING)                                       \
    {                                                                                    \
        __mmask16 on_ = (__mmask16)bnfast_flat_bits(bits, pos + p,                        \
                                                    __builtin_popcount((unsigned)(k)));  \
        bnfast_h16f v_;                                                                  \
        BNFAST_FLAT_DX_##TRAINING(v_, LOAD16M(on_, dy + p), LOAD16M(k, x + p),           \
                                  BNFAST_FLAT_THIS)                                      \
        if (g != NULL) COPY16M(k, on_, dy + p, g + p);                                   \
        STORE16M(k, dx + p, v_);                                                         \
    }
#define BNFAST_DEFINE_FLAT_MGRAD(NAME, T, TARGET, MASKS, TRAINING, ...)                   \
    TARGET static inline void NAME(const T *x, const T *dy, const unsigned char *bits,   \
                                   ptrdiff_t pos, T *g, T *dx, ptrdiff_t runs,           \
                                   ptrdiff_t S, ptrdiff_t c, ptrdiff_t C, const float *m, \
                                   const float *a, const float *b, const float *d)       \
        BNFAST_FLAT_WALK(T, dx, 1, bnfast_walk_down(dx, dy, TRAINING ? x : NULL),        \
                         BNFAST_FLAT_GRAD_ROWS_##TRAINING, MASKS,                        \
                         BNFAST_FLAT_MGRAD_STEP, BNFAST_FLAT_MGRAD_MASKED, __VA_ARGS__,   \
                         TRAINING)
/* n <= 32 bits of the mask from bit q on (bit i of the result: bit q + i), read
 * byte by byte: no byte past the last one those bits need. */
static inline uint32_t bnfast_flat_bits(const unsigned char *bits, ptrdiff_t q, ptrdiff_t n) {
    const unsigned char *b = bits + (q >> 3);
    unsigned shift = (unsigned)(q & 7);
    ptrdiff_t bytes = ((ptrdiff_t)shift + n + 7) >> 3, i;
    uint64_t w = 0;
    for (i = 0; i < bytes; i++) w |= (uint64_t)b[i] << (8 * i);
    return (uint32_t)(w >> shift) & (n == 32 ? 0xffffffffu : (1u << n) - 1u);
}

/* Masks of a step whose d-th value (0 < d < 32) starts the next channel: the
 * first and last 16 values (SPLIT), or the even and odd ones (EO). */
#define BNFAST_FLAT_MASKS_SPLIT(d, KA, KB)                                               \
    {                                                                                    \
        uint32_t k_ = 0xffffffffu << (d);                                                \
        KA = (__mmask16)k_;                                                              \
        KB = (__mmask16)(k_ >> 16);                                                      \
    }
#define BNFAST_FLAT_MASKS_EO(d, KA, KB)                                                  \
    {                                                                                    \
        KA = (__mmask16)(0xffffu << (((d) + 1) / 2));                                    \
        KB = (__mmask16)(0xffffu << ((d) / 2));                                          \
    }

/* bfloat16 (bnfast_half.h's z variant): even and odd values of one load. */
#define BNFAST_FLAT_LOAD32_BF16(p, A, B)                                                 \
    {                                                                                    \
        __m512i w_ = _mm512_loadu_si512((const void *)(p));                              \
        A = (bnfast_h16f)_mm512_slli_epi32(w_, 16);                                      \
        B = (bnfast_h16f)_mm512_and_si512(w_, BNFAST_BF16_Z_K_(512, 4));                 \
    }
#define BNFAST_FLAT_LOAD16M_BF16(k, p) ((bnfast_h16f)_mm512_slli_epi32(                   \
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((k), (const void *)(p))), 16))
#define BNFAST_FLAT_STORE16M_BF16(k, p, v) \
    _mm256_mask_storeu_epi16((void *)(p), (k), bnfast_pack16_bf16_z(v))
#define BNFAST_FLAT_LOAD32M_BF16(k, p, A, B)                                             \
    {                                                                                    \
        __m512i w_ = _mm512_maskz_loadu_epi16((k), (const void *)(p));                   \
        A = (bnfast_h16f)_mm512_slli_epi32(w_, 16);                                      \
        B = (bnfast_h16f)_mm512_and_si512(w_, BNFAST_BF16_Z_K_(512, 4));                 \
    }
/* The 16-bit types' masked copies (the bits themselves). */
#define BNFAST_FLAT_COPY32M_16(k, src, dst) \
    _mm512_storeu_si512((void *)(dst), _mm512_maskz_loadu_epi16((k), (const void *)(src)))
#define BNFAST_FLAT_COPY16M_16(kn, k, src, dst)                                          \
    _mm256_mask_storeu_epi16((void *)(dst), (kn),                                        \
                             _mm256_maskz_loadu_epi16((k), (const void *)(src)))
/* The split types' 32 values as two 16-value loads, plainly (LOAD16(p)) or under
 * the mask k's halves (LOAD16M(k, p)). */
#define BNFAST_FLAT_SPLIT_LOAD32(LOAD16, p, A, B)                                        \
    {                                                                                    \
        A = LOAD16(p);                                                                   \
        B = LOAD16((p) + 16);                                                            \
    }
#define BNFAST_FLAT_SPLIT_LOAD32M(LOAD16M, k, p, A, B)                                   \
    {                                                                                    \
        A = LOAD16M((__mmask16)(k), p);                                                  \
        B = LOAD16M((__mmask16)((k) >> 16), (p) + 16);                                   \
    }
/* float16 (F16C's conversions on zmm, AVX512F). */
#define BNFAST_FLAT_LOAD32_F16(p, A, B) BNFAST_FLAT_SPLIT_LOAD32(bnfast_load16_f16_z, p, A, B)
#define BNFAST_FLAT_LOAD16M_F16(k, p) \
    ((bnfast_h16f)_mm512_cvtph_ps(_mm256_maskz_loadu_epi16((k), (const void *)(p))))
#define BNFAST_FLAT_STORE16M_F16(k, p, v) \
    _mm256_mask_storeu_epi16((void *)(p), (k), bnfast_pack16_f16_z(v))
#define BNFAST_FLAT_LOAD32M_F16(k, p, A, B) \
    BNFAST_FLAT_SPLIT_LOAD32M(BNFAST_FLAT_LOAD16M_F16, k, p, A, B)
/* float32. */
#define BNFAST_FLAT_LOAD16_F32(p) ((bnfast_h16f)_mm512_loadu_ps(p))
#define BNFAST_FLAT_LOAD32_F32(p, A, B) BNFAST_FLAT_SPLIT_LOAD32(BNFAST_FLAT_LOAD16_F32, p, A, B)
#define BNFAST_FLAT_LOAD16M_F32(k, p) ((bnfast_h16f)_mm512_maskz_loadu_ps((k), (p)))
#define BNFAST_FLAT_STORE16M_F32(k, p, v) _mm512_mask_storeu_ps((p), (k), (__m512)(v))
#define BNFAST_FLAT_STORE32_F32(p, A, B)                                                 \
    {                                                                                    \
        _mm512_storeu_ps((p), (__m512)(A));                                              \
        _mm512_storeu_ps((p) + 16, (__m512)(B));                                         \
    }
#define BNFAST_FLAT_LOAD32M_F32(k, p, A, B) \
    BNFAST_FLAT_SPLIT_LOAD32M(BNFAST_FLAT_LOAD16M_F32, k, p, A, B)
#define BNFAST_FLAT_COPY32M_F32(k, src, dst)                                             \
    {                                                                                    \
        _mm512_storeu_ps((dst), _mm512_maskz_loadu_ps((__mmask16)(k), (src)));           \
        _mm512_storeu_ps((dst) + 16, _mm512_maskz_loadu_ps((__mmask16)((k) >> 16), (src) + 16)); \
    }
#define BNFAST_FLAT_COPY16M_F32(kn, k, src, dst) \
    _mm512_mask_storeu_ps((dst), (kn), _mm512_maskz_loadu_ps((k), (src)))
#define BNFAST_FLAT_STREAM32_F32(p, A, B)                                                \
    {                                                                                    \
        _mm512_stream_ps((p), (__m512)(A));                                              \
        _mm512_stream_ps((p) + 16, (__m512)(B));                                         \
    }

#define BNFAST_FLAT_TARGET __attribute__((target("avx2,f16c,avx512f,avx512vl,avx512bw")))
BNFAST_DEFINE_CPU_CHECK(flat, BNFAST_CPU("avx2") && BNFAST_CPU("f16c") && BNFAST_CPU("avx512f")
                              && BNFAST_CPU("avx512vl") && BNFAST_CPU("avx512bw"))
/* Each type's normalise and dx, cached (ALIGN 1) and streamed (64-byte aligned
 * 32-value steps). */
#define BNFAST_DEFINE_FLAT_LEAVES(H, T, LOAD32, MASKS, STORE32, STREAM32, LOAD16M, STORE16M, \
                                  LOAD32M, COPY32M, COPY16M)                             \
    BNFAST_DEFINE_FLAT_RUNS(bnfast_flat_runs_##H, T, BNFAST_FLAT_TARGET, MASKS, 1,        \
                            LOAD32, STORE32, LOAD16M, STORE16M)                          \
    BNFAST_DEFINE_FLAT_RUNS(bnfast_flat_runs_##H##_nt, T, BNFAST_FLAT_TARGET, MASKS, 64,  \
                            LOAD32, STREAM32, LOAD16M, STORE16M)                         \
    BNFAST_FLAT_DX_LEAVES(H, T, grad, 1, LOAD32, MASKS, STORE32, STREAM32, LOAD16M,       \
                          STORE16M, LOAD32M, COPY32M, COPY16M)                           \
    BNFAST_FLAT_DX_LEAVES(H, T, scale, 0, LOAD32, MASKS, STORE32, STREAM32, LOAD16M,      \
                          STORE16M, LOAD32M, COPY32M, COPY16M)
/* dx in training (KIND grad, TRAINING 1) or evaluation (scale, 0): cached,
 * streamed, and under the mask (m: cached). */
#define BNFAST_FLAT_DX_LEAVES(H, T, KIND, TRAINING, LOAD32, MASKS, STORE32, STREAM32,     \
                              LOAD16M, STORE16M, LOAD32M, COPY32M, COPY16M)              \
    BNFAST_DEFINE_FLAT_GRAD(bnfast_flat_##KIND##_##H, T, BNFAST_FLAT_TARGET, MASKS, 1,    \
                            TRAINING, LOAD32, STORE32, LOAD16M, STORE16M)                \
    BNFAST_DEFINE_FLAT_GRAD(bnfast_flat_##KIND##_##H##_nt, T, BNFAST_FLAT_TARGET, MASKS,  \
                            64, TRAINING, LOAD32, STREAM32, LOAD16M, STORE16M)           \
    BNFAST_DEFINE_FLAT_MGRAD(bnfast_flat_m##KIND##_##H, T, BNFAST_FLAT_TARGET, MASKS,     \
                             TRAINING, LOAD32, STORE32, LOAD16M, STORE16M, LOAD32M,      \
                             COPY32M, COPY16M)
BNFAST_DEFINE_FLAT_LEAVES(bf16, bnfast_bf16, BNFAST_FLAT_LOAD32_BF16, BNFAST_FLAT_MASKS_EO,
                          bnfast_store32eo_bf16_z, bnfast_stream32eo_bf16_z,
                          BNFAST_FLAT_LOAD16M_BF16, BNFAST_FLAT_STORE16M_BF16,
                          BNFAST_FLAT_LOAD32M_BF16, BNFAST_FLAT_COPY32M_16, BNFAST_FLAT_COPY16M_16)
BNFAST_DEFINE_FLAT_LEAVES(f16, bnfast_f16, BNFAST_FLAT_LOAD32_F16, BNFAST_FLAT_MASKS_SPLIT,
                          bnfast_store32_f16_z, bnfast_stream32_f16_z,
                          BNFAST_FLAT_LOAD16M_F16, BNFAST_FLAT_STORE16M_F16,
                          BNFAST_FLAT_LOAD32M_F16, BNFAST_FLAT_COPY32M_16, BNFAST_FLAT_COPY16M_16)
BNFAST_DEFINE_FLAT_LEAVES(f32, float, BNFAST_FLAT_LOAD32_F32, BNFAST_FLAT_MASKS_SPLIT,
                          BNFAST_FLAT_STORE32_F32, BNFAST_FLAT_STREAM32_F32,
                          BNFAST_FLAT_LOAD16M_F32, BNFAST_FLAT_STORE16M_F32,
                          BNFAST_FLAT_LOAD32M_F32, BNFAST_FLAT_COPY32M_F32, BNFAST_FLAT_COPY16M_F32)

/* Whether runs of S values take the flat leaves: S >= 32 (a step meets at most
 * one run's end), on CPUs where the float16 leaves go to zmm from 32 values
 * (bnfast_half.h's BNFAST_F16_Z_MIN: from 128 on AMD's, whose zmm work is split
 * in two 256-bit halves), and for bfloat16 where AVX512-BF16's conversion is
 * not there (its run-by-run leaves convert 32 values in one instruction).  On
 * the Xeon VM, one thread, in L2, every S measured from 36 to 784 was as fast
 * or faster than run by run (bfloat16 S = 49 19.1 -> 14.9 cycles a run, float16
 * 13.8 -> 11.5, float32 20.7 -> 17.5). */
static inline int bnfast_flat_runs_taken_f32(ptrdiff_t S) {
    return S >= 32 && S >= BNFAST_F16_Z_MIN && bnfast_use_flat();
}
#define bnfast_flat_runs_taken_f16 bnfast_flat_runs_taken_f32
static inline int bnfast_flat_runs_taken_bf16(ptrdiff_t S) {
    return bnfast_flat_runs_taken_f32(S) && !bnfast_use_bf16_hw();
}
#else
/* Builds without the run-time dispatch (portable, non-x86) never take the
 * flat leaves; the names stand for the run-by-run leaves, for the callers' one
 * code path. */
#define BNFAST_FLAT_NONE(S) 0
#define bnfast_flat_runs_taken_f32 BNFAST_FLAT_NONE
#define bnfast_flat_runs_taken_f16 BNFAST_FLAT_NONE
#define bnfast_flat_runs_taken_bf16 BNFAST_FLAT_NONE
#define bnfast_flat_runs_f32 bnfast_affine_runs_f32_cached
#define bnfast_flat_runs_f16 bnfast_affine_runs_f16_cached
#define bnfast_flat_runs_bf16 bnfast_affine_runs_bf16_cached
#define bnfast_flat_runs_f32_nt bnfast_affine_runs_f32_nt
#define bnfast_flat_runs_f16_nt bnfast_affine_runs_f16_nt
#define bnfast_flat_runs_bf16_nt bnfast_affine_runs_bf16_nt
#endif

/* dx's entries for the Cython layer (src/_backward.pyx), as bnfast_affine_entries.h's
 * for the normalise: training or evaluation and cached or streamed by flags; the
 * masked ones (g: the masked dy, or NULL) cached.  Their bodies: the flat leaves,
 * or (builds without the dispatch: never taken there, see above) run by run. */
#if BNFAST_DISPATCH_AVX2
#define BNFAST_FLAT_GRAD_BODY(H)                                                         \
    (training ? (stream ? bnfast_flat_grad_##H##_nt : bnfast_flat_grad_##H)              \
              : (stream ? bnfast_flat_scale_##H##_nt : bnfast_flat_scale_##H))(          \
        x, dy, dx, runs, S, c, C, m, a, b, d);
#define BNFAST_FLAT_MGRAD_BODY(H)                                                        \
    (training ? bnfast_flat_mgrad_##H : bnfast_flat_mscale_##H)(                         \
        x, dy, bits, pos, g, dx, runs, S, c, C, m, a, b, d);
#else
#define BNFAST_FLAT_GRAD_BODY(H)                                                         \
    (void)stream;                                                                        \
    bnfast_flat_mgrad_##H##_s(x, dy, NULL, 0, NULL, dx, runs, S, c, C, m, a, b, d, training);
#define BNFAST_FLAT_MGRAD_BODY(H)                                                        \
    ptrdiff_t t;                                                                         \
    for (t = 0; t < runs; t++) {                                                         \
        bnfast_grad_run_scalar_##H(x + t * S, dy + t * S, bits, pos + t * S, S, m[c], a[c], \
                                   b[c], d[c], training, 0, dx + t * S,                  \
                                   g == NULL ? NULL : g + t * S);                        \
        if (++c == C) c = 0;                                                             \
    }
#endif
#define BNFAST_FLAT_GRAD_ENTRIES(H, T)                                                   \
    static inline void bnfast_flat_mgrad_##H##_s(const T *x, const T *dy,                \
                                                 const unsigned char *bits, ptrdiff_t pos, \
                                                 T *g, T *dx, ptrdiff_t runs, ptrdiff_t S, \
                                                 ptrdiff_t c, ptrdiff_t C, const float *m, \
                                                 const float *a, const float *b,         \
                                                 const float *d, int training) {         \
        BNFAST_FLAT_MGRAD_BODY(H)                                                        \
    }                                                                                    \
    static inline void bnfast_flat_grad_##H##_s(const T *x, const T *dy, T *dx,          \
                                                ptrdiff_t runs, ptrdiff_t S, ptrdiff_t c, \
                                                ptrdiff_t C, const float *m, const float *a, \
                                                const float *b, const float *d,          \
                                                int training, int stream) {              \
        BNFAST_FLAT_GRAD_BODY(H)                                                         \
    }
BNFAST_FLAT_GRAD_ENTRIES(f32, float)
BNFAST_FLAT_GRAD_ENTRIES(f16, bnfast_f16)
BNFAST_FLAT_GRAD_ENTRIES(bf16, bnfast_bf16)

#endif /* BNFAST_FLAT_RUNS_H */
