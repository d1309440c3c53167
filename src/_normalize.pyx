"""The normalise pass with its fused epilogue: ``y = relu?((x - mean) * scale + shift + addend?)``.

Per-channel coefficients are prepared in double (``coefficients``) and applied
in double, rounded once to the storage type.  A batch mean comes with its
residual (``_stats``), folded into the shift, so data far from zero keeps its
precision: ``x - mean`` is exact there (Sterbenz).

One read of x (and addend), one write of y, in either memory layout.  ``out``
may be ``x`` or ``addend`` itself: every element is read before it is written.
"""
from cython cimport floating

from _affine cimport fill_coefficients, normalize, param_t, stat_t

# Rows of the coefficient table.
MEAN, INVSTD, SCALE, SHIFT = 0, 1, 2, 3


def coefficients(const stat_t[::1] mean,      # IN (C,) batch or running mean
                 const stat_t[::1] var,       # IN (C,) biased batch or running variance
                 const param_t[::1] weight,   # IN (C,) gamma (ignored unless has_weight)
                 const param_t[::1] bias,     # IN (C,) beta (ignored unless has_bias)
                 bint has_weight, bint has_bias, double eps,
                 double[:, ::1] coef):        # OUT (4, C): mean, invstd, scale, shift
    """Per-channel coefficients in double: invstd = 1/sqrt(var + eps), scale = weight * invstd."""
    if mean.shape[0] == 0:
        return
    with nogil:
        fill_coefficients(&mean[0], &var[0], &weight[0] if has_weight else NULL,
                           &bias[0] if has_bias else NULL, mean.shape[0], eps, &coef[0, 0])


def channels_first(const floating[:, :, ::1] x,       # IN  (N, C, S)
                   const double[:, ::1] coef,         # IN  (4, C) from coefficients()
                   floating[:, :, ::1] out,           # OUT (N, C, S), may be x or addend
                   const floating[:, :, ::1] addend,  # IN  (N, C, S) or None
                   bint relu, int n_threads,
                   unsigned char[::1] mask=None,      # OUT (ceil(N*C*S / 8),) or None
                   const double[::1] residual=None):  # IN  (C,) from _stats, or None
    """Apply the per-channel affine map (and epilogue) to an (N, C, S) array.

    With ``mask``, also pack ``not (out <= 0)`` (where a ReLU passes gradient)
    from each block while it is in cache: no second pass over ``out``.
    ``residual``: the batch mean's residual (``_stats``), folded into the shift.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    if N == 0 or C == 0 or S == 0:
        return
    cdef int status
    with nogil:
        status = normalize(&x[0, 0, 0], NULL if addend is None else &addend[0, 0, 0],
                           &out[0, 0, 0], N, C, S, &coef[0, 0], relu, n_threads,
                           NULL if mask is None else &mask[0],
                           NULL if residual is None else &residual[0])
    if status:
        raise MemoryError()


def channels_last(const floating[:, ::1] x,       # IN  (M, C)
                  const double[:, ::1] coef,      # IN  (4, C) from coefficients()
                  floating[:, ::1] out,           # OUT (M, C), may be x or addend
                  const floating[:, ::1] addend,  # IN  (M, C) or None
                  bint relu, int n_threads,
                  unsigned char[::1] mask=None,      # OUT (ceil(M*C / 8),) or None
                  const double[::1] residual=None):  # IN  (C,) from _stats, or None
    """Apply the per-channel affine map (and epilogue) to an (M, C) array.

    ``mask``, ``residual``: as in :func:`channels_first`.
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    if M == 0 or C == 0:
        return
    cdef int status
    with nogil:
        status = normalize(&x[0, 0], NULL if addend is None else &addend[0, 0],
                           &out[0, 0], M, C, 0, &coef[0, 0], relu, n_threads,
                           NULL if mask is None else &mask[0],
                           NULL if residual is None else &residual[0])
    if status:
        raise MemoryError()


