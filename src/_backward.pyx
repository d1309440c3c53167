"""The backward entry: every batch norm backward, functional or module, plain or
fused, reaches the kernels here (and ``relu_mask`` reaches ``pack_positive``).

With ``dy`` the output gradient (masked by the ReLU for the fused variant),
per channel ``sum_dy = sum(dy)`` and ``sum_xdy = sum((x - mean) * dy)``, and
``a = invstd * weight``:

* training: ``dx = (dy - sum_dy/n - (x - mean) * invstd**2 * sum_xdy/n) * a``
* eval:     ``dx = dy * a``
* ``grad_weight = sum_xdy * invstd``, ``grad_bias = sum_dy``.

Two passes over the data, in the forward's two memory layouts:

1. reduce: both sums in ONE read of ``x`` and ``dy`` (double accumulation,
   8 fixed lanes, see ``bnfast_simd.h``).  The work is cut by the shape only
   and the partials are merged in a fixed order, so any thread count gives
   the same bits.
2. apply: ``dx = (dy - d) * a + (x - m) * b`` per element, in the compute
   type: double for float64 data, float for float32, float16 and bfloat16.
   ``d`` and ``m`` are the zeros of the two terms, dy's mean rounded to the
   compute type and the mean with what that rounding lost (bnfast_table.h):
   where dy lies near its mean, or x near its (mean 1e6, std 1), the
   difference is exact and the float arithmetic errs by ~2^-24 of dx, not of
   ``dy * a``.  From bnfast.backward.streams' size on (4 MiB), dx takes
   non-temporal stores.

Half-precision data (float16, bfloat16) runs the same kernels: its leaves
(``bnfast_backward_half.h``) widen it exactly (in registers, or staged) and do
the float32 leaves' arithmetic, so its sums are those of the same values stored
as float32 and its dx is float32's, rounded once.

The fused variant reads the ReLU mask packed 8 per byte (``pack_positive``,
1/32 of a float32 copy) and applies it on the fly, inside the SIMD leaves
(``bnfast_backward_simd.h``).  When the addend's gradient ``g`` is wanted,
pass 1 writes it, and pass 2 reads it instead of ``dy`` and the mask.

Nothing here validates: ``bnfast.backward`` has checked and laid out every
argument (the contract is in :func:`backward`'s docstring).  The dtype switch
happens here, on the NumPy type number; the kernels have one body per mode.
Work below ``SERIAL_ELEMS`` values runs without entering an OpenMP region.
"""
cimport cython
cimport numpy as cnp
from cython.parallel cimport parallel
from _aligned cimport aligned_free, aligned_malloc

from _affine cimport bnfast_stream_stalls, flat_runs_taken, flat_tiles_taken, pack_block
from _arrays cimport Shape, data_or_null, kernel_shape, load_doubles
from _dtypes cimport CHANNELS_FIRST, bnfast_bf16, bnfast_f16, real_t, store_double, to_double
from _openmp_helpers cimport (bnfast_claim, bnfast_claim_next, bnfast_claim_start, bnfast_shares,
                             bnfast_shares_init, bnfast_thread_num, threads_for)
from _moments cimport bnfast_group_sums
from _tiling cimport (APPLY_WIDTH, COLS_MAX_S_DOT, COLS_TILE, ColumnTasks, ColumnTiles,
                     RowBlocks, SampleTasks, by_columns, column_tasks, column_tiles,
                     repeat_channels, row_blocks, sample_tasks, tile_repeat)

cnp.import_array()

cdef extern from "bnfast_backward_simd.h" nogil:
    void bnfast_centered_dot_runs_f32(const float* x, const float* y, Py_ssize_t runs,
                                      Py_ssize_t n, const double* shift, double* sy,
                                      double* sxy)
    void bnfast_centered_dot_runs_f64(const double* x, const double* y, Py_ssize_t runs,
                                      Py_ssize_t n, const double* shift, double* sy,
                                      double* sxy)
    void bnfast_centered_coldot_f32(const float* x, const float* y, Py_ssize_t rows,
                                    Py_ssize_t W, Py_ssize_t stride, const double* shift,
                                    double* sy, double* sxy)
    void bnfast_centered_coldot_f64(const double* x, const double* y, Py_ssize_t rows,
                                    Py_ssize_t W, Py_ssize_t stride, const double* shift,
                                    double* sy, double* sxy)
    void bnfast_centered_dot_masked_f32(const float* x, const float* y, const unsigned char* bits,
                                        Py_ssize_t pos, Py_ssize_t n, double shift, double* sy,
                                        double* sxy, float* g)
    void bnfast_centered_dot_masked_f64(const double* x, const double* y,
                                        const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                        double shift, double* sy, double* sxy, double* g)
    void bnfast_centered_coldot_masked_f32(const float* x, const float* y,
                                           const unsigned char* bits, Py_ssize_t pos,
                                           Py_ssize_t rows, Py_ssize_t W, Py_ssize_t stride,
                                           const double* shift, double* sy, double* sxy,
                                           float* g)
    void bnfast_centered_coldot_masked_f64(const double* x, const double* y,
                                           const unsigned char* bits, Py_ssize_t pos,
                                           Py_ssize_t rows, Py_ssize_t W, Py_ssize_t stride,
                                           const double* shift, double* sy, double* sxy,
                                           double* g)
    void bnfast_grad_runs_f32(const float* x, const float* dy, float* dx, Py_ssize_t runs,
                              Py_ssize_t n, const float* m, const float* a, const float* b,
                              const float* d)
    void bnfast_grad_runs_f64(const double* x, const double* dy, double* dx, Py_ssize_t runs,
                              Py_ssize_t n, const double* m, const double* a, const double* b,
                              const double* d)
    void bnfast_stream_fence()
    # dx (and, masked, the addend's gradient g) of one run: every variant behind one entry.
    void bnfast_grad_run_scalar_f32(const float* x, const float* dy, const unsigned char* bits,
                                    Py_ssize_t pos, Py_ssize_t n, float m, float a, float b,
                                    float d, int training, int stream, float* dx, float* g)
    void bnfast_grad_run_scalar_f64(const double* x, const double* dy,
                                    const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                    double m, double a, double b, double d, int training,
                                    int stream, double* dx, double* g)
    void bnfast_grad_run_tiled_f32(const float* x, const float* dy, const unsigned char* bits,
                                   Py_ssize_t pos, Py_ssize_t n, const float* m, const float* a,
                                   const float* b, const float* d, int training, int stream,
                                   float* dx, float* g)
    void bnfast_grad_run_tiled_f64(const double* x, const double* dy,
                                   const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                   const double* m, const double* a, const double* b,
                                   const double* d, int training, int stream, double* dx,
                                   double* g)


cdef extern from "bnfast_rows.h" nogil:
    # Channels-last float32 rows of C <= 96 channels, pass 2's rows in registers.
    bint bnfast_grad_rows_f32_fits(Py_ssize_t C, const float* dx, int stream)
    void bnfast_grad_rows_f32(const float* x, const float* dy, float* dx, Py_ssize_t rows,
                              Py_ssize_t C, const float* m, const float* a, const float* b,
                              const float* d, int stream)


cdef extern from "bnfast_flat_runs.h" nogil:
    # Channels-first dx on AVX-512, a block's runs as one span, in training or
    # evaluation (cached, or streamed from any element-aligned start: the leaves
    # align their 64-byte stores), where _affine's flat_runs_taken says so.
    void bnfast_flat_grad_f32_s(const float* x, const float* dy, float* dx, Py_ssize_t runs,
                                Py_ssize_t S, Py_ssize_t c, Py_ssize_t C, const float* m,
                                const float* a, const float* b, const float* d, int training,
                                int stream)
    void bnfast_flat_grad_f16_s(const bnfast_f16* x, const bnfast_f16* dy, bnfast_f16* dx,
                                Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c, Py_ssize_t C,
                                const float* m, const float* a, const float* b,
                                const float* d, int training, int stream)
    void bnfast_flat_grad_bf16_s(const bnfast_bf16* x, const bnfast_bf16* dy,
                                 bnfast_bf16* dx, Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c,
                                 Py_ssize_t C, const float* m, const float* a, const float* b,
                                 const float* d, int training, int stream)
    # The same with the fused ReLU's mask (bits from bit pos on), g: the masked dy.
    void bnfast_flat_mgrad_f32_s(const float* x, const float* dy, const unsigned char* bits,
                                 Py_ssize_t pos, float* g, float* dx, Py_ssize_t runs,
                                 Py_ssize_t S, Py_ssize_t c, Py_ssize_t C, const float* m,
                                 const float* a, const float* b, const float* d, int training)
    void bnfast_flat_mgrad_f16_s(const bnfast_f16* x, const bnfast_f16* dy,
                                 const unsigned char* bits, Py_ssize_t pos, bnfast_f16* g,
                                 bnfast_f16* dx, Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c,
                                 Py_ssize_t C, const float* m, const float* a, const float* b,
                                 const float* d, int training)
    void bnfast_flat_mgrad_bf16_s(const bnfast_bf16* x, const bnfast_bf16* dy,
                                  const unsigned char* bits, Py_ssize_t pos, bnfast_bf16* g,
                                  bnfast_bf16* dx, Py_ssize_t runs, Py_ssize_t S, Py_ssize_t c,
                                  Py_ssize_t C, const float* m, const float* a, const float* b,
                                  const float* d, int training)


