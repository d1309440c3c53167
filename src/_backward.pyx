"""Backward pass of Batch Normalization (and of its fused ReLU/addend epilogue).

With ``dy`` the output gradient (masked by the ReLU for the fused variant),
per channel ``sum_dy = sum(dy)`` and ``sum_xdy = sum((x - mean) * dy)``, and
``a = invstd * weight``:

* training: ``dx = (dy - sum_dy/n - (x - mean) * invstd**2 * sum_xdy/n) * a``
* eval:     ``dx = dy * a``
* ``grad_weight = sum_xdy * invstd``, ``grad_bias = sum_dy``.

Two passes over the data, in the forward's two memory layouts:

1. ``reduce_*``: both sums in ONE read of ``x`` and ``dy`` (double
   accumulation, 8 fixed lanes, see ``bnfast_simd.h``).  The work is cut by
   the shape only and the partials are merged in a fixed order, so any thread
   count gives the same bits.
2. ``apply_*``: ``dx = (dy * a + (x - m) * b) + d`` per element, in the
   storage type.  ``m`` is the storage-type mean and its rounding error is
   folded into ``d`` (in double), as in ``_normalize.pyx``: float32 data far
   from zero (mean 1e6, std 1) keeps ``x - m`` exact.  Arrays far larger than
   the caches are written with non-temporal stores.

The fused variant reads the ReLU mask packed 8 per byte (``pack_positive``,
1/32 of a float32 copy) and applies it on the fly, inside the SIMD leaves
(``bnfast_backward_simd.h``).  When the addend's gradient ``g`` is wanted,
pass 1 writes it, and pass 2 reads it instead of ``dy`` and the mask.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from _moments cimport centered_dot
from _tiling cimport RowBlocks, row_blocks
from _openmp_helpers cimport threads_for

cdef extern from "bnfast_backward_simd.h" nogil:
    void bnfast_centered_coldot_f32(const float* x, const float* y, Py_ssize_t rows,
                                    Py_ssize_t W, const double* shift, double* sy, double* sxy)
    void bnfast_centered_coldot_f64(const double* x, const double* y, Py_ssize_t rows,
                                    Py_ssize_t W, const double* shift, double* sy, double* sxy)
    void bnfast_centered_dot_masked_f32(const float* x, const float* y, const unsigned char* bits,
                                        Py_ssize_t pos, Py_ssize_t n, double shift, double* sy,
                                        double* sxy, float* g)
    void bnfast_centered_dot_masked_f64(const double* x, const double* y,
                                        const unsigned char* bits, Py_ssize_t pos, Py_ssize_t n,
                                        double shift, double* sy, double* sxy, double* g)
    void bnfast_centered_coldot_masked_f32(const float* x, const float* y,
                                           const unsigned char* bits, Py_ssize_t pos,
                                           Py_ssize_t rows, Py_ssize_t W, const double* shift,
                                           double* sy, double* sxy, float* g)
    void bnfast_centered_coldot_masked_f64(const double* x, const double* y,
                                           const unsigned char* bits, Py_ssize_t pos,
                                           Py_ssize_t rows, Py_ssize_t W, const double* shift,
                                           double* sy, double* sxy, double* g)
    void bnfast_pack_positive_f32(const float* y, Py_ssize_t n, unsigned char* bits)
    void bnfast_pack_positive_f64(const double* y, Py_ssize_t n, unsigned char* bits)
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

ctypedef fused param_t:
    float
    double

cdef enum:
    # Channels-first pass 1: a task covers a block of samples times a block of
    # channels, read in memory order.  Per sample it spans about RUN_ELEMS
    # contiguous values (whole channels), and TASK_ELEMS values in all.
    RUN_ELEMS = 8192
    TASK_ELEMS = 32768
    BLOCK_ELEMS = 32768
    MAX_BLOCK_ROWS = 4096
    # Pass 2: blocks of about APPLY_ELEMS values; channels-last coefficient
    # tiles of about APPLY_WIDTH values.
    APPLY_ELEMS = 16384
    APPLY_WIDTH = 256
    # The mask is packed this many values (a multiple of 8) per task.
    PACK_ELEMS = 65536

# Rows of the coefficient table written by coefficients().
MEAN, SCALE, SLOPE, OFFSET, GRAD_WEIGHT, GRAD_BIAS = 0, 1, 2, 3, 4, 5


# -- typed wrappers around the SIMD leaves -----------------------------------------
cdef inline void _dot(const floating* x, const floating* y, const unsigned char* bits,
                      Py_ssize_t pos, Py_ssize_t n, double shift, double* sy, double* sxy,
                      floating* g) noexcept nogil:
    """sy += sum(y'), sxy += sum((x - shift) * y'): y' = y, or y masked by bits (then g = y')."""
    if bits == NULL:
        centered_dot(x, y, n, shift, sy, sxy)
    elif floating is float:
        bnfast_centered_dot_masked_f32(x, y, bits, pos, n, shift, sy, sxy, g)
    else:
        bnfast_centered_dot_masked_f64(x, y, bits, pos, n, shift, sy, sxy, g)


cdef inline void _coldot(const floating* x, const floating* y, const unsigned char* bits,
                         Py_ssize_t pos, Py_ssize_t rows, Py_ssize_t W, const double* shift,
                         double* sy, double* sxy, floating* g) noexcept nogil:
    """Per-column _dot of (rows, W) row-major blocks."""
    if floating is float:
        if bits == NULL:
            bnfast_centered_coldot_f32(x, y, rows, W, shift, sy, sxy)
        else:
            bnfast_centered_coldot_masked_f32(x, y, bits, pos, rows, W, shift, sy, sxy, g)
    else:
        if bits == NULL:
            bnfast_centered_coldot_f64(x, y, rows, W, shift, sy, sxy)
        else:
            bnfast_centered_coldot_masked_f64(x, y, bits, pos, rows, W, shift, sy, sxy, g)


cdef inline void _grad_scalar(const floating* x, const floating* dy, const unsigned char* bits,
                              Py_ssize_t pos, Py_ssize_t n, floating m, floating a, floating b,
                              floating d, bint training, bint stream, floating* dx,
                              floating* g) noexcept nogil:
    """dx (and, masked, g) of a run with one (m, a, b, d)."""
    if floating is float:
        bnfast_grad_run_scalar_f32(x, dy, bits, pos, n, m, a, b, d, training, stream, dx, g)
    else:
        bnfast_grad_run_scalar_f64(x, dy, bits, pos, n, m, a, b, d, training, stream, dx, g)


cdef inline void _grad_tiled(const floating* x, const floating* dy, const unsigned char* bits,
                             Py_ssize_t pos, Py_ssize_t n, const floating* tile, Py_ssize_t W,
                             bint training, bint stream, floating* dx,
                             floating* g) noexcept nogil:
    """dx (and, masked, g) of a W-aligned piece; tile holds the rows m, a, b, d (W each)."""
    if floating is float:
        bnfast_grad_run_tiled_f32(x, dy, bits, pos, n, tile, tile + W, tile + 2 * W,
                                  tile + 3 * W, training, stream, dx, g)
    else:
        bnfast_grad_run_tiled_f64(x, dy, bits, pos, n, tile, tile + W, tile + 2 * W,
                                  tile + 3 * W, training, stream, dx, g)


cdef inline void _add_into(double* acc, const double* part, Py_ssize_t n) noexcept nogil:
    """acc[i] += part[i]: the fixed-order merge of one block's partials (vectorises)."""
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] = acc[i] + part[i]


