"""What OpenMP the kernels were built with, queried at run time.

(No array arguments here, so none of the const memoryviews the kernels use.)
"""
from _openmp_helpers cimport BNFAST_OPENMP, bnfast_default_threads, bnfast_max_threads


def openmp_enabled():
    """Return True if the kernels were compiled with OpenMP."""
    return bool(BNFAST_OPENMP)


def max_threads():
    """Return ``omp_get_max_threads()`` now (1 in a serial build).

    Asked on every call so ``OMP_NUM_THREADS`` and threadpoolctl limits, which
    change the OpenMP runtime's setting, are honoured.
    """
    return bnfast_max_threads()


def default_threads():
    """Return the thread count for ``n_threads=None``: ``max_threads()``, or 1
    while other processes compete for the cores (see _openmp_helpers.pxd)."""
    return bnfast_default_threads()