cdef extern from "bnfast_flat_tiles.h" nogil:
    # Channels-last streamed dx on AVX-512 (no mask), a block of tiles as one span,
    # in training or evaluation, from any element-aligned start, where _affine's
    # flat_tiles_taken says so.
    void bnfast_flat_tiles_grad_f32_s(const float* x, const float* dy, float* dx, Py_ssize_t n,
                                      Py_ssize_t W, const float* m, const float* a,
                                      const float* b, const float* d, int training)
    void bnfast_flat_tiles_grad_f16_s(const bnfast_f16* x, const bnfast_f16* dy, bnfast_f16* dx,
                                      Py_ssize_t n, Py_ssize_t W, const float* m,
                                      const float* a, const float* b, const float* d,
                                      int training)
    void bnfast_flat_tiles_grad_bf16_s(const bnfast_bf16* x, const bnfast_bf16* dy,
                                       bnfast_bf16* dx, Py_ssize_t n, Py_ssize_t W,
                                       const float* m, const float* a, const float* b,
                                       const float* d, int training)


cdef extern from "bnfast_backward_half.h" nogil:
    # The same jobs for half-precision storage, with the float32 leaves' arithmetic
    # (sums: float32's bits of the same values; dx: float coefficients).
    Py_ssize_t bnfast_coldot_stage_len(Py_ssize_t W, Py_ssize_t stride)
    void bnfast_centered_dot_runs_f16(const bnfast_f16* x, const bnfast_f16* y, Py_ssize_t runs,
                                      Py_ssize_t n, const double* shift, double* sy,
                                      double* sxy)
    void bnfast_centered_dot_runs_bf16(const bnfast_bf16* x, const bnfast_bf16* y,
                                       Py_ssize_t runs, Py_ssize_t n, const double* shift,
                                       double* sy, double* sxy)
    void bnfast_centered_dot_masked_f16(const bnfast_f16* x, const bnfast_f16* y,
                                        const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                        double shift, double* sy, double* sxy, bnfast_f16* g)
    void bnfast_centered_dot_masked_bf16(const bnfast_bf16* x, const bnfast_bf16* y,
                                         const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                         double shift, double* sy, double* sxy, bnfast_bf16* g)
    void bnfast_centered_coldot_any_f16(const bnfast_f16* x, const bnfast_f16* y,
                                        const unsigned char* bits, Py_ssize_t pos,
                                        Py_ssize_t rows, Py_ssize_t W, Py_ssize_t stride,
                                        const double* shift, double* sy, double* sxy,
                                        bnfast_f16* g, float* stage)
    void bnfast_centered_coldot_any_bf16(const bnfast_bf16* x, const bnfast_bf16* y,
                                         const unsigned char* bits, Py_ssize_t pos,
                                         Py_ssize_t rows, Py_ssize_t W, Py_ssize_t stride,
                                         const double* shift, double* sy, double* sxy,
                                         bnfast_bf16* g, float* stage)
    void bnfast_grad_runs_f16(const bnfast_f16* x, const bnfast_f16* dy, bnfast_f16* dx,
                              Py_ssize_t runs, Py_ssize_t n, const float* m, const float* a,
                              const float* b, const float* d)
    void bnfast_grad_runs_bf16(const bnfast_bf16* x, const bnfast_bf16* dy, bnfast_bf16* dx,
                               Py_ssize_t runs, Py_ssize_t n, const float* m, const float* a,
                               const float* b, const float* d)
    void bnfast_grad_run_scalar_f16(const bnfast_f16* x, const bnfast_f16* dy,
                                    const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                    float m, float a, float b, float d, int training,
                                    int stream, bnfast_f16* dx, bnfast_f16* g)
    void bnfast_grad_run_scalar_bf16(const bnfast_bf16* x, const bnfast_bf16* dy,
                                     const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                     float m, float a, float b, float d, int training,
                                     int stream, bnfast_bf16* dx, bnfast_bf16* g)
    void bnfast_grad_tiles_f16(const bnfast_f16* x, const bnfast_f16* dy,
                               const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                               Py_ssize_t W, const float* m, const float* a, const float* b,
                               const float* d, int training, int stream, bnfast_f16* dx,
                               bnfast_f16* g)
    void bnfast_grad_tiles_bf16(const bnfast_bf16* x, const bnfast_bf16* dy,
                                const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                Py_ssize_t W, const float* m, const float* a, const float* b,
                                const float* d, int training, int stream, bnfast_bf16* dx,
                                bnfast_bf16* g)

cdef enum:
    # Channels-first pass 1: a task covers a block of samples times a block of
    # channels, read in memory order.  Per sample it spans about RUN_ELEMS
    # contiguous values (whole channels), and TASK_ELEMS values in all.
    RUN_ELEMS = 8192
    TASK_ELEMS = 32768
    # Channels-last pass 1: tasks of a column tile of at most TILE_COLS values
    # times a block of wide rows: about BLOCK_ELEMS values, at least
    # MIN_BLOCK_ROWS rows and at most MAX_BLOCK_ROWS.  Each (block, column)
    # costs its partials' (cold) lines, a zeroing and a merge: (4096, 1024)
    # float32 ran ~10% faster in blocks of 128 rows than of 32.  Tiles of 1024
    # (a 4 KiB page of float32 per row) beat 512 for float32 (1.5 vs 1.8 ms for
    # (4096, 1024): shorter pieces of rows feed the hardware prefetchers worse)
    # and keep the accumulators (3 doubles a column, 24 KiB) within L1.
    BLOCK_ELEMS = 32768
    MIN_BLOCK_ROWS = 128
    MAX_BLOCK_ROWS = 4096
    TILE_COLS = 1024
    # Pass 2: blocks of about APPLY_ELEMS values (channels-last coefficient
    # tiles: _tiling's APPLY_WIDTH).
    APPLY_ELEMS = 16384
    # The mask is packed this many values (a multiple of 8) per task.
    PACK_ELEMS = 65536
    # Doubles (two cache lines) between pass 1's partial arrays: no 4K aliasing.
    ALIAS_PAD = 16
    # Pass 1 widens both inputs to double and costs about this many times a
    # value of an elementwise pass (threads_for's unit): it pays for a
    # parallel region at a quarter of the size (a (1, 512, 7, 7) batch).
    REDUCE_COST = 4


cdef extern from "bnfast_table.h" nogil:
    # The per-channel set-up in vectorised C: dx's coefficients (double rows),
    # grad_weight and grad_bias, pass 2's table in the compute type.
    void bnfast_grad_coefficients_f32(const double* invstd, const double* weight,
                                      const double* sum_dy, const double* sum_xdy,
                                      Py_ssize_t C, double inv_n,
                                      double* scale, double* slope, double* dy_mean,
                                      float* grad_weight, float* grad_bias)
    void bnfast_grad_coefficients_f64(const double* invstd, const double* weight,
                                      const double* sum_dy, const double* sum_xdy,
                                      Py_ssize_t C, double inv_n,
                                      double* scale, double* slope, double* dy_mean,
                                      double* grad_weight, double* grad_bias)
    void bnfast_grad_table_f32(const double* mean, const double* scale, const double* slope,
                               const double* dy_mean, Py_ssize_t C, Py_ssize_t repeat,
                               Py_ssize_t R, float* table)
    void bnfast_grad_table_f64(const double* mean, const double* scale, const double* slope,
                               const double* dy_mean, Py_ssize_t C, Py_ssize_t repeat,
                               Py_ssize_t R, double* table)


# -- the compute type of pass 2 -----------------------------------------------------
# dx is computed in double for float64 data and in float for float32 and the half
# types (whose leaves widen to float, do the float32 leaf's arithmetic, round once).  The
# coefficients (per-run scalars, tables) are rounded to that type; ``kind`` is any
# pointer of the storage type, there to pick the specialisation.
cdef inline bint _half(const real_t* kind) noexcept nogil:
    return real_t is bnfast_f16 or real_t is bnfast_bf16


