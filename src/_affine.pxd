# The normalise pass at the C level, run by the forward entry (_forward.pyx):
#
#   fill_table         per-channel mean, invstd, scale, shift in double, and
#                      from them the apply table (tiled for rows), see below
#                      (bnfast_table.h)
#   apply_first/_last  blocked apply over (N, C, S) or (M, C) rows:
#                      y = relu?((x - m) * a + b + addend?), ReLU mask packed
#   pack_block         the ReLU mask bits of a block (also relu_mask's)
#
# The table (table_len(W) doubles for W = repeat * C coefficients per row,
# the rows table_row(W) values apart):
#   [m | a | b]    3 rows of doubles: float64 data, and float32 and half data
#                  the float rows cannot carry, computed in double and rounded
#                  once (and half data's checked sum with an addend, beside the
#                  half rows: _checked)
#   [m | a | b]    3 rows of floats: float32 data, computed in float32 (as fast
#                  as a copy when in cache; double costs ~3x there)
#   [m | a | b]    3 half rows (floats): half data, the same map about its zero
#                  (m = z = mean - b / a, b = what rounding z moved), so float
#                  arithmetic errs by ~2^-22 of |y|, not of the terms that cancel
#                  in y: every output within an ulp of the half type
#   flag           1.0 if the float rows are usable: every channel's finite a
#                  and b fit float32 and its finite m has |m| <= 2^100, so
#                  x - m cannot overflow for finite x.  (One choice per table,
#                  so both layouts give the same bits.)  Otherwise float32
#                  data is computed in double:
#                  values near +-3e38 with a mean of 1e37 normalise to the exact
#                  result rounded (not -inf), and a constant channel with
#                  eps=1e-300 (scale 1e150) gives exactly the bias (not NaN).
#
# Batch statistics come as mean + residual (_batch_stats.pxd): the float64
# mean rounded to a double and what that rounding lost.  m is the rounded mean
# (a double, so x - m is exact for float64 data near it: Sterbenz) and the
# residual is folded into b, so the output error does not grow with the offset
# (float64 data at 1e10 with std 1 normalises to ~1e-15, not 1e-6).  The float
# rows round m to float32 and fold that error into b too (mean 1e6, std 1
# still normalises to ~1e-7).
# One read of x (and addend), one write of y; y may be x or addend itself
# (every element is read before it is written).
from _dtypes cimport bnfast_bf16, bnfast_f16, real_t
from cython.parallel cimport parallel

from _tiling cimport _gcd
from _openmp_helpers cimport (bnfast_claim, bnfast_claim_next, bnfast_claim_start, bnfast_shares,
                             bnfast_shares_init, bnfast_thread_num, threads_for)

cdef enum:
    # Elements per parallel task.
    BLOCK_ELEMS = 16384
    # ... of half-precision data: a task is a few microseconds of work either way,
    # and at 16384 the per-task cost showed (every task then handed out alone):
    # 2 threads, float16 (16, 64, 64, 64) eval 189 us, 32768: 183, 131072: 180
    # (bfloat16 186, 179, 172; float16 (4096, 1024) 214, 210, 203), in one
    # interleaved run.
    HALF_BLOCK_ELEMS = 131072
    # ... when the ReLU mask is packed from each block: small enough that the
    # block just written is still in L1 when it is read back.
    MASK_BLOCK_ELEMS = 2048


cdef extern from "bnfast_table.h" nogil:
    # The per-channel set-up in one pass (C: see there).
    Py_ssize_t table_row "bnfast_table_row"(Py_ssize_t W)
    Py_ssize_t table_len "bnfast_table_len"(Py_ssize_t W)
    void fill_table "bnfast_fill_table"(const double* mean, const double* var,
                                        const double* weight, const double* bias,
                                        const double* residual, Py_ssize_t C, double eps,
                                        Py_ssize_t repeat, double* coef, double* table)


cdef inline bint float_rows(const double* table, Py_ssize_t W) noexcept nogil:
    """Whether float32 and half data may use the table's float and half rows."""
    return table[table_len(W) - 1] != 0.0


