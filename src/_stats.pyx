"""Per-channel batch statistics (mean and biased variance), float64 accumulation.

The kernels live in ``_batch_stats.pxd`` (shared with the one-call paths of
``_inference.pyx``); these are their typed-memoryview entry points for the
functional layer.  ``channels_first`` takes ``(N, C, S)``, ``channels_last``
``(M, C)`` rows; any thread count gives the same bits.
"""
from cython cimport floating

cimport _batch_stats
from _batch_stats cimport buffer_t, stats_first, stats_last


def channels_first(const floating[:, :, ::1] x,  # IN  (N, C, S)
                   double[::1] mean,              # OUT (C,)
                   double[::1] var,               # OUT (C,) biased
                   int n_threads,
                   double[::1] residual=None):    # OUT (C,) exact mean - mean, or None
    """Per-channel mean and biased variance of an (N, C, S) array."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    if N == 0 or C == 0 or S == 0:
        return
    cdef int status
    with nogil:
        status = stats_first(&x[0, 0, 0], N, C, S, &mean[0], &var[0], n_threads,
                             NULL if residual is None else &residual[0])
    if status:
        raise MemoryError()


def channels_last(const floating[:, ::1] x,  # IN  (M, C)
                  double[::1] mean,           # OUT (C,)
                  double[::1] var,            # OUT (C,) biased
                  int n_threads,
                  double[::1] residual=None): # OUT (C,) exact mean - mean, or None
    """Per-channel mean and biased variance of an (M, C) array (channels-last rows)."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    if M == 0 or C == 0:
        return
    cdef int status
    with nogil:
        status = stats_last(&x[0, 0], M, C, &mean[0], &var[0], n_threads,
                            NULL if residual is None else &residual[0])
    if status:
        raise MemoryError()


def update_running(buffer_t[::1] running_mean,  # IN/OUT (C,)
                   buffer_t[::1] running_var,   # IN/OUT (C,)
                   const double[::1] mean,      # IN (C,) batch mean
                   const double[::1] var,       # IN (C,) biased batch variance
                   double count, double momentum):
    """PyTorch's running-stat update in place, computed in double and rounded once.

    running = (1 - momentum) * running + momentum * batch, with the unbiased
    variance var * count / (count - 1) for running_var.
    """
    if mean.shape[0] == 0:
        return
    with nogil:
        _batch_stats.update_running(&running_mean[0], &running_var[0], &mean[0], &var[0],
                                    mean.shape[0], count, momentum)