cdef inline double _entry(const real_t* kind, const void* table, Py_ssize_t i) noexcept nogil:
    """Entry i of a compute-type table (an array of that type), as a double."""
    if real_t is double:
        return (<const double*>table)[i]
    else:
        return (<const float*>table)[i]


cdef inline size_t _compute_size(const real_t* kind) noexcept nogil:
    if real_t is double:
        return sizeof(double)
    else:
        return sizeof(float)


# -- typed wrappers around the SIMD leaves -----------------------------------------
cdef inline void _dot_runs(const real_t* x, const real_t* y, Py_ssize_t runs, Py_ssize_t n,
                           const double* shift, double* sy, double* sxy) noexcept nogil:
    """sy[r] += sum(y_r), sxy[r] += sum((x_r - shift[r]) * y_r) over consecutive runs of n."""
    if real_t is float:
        bnfast_centered_dot_runs_f32(x, y, runs, n, shift, sy, sxy)
    elif real_t is double:
        bnfast_centered_dot_runs_f64(x, y, runs, n, shift, sy, sxy)
    elif real_t is bnfast_f16:
        bnfast_centered_dot_runs_f16(x, y, runs, n, shift, sy, sxy)
    else:
        bnfast_centered_dot_runs_bf16(x, y, runs, n, shift, sy, sxy)


cdef inline void _dot_masked(const real_t* x, const real_t* y, const unsigned char* bits,
                             Py_ssize_t pos, Py_ssize_t n, double shift, double* sy,
                             double* sxy, real_t* g) noexcept nogil:
    """sy += sum(y'), sxy += sum((x - shift) * y'), y' = y masked by bits (and g = y' if g)."""
    if real_t is float:
        bnfast_centered_dot_masked_f32(x, y, bits, pos, n, shift, sy, sxy, g)
    elif real_t is double:
        bnfast_centered_dot_masked_f64(x, y, bits, pos, n, shift, sy, sxy, g)
    elif real_t is bnfast_f16:
        bnfast_centered_dot_masked_f16(x, y, bits, pos, n, shift, sy, sxy, g)
    else:
        bnfast_centered_dot_masked_bf16(x, y, bits, pos, n, shift, sy, sxy, g)


cdef inline void _coldot(const real_t* x, const real_t* y, const unsigned char* bits,
                         Py_ssize_t pos, Py_ssize_t rows, Py_ssize_t W, Py_ssize_t stride,
                         const double* shift, double* sy, double* sxy, real_t* g,
                         float* stage) noexcept nogil:
    """Per-column _dot of W columns of rows stride apart (g laid out as x).  stage:
    the half types' scratch for masked sums, bnfast_coldot_stage_len(W, stride)
    floats (unused, may be NULL, else)."""
    if real_t is float:
        if bits == NULL:
            bnfast_centered_coldot_f32(x, y, rows, W, stride, shift, sy, sxy)
        else:
            bnfast_centered_coldot_masked_f32(x, y, bits, pos, rows, W, stride, shift, sy, sxy,
                                              g)
    elif real_t is double:
        if bits == NULL:
            bnfast_centered_coldot_f64(x, y, rows, W, stride, shift, sy, sxy)
        else:
            bnfast_centered_coldot_masked_f64(x, y, bits, pos, rows, W, stride, shift, sy, sxy,
                                              g)
    elif real_t is bnfast_f16:
        bnfast_centered_coldot_any_f16(x, y, bits, pos, rows, W, stride, shift, sy, sxy, g,
                                       stage)
    else:
        bnfast_centered_coldot_any_bf16(x, y, bits, pos, rows, W, stride, shift, sy, sxy, g,
                                        stage)


cdef inline void _grad_runs(const real_t* x, const real_t* dy, real_t* dx, Py_ssize_t runs,
                            Py_ssize_t S, const void* table, Py_ssize_t C,
                            Py_ssize_t c) noexcept nogil:
    """dx of runs consecutive runs of S values from channel c on; table holds the rows
    m, a, b, d (C each) in the compute type."""
    cdef const float* ft = <const float*>table
    cdef const double* dt = <const double*>table
    if real_t is float:
        bnfast_grad_runs_f32(x, dy, dx, runs, S, ft + c, ft + C + c, ft + 2 * C + c,
                             ft + 3 * C + c)
    elif real_t is double:
        bnfast_grad_runs_f64(x, dy, dx, runs, S, dt + c, dt + C + c, dt + 2 * C + c,
                             dt + 3 * C + c)
    elif real_t is bnfast_f16:
        bnfast_grad_runs_f16(x, dy, dx, runs, S, ft + c, ft + C + c, ft + 2 * C + c,
                             ft + 3 * C + c)
    else:
        bnfast_grad_runs_bf16(x, dy, dx, runs, S, ft + c, ft + C + c, ft + 2 * C + c,
                              ft + 3 * C + c)


cdef inline void _flat_grad(const real_t* x, const real_t* dy, const unsigned char* bits,
                            Py_ssize_t pos, real_t* g, real_t* dx, Py_ssize_t runs,
                            Py_ssize_t S, const void* table, Py_ssize_t C, Py_ssize_t c,
                            bint training, bint stream) noexcept nogil:
    """dx of runs consecutive runs of S values from channel c on (wrapping at C), as
    one span (flat_runs_taken); with a mask (bits from bit pos on: never streamed),
    g gets the masked dy unless NULL.  table holds the float rows m, a, b, d (C
    each)."""
    cdef const float* ft = <const float*>table
    if bits != NULL:
        if real_t is float:
            bnfast_flat_mgrad_f32_s(x, dy, bits, pos, g, dx, runs, S, c, C, ft, ft + C,
                                    ft + 2 * C, ft + 3 * C, training)
        elif real_t is bnfast_f16:
            bnfast_flat_mgrad_f16_s(x, dy, bits, pos, g, dx, runs, S, c, C, ft, ft + C,
                                    ft + 2 * C, ft + 3 * C, training)
        elif real_t is bnfast_bf16:
            bnfast_flat_mgrad_bf16_s(x, dy, bits, pos, g, dx, runs, S, c, C, ft, ft + C,
                                     ft + 2 * C, ft + 3 * C, training)
    elif real_t is float:
        bnfast_flat_grad_f32_s(x, dy, dx, runs, S, c, C, ft, ft + C, ft + 2 * C, ft + 3 * C,
                               training, stream)
    elif real_t is bnfast_f16:
        bnfast_flat_grad_f16_s(x, dy, dx, runs, S, c, C, ft, ft + C, ft + 2 * C, ft + 3 * C,
                               training, stream)
    elif real_t is bnfast_bf16:
        bnfast_flat_grad_bf16_s(x, dy, dx, runs, S, c, C, ft, ft + C, ft + 2 * C, ft + 3 * C,
                                training, stream)


cdef inline void _grad_scalar(const real_t* x, const real_t* dy, const unsigned char* bits,
                              Py_ssize_t pos, Py_ssize_t n, double m, double a, double b,
                              double d, bint training, bint stream, real_t* dx,
                              real_t* g) noexcept nogil:
    """dx (and, masked, g) of a run with one (m, a, b, d), each of the compute type."""
    if real_t is float:
        bnfast_grad_run_scalar_f32(x, dy, bits, pos, n, <float>m, <float>a, <float>b,
                                   <float>d, training, stream, dx, g)
    elif real_t is double:
        bnfast_grad_run_scalar_f64(x, dy, bits, pos, n, m, a, b, d, training, stream, dx, g)
    elif real_t is bnfast_f16:
        bnfast_grad_run_scalar_f16(x, dy, bits, pos, n, <float>m, <float>a, <float>b,
                                   <float>d, training, stream, dx, g)
    else:
        bnfast_grad_run_scalar_bf16(x, dy, bits, pos, n, <float>m, <float>a, <float>b,
                                    <float>d, training, stream, dx, g)