cdef inline bint _checked(const real_t* kind, const double* table, Py_ssize_t W,
                          const real_t* addend) noexcept nogil:
    """Whether the checked leaves take the call: half data with an addend, the
    table fitting the float rows (bnfast_half_leaves.h's end: the addend may
    cancel the normalised value, and float's sum errs by 2^-24 of the terms,
    more than an ulp of a half output near 0).  They walk up and align their
    own streamed lines; where an input lies just behind the output they store
    cached."""
    if real_t is bnfast_f16 or real_t is bnfast_bf16:
        return addend != NULL and float_rows(table, W)
    return False


cdef inline const float* _rows_for(const real_t* kind, const double* table,
                                   Py_ssize_t W) noexcept nogil:
    """The float rows m, a, b (table_row(W) apart) that data of kind's type reads:
    the float rows, or for half data the half rows."""
    cdef Py_ssize_t R = table_row(W)
    cdef const float* ft = <const float*>(table + 3 * R)
    if real_t is bnfast_f16 or real_t is bnfast_bf16:
        return ft + 3 * R
    return ft


cdef extern from "bnfast_simd.h" nogil:
    # SIMD leaves (AVX2 picked at run time); the epilogue branches are hoisted there.
    void bnfast_affine_scalar_f32(const float* x, const float* add, float* y, Py_ssize_t n,
                                  float m, float a, float b, int relu)
    void bnfast_affine_scalar_f32d(const float* x, const float* add, float* y, Py_ssize_t n,
                                   double m, double a, double b, int relu)
    void bnfast_affine_scalar_f64(const double* x, const double* add, double* y, Py_ssize_t n,
                                  double m, double a, double b, int relu)
    void bnfast_affine_tiled_f32(const float* x, const float* add, float* y, Py_ssize_t n,
                                 Py_ssize_t W, const float* m, const float* a,
                                 const float* b, int relu)
    void bnfast_affine_tiled_f32d(const float* x, const float* add, float* y, Py_ssize_t n,
                                  Py_ssize_t W, const double* m, const double* a,
                                  const double* b, int relu)
    void bnfast_affine_tiled_f64(const double* x, const double* add, double* y, Py_ssize_t n,
                                 Py_ssize_t W, const double* m, const double* a, const double* b,
                                 int relu)
    void bnfast_affine_runs_f32(const float* x, const float* add, float* y, Py_ssize_t runs,
                                Py_ssize_t S, Py_ssize_t c, Py_ssize_t C, const float* m,
                                const float* a, const float* b, int relu)
    void bnfast_nt_fence()


cdef extern from "bnfast_half_leaves.h" nogil:
    # Half data with an addend: float, the sum checked and taken again in double
    # where it cancels (C: see there); add not NULL.
    void bnfast_checked_scalar_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                   Py_ssize_t n, float hz, float fa, float hb, double m,
                                   double a, double b, int relu, int stream)
    void bnfast_checked_scalar_bf16(const bnfast_bf16* x, const bnfast_bf16* add,
                                    bnfast_bf16* y, Py_ssize_t n, float hz, float fa, float hb,
                                    double m, double a, double b, int relu, int stream)
    void bnfast_checked_tiled_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                  Py_ssize_t n, Py_ssize_t W, const float* hz, const float* fa,
                                  const float* hb, const double* m, const double* a,
                                  const double* b, int relu, int stream)
    void bnfast_checked_tiled_bf16(const bnfast_bf16* x, const bnfast_bf16* add,
                                   bnfast_bf16* y, Py_ssize_t n, Py_ssize_t W, const float* hz,
                                   const float* fa, const float* hb, const double* m,
                                   const double* a, const double* b, int relu, int stream)


cdef extern from "bnfast_backward_simd.h" nogil:
    void bnfast_pack_positive_f32(const float* y, Py_ssize_t n, unsigned char* bits)
    void bnfast_pack_positive_f64(const double* y, Py_ssize_t n, unsigned char* bits)