cdef inline Py_ssize_t _gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef inline bint _aligned16(const void* p, Py_ssize_t piece_bytes) noexcept nogil:
    """p on a 16-byte boundary, and so is every multiple of piece_bytes after it."""
    return p != NULL and (<size_t>p) % 16 == 0 and piece_bytes % 16 == 0


cdef inline floating _offset_in(floating m, const double[:, ::1] coef, Py_ssize_t c) noexcept nogil:
    """Storage-type d for dx = (dy * a + (x - m) * b) + d, with m = storage-type mean.

    (x - mean) = (x - m) - (mean - m): the mean's rounding error moves into d, in double.
    """
    return <floating>(coef[3, c] - (coef[0, c] - <double>m) * coef[2, c])


# -- pass 1 ---------------------------------------------------------------------------
cdef inline void _reduce_first_task(Py_ssize_t t, const floating* xp, const floating* dyp,
                                    const unsigned char* bits, const double* mean,
                                    floating* gp, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
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
        for c in range(c0, c1):
            off = (n * C + c) * S
            _dot(xp + off, dyp + off, bits, off, S, mean[c], part + nb * C + c,
                 part_xdy + nb * C + c, NULL if gp == NULL else gp + off)


def reduce_channels_first(const floating[:, :, ::1] x,    # IN  (N, C, S)
                          const floating[:, :, ::1] dy,   # IN  (N, C, S)
                          const unsigned char[::1] mask,  # IN  packed ReLU mask, or None
                          const double[::1] mean,         # IN  (C,) save_mean
                          double[::1] sum_dy,             # OUT (C,)
                          double[::1] sum_xdy,            # OUT (C,)
                          floating[:, :, ::1] g,          # OUT (N, C, S) masked dy, or None
                          int n_threads):
    """Per-channel sum(dy) and sum((x - mean) * dy) of (N, C, S) arrays, one read of each."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    sum_dy[:] = 0.0
    sum_xdy[:] = 0.0
    if N == 0 or C == 0 or S == 0:
        return
    # Tasks: samples [nb * npt, +npt) x channels [cb * cpt, +cpt), walked in memory order.
    cdef Py_ssize_t cpt = C if C * S <= RUN_ELEMS else max(1, RUN_ELEMS // S)
    cdef Py_ssize_t npt = max(1, TASK_ELEMS // (cpt * S))
    cdef Py_ssize_t nblocks = (N + npt - 1) // npt
    npt = (N + nblocks - 1) // nblocks  # even blocks: 8 samples as 4 + 4, not 5 + 3
    nblocks = (N + npt - 1) // npt
    cdef Py_ssize_t cblocks = (C + cpt - 1) // cpt
    cdef Py_ssize_t tasks = nblocks * cblocks
    cdef int nt = threads_for(tasks, N * C * S, n_threads)
    cdef const unsigned char* bits = NULL if mask is None else &mask[0]
    cdef floating* gp = NULL if g is None else &g[0, 0, 0]
    # Partials laid out [sample block][channel]; each task owns its slice.
    cdef double* part = <double*>malloc(2 * nblocks * C * sizeof(double))
    if part == NULL:
        raise MemoryError()
    cdef double* part_xdy = part + nblocks * C
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef Py_ssize_t t, nb
    try:
        with nogil:
            if nt == 1:  # no OpenMP region: entering one costs ~1 us even for 1 thread
                for t in range(tasks):
                    _reduce_first_task(t, xp, dyp, bits, &mean[0], gp, N, C, S, cpt, npt,
                                       cblocks, part, part_xdy)
            else:
                for t in prange(tasks, schedule='dynamic', chunksize=1, num_threads=nt):
                    _reduce_first_task(t, xp, dyp, bits, &mean[0], gp, N, C, S, cpt, npt,
                                       cblocks, part, part_xdy)
            for nb in range(nblocks):
                _add_into(&sum_dy[0], part + nb * C, C)
                _add_into(&sum_xdy[0], part_xdy + nb * C, C)
    finally:
        free(part)


cdef inline void _reduce_last_block(Py_ssize_t b, const floating* xp, const floating* dyp,
                                    const unsigned char* bits, floating* gp, Py_ssize_t rows,
                                    Py_ssize_t per_block, Py_ssize_t W, const double* shift,
                                    double* part, double* part_xdy) noexcept nogil:
    """Block b of wide rows: its column sums into part[b * W:], part_xdy[b * W:]."""
    cdef Py_ssize_t j
    for j in range(W):
        part[b * W + j] = 0.0
        part_xdy[b * W + j] = 0.0
    cdef Py_ssize_t r0 = b * per_block
    _coldot(xp + r0 * W, dyp + r0 * W, bits, r0 * W, min(rows, r0 + per_block) - r0, W, shift,
            part + b * W, part_xdy + b * W, NULL if gp == NULL else gp + r0 * W)


def reduce_channels_last(const floating[:, ::1] x,       # IN  (M, C)
                         const floating[:, ::1] dy,      # IN  (M, C)
                         const unsigned char[::1] mask,  # IN  packed ReLU mask, or None
                         const double[::1] mean,         # IN  (C,) save_mean
                         double[::1] sum_dy,             # OUT (C,)
                         double[::1] sum_xdy,            # OUT (C,)
                         floating[:, ::1] g,             # OUT (M, C) masked dy, or None
                         int n_threads):
    """Per-channel sum(dy) and sum((x - mean) * dy) of (M, C) rows, one read of each."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    sum_dy[:] = 0.0
    sum_xdy[:] = 0.0
    if M == 0 or C == 0:
        return
    # Wide rows of W = k * C values (long inner loops for small C), in blocks.
    cdef RowBlocks tiling = row_blocks(M, C, BLOCK_ELEMS, MAX_BLOCK_ROWS)
    cdef Py_ssize_t k = tiling.k, W = tiling.W, rows = tiling.rows
    cdef Py_ssize_t per_block = tiling.per_block, blocks = tiling.blocks
    cdef int nt = threads_for(blocks, M * C, n_threads)
    cdef const unsigned char* bits = NULL if mask is None else &mask[0]
    cdef floating* gp = NULL if g is None else &g[0, 0]
    # Partials per (block, column), then the tiled mean (the shift of every column).
    cdef double* part = <double*>malloc((2 * blocks * W + W) * sizeof(double))
    if part == NULL:
        raise MemoryError()
    cdef double* part_xdy = part + blocks * W
    cdef double* shift = part + 2 * blocks * W
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    cdef Py_ssize_t b, j, l, r, c
    cdef double v
    for j in range(W):
        shift[j] = mean[j % C]
    try:
        with nogil:
            if nt == 1:  # see reduce_channels_first
                for b in range(blocks):
                    _reduce_last_block(b, xp, dyp, bits, gp, rows, per_block, W, shift, part,
                                       part_xdy)
            else:
                for b in prange(blocks, schedule='dynamic', chunksize=1, num_threads=nt):
                    _reduce_last_block(b, xp, dyp, bits, gp, rows, per_block, W, shift, part,
                                       part_xdy)
            # Fold (block, lane) partials in order, then the rows that did not fill a wide row.
            for b in range(blocks):
                for l in range(k):
                    _add_into(&sum_dy[0], part + b * W + l * C, C)
                    _add_into(&sum_xdy[0], part_xdy + b * W + l * C, C)
            for r in range(rows * k, M):
                for c in range(C):
                    j = r * C + c
                    v = dyp[j]
                    if bits != NULL:
                        if not ((bits[j >> 3] >> (j & 7)) & 1):
                            v = 0.0
                        if gp != NULL:
                            gp[j] = <floating>v
                    sum_dy[c] += v
                    sum_xdy[c] += (<double>xp[j] - mean[c]) * v
    finally:
        free(part)


# -- coefficients ----------------------------------------------------------------------
def coefficients(const double[::1] sum_dy,    # IN  (C,) from reduce_*
                 const double[::1] sum_xdy,   # IN  (C,) from reduce_*
                 const double[::1] mean,      # IN  (C,) save_mean
                 const double[::1] invstd,    # IN  (C,) save_invstd
                 const param_t[::1] weight,   # IN  (C,) gamma (ignored unless has_weight)
                 bint has_weight, double count, bint training,
                 double[:, ::1] coef):        # OUT (6, C): mean, a, b, d, grad_weight, grad_bias
    """Per-channel coefficients of dx = dy * a + (x - mean) * b + d, and the parameter grads."""
    cdef Py_ssize_t c, C = mean.shape[0]
    if C == 0:
        return
    cdef double a, k
    cdef double* mu = &coef[0, 0]
    cdef double* scale = mu + C
    cdef double* slope = mu + 2 * C
    cdef double* offset = mu + 3 * C
    cdef double* gw = mu + 4 * C
    cdef double* gb = mu + 5 * C
    # torch: (dy - sum_dy/n - (x - mean) * invstd**2 * sum_xdy/n) * invstd * w
    cdef double inv_n = 1.0 / count if training and count > 0 else 0.0
    with nogil:
        for c in range(C):
            a = invstd[c] * weight[c] if has_weight else invstd[c]
            k = invstd[c] * invstd[c] * (sum_xdy[c] * inv_n)
            mu[c] = mean[c]
            scale[c] = a
            slope[c] = -(k * a)
            offset[c] = -((sum_dy[c] * inv_n) * a)
            gw[c] = sum_xdy[c] * invstd[c]
            gb[c] = sum_dy[c]


# -- pass 2 ---------------------------------------------------------------------------
cdef inline void _apply_first_block(Py_ssize_t blk, const floating* xp, const floating* dyp,
                                    const unsigned char* bits, const double[:, ::1] coef,
                                    floating* dxp, floating* gp, Py_ssize_t runs, Py_ssize_t C,
                                    Py_ssize_t S, Py_ssize_t per_block, bint training,
                                    bint stream) noexcept nogil:
    """Runs [blk * per_block, ...) of (N, C, S): run t is channel t % C."""
    cdef Py_ssize_t c = (blk * per_block) % C
    cdef Py_ssize_t t, off
    cdef floating m, a, b, d
    for t in range(blk * per_block, min(runs, (blk + 1) * per_block)):
        m = <floating>coef[0, c]
        a = <floating>coef[1, c]
        b = <floating>coef[2, c]
        d = _offset_in(m, coef, c)
        off = t * S
        _grad_scalar(xp + off, dyp + off, bits, off, S, m, a, b, d, training, stream,
                     NULL if dxp == NULL else dxp + off, NULL if gp == NULL else gp + off)
        c = c + 1
        if c == C:
            c = 0
    if stream:
        bnfast_stream_fence()


def apply_channels_first(const floating[:, :, ::1] x,    # IN  (N, C, S) (not read in eval)
                         const floating[:, :, ::1] dy,   # IN  (N, C, S)
                         const unsigned char[::1] mask,  # IN  packed ReLU mask, or None
                         const double[:, ::1] coef,      # IN  (>= 4, C) from coefficients()
                         floating[:, :, ::1] dx,         # OUT (N, C, S), or None (g only)
                         floating[:, :, ::1] g,          # OUT (N, C, S) masked dy, or None
                         bint training, bint stream, int n_threads):
    """dx of (N, C, S) arrays (and the masked dy into g when asked), one pass.

    ``stream``: store dx with non-temporal stores (outputs much larger than the
    caches); honoured for unmasked gradients whose runs are 16-byte aligned.
    """
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], S = dy.shape[2]
    if N == 0 or C == 0 or S == 0 or (dx is None and (mask is None or g is None)):
        return
    # Blocks of consecutive (n, c) runs: the channel is found once per block and
    # then stepped (a division per run costs more than a 7x7 run itself).
    cdef Py_ssize_t runs = N * C
    cdef Py_ssize_t per_block = APPLY_ELEMS // S if S < APPLY_ELEMS else 1
    cdef Py_ssize_t blocks = (runs + per_block - 1) // per_block
    cdef int nt = threads_for(blocks, runs * S, n_threads)
    cdef const unsigned char* bits = NULL if mask is None else &mask[0]
    cdef floating* gp = NULL if g is None else &g[0, 0, 0]
    cdef floating* dxp = NULL if dx is None else &dx[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef Py_ssize_t blk
    # Streaming stores only where every run starts on a 16-byte boundary: a line
    # written partly by movnt and partly by plain stores is very slow.
    stream = stream and bits == NULL and _aligned16(dxp, S * sizeof(floating))
    with nogil:
        if nt == 1:  # see reduce_channels_first
            for blk in range(blocks):
                _apply_first_block(blk, xp, dyp, bits, coef, dxp, gp, runs, C, S, per_block,
                                   training, stream)
        else:
            for blk in prange(blocks, schedule='dynamic', chunksize=1, num_threads=nt):
                _apply_first_block(blk, xp, dyp, bits, coef, dxp, gp, runs, C, S, per_block,
                                   training, stream)


cdef inline void _apply_last_block(Py_ssize_t blk, const floating* xp, const floating* dyp,
                                   const unsigned char* bits, const floating* tile,
                                   floating* dxp, floating* gp, Py_ssize_t total, Py_ssize_t W,
                                   Py_ssize_t per_block, bint training,
                                   bint stream) noexcept nogil:
    """Values [blk * per_block, ...) of the flat (M, C) array, in W-long tile pieces."""
    cdef Py_ssize_t i_end = min(total, (blk + 1) * per_block)
    cdef Py_ssize_t i = blk * per_block
    while i < i_end:
        _grad_tiled(xp + i, dyp + i, bits, i, min(W, i_end - i), tile, W, training, stream,
                    NULL if dxp == NULL else dxp + i, NULL if gp == NULL else gp + i)
        i = i + W
    if stream:
        bnfast_stream_fence()


def apply_channels_last(const floating[:, ::1] x,       # IN  (M, C) (not read in eval)
                        const floating[:, ::1] dy,      # IN  (M, C)
                        const unsigned char[::1] mask,  # IN  packed ReLU mask, or None
                        const double[:, ::1] coef,      # IN  (>= 4, C) from coefficients()
                        floating[:, ::1] dx,            # OUT (M, C), or None (g only)
                        floating[:, ::1] g,             # OUT (M, C) masked dy, or None
                        bint training, bint stream, int n_threads):
    """dx of (M, C) rows (and the masked dy into g when asked), one pass (see apply_channels_first)."""
    cdef Py_ssize_t M = dy.shape[0], C = dy.shape[1]
    if M == 0 or C == 0 or (dx is None and (mask is None or g is None)):
        return
    # The coefficient pattern repeats every C values of the flat array: tile it
    # k times; every W-aligned piece starts at channel 0.  k is rounded to a
    # multiple of q so that W values are whole 16-byte units where possible.
    cdef Py_ssize_t k = APPLY_WIDTH // C if C < APPLY_WIDTH else 1
    cdef Py_ssize_t q = (16 // sizeof(floating)) // _gcd(C, 16 // sizeof(floating))
    if k >= q:
        k = k - k % q
    cdef Py_ssize_t W = k * C, total = M * C
    cdef Py_ssize_t per_block = (APPLY_ELEMS // W if W < APPLY_ELEMS else 1) * W
    cdef Py_ssize_t blocks = (total + per_block - 1) // per_block
    cdef int nt = threads_for(blocks, total, n_threads)
    cdef const unsigned char* bits = NULL if mask is None else &mask[0]
    cdef floating* gp = NULL if g is None else &g[0, 0]
    cdef floating* dxp = NULL if dx is None else &dx[0, 0]
    cdef floating* tile = <floating*>malloc(4 * W * sizeof(floating))
    if tile == NULL:
        raise MemoryError()
    cdef Py_ssize_t j, blk
    stream = stream and bits == NULL and _aligned16(dxp, W * sizeof(floating))
    for j in range(W):
        tile[j] = <floating>coef[0, j % C]
        tile[W + j] = <floating>coef[1, j % C]
        tile[2 * W + j] = <floating>coef[2, j % C]
        tile[3 * W + j] = _offset_in(tile[j], coef, j % C)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* dyp = &dy[0, 0]
    try:
        with nogil:
            if nt == 1:  # see reduce_channels_first
                for blk in range(blocks):
                    _apply_last_block(blk, xp, dyp, bits, tile, dxp, gp, total, W, per_block,
                                      training, stream)
            else:
                for blk in prange(blocks, schedule='dynamic', chunksize=1, num_threads=nt):
                    _apply_last_block(blk, xp, dyp, bits, tile, dxp, gp, total, W, per_block,
                                      training, stream)
    finally:
        free(tile)


# -- the ReLU mask ----------------------------------------------------------------------
cdef inline void _pack_block(const floating* yp, unsigned char* bp, Py_ssize_t i0,
                             Py_ssize_t n) noexcept nogil:
    """Bits of y[i0:i0 + n] into bp[i0 // 8:] (i0 a multiple of 8)."""
    if floating is float:
        bnfast_pack_positive_f32(yp + i0, n, bp + i0 // 8)
    else:
        bnfast_pack_positive_f64(yp + i0, n, bp + i0 // 8)


def pack_positive(const floating[::1] y,      # IN  flat output of the fused forward
                  unsigned char[::1] bits,    # OUT (ceil(n / 8),) little bit order
                  int n_threads):
    """bits of ``not (y <= 0)``: where the ReLU passed its input's gradient (NaN included)."""
    cdef Py_ssize_t n = y.shape[0]
    if n == 0:
        return
    cdef Py_ssize_t blocks = (n + PACK_ELEMS - 1) // PACK_ELEMS
    cdef int nt = threads_for(blocks, n, n_threads)
    cdef const floating* yp = &y[0]
    cdef unsigned char* bp = &bits[0]
    cdef Py_ssize_t blk
    with nogil:
        if nt == 1:  # see reduce_channels_first
            for blk in range(blocks):
                _pack_block(yp, bp, blk * PACK_ELEMS, min(PACK_ELEMS, n - blk * PACK_ELEMS))
        else:
            for blk in prange(blocks, schedule='dynamic', chunksize=1, num_threads=nt):
                _pack_block(yp, bp, blk * PACK_ELEMS, min(PACK_ELEMS, n - blk * PACK_ELEMS))