cdef inline void _grad_tiled(const real_t* x, const real_t* dy, const unsigned char* bits,
                             Py_ssize_t pos, Py_ssize_t n, const void* tile, Py_ssize_t W,
                             Py_ssize_t R, bint training, bint stream, real_t* dx,
                             real_t* g) noexcept nogil:
    """dx (and, masked, g) of n values from a W-aligned start (pos in the flat array):
    the tile's rows m, a, b, d (W each, R apart, compute type) repeat every W values.
    Streamed without a mask, the flat tiles take the whole span where they are taken;
    the half types' leaf takes it too (it stages whole tiles)."""
    cdef const float* ft = <const float*>tile
    cdef const double* dt = <const double*>tile
    cdef Py_ssize_t i = 0
    if stream and bits == NULL and dx != NULL and flat_tiles_taken(x, W):
        if real_t is float:
            bnfast_flat_tiles_grad_f32_s(x, dy, dx, n, W, ft, ft + R, ft + 2 * R, ft + 3 * R,
                                         training)
        elif real_t is bnfast_f16:
            bnfast_flat_tiles_grad_f16_s(x, dy, dx, n, W, ft, ft + R, ft + 2 * R, ft + 3 * R,
                                         training)
        elif real_t is bnfast_bf16:
            bnfast_flat_tiles_grad_bf16_s(x, dy, dx, n, W, ft, ft + R, ft + 2 * R, ft + 3 * R,
                                          training)
        return
    if real_t is bnfast_f16:
        bnfast_grad_tiles_f16(x, dy, bits, pos, n, W, ft, ft + R, ft + 2 * R, ft + 3 * R,
                              training, stream, dx, g)
    elif real_t is bnfast_bf16:
        bnfast_grad_tiles_bf16(x, dy, bits, pos, n, W, ft, ft + R, ft + 2 * R, ft + 3 * R,
                               training, stream, dx, g)
    else:
        while i < n:
            if real_t is float:
                bnfast_grad_run_tiled_f32(x + i, dy + i, bits, pos + i, min(W, n - i), ft,
                                          ft + R, ft + 2 * R, ft + 3 * R, training, stream,
                                          NULL if dx == NULL else dx + i,
                                          NULL if g == NULL else g + i)
            else:
                bnfast_grad_run_tiled_f64(x + i, dy + i, bits, pos + i, min(W, n - i), dt,
                                          dt + R, dt + 2 * R, dt + 3 * R, training, stream,
                                          NULL if dx == NULL else dx + i,
                                          NULL if g == NULL else g + i)
            i = i + W


cdef inline Py_ssize_t _tile_rows(Py_ssize_t W) noexcept nogil:
    """The distance between the rows of a pass-2 tile: W plus a cache line's worth
    of doubles.  Rows exactly W apart put m[j], a[j], b[j], d[j] a multiple of 4 KiB
    apart for wide tiles (C = 2048 float32: 8 KiB), on one L1 set and aliasing the
    dx stores; training pass 2 of 32x2048x7x7 channels-last ran at 2.2x eval's."""
    return W + 8


cdef inline void _add_into(double* acc, const double* part, Py_ssize_t n) noexcept nogil:
    """acc[i] += part[i]: the fixed-order merge of one block's partials (vectorises)."""
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] = acc[i] + part[i]


cdef inline bint _aligned16(const void* p, Py_ssize_t piece_bytes) noexcept nogil:
    """p on a 16-byte boundary, and so is every multiple of piece_bytes after it."""
    return p != NULL and (<size_t>p) % 16 == 0 and piece_bytes % 16 == 0


cdef inline bint _stalls(const void* dx, const void* dy, const void* x,
                         bint training) noexcept nogil:
    """Whether the run-by-run leaves' streamed dx would stall on an input just
    behind it modulo 4 KiB (bnfast_alias.h): they store it cached there."""
    return bnfast_stream_stalls(dx, dy, x if training else NULL)


# -- pass 1 ---------------------------------------------------------------------------
cdef inline void _reduce_first_task(Py_ssize_t t, const real_t* xp, const real_t* dyp,
                                    const unsigned char* bits, const double* mean,
                                    real_t* gp, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                    Py_ssize_t cpt, Py_ssize_t npt, Py_ssize_t cblocks,
                                    double* part, double* part_xdy) noexcept nogil:
    """Task t = (sample block nb, channel block cb): its sums into part[nb * C + c]."""
    cdef Py_ssize_t nb = t // cblocks
    cdef Py_ssize_t cb = t - nb * cblocks
    cdef Py_ssize_t c0 = cb * cpt
    cdef Py_ssize_t c1 = min(C, c0 + cpt)
    cdef Py_ssize_t c, n, off
    for c in range(c0, c1):
        part[nb * C + c] = 0.0
        part_xdy[nb * C + c] = 0.0
    for n in range(nb * npt, min(N, (nb + 1) * npt)):
        if bits == NULL:  # the runs of channels c0..c1 are consecutive: one call
            off = (n * C + c0) * S
            _dot_runs(xp + off, dyp + off, c1 - c0, S, mean + c0, part + nb * C + c0,
                      part_xdy + nb * C + c0)
            continue
        for c in range(c0, c1):
            off = (n * C + c) * S
            _dot_masked(xp + off, dyp + off, bits, off, S, mean[c], part + nb * C + c,
                        part_xdy + nb * C + c, NULL if gp == NULL else gp + off)


cdef inline Py_ssize_t _stage_len(const real_t* kind, const unsigned char* bits,
                                  Py_ssize_t tile, Py_ssize_t last,
                                  Py_ssize_t stride) noexcept nogil:
    """Floats of per-thread staging the half types' masked column sums need (the
    portable leaves; see _coldot) for tiles of `tile` columns but the `last`, rows
    stride apart; 0 where none is needed.  Allocated before the parallel region,
    each thread its slice; a narrower last tile may stage more."""
    if not (_half(kind) and bits != NULL):
        return 0
    return max(bnfast_coldot_stage_len(tile, stride), bnfast_coldot_stage_len(last, stride))


cdef inline float* _stages(Py_ssize_t stage_len, int nt) noexcept nogil:
    """nt slices of stage_len floats (one a thread), or NULL: none needed (stage_len
    0), or no memory."""
    if not stage_len:
        return NULL
    return <float*>aligned_malloc(nt * stage_len * sizeof(float))


cdef inline void _reduce_cols_task(Py_ssize_t t, const real_t* xp, const real_t* dyp,
                                   const unsigned char* bits, const double* mean,
                                   real_t* gp, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                   Py_ssize_t cpt, Py_ssize_t npt, Py_ssize_t ctiles,
                                   double* part, double* part_xdy, double* scratch,
                                   float* stage) noexcept nogil:
    """Task t = (sample block nb, channel tile) of _reduce_first_cols: the block's
    column sums over the tile's w * S values (each column against its channel's
    mean), then each channel's S columns, into part[nb * C + c], part_xdy[nb * C + c].
    scratch: 3 * (COLS_TILE + ALIAS_PAD) doubles; stage: see _coldot."""
    cdef Py_ssize_t nb = t // ctiles
    cdef Py_ssize_t c0 = (t - nb * ctiles) * cpt
    cdef Py_ssize_t w = min(C, c0 + cpt) - c0
    cdef Py_ssize_t n0 = nb * npt
    cdef Py_ssize_t rows = min(N, n0 + npt) - n0
    cdef Py_ssize_t o = (n0 * C + c0) * S
    # ALIAS_PAD apart: no 4K aliasing between the leaf's sy[j], sxy[j] and shift[j].
    cdef double* sy = scratch
    cdef double* sxy = sy + COLS_TILE + ALIAS_PAD
    cdef double* shift = sxy + COLS_TILE + ALIAS_PAD
    cdef Py_ssize_t c, j
    for c in range(w):
        for j in range(c * S, (c + 1) * S):
            shift[j] = mean[c0 + c]
    for j in range(w * S):
        sy[j] = 0.0
        sxy[j] = 0.0
    _coldot(xp + o, dyp + o, bits, o, rows, w * S, C * S, shift, sy, sxy,
            NULL if gp == NULL else gp + o, stage)
    bnfast_group_sums(sy, w, S, part + nb * C + c0)
    bnfast_group_sums(sxy, w, S, part_xdy + nb * C + c0)


