"""The normalise pass with its fused epilogue: ``y = relu?((x - mean) * scale + shift + addend?)``.

Per-channel coefficients are prepared in double (``coefficients``) and applied
in the storage type.  The mean is split as ``m = float(mean)``, and its rounding
error is folded into the shift, so float32 data far from zero (mean 1e6,
std 1) still normalises to ~1e-6: ``x - m`` is exact there (Sterbenz).

One read of x (and addend), one write of y, in either memory layout.  ``out``
may be ``x`` or ``addend`` itself: every element is read before it is written.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from _tiling cimport _gcd, tile_repeat
from _openmp_helpers cimport threads_for

ctypedef fused stat_t:
    float
    double

ctypedef fused param_t:
    float
    double

cdef enum:
    # Elements per parallel task in the channels-last layout.
    BLOCK_ELEMS = 16384

# Rows of the coefficient table.
MEAN, INVSTD, SCALE, SHIFT = 0, 1, 2, 3


def coefficients(const stat_t[::1] mean,      # IN (C,) batch or running mean
                 const stat_t[::1] var,       # IN (C,) biased batch or running variance
                 const param_t[::1] weight,   # IN (C,) gamma (ignored unless has_weight)
                 const param_t[::1] bias,     # IN (C,) beta (ignored unless has_bias)
                 bint has_weight, bint has_bias, double eps,
                 double[:, ::1] coef):        # OUT (4, C): mean, invstd, scale, shift
    """Per-channel coefficients in double: invstd = 1/sqrt(var + eps), scale = weight * invstd."""
    cdef Py_ssize_t c, C = mean.shape[0]
    cdef double* mu = &coef[0, 0]
    cdef double* invstd = mu + C
    cdef double* scale = mu + 2 * C
    cdef double* shift = mu + 3 * C
    with nogil:
        # Separate branch-free loops so each one vectorises.
        for c in range(C):
            mu[c] = mean[c]
            invstd[c] = 1.0 / sqrt(<double>var[c] + eps)
        if has_weight:
            for c in range(C):
                scale[c] = invstd[c] * weight[c]
        else:
            for c in range(C):
                scale[c] = invstd[c]
        if has_bias:
            for c in range(C):
                shift[c] = bias[c]
        else:
            for c in range(C):
                shift[c] = 0.0


cdef void _fill_table(const double[:, ::1] coef, Py_ssize_t C, Py_ssize_t repeat,
                      floating* table) noexcept nogil:
    """Fill [m | a | b], each of length repeat * C, for y = (x - m) * a + b.

    m is the mean rounded to the storage type; its rounding error is folded
    into b in double, so float32 data far from zero keeps its precision.
    The channel pattern is repeated ``repeat`` times (a channels-last tile).
    """
    cdef Py_ssize_t W = repeat * C, c, j
    cdef const double* mean = &coef[0, 0]
    cdef const double* scale = mean + 2 * C
    cdef const double* shift = mean + 3 * C
    for c in range(C):
        table[c] = <floating>mean[c]
        table[W + c] = <floating>scale[c]
        table[2 * W + c] = <floating>(shift[c] - (mean[c] - <double>table[c]) * scale[c])
    for j in range(C, W):  # the tile's repeats
        table[j] = table[j - C]
        table[W + j] = table[W + j - C]
        table[2 * W + j] = table[2 * W + j - C]


cdef extern from "bnfast_simd.h" nogil:
    # SIMD leaves (AVX2 picked at run time); the epilogue branches are hoisted there.
    void bnfast_affine_scalar_f32(const float* x, const float* add, float* y, Py_ssize_t n,
                                  float m, float a, float b, int relu)
    void bnfast_affine_scalar_f64(const double* x, const double* add, double* y, Py_ssize_t n,
                                  double m, double a, double b, int relu)
    void bnfast_affine_tiled_f32(const float* x, const float* add, float* y, Py_ssize_t n,
                                 Py_ssize_t W, const float* m, const float* a, const float* b,
                                 int relu)
    void bnfast_affine_tiled_f64(const double* x, const double* add, double* y, Py_ssize_t n,
                                 Py_ssize_t W, const double* m, const double* a, const double* b,
                                 int relu)


cdef extern from "bnfast_backward_simd.h" nogil:
    void bnfast_pack_positive_f32(const float* y, Py_ssize_t n, unsigned char* bits)
    void bnfast_pack_positive_f64(const double* y, Py_ssize_t n, unsigned char* bits)


cdef inline void _pack_block(const floating* y, Py_ssize_t start, Py_ssize_t n,
                             unsigned char* bits) noexcept nogil:
    """ReLU mask bits of y[start:start + n], just written (still in cache).

    ``start`` is a multiple of 8, so threads never share a byte.
    """
    if bits == NULL:
        return
    if floating is float:
        bnfast_pack_positive_f32(y + start, n, bits + start // 8)
    else:
        bnfast_pack_positive_f64(y + start, n, bits + start // 8)


cdef inline Py_ssize_t _byte_aligned(Py_ssize_t units, Py_ssize_t unit_len) noexcept nogil:
    """units rounded up so that units * unit_len is a multiple of 8 (whole mask bytes)."""
    cdef Py_ssize_t step = 8 // _gcd(unit_len, 8)
    return (units + step - 1) // step * step


cdef inline void _apply_scalar(const floating* x, const floating* addend, floating* y,
                               Py_ssize_t n, floating m, floating a, floating b,
                               bint relu) noexcept nogil:
    if floating is float:
        bnfast_affine_scalar_f32(x, addend, y, n, m, a, b, relu)
    else:
        bnfast_affine_scalar_f64(x, addend, y, n, m, a, b, relu)


cdef inline void _apply_tiled(const floating* x, const floating* addend, floating* y,
                              Py_ssize_t n, Py_ssize_t W, const floating* m, const floating* a,
                              const floating* b, bint relu) noexcept nogil:
    # n values from a W-aligned start, as pieces of the W-long tile m, a, b.
    if floating is float:
        bnfast_affine_tiled_f32(x, addend, y, n, W, m, a, b, relu)
    else:
        bnfast_affine_tiled_f64(x, addend, y, n, W, m, a, b, relu)


def channels_first(const floating[:, :, ::1] x,       # IN  (N, C, S)
                   const double[:, ::1] coef,         # IN  (4, C) from coefficients()
                   floating[:, :, ::1] out,           # OUT (N, C, S), may be x or addend
                   const floating[:, :, ::1] addend,  # IN  (N, C, S) or None
                   bint relu, int n_threads,
                   unsigned char[::1] mask=None):     # OUT (ceil(N*C*S / 8),) or None
    """Apply the per-channel affine map (and epilogue) to an (N, C, S) array.

    With ``mask``, also pack ``not (out <= 0)`` (where a ReLU passes gradient)
    from each block while it is in cache: no second pass over ``out``.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    if N == 0 or C == 0 or S == 0:
        return
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &out[0, 0, 0]
    cdef const floating* ap = NULL if addend is None else &addend[0, 0, 0]
    # Tasks are blocks of consecutive (n, c) runs: the channel index is found
    # with one division per block and then stepped.
    cdef Py_ssize_t runs = N * C
    cdef Py_ssize_t per_block = _byte_aligned(BLOCK_ELEMS // S if S < BLOCK_ELEMS else 1, S)
    cdef Py_ssize_t blocks = (runs + per_block - 1) // per_block
    cdef Py_ssize_t blk, t, c, off
    cdef unsigned char* bits = NULL if mask is None else &mask[0]
    cdef floating* table = <floating*>malloc(3 * C * sizeof(floating))
    if table == NULL:
        raise MemoryError()
    _fill_table(coef, C, 1, table)
    cdef int nt = threads_for(blocks, runs * S, n_threads)
    try:
        with nogil:
            for blk in prange(blocks, schedule='static', num_threads=nt):
                c = (blk * per_block) % C
                for t in range(blk * per_block, min(runs, (blk + 1) * per_block)):
                    off = t * S
                    _apply_scalar(xp + off, NULL if ap == NULL else ap + off, yp + off, S,
                                  table[c], table[C + c], table[2 * C + c], relu)
                    c = c + 1
                    if c == C:
                        c = 0
                t = blk * per_block
                _pack_block(yp, t * S, (min(runs, t + per_block) - t) * S, bits)
    finally:
        free(table)


def channels_last(const floating[:, ::1] x,       # IN  (M, C)
                  const double[:, ::1] coef,      # IN  (4, C) from coefficients()
                  floating[:, ::1] out,           # OUT (M, C), may be x or addend
                  const floating[:, ::1] addend,  # IN  (M, C) or None
                  bint relu, int n_threads,
                  unsigned char[::1] mask=None):  # OUT (ceil(M*C / 8),) or None
    """Apply the per-channel affine map (and epilogue) to an (M, C) array.

    ``mask``: as in :func:`channels_first`.
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    if M == 0 or C == 0:
        return
    # The coefficient pattern repeats every C values of the flat array: tile it
    # k times so that small C still gives long vector loops.  Every W-aligned
    # piece starts at channel 0, so a short last piece needs no special case.
    cdef Py_ssize_t k = tile_repeat(C)
    cdef Py_ssize_t W = k * C, total = M * C
    cdef Py_ssize_t per_block = _byte_aligned(BLOCK_ELEMS // W if W < BLOCK_ELEMS else 1, W) * W
    cdef Py_ssize_t blocks = (total + per_block - 1) // per_block
    cdef floating* tile = <floating*>malloc(3 * W * sizeof(floating))
    if tile == NULL:
        raise MemoryError()
    _fill_table(coef, C, k, tile)
    cdef Py_ssize_t blk, i
    cdef unsigned char* bits = NULL if mask is None else &mask[0]
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &out[0, 0]
    cdef const floating* ap = NULL if addend is None else &addend[0, 0]
    cdef int nt = threads_for(blocks, total, n_threads)
    try:
        with nogil:
            for blk in prange(blocks, schedule='static', num_threads=nt):
                i = blk * per_block
                _apply_tiled(xp + i, NULL if ap == NULL else ap + i, yp + i,
                             min(total, i + per_block) - i, W, tile, tile + W, tile + 2 * W, relu)
                _pack_block(yp, i, min(total, i + per_block) - i, bits)
    finally:
        free(tile)