cdef extern from "bnfast_half_leaves.h" nogil:
    # The float32 leaves' jobs on half-precision storage (staged, rounded once).
    void bnfast_affine_scalar_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                  Py_ssize_t n, float m, float a, float b, int relu)
    void bnfast_affine_scalar_f16d(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                   Py_ssize_t n, double m, double a, double b, int relu)
    void bnfast_affine_tiled_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                 Py_ssize_t n, Py_ssize_t W, const float* m, const float* a,
                                 const float* b, int relu)
    void bnfast_affine_tiled_f16d(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                  Py_ssize_t n, Py_ssize_t W, const double* m, const double* a,
                                  const double* b, int relu)
    void bnfast_affine_scalar_bf16(const bnfast_bf16* x, const bnfast_bf16* add, bnfast_bf16* y,
                                   Py_ssize_t n, float m, float a, float b, int relu)
    void bnfast_affine_scalar_bf16d(const bnfast_bf16* x, const bnfast_bf16* add,
                                    bnfast_bf16* y, Py_ssize_t n, double m, double a, double b,
                                    int relu)
    void bnfast_affine_tiled_bf16(const bnfast_bf16* x, const bnfast_bf16* add, bnfast_bf16* y,
                                  Py_ssize_t n, Py_ssize_t W, const float* m, const float* a,
                                  const float* b, int relu)
    void bnfast_affine_tiled_bf16d(const bnfast_bf16* x, const bnfast_bf16* add, bnfast_bf16* y,
                                   Py_ssize_t n, Py_ssize_t W, const double* m, const double* a,
                                   const double* b, int relu)
    void bnfast_affine_runs_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c, Py_ssize_t C,
                                const float* m, const float* a, const float* b, int relu)
    void bnfast_affine_runs_bf16(const bnfast_bf16* x, const bnfast_bf16* add, bnfast_bf16* y,
                                 Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c, Py_ssize_t C,
                                 const float* m, const float* a, const float* b, int relu)
    void bnfast_pack_positive_f16(const bnfast_f16* y, Py_ssize_t n, unsigned char* bits)
    void bnfast_pack_positive_bf16(const bnfast_bf16* y, Py_ssize_t n, unsigned char* bits)


cdef extern from "bnfast_rows.h" nogil:
    # Channels-last rows of C <= 128 channels, the float rows in registers.
    bint bnfast_affine_rows_f32_fits(Py_ssize_t C, const float* y, int stream)
    bint bnfast_affine_rows_f16_fits(Py_ssize_t C, const bnfast_f16* y, int stream)
    bint bnfast_affine_rows_bf16_fits(Py_ssize_t C, const bnfast_bf16* y, int stream)
    void bnfast_affine_rows_f32(const float* x, const float* add, float* y, Py_ssize_t rows,
                                Py_ssize_t C, const float* m, const float* a, const float* b,
                                int relu, int stream)
    void bnfast_affine_rows_f16(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                Py_ssize_t rows, Py_ssize_t C, const float* m, const float* a,
                                const float* b, int relu, int stream)
    void bnfast_affine_rows_bf16(const bnfast_bf16* x, const bnfast_bf16* add, bnfast_bf16* y,
                                 Py_ssize_t rows, Py_ssize_t C, const float* m, const float* a,
                                 const float* b, int relu, int stream)


cdef inline bint _rows_fit(const real_t* y, Py_ssize_t C, bint use_float,
                           bint stream) noexcept nogil:
    """Whether channels-last rows of C channels take bnfast_rows.h's leaves (float rows
    only; float64 keeps the table)."""
    if real_t is float:
        return use_float and bnfast_affine_rows_f32_fits(C, y, stream)
    elif real_t is bnfast_f16:
        return use_float and bnfast_affine_rows_f16_fits(C, y, stream)
    elif real_t is bnfast_bf16:
        return use_float and bnfast_affine_rows_bf16_fits(C, y, stream)
    else:
        return False