cdef int _reduce_first_cols(const real_t* xp, const real_t* dyp, const unsigned char* bits,
                            const double* mean, double* sum_dy, double* sum_xdy, real_t* gp,
                            Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                            int n_threads) noexcept nogil:
    """_reduce_first of short runs by columns (_tiling.by_columns): the batch as N
    rows of C * S values, summed down the rows in tiles of whole channels with the
    channels-last column leaves, then each channel's S columns in double.  Two
    threads, the whole backward: 32x2048x7x7 bfloat16 1052 -> 994 us, 16x512x4x4
    float32 50.5 -> 42.8, 256x16x5x5 bfloat16 57.2 -> 43.8.  -1 if out of memory."""
    cdef ColumnTasks split = column_tasks(N, C, S)
    cdef Py_ssize_t cpt = split.cpt, ctiles = split.ctiles
    cdef Py_ssize_t npt = split.npt, nblocks = split.nblocks
    cdef Py_ssize_t tasks = nblocks * ctiles
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, N * C * S * REDUCE_COST, n_threads)
    cdef Py_ssize_t slice_len = 3 * (COLS_TILE + ALIAS_PAD) + 8
    cdef double* part = <double*>aligned_malloc(
        (2 * nblocks * C + ALIAS_PAD + nt * slice_len) * sizeof(double))
    if part == NULL:
        return -1
    cdef double* part_xdy = part + nblocks * C + ALIAS_PAD
    cdef double* scratch = part_xdy + nblocks * C
    cdef Py_ssize_t stage_len = _stage_len(xp, bits, cpt * S, (C - (ctiles - 1) * cpt) * S,
                                           C * S)
    cdef float* stages = _stages(stage_len, nt)
    cdef float* stage = NULL
    if stage_len and stages == NULL:
        aligned_free(part)
        return -1
    cdef Py_ssize_t t = 0, nb
    if nt == 1:
        for t in range(tasks):
            _reduce_cols_task(t, xp, dyp, bits, mean, gp, N, C, S, cpt, npt, ctiles, part,
                              part_xdy, scratch, stages)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            stage = NULL if stages == NULL else stages + stage_len * bnfast_thread_num()
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _reduce_cols_task(t, xp, dyp, bits, mean, gp, N, C, S, cpt, npt, ctiles,
                                  part, part_xdy, scratch + slice_len * bnfast_thread_num(),
                                  stage)
                t = bnfast_claim_next(&shares, &claim)
    aligned_free(stages)
    for nb in range(nblocks):
        _add_into(sum_dy, part + nb * C, C)
        _add_into(sum_xdy, part_xdy + nb * C, C)
    aligned_free(part)
    return 0


cdef int _reduce_first(const real_t* xp, const real_t* dyp, const unsigned char* bits,
                       const double* mean, double* sum_dy, double* sum_xdy, real_t* gp,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int n_threads) noexcept nogil:
    """Add the per-channel sum(dy) and sum((x - mean) * dy) of (N, C, S) arrays into
    sum_dy, sum_xdy (zeroed by the caller), one read of each; -1 if out of memory."""
    if N == 0 or C == 0 or S == 0:
        return 0
    if by_columns(N, S, COLS_MAX_S_DOT):
        return _reduce_first_cols(xp, dyp, bits, mean, sum_dy, sum_xdy, gp, N, C, S, n_threads)
    # Tasks: samples [nb * npt, +npt) x channels [cb * cpt, +cpt), walked in memory order.
    cdef SampleTasks split = sample_tasks(N, C, S, RUN_ELEMS, TASK_ELEMS)
    cdef Py_ssize_t cpt = split.cpt, npt = split.npt
    cdef Py_ssize_t nblocks = split.nblocks, cblocks = split.cblocks
    cdef Py_ssize_t tasks = nblocks * cblocks
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, N * C * S * REDUCE_COST, n_threads)
    # Partials laid out [sample block][channel]; each task owns its slice.
    # part_xdy starts ALIAS_PAD doubles further than packed (see _reduce_last).
    cdef double* part = <double*>aligned_malloc((2 * nblocks * C + ALIAS_PAD) * sizeof(double))
    if part == NULL:
        return -1
    cdef double* part_xdy = part + nblocks * C + ALIAS_PAD
    cdef Py_ssize_t t = 0, nb
    if nt == 1:  # no OpenMP region: entering one costs ~1 us even for 1 thread
        for t in range(tasks):
            _reduce_first_task(t, xp, dyp, bits, mean, gp, N, C, S, cpt, npt, cblocks, part,
                               part_xdy)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _reduce_first_task(t, xp, dyp, bits, mean, gp, N, C, S, cpt, npt, cblocks, part,
                                   part_xdy)
                t = bnfast_claim_next(&shares, &claim)
    for nb in range(nblocks):
        _add_into(sum_dy, part + nb * C, C)
        _add_into(sum_xdy, part_xdy + nb * C, C)
    aligned_free(part)
    return 0


cdef inline void _reduce_last_task(Py_ssize_t t, const real_t* xp, const real_t* dyp,
                                   const unsigned char* bits, real_t* gp, Py_ssize_t rows,
                                   Py_ssize_t per_block, Py_ssize_t W, Py_ssize_t tile,
                                   Py_ssize_t tiles, const double* shift, double* part,
                                   double* part_xdy, float* stage) noexcept nogil:
    """Task t = (block b of wide rows, column tile): the tile's column sums into
    part[b * W + j], part_xdy[b * W + j] (stage: the half types' scratch, see _coldot)."""
    cdef Py_ssize_t b = t // tiles
    cdef Py_ssize_t j0 = (t - b * tiles) * tile
    cdef Py_ssize_t jn = min(W - j0, tile)
    cdef Py_ssize_t j, o = b * per_block * W + j0
    for j in range(b * W + j0, b * W + j0 + jn):
        part[j] = 0.0
        part_xdy[j] = 0.0
    _coldot(xp + o, dyp + o, bits, o, min(rows, (b + 1) * per_block) - b * per_block, jn, W,
            shift + j0, part + b * W + j0, part_xdy + b * W + j0,
            NULL if gp == NULL else gp + o, stage)


cdef int _reduce_last(const real_t* xp, const real_t* dyp, const unsigned char* bits,
                      const double* mean, double* sum_dy, double* sum_xdy, real_t* gp,
                      Py_ssize_t M, Py_ssize_t C, int n_threads) noexcept nogil:
    """_reduce_first of (M, C) rows; -1 if out of memory."""
    if M == 0 or C == 0:
        return 0
    # Wide rows of W = k * C values (long inner loops for small C), cut into
    # column tiles of at most TILE_COLS values and blocks of rows (see the
    # constants): a task is a (block, tile).
    cdef RowBlocks wide = row_blocks(M, C, BLOCK_ELEMS, MAX_BLOCK_ROWS)
    cdef Py_ssize_t k = wide.k, W = wide.W, rows = wide.rows
    cdef ColumnTiles cols = column_tiles(W, TILE_COLS)
    cdef Py_ssize_t tile = cols.tile, tiles = cols.tiles
    cdef Py_ssize_t per_block = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, BLOCK_ELEMS // tile))
    cdef Py_ssize_t blocks = (rows + per_block - 1) // per_block
    cdef Py_ssize_t tasks = blocks * tiles
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, M * C * REDUCE_COST, n_threads)
    # Partials per (block, column), then the tiled mean (the shift of every column).
    # The three arrays are ALIAS_PAD doubles apart beyond their lengths: the leaf
    # stores sy[j] and then loads sxy[j] (and shift[j]); at a distance that is a
    # multiple of 4 KiB (blocks * W * 8 bytes often is: W = 1024) the load waits
    # for the store (4K aliasing), every iteration.
    cdef double* part = <double*>aligned_malloc(
        (2 * blocks * W + W + 2 * ALIAS_PAD) * sizeof(double))
    if part == NULL:
        return -1
    cdef double* part_xdy = part + blocks * W + ALIAS_PAD
    cdef double* shift = part_xdy + blocks * W + ALIAS_PAD
    cdef Py_ssize_t stage_len = _stage_len(xp, bits, tile, W - (tiles - 1) * tile, W)
    cdef float* stages = _stages(stage_len, nt)
    cdef float* stage = NULL
    if stage_len and stages == NULL:
        aligned_free(part)
        return -1
    cdef Py_ssize_t t = 0, b, j, l, r, c
    cdef double v
    for j in range(C):
        shift[j] = mean[j]
    repeat_channels(shift, C, W)
    if nt == 1:  # see _reduce_first
        for t in range(tasks):
            _reduce_last_task(t, xp, dyp, bits, gp, rows, per_block, W, tile, tiles, shift, part,
                              part_xdy, stages)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            stage = NULL if stages == NULL else stages + stage_len * bnfast_thread_num()
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _reduce_last_task(t, xp, dyp, bits, gp, rows, per_block, W, tile, tiles, shift,
                                  part, part_xdy, stage)
                t = bnfast_claim_next(&shares, &claim)
    aligned_free(stages)
    # Fold (block, lane) partials in order, then the rows that did not fill a wide row.
    for b in range(blocks):
        for l in range(k):
            _add_into(sum_dy, part + b * W + l * C, C)
            _add_into(sum_xdy, part_xdy + b * W + l * C, C)
    for r in range(rows * k, M):
        for c in range(C):
            j = r * C + c
            v = to_double(dyp[j])
            if bits != NULL:
                if not ((bits[j >> 3] >> (j & 7)) & 1):
                    v = 0.0
                if gp != NULL:
                    store_double(&gp[j], v)  # exact: v is a value of the storage type
            sum_dy[c] += v
            sum_xdy[c] += (to_double(xp[j]) - mean[c]) * v
    aligned_free(part)
    return 0


# -- pass 2 ---------------------------------------------------------------------------
cdef struct Coef:
    # Per channel (C doubles each): dx = (dy - dy_mean) * scale + (x - mean) * slope.
    const double* mean
    const double* scale
    const double* slope
    const double* dy_mean


cdef inline void _fill_table(const real_t* kind, void* table, Py_ssize_t C, Py_ssize_t repeat,
                             Py_ssize_t rows, Coef k) noexcept nogil:
    """The channels' m, a, b, d into a compute-type table of 4 rows ``rows`` apart,
    repeated ``repeat`` times: dx = (dy - d) * a + (x - m) * b, d dy's mean rounded
    to the compute type and m the mean with what that lost (bnfast_table.h)."""
    if real_t is double:
        bnfast_grad_table_f64(k.mean, k.scale, k.slope, k.dy_mean, C, repeat, rows,
                              <double*>table)
    else:
        bnfast_grad_table_f32(k.mean, k.scale, k.slope, k.dy_mean, C, repeat, rows,
                              <float*>table)


cdef inline void _apply_first_block(Py_ssize_t blk, const real_t* xp, const real_t* dyp,
                                    const unsigned char* bits, const void* table,
                                    real_t* dxp, real_t* gp, Py_ssize_t runs, Py_ssize_t C,
                                    Py_ssize_t S, Py_ssize_t per_block, bint training,
                                    bint stream) noexcept nogil:
    """Runs [blk * per_block, ...) of (N, C, S): run t is channel t % C; table holds
    the rows m, a, b, d (C each) in the compute type."""
    cdef Py_ssize_t c = (blk * per_block) % C
    cdef Py_ssize_t t, off
    for t in range(blk * per_block, min(runs, (blk + 1) * per_block)):
        off = t * S
        _grad_scalar(xp + off, dyp + off, bits, off, S, _entry(xp, table, c),
                     _entry(xp, table, C + c), _entry(xp, table, 2 * C + c),
                     _entry(xp, table, 3 * C + c), training, stream,
                     NULL if dxp == NULL else dxp + off, NULL if gp == NULL else gp + off)
        c = c + 1
        if c == C:
            c = 0
    if stream:
        bnfast_stream_fence()


cdef inline void _apply_first_runs(Py_ssize_t blk, const real_t* xp, const real_t* dyp,
                                   const unsigned char* bits, const void* table,
                                   real_t* dxp, real_t* gp, Py_ssize_t runs, Py_ssize_t C,
                                   Py_ssize_t S, Py_ssize_t per_block, bint flat,
                                   bint training, bint stream) noexcept nogil:
    """_apply_first_block's job: the block's runs in one flat leaf call (flat: mask, g
    and evaluation too), else (training without mask or g, never streamed) in
    stretches of consecutive channels, one leaf call each; table holds the rows m,
    a, b, d (C each) in the compute type."""
    cdef Py_ssize_t t = blk * per_block, t_end = min(runs, (blk + 1) * per_block)
    cdef Py_ssize_t c, n
    if flat:
        _flat_grad(xp + t * S, dyp + t * S, bits, t * S, NULL if gp == NULL else gp + t * S,
                   dxp + t * S, t_end - t, S, table, C, t % C, training, stream)
        if stream:
            bnfast_stream_fence()
        return
    while t < t_end:
        c = t % C
        n = min(t_end - t, C - c)
        _grad_runs(xp + t * S, dyp + t * S, dxp + t * S, n, S, table, C, c)
        t = t + n