cdef inline void _apply_rows(const real_t* x, const real_t* addend, real_t* y, Py_ssize_t rows,
                             Py_ssize_t C, const float* ft, Py_ssize_t R, bint relu,
                             bint stream) noexcept nogil:
    # rows rows of C values (_rows_fit), the float rows m, a, b R apart from ft.
    if real_t is float:
        bnfast_affine_rows_f32(x, addend, y, rows, C, ft, ft + R, ft + 2 * R, relu, stream)
    elif real_t is bnfast_f16:
        bnfast_affine_rows_f16(x, addend, y, rows, C, ft, ft + R, ft + 2 * R, relu, stream)
    elif real_t is bnfast_bf16:
        bnfast_affine_rows_bf16(x, addend, y, rows, C, ft, ft + R, ft + 2 * R, relu, stream)


cdef extern from "bnfast_alias.h" nogil:
    bint bnfast_stream_stalls(const void* out, const void* in1, const void* in2)


cdef extern from "bnfast_affine_entries.h" nogil:
    # The leaves above on the float rows (and float64), cached or streamed by a flag.
    void bnfast_affine_scalar_f32_s(const float* x, const float* add, float* y, Py_ssize_t n,
                                    float m, float a, float b, int relu, int stream)
    void bnfast_affine_scalar_f64_s(const double* x, const double* add, double* y,
                                    Py_ssize_t n, double m, double a, double b, int relu,
                                    int stream)
    void bnfast_affine_scalar_f16_s(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                    Py_ssize_t n, float m, float a, float b, int relu,
                                    int stream)
    void bnfast_affine_scalar_bf16_s(const bnfast_bf16* x, const bnfast_bf16* add,
                                     bnfast_bf16* y, Py_ssize_t n, float m, float a, float b,
                                     int relu, int stream)
    void bnfast_affine_tiled_f32_s(const float* x, const float* add, float* y, Py_ssize_t n,
                                   Py_ssize_t W, const float* m, const float* a,
                                   const float* b, int relu, int stream)
    void bnfast_affine_tiled_f64_s(const double* x, const double* add, double* y,
                                   Py_ssize_t n, Py_ssize_t W, const double* m,
                                   const double* a, const double* b, int relu, int stream)
    void bnfast_affine_tiled_f16_s(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                   Py_ssize_t n, Py_ssize_t W, const float* m, const float* a,
                                   const float* b, int relu, int stream)
    void bnfast_affine_tiled_bf16_s(const bnfast_bf16* x, const bnfast_bf16* add,
                                    bnfast_bf16* y, Py_ssize_t n, Py_ssize_t W,
                                    const float* m, const float* a, const float* b, int relu,
                                    int stream)
    void bnfast_affine_runs_f32_s(const float* x, const float* add, float* y, Py_ssize_t runs,
                                  Py_ssize_t S, Py_ssize_t c, Py_ssize_t C, const float* m,
                                  const float* a, const float* b, int relu, int stream)
    void bnfast_affine_runs_f16_s(const bnfast_f16* x, const bnfast_f16* add, bnfast_f16* y,
                                  Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c, Py_ssize_t C,
                                  const float* m, const float* a, const float* b, int relu,
                                  int stream)
    void bnfast_affine_runs_bf16_s(const bnfast_bf16* x, const bnfast_bf16* add,
                                   bnfast_bf16* y, Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c,
                                   Py_ssize_t C, const float* m, const float* a,
                                   const float* b, int relu, int stream)
    bint bnfast_flat_runs_taken_f32(Py_ssize_t S)
    bint bnfast_flat_runs_taken_f16(Py_ssize_t S)
    bint bnfast_flat_runs_taken_bf16(Py_ssize_t S)
    bint bnfast_flat_tiles_taken_f32(Py_ssize_t W)
    bint bnfast_flat_tiles_taken_f16(Py_ssize_t W)
    bint bnfast_flat_tiles_taken_bf16(Py_ssize_t W)