cdef int _apply_first(const real_t* xp, const real_t* dyp, const unsigned char* bits,
                      Coef k, real_t* dxp, real_t* gp, Py_ssize_t N, Py_ssize_t C,
                      Py_ssize_t S, bint training, bint stream, int n_threads) noexcept nogil:
    """dx of (N, C, S) arrays (and the masked dy into g when asked), one pass.

    ``stream``: store dx with non-temporal stores; honoured for unmasked
    gradients whose runs are 16-byte aligned.
    """
    if N == 0 or C == 0 or S == 0:
        return 0
    # Blocks of consecutive (n, c) runs: the channel is found once per block and
    # then stepped (a division per run costs more than a 7x7 run itself).
    cdef Py_ssize_t runs = N * C
    cdef Py_ssize_t per_block = APPLY_ELEMS // S if S < APPLY_ELEMS else 1
    cdef Py_ssize_t blocks = (runs + per_block - 1) // per_block
    per_block = (runs + blocks - 1) // blocks  # even blocks: a thread count never idles one
    blocks = (runs + per_block - 1) // per_block
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(blocks, runs * S, n_threads)
    cdef Py_ssize_t blk = 0
    # The flat leaves stream a block's runs from any element-aligned start (they
    # align their 64-byte stores; an out= view may be misaligned, which only
    # plain stores take).  Otherwise streaming stores only where every run starts
    # on a 16-byte boundary (a line written partly by movnt and partly by plain
    # stores is very slow) and no input lies just behind dx (bnfast_alias.h).
    cdef bint flat = dxp != NULL and flat_runs_taken(xp, S)
    stream = stream and bits == NULL and (
        (flat and (<size_t>dxp) % sizeof(real_t) == 0)
        or (_aligned16(dxp, S * sizeof(real_t)) and not _stalls(dxp, dyp, xp, training)))
    # The compute-type coefficients, once per channel.
    cdef void* table = aligned_malloc(4 * C * _compute_size(xp))
    if table == NULL:
        return -1
    _fill_table(xp, table, C, 1, C, k)
    if flat or (training and bits == NULL and gp == NULL and not stream):
        # The common case: one leaf call per block (flat) or per stretch of
        # consecutive channels (the same arithmetic).
        if nt == 1:
            for blk in range(blocks):
                _apply_first_runs(blk, xp, dyp, bits, table, dxp, gp, runs, C, S, per_block,
                                  flat, training, stream)
        else:
            bnfast_shares_init(&shares, blocks, nt)
            with parallel(num_threads=nt):
                claim = bnfast_claim_start(&shares, bnfast_thread_num())
                blk = bnfast_claim_next(&shares, &claim)
                while blk >= 0:
                    _apply_first_runs(blk, xp, dyp, bits, table, dxp, gp, runs, C, S,
                                      per_block, flat, training, stream)
                    blk = bnfast_claim_next(&shares, &claim)
    elif nt == 1:  # see _reduce_first
        for blk in range(blocks):
            _apply_first_block(blk, xp, dyp, bits, table, dxp, gp, runs, C, S, per_block,
                               training, stream)
    else:
        bnfast_shares_init(&shares, blocks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            blk = bnfast_claim_next(&shares, &claim)
            while blk >= 0:
                _apply_first_block(blk, xp, dyp, bits, table, dxp, gp, runs, C, S, per_block,
                                   training, stream)
                blk = bnfast_claim_next(&shares, &claim)
    aligned_free(table)
    return 0


cdef inline void _apply_last_block(Py_ssize_t blk, const real_t* xp, const real_t* dyp,
                                   const unsigned char* bits, const void* tile,
                                   real_t* dxp, real_t* gp, Py_ssize_t total, Py_ssize_t W,
                                   Py_ssize_t C, Py_ssize_t per_block, bint training,
                                   bint in_rows, bint stream) noexcept nogil:
    """Values [blk * per_block, ...) of the flat (M, C) array, in W-long tile pieces;
    in_rows: float32 rows the registers hold (bnfast_rows.h)."""
    cdef Py_ssize_t i_end = min(total, (blk + 1) * per_block)
    cdef Py_ssize_t i = blk * per_block
    cdef Py_ssize_t R = _tile_rows(W)
    cdef const float* ft = <const float*>tile
    if real_t is float and in_rows:
        bnfast_grad_rows_f32(xp + i, dyp + i, dxp + i, (i_end - i) // C, C, ft, ft + R,
                             ft + 2 * R, ft + 3 * R, stream)
    else:
        _grad_tiled(xp + i, dyp + i, bits, i, i_end - i, tile, W, R, training, stream,
                    NULL if dxp == NULL else dxp + i, NULL if gp == NULL else gp + i)
    if stream:
        bnfast_stream_fence()


cdef int _apply_last(const real_t* xp, const real_t* dyp, const unsigned char* bits,
                     Coef k, real_t* dxp, real_t* gp, Py_ssize_t M, Py_ssize_t C,
                     bint training, bint stream, int n_threads) noexcept nogil:
    """_apply_first of (M, C) rows; -1 if out of memory."""
    if M == 0 or C == 0:
        return 0
    # The coefficient pattern repeats every C values of the flat array: tile it
    # (the normalise pass's tile width); every W-aligned piece starts at channel 0.
    cdef Py_ssize_t W = tile_repeat(C, APPLY_WIDTH) * C, total = M * C
    cdef Py_ssize_t per_block = (APPLY_ELEMS // W if W < APPLY_ELEMS else 1) * W
    cdef Py_ssize_t blocks = (total + per_block - 1) // per_block
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(blocks, total, n_threads)
    cdef void* tile = aligned_malloc(4 * _tile_rows(W) * _compute_size(xp))
    if tile == NULL:
        return -1
    cdef Py_ssize_t blk = 0
    # The flat tiles stream from any element-aligned start (they align their 64-byte
    # stores), the others from 16-byte aligned whole pieces, no input just behind.
    stream = stream and bits == NULL and (
        (dxp != NULL and flat_tiles_taken(xp, W) and (<size_t>dxp) % sizeof(real_t) == 0)
        or (_aligned16(dxp, W * sizeof(real_t)) and not _stalls(dxp, dyp, xp, training)))
    _fill_table(xp, tile, C, W // C, _tile_rows(W), k)
    cdef bint rows_kind = real_t is float and training and bits == NULL and dxp != NULL
    cdef bint in_rows = rows_kind and bnfast_grad_rows_f32_fits(C, <const float*>dxp, stream)
    # The register rows walk up: where that stalls (bnfast_alias.h) the flat tiles
    # take the rows (they walk down there), or else the rows store cached.
    if in_rows and stream and _stalls(dxp, dyp, xp, training):
        if flat_tiles_taken(xp, W):
            in_rows = False
        else:
            stream = False
            in_rows = bnfast_grad_rows_f32_fits(C, <const float*>dxp, stream)
    if nt == 1:  # see _reduce_first
        for blk in range(blocks):
            _apply_last_block(blk, xp, dyp, bits, tile, dxp, gp, total, W, C, per_block,
                              training, in_rows, stream)
    else:
        bnfast_shares_init(&shares, blocks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            blk = bnfast_claim_next(&shares, &claim)
            while blk >= 0:
                _apply_last_block(blk, xp, dyp, bits, tile, dxp, gp, total, W, C, per_block,
                                  training, in_rows, stream)
                blk = bnfast_claim_next(&shares, &claim)
    aligned_free(tile)
    return 0


# -- one backward ------------------------------------------------------------------------
cdef struct Job:
    Shape shape
    bint training
    bint stream
    int n_threads
    const void* x
    const void* dy
    const unsigned char* bits
    void* dx
    void* g
    void* grad_weight
    void* grad_bias
    # (C,) doubles: the caller's arrays when they are contiguous float64, else
    # copies in the work rows; weight NULL for none.
    const double* mean
    const double* invstd
    const double* weight
    # (2, C) doubles sum_dy, sum_xdy: written by pass 1 (sums_given false), or
    # given (pass 1 skipped; then count is the values per channel they cover).
    double* sums
    bint sums_given
    Py_ssize_t count


cdef int _run(const Job* job, double* work, real_t* kind) noexcept nogil:
    """Both passes of one backward; ``kind`` (NULL) picks the storage type.

    ``work`` holds 5 rows of C doubles: sum_dy, sum_xdy, scale, slope, dy_mean.
    -1 if out of memory.
    """
    cdef Py_ssize_t c, C = job.shape.C
    cdef Py_ssize_t count = job.count if job.sums_given else job.shape.count
    cdef bint training = job.training
    cdef const real_t* xp = <const real_t*>job.x
    cdef const real_t* dyp = <const real_t*>job.dy
    cdef const unsigned char* bits = job.bits
    cdef real_t* dxp = <real_t*>job.dx
    cdef real_t* gp = <real_t*>job.g
    cdef const double* mean = job.mean
    cdef const double* invstd = job.invstd
    cdef const double* weight = job.weight
    cdef double* sum_dy = work
    cdef double* sum_xdy = work + C
    cdef double* scale = work + 2 * C
    cdef double* slope = work + 3 * C
    cdef double* dy_mean = work + 4 * C
    for c in range(C):
        sum_dy[c] = 0.0
        sum_xdy[c] = 0.0
    cdef bint g_done = False
    cdef int rc = 0
    if job.sums_given:  # another process's pass 1 (all ranks' sums): no pass 1 here
        for c in range(2 * C):
            work[c] = job.sums[c]
    elif (job.grad_weight != NULL or job.grad_bias != NULL or job.sums != NULL
          or (training and dxp != NULL)):
        # Pass 1; it also writes the masked gradient when that is wanted, and
        # pass 2 then reads it instead of grad_output and the mask.
        if job.shape.layout == CHANNELS_FIRST:
            rc = _reduce_first(xp, dyp, bits, mean, sum_dy, sum_xdy, gp, job.shape.N, C,
                               job.shape.S, job.n_threads)
        else:
            rc = _reduce_last(xp, dyp, bits, mean, sum_dy, sum_xdy, gp, job.shape.N, C,
                              job.n_threads)
        if rc != 0:
            return rc
        g_done = gp != NULL
        if job.sums != NULL:
            for c in range(2 * C):
                job.sums[c] = work[c]
    # torch: (dy - sum_dy/n - (x - mean) * invstd**2 * sum_xdy/n) * invstd * w; and
    # grad_weight, grad_bias (arrays of the compute type: float32 for half data).
    cdef double inv_n = 1.0 / count if training and count > 0 else 0.0
    if real_t is double:
        bnfast_grad_coefficients_f64(invstd, weight, sum_dy, sum_xdy, C, inv_n, scale,
                                     slope, dy_mean, <double*>job.grad_weight,
                                     <double*>job.grad_bias)
    else:
        bnfast_grad_coefficients_f32(invstd, weight, sum_dy, sum_xdy, C, inv_n, scale,
                                     slope, dy_mean, <float*>job.grad_weight,
                                     <float*>job.grad_bias)
    cdef Coef k
    k.mean, k.scale, k.slope, k.dy_mean = mean, scale, slope, dy_mean
    cdef bint stream
    if dxp != NULL or (gp != NULL and not g_done):
        stream = job.stream and dxp != NULL
        if g_done:  # g holds the masked dy: read it instead of grad_output and the mask
            dyp = gp
            bits = NULL
            gp = NULL
        if job.shape.layout == CHANNELS_FIRST:
            rc = _apply_first(xp, dyp, bits, k, dxp, gp, job.shape.N, C, job.shape.S, training,
                              stream, job.n_threads)
        else:
            rc = _apply_last(xp, dyp, bits, k, dxp, gp, job.shape.N, C, training, stream,
                             job.n_threads)
    return rc


cdef const double* _as_doubles(cnp.ndarray v, Py_ssize_t C, double* scratch) noexcept:
    """A (C,) float vector as doubles: its own data if contiguous float64, else a copy."""
    if cnp.PyArray_TYPE(v) == cnp.NPY_FLOAT64 and (C < 2 or cnp.PyArray_STRIDE(v, 0) == 8):
        return <const double*>cnp.PyArray_DATA(v)
    load_doubles(v, C, scratch)
    return scratch


def backward(cnp.ndarray x not None,            # IN  (N, C, *spatial), in `layout`
             cnp.ndarray grad_output not None,  # IN  x's shape, dtype and layout
             cnp.ndarray mask,                  # IN  packed ReLU mask (uint8), or None
             cnp.ndarray mean not None,         # IN  (C,) save_mean
             cnp.ndarray invstd not None,       # IN  (C,) save_invstd
             cnp.ndarray weight,                # IN  (C,) gamma, or None (ones)
             cnp.ndarray grad_input,            # OUT x's shape, dtype, layout; or None
             cnp.ndarray grad_addend,           # OUT masked grad_output, like x; or None
             bint want_weight, bint want_bias,  # return grad_weight, grad_bias?
             int layout, bint training, bint stream, int n_threads,
             cnp.ndarray sums=None,             # INOUT (2, C) float64 C-contiguous, or None
             bint sums_given=False, Py_ssize_t count=0):
    """Gradients of one batch norm (plain, or fused with a ReLU when ``mask`` is given).

    The contract (``bnfast.backward`` checks and lays out; nothing is checked
    here): ``x``, ``grad_output`` and the outputs of its shape are float32,
    float64, float16 or bfloat16 (``ml_dtypes``; the one dtype without a fixed
    type number: any other type number is taken for it), one dtype, their
    memory in ``layout`` (``bnfast._layout.Layout``: 0 channels-first, 1
    channels-last); ``grad_input`` may be ``x`` or ``grad_output`` itself,
    ``grad_addend`` only ``grad_output``.  ``mask`` is contiguous uint8, at
    least ``ceil(x.size / 8)`` bytes, one bit per value of ``x`` in its memory
    order.  ``grad_addend`` only with ``mask``.  The (C,) vectors are of any
    of the four dtypes, any stride.  Outputs that are None are not computed.
    ``stream``: write grad_input with non-temporal stores (arrays far beyond
    the caches).

    Half-precision data: sums in double over the float values (the same bits
    as float32 data of the same values), dx computed in float and rounded once.

    ``sums`` (for a batch split over processes: SyncBatchNorm): without
    ``sums_given``, pass 1's float64 ``sum_dy`` and ``sum_xdy`` (of the masked
    gradient, with a mask) are written into its two rows; with ``sums_given``,
    pass 1 is skipped and its rows are used instead, as the sums over ``count``
    values per channel (all processes' together).

    Returns ``(grad_weight, grad_bias)``: new (C,) arrays, float64 for float64
    data and float32 otherwise (float32, float16, bfloat16), or None where not
    wanted.
    """
    cdef Shape shape = kernel_shape(x, layout)
    cdef int typenum = cnp.PyArray_TYPE(x)
    # grad_weight/grad_bias in the compute type: float64 for float64 data, else float32.
    cdef int param_type = cnp.NPY_FLOAT64 if typenum == cnp.NPY_FLOAT64 else cnp.NPY_FLOAT32
    cdef cnp.npy_intp dims[1]
    dims[0] = shape.C
    grad_weight = cnp.PyArray_EMPTY(1, dims, param_type, 0) if want_weight else None
    grad_bias = cnp.PyArray_EMPTY(1, dims, param_type, 0) if want_bias else None
    cdef Job job = _job(shape, training, stream, n_threads, data_or_null(x),
                        data_or_null(grad_output), <const unsigned char*>data_or_null(mask),
                        data_or_null(grad_input), data_or_null(grad_addend),
                        data_or_null(grad_weight), data_or_null(grad_bias))
    job.sums = <double*>data_or_null(sums)
    job.sums_given = sums_given
    job.count = count
    _run_job(&job, typenum, mean, invstd, weight)
    return grad_weight, grad_bias


cdef inline Job _job(Shape shape, bint training, bint stream, int n_threads, const void* x,
                     const void* dy, const unsigned char* bits, void* dx, void* g,
                     void* grad_weight, void* grad_bias) noexcept:
    """A job on these addresses (NULL: none), without given sums; its (C,) vectors are
    set by the caller or by _run_job."""
    cdef Job job
    job.shape = shape
    job.training = training
    job.stream = stream
    job.n_threads = n_threads
    job.x = x
    job.dy = dy
    job.bits = bits
    job.dx = dx
    job.g = g
    job.grad_weight = grad_weight
    job.grad_bias = grad_bias
    job.sums = NULL
    job.sums_given = False
    job.count = 0
    return job


cdef int _run_job(Job* job, int typenum, cnp.ndarray mean, cnp.ndarray invstd,
                  cnp.ndarray weight) except -1:
    """Run ``job`` on data of type number ``typenum``; its (C,) vectors from these
    arrays (``mean``/``invstd`` None: the job's own)."""
    cdef Py_ssize_t C = job.shape.C
    cdef double* work = <double*>aligned_malloc((8 * C + 1) * sizeof(double))
    if work == NULL:
        raise MemoryError()
    if mean is not None:
        job.mean = _as_doubles(mean, C, work + 5 * C)
        job.invstd = _as_doubles(invstd, C, work + 6 * C)
    job.weight = NULL
    if weight is not None:
        job.weight = _as_doubles(weight, C, work + 7 * C)
    cdef int rc
    with nogil:  # the dtype switch (validation admits these four)
        if typenum == cnp.NPY_FLOAT32:
            rc = _run(job, work, <float*>NULL)
        elif typenum == cnp.NPY_FLOAT64:
            rc = _run(job, work, <double*>NULL)
        elif typenum == cnp.NPY_FLOAT16:
            rc = _run(job, work, <bnfast_f16*>NULL)
        else:  # bfloat16
            rc = _run(job, work, <bnfast_bf16*>NULL)
    aligned_free(work)
    if rc != 0:
        raise MemoryError()
    return 0


@cython.auto_pickle(False)
cdef class BoundBackward:
    """:func:`backward` with the geometry, weight and mode fixed, run on addresses.

    For callers that check a configuration once and call it many times
    (``bnfast.torch``'s plans; ``bnfast._forward.BoundForward`` is its
    forward): a call passes the addresses of the data, of the forward's
    save_mean and save_invstd (C float64 values each: the first two rows of
    ``SavedStats``' table) and of the outputs (0 for none), with no NumPy
    array made per call.  ``grad_weight``/``grad_bias``: C values of the compute
    type (float64 for float64 data, else float32).  The contract is
    :func:`backward`'s; ``x`` gives the geometry and is not kept.
    """
    cdef Shape shape
    cdef int typenum
    cdef cnp.ndarray weight
    cdef bint training

    def __init__(self, cnp.ndarray x not None, cnp.ndarray weight, int layout, bint training):
        self.shape = kernel_shape(x, layout)
        self.typenum = cnp.PyArray_TYPE(x)
        self.weight, self.training = weight, training

    def run(self, size_t x, size_t grad_output, size_t mask, size_t mean, size_t invstd,
            size_t grad_input, size_t grad_addend, size_t grad_weight, size_t grad_bias,
            bint stream, int n_threads):
        """Write the gradients asked for (their addresses not 0)."""
        cdef Job job = _job(self.shape, self.training, stream, n_threads, <const void*>x,
                            <const void*>grad_output, <const unsigned char*>mask,
                            <void*>grad_input, <void*>grad_addend, <void*>grad_weight,
                            <void*>grad_bias)
        job.mean = <const double*>mean
        job.invstd = <const double*>invstd
        _run_job(&job, self.typenum, None, None, self.weight)


# -- the ReLU mask ----------------------------------------------------------------------

cdef void _pack(const real_t* yp, unsigned char* bp, Py_ssize_t n,
                int n_threads) noexcept nogil:
    cdef Py_ssize_t blocks = (n + PACK_ELEMS - 1) // PACK_ELEMS
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(blocks, n, n_threads)
    cdef Py_ssize_t blk = 0
    if nt == 1:  # see _reduce_first
        for blk in range(blocks):
            pack_block(yp, blk * PACK_ELEMS, min(PACK_ELEMS, n - blk * PACK_ELEMS), bp)
    else:
        bnfast_shares_init(&shares, blocks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            blk = bnfast_claim_next(&shares, &claim)
            while blk >= 0:
                pack_block(yp, blk * PACK_ELEMS, min(PACK_ELEMS, n - blk * PACK_ELEMS), bp)
                blk = bnfast_claim_next(&shares, &claim)


def pack_positive(cnp.ndarray output not None,  # IN  a float array, contiguous in some order
                  cnp.ndarray bits not None,    # OUT (ceil(output.size / 8),) uint8
                  int n_threads):
    """Bits of ``not (output <= 0)`` in ``output``'s memory order, little bit order:
    where the ReLU passed its input's gradient (NaN included).

    ``output``'s memory is one contiguous block (C, F or channels-last order);
    the last partial byte is written whole (its unused bits 0).  Its dtype:
    float32, float64, float16, or (any other) bfloat16.
    """
    cdef Py_ssize_t n = cnp.PyArray_SIZE(output)
    cdef int typenum = cnp.PyArray_TYPE(output)
    cdef const void* yp = cnp.PyArray_DATA(output)
    cdef unsigned char* bp = <unsigned char*>cnp.PyArray_DATA(bits)
    with nogil:
        if typenum == cnp.NPY_FLOAT32:
            _pack(<const float*>yp, bp, n, n_threads)
        elif typenum == cnp.NPY_FLOAT64:
            _pack(<const double*>yp, bp, n, n_threads)
        elif typenum == cnp.NPY_FLOAT16:
            _pack(<const bnfast_f16*>yp, bp, n, n_threads)
        else:  # bfloat16
            _pack(<const bnfast_bf16*>yp, bp, n, n_threads)