cdef inline void pack_block(const real_t* y, Py_ssize_t start, Py_ssize_t n,
                             unsigned char* bits) noexcept nogil:
    """ReLU mask bits ``not (y <= 0)`` of y[start:start + n] into bits[start // 8:]
    (nothing when bits is NULL); the forward packs a block just written (still in
    cache), the backward's relu_mask a block of an output.

    ``start`` is a multiple of 8, so threads never share a byte.
    """
    if bits == NULL:
        return
    if real_t is float:
        bnfast_pack_positive_f32(y + start, n, bits + start // 8)
    elif real_t is double:
        bnfast_pack_positive_f64(y + start, n, bits + start // 8)
    elif real_t is bnfast_f16:
        bnfast_pack_positive_f16(y + start, n, bits + start // 8)
    else:
        bnfast_pack_positive_bf16(y + start, n, bits + start // 8)


cdef inline Py_ssize_t _block_elems(bint half, Py_ssize_t total,
                                    unsigned char* bits) noexcept nogil:
    """Elements per parallel task of the normalise pass over ``total`` values (half:
    half-precision data, in tasks of up to HALF_BLOCK_ELEMS but at least 16 tasks
    where BLOCK_ELEMS allows them, so medium arrays still split evenly)."""
    if bits != NULL:
        return MASK_BLOCK_ELEMS
    if not half:
        return BLOCK_ELEMS
    return min(<Py_ssize_t>HALF_BLOCK_ELEMS, max(<Py_ssize_t>BLOCK_ELEMS, total // 16))


cdef inline Py_ssize_t _byte_aligned(Py_ssize_t units, Py_ssize_t unit_len) noexcept nogil:
    """units rounded up so that units * unit_len is a multiple of 8 (whole mask bytes)."""
    cdef Py_ssize_t step = 8 // _gcd(unit_len, 8)
    return (units + step - 1) // step * step


cdef inline void _apply_scalar(const real_t* x, const real_t* addend, real_t* y,
                               Py_ssize_t n, const double* table, Py_ssize_t W, Py_ssize_t c,
                               bint use_float, bint relu, bint stream) noexcept nogil:
    # Channel c of the table: its float rows (use_float) or its double rows;
    # stream: non-temporal stores (float32 and half on float rows, float64).
    cdef Py_ssize_t R = table_row(W)
    cdef const float* ft = _rows_for(x, table, W)
    if real_t is double:
        bnfast_affine_scalar_f64_s(x, addend, y, n, table[c], table[R + c], table[2 * R + c],
                                   relu, stream)
    elif use_float:
        if real_t is float:
            bnfast_affine_scalar_f32_s(x, addend, y, n, ft[c], ft[R + c], ft[2 * R + c], relu,
                                       stream)
        elif real_t is bnfast_f16:
            bnfast_affine_scalar_f16_s(x, addend, y, n, ft[c], ft[R + c], ft[2 * R + c], relu,
                                       stream)
        else:
            bnfast_affine_scalar_bf16_s(x, addend, y, n, ft[c], ft[R + c], ft[2 * R + c], relu,
                                        stream)
    elif real_t is bnfast_f16 and float_rows(table, W):  # use_float false: _checked
        bnfast_checked_scalar_f16(x, addend, y, n, ft[c], ft[R + c], ft[2 * R + c], table[c],
                                  table[R + c], table[2 * R + c], relu, stream)
    elif real_t is bnfast_bf16 and float_rows(table, W):
        bnfast_checked_scalar_bf16(x, addend, y, n, ft[c], ft[R + c], ft[2 * R + c], table[c],
                                   table[R + c], table[2 * R + c], relu, stream)
    else:
        if real_t is float:
            bnfast_affine_scalar_f32d(x, addend, y, n, table[c], table[R + c],
                                      table[2 * R + c], relu)
        elif real_t is bnfast_f16:
            bnfast_affine_scalar_f16d(x, addend, y, n, table[c], table[R + c],
                                      table[2 * R + c], relu)
        else:
            bnfast_affine_scalar_bf16d(x, addend, y, n, table[c], table[R + c],
                                       table[2 * R + c], relu)


cdef inline void _apply_tiled(const real_t* x, const real_t* addend, real_t* y,
                              Py_ssize_t n, Py_ssize_t W, const double* tile,
                              bint use_float, bint relu, bint stream) noexcept nogil:
    # n values from a W-aligned start, as pieces of the W-long tile (stream: see
    # _apply_scalar).
    cdef Py_ssize_t R = table_row(W)
    cdef const float* ft = _rows_for(x, tile, W)
    if real_t is double:
        bnfast_affine_tiled_f64_s(x, addend, y, n, W, tile, tile + R, tile + 2 * R, relu, stream)
    elif use_float:
        if real_t is float:
            bnfast_affine_tiled_f32_s(x, addend, y, n, W, ft, ft + R, ft + 2 * R, relu, stream)
        elif real_t is bnfast_f16:
            bnfast_affine_tiled_f16_s(x, addend, y, n, W, ft, ft + R, ft + 2 * R, relu, stream)
        else:
            bnfast_affine_tiled_bf16_s(x, addend, y, n, W, ft, ft + R, ft + 2 * R, relu, stream)
    elif real_t is bnfast_f16 and float_rows(tile, W):  # use_float false: _checked
        bnfast_checked_tiled_f16(x, addend, y, n, W, ft, ft + R, ft + 2 * R, tile, tile + R,
                                 tile + 2 * R, relu, stream)
    elif real_t is bnfast_bf16 and float_rows(tile, W):
        bnfast_checked_tiled_bf16(x, addend, y, n, W, ft, ft + R, ft + 2 * R, tile, tile + R,
                                  tile + 2 * R, relu, stream)
    else:
        if real_t is float:
            bnfast_affine_tiled_f32d(x, addend, y, n, W, tile, tile + R, tile + 2 * R, relu)
        elif real_t is bnfast_f16:
            bnfast_affine_tiled_f16d(x, addend, y, n, W, tile, tile + R, tile + 2 * R, relu)
        else:
            bnfast_affine_tiled_bf16d(x, addend, y, n, W, tile, tile + R, tile + 2 * R, relu)


cdef inline void _apply_runs(const real_t* x, const real_t* addend, real_t* y, Py_ssize_t runs,
                             Py_ssize_t S, Py_ssize_t c, Py_ssize_t C, const float* ft,
                             bint relu, bint stream) noexcept nogil:
    # Consecutive runs from channel c on, with the table's float rows (not for double).
    cdef const float* fa = ft + table_row(C)
    cdef const float* fb = ft + 2 * table_row(C)
    if real_t is float:
        bnfast_affine_runs_f32_s(x, addend, y, runs, S, c, C, ft, fa, fb, relu, stream)
    elif real_t is bnfast_f16:
        bnfast_affine_runs_f16_s(x, addend, y, runs, S, c, C, ft, fa, fb, relu, stream)
    elif real_t is bnfast_bf16:
        bnfast_affine_runs_bf16_s(x, addend, y, runs, S, c, C, ft, fa, fb, relu, stream)


cdef inline void _first_block(const real_t* xp, const real_t* ap, real_t* yp,
                              Py_ssize_t runs, Py_ssize_t C, Py_ssize_t S,
                              Py_ssize_t first, Py_ssize_t last, const double* table,
                              bint use_float, bint relu, unsigned char* bits,
                              bint stream) noexcept nogil:
    """Runs [first, last) of (N, C, S): run t is channel t % C, S values long."""
    cdef Py_ssize_t t, off, c = first % C  # one division per block, then stepped
    cdef const float* ft = _rows_for(xp, table, C)
    cdef const real_t* ax = ap if ap == NULL else ap + first * S
    # Float rows: the block's runs in one leaf call (the choice hoisted out of the
    # run loop, the call and pick paid per block, not per run).
    if real_t is double:
        pass
    elif use_float:
        _apply_runs(xp + first * S, ax, yp + first * S, last - first, S, c, C, ft, relu,
                    stream)
        if stream:
            bnfast_nt_fence()
        pack_block(yp, first * S, (last - first) * S, bits)
        return
    for t in range(first, last):
        off = t * S
        _apply_scalar(xp + off, ap if ap == NULL else ap + off, yp + off, S,
                      table, C, c, use_float, relu, stream)
        c = c + 1
        if c == C:
            c = 0
    if stream:
        bnfast_nt_fence()
    pack_block(yp, first * S, (last - first) * S, bits)


cdef inline bint _streamable(const void* y, Py_ssize_t piece_bytes, bint use_float,
                             bint float_data, bint half_data, unsigned char* bits,
                             const void* x, const void* addend) noexcept nogil:
    """Whether an output may take non-temporal stores in the run-by-run leaves:
    pieces (runs, tiles) that start on 16-byte boundaries (a line written partly
    by movnt and partly by plain stores is very slow), a streaming leaf for the
    type (float32 and half data on float rows, float64), no mask to pack from the
    block just written (it would come back from memory, not L1), and no input
    just behind the output modulo 4 KiB (bnfast_alias.h: 13-17x slower)."""
    return ((<size_t>y) % 16 == 0 and piece_bytes % 16 == 0 and bits == NULL
            and (use_float or not (float_data or half_data))
            and not bnfast_stream_stalls(y, x, addend))


cdef inline bint flat_runs_taken(const real_t* kind, Py_ssize_t S) noexcept nogil:
    """Whether channels-first runs of S values of kind's type take the flat leaves
    (bnfast_flat_runs.h: the normalise on float rows, the backward's dx; they
    align their own non-temporal stores)."""
    if real_t is float:
        return bnfast_flat_runs_taken_f32(S)
    elif real_t is bnfast_f16:
        return bnfast_flat_runs_taken_f16(S)
    elif real_t is bnfast_bf16:
        return bnfast_flat_runs_taken_bf16(S)
    else:
        return False


cdef inline bint flat_tiles_taken(const real_t* kind, Py_ssize_t W) noexcept nogil:
    """Whether streamed channels-last tiles of W values of kind's type take the flat
    leaves (bnfast_flat_tiles.h: on float rows; they align their own non-temporal
    stores)."""
    if real_t is float:
        return bnfast_flat_tiles_taken_f32(W)
    elif real_t is bnfast_f16:
        return bnfast_flat_tiles_taken_f16(W)
    elif real_t is bnfast_bf16:
        return bnfast_flat_tiles_taken_bf16(W)
    else:
        return False


cdef inline void apply_first(const real_t* xp, const real_t* ap, real_t* yp,
                             Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, const double* table,
                             bint relu, int n_threads, unsigned char* bits,
                             bint stream) noexcept nogil:
    """relu?((x - m) * a + b + addend?) over (N, C, S); table: fill_table's, untiled.
    stream: the output is STREAM_BYTES (4 MiB) or more (non-temporal stores where
    _streamable allows)."""
    # Tasks are blocks of consecutive (n, c) runs.
    cdef Py_ssize_t runs = N * C
    cdef Py_ssize_t elems = _block_elems(real_t is bnfast_f16 or real_t is bnfast_bf16,
                                         runs * S, bits)
    cdef Py_ssize_t per_block = _byte_aligned(elems // S if S < elems else 1, S)
    cdef Py_ssize_t blocks = (runs + per_block - 1) // per_block
    cdef Py_ssize_t blk = 0
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(blocks, runs * S, n_threads)
    cdef bint checked = _checked(xp, table, C, ap)
    cdef bint use_float = float_rows(table, C) and not checked
    if use_float and flat_runs_taken(yp, S) or checked:
        # Any S, any element-aligned start: the leaves align their 64-byte stores
        # (an out= view may be misaligned, which only plain stores take).
        stream = (stream and bits == NULL and (<size_t>yp) % sizeof(real_t) == 0
                  and (use_float or not bnfast_stream_stalls(yp, xp, ap)))
    else:
        stream = stream and _streamable(yp, S * sizeof(real_t), use_float, real_t is float,
                                        real_t is bnfast_f16 or real_t is bnfast_bf16, bits,
                                        xp, ap)
    if nt == 1:  # no parallel region at all: entering one costs ~1 us even for 1 thread
        for blk in range(blocks):
            _first_block(xp, ap, yp, runs, C, S, blk * per_block,
                         min(runs, (blk + 1) * per_block), table, use_float, relu, bits,
                         stream)
        return
    bnfast_shares_init(&shares, blocks, nt)
    with parallel(num_threads=nt):
        claim = bnfast_claim_start(&shares, bnfast_thread_num())
        blk = bnfast_claim_next(&shares, &claim)
        while blk >= 0:
            _first_block(xp, ap, yp, runs, C, S, blk * per_block,
                         min(runs, (blk + 1) * per_block), table, use_float, relu, bits, stream)
            blk = bnfast_claim_next(&shares, &claim)


cdef inline void _last_block(const real_t* xp, const real_t* ap, real_t* yp,
                             Py_ssize_t start, Py_ssize_t stop, Py_ssize_t W, Py_ssize_t C,
                             const double* tile, bint use_float, bint in_rows, bint relu,
                             unsigned char* bits, bint stream) noexcept nogil:
    """Values [start, stop) of the flat (M, C) array; start is a multiple of W.
    in_rows: rows the registers hold (_rows_fit)."""
    if in_rows:
        _apply_rows(xp + start, ap if ap == NULL else ap + start, yp + start,
                    (stop - start) // C, C, _rows_for(xp, tile, W),
                    table_row(W), relu, stream)
    else:
        _apply_tiled(xp + start, ap if ap == NULL else ap + start, yp + start, stop - start, W,
                     tile, use_float, relu, stream)
    if stream:
        bnfast_nt_fence()
    pack_block(yp, start, stop - start, bits)


cdef inline void apply_last(const real_t* xp, const real_t* ap, real_t* yp,
                            Py_ssize_t M, Py_ssize_t C, Py_ssize_t k, const double* tile,
                            bint relu, int n_threads, unsigned char* bits,
                            bint stream) noexcept nogil:
    """The same over (M, C) rows; tile: fill_table's with the channels repeated k times."""
    # The coefficient pattern repeats every C values of the flat array: tiled
    # k times, small C still gives long vector loops.  Every W-aligned piece
    # starts at channel 0, so a short last piece needs no special case.
    cdef Py_ssize_t W = k * C, total = M * C
    cdef Py_ssize_t elems = _block_elems(real_t is bnfast_f16 or real_t is bnfast_bf16, total,
                                         bits)
    cdef Py_ssize_t per_block = _byte_aligned(elems // W if W < elems else 1, W) * W
    cdef Py_ssize_t blocks = (total + per_block - 1) // per_block
    cdef Py_ssize_t blk = 0
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(blocks, total, n_threads)
    cdef bint checked = _checked(xp, tile, W, ap)
    cdef bint use_float = float_rows(tile, W) and not checked
    if use_float and flat_tiles_taken(yp, W) or checked:
        # Any element-aligned start: the leaves align their 64-byte stores (see
        # apply_first).
        stream = (stream and bits == NULL and (<size_t>yp) % sizeof(real_t) == 0
                  and (use_float or not bnfast_stream_stalls(yp, xp, ap)))
    else:
        stream = stream and _streamable(yp, W * sizeof(real_t), use_float, real_t is float,
                                        real_t is bnfast_f16 or real_t is bnfast_bf16, bits,
                                        xp, ap)
    cdef bint in_rows = _rows_fit(yp, C, use_float, stream)
    # The register rows walk up: where that stalls (bnfast_alias.h) the flat tiles
    # take the rows (they walk down there), or else the rows store cached.
    if in_rows and stream and bnfast_stream_stalls(yp, xp, ap):
        if flat_tiles_taken(yp, W):
            in_rows = False
        else:
            stream = False
            in_rows = _rows_fit(yp, C, use_float, stream)
    if nt == 1:  # see apply_first
        for blk in range(blocks):
            _last_block(xp, ap, yp, blk * per_block, min(total, (blk + 1) * per_block), W, C,
                        tile, use_float, in_rows, relu, bits, stream)
        return
    bnfast_shares_init(&shares, blocks, nt)
    with parallel(num_threads=nt):
        claim = bnfast_claim_start(&shares, bnfast_thread_num())
        blk = bnfast_claim_next(&shares, &claim)
        while blk >= 0:
            _last_block(xp, ap, yp, blk * per_block, min(total, (blk + 1) * per_block), W, C,
                        tile, use_float, in_rows, relu, bits, stream)
            blk = bnfast_claim_next(&shares, &claim)
