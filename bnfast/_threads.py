"""Resolve the ``n_threads`` argument the way scikit-learn does."""
import numbers

from . import _openmp


def resolve_threads(n_threads=None):
    """Return the number of OpenMP threads a kernel call should use.

    Parameters
    ----------
    n_threads : int or None
        ``None`` means the OpenMP maximum *now* (``omp_get_max_threads()``), so
        ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` are
        honoured; but 1 while other processes compete for the cores (for a
        second after the kernel last preempted one of this process's
        threads: a team is only as fast as its preempted thread).  A positive
        int is used as given; a negative one counts back from the maximum
        (``-1``: all, ``-2``: all but one).  ``0`` is an error.

    Returns
    -------
    int
        At least 1.  A serial build always returns 1.
    """
    if n_threads is None:
        return _openmp.default_threads()
    max_threads = _openmp.max_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    n_threads = int(n_threads)
    if n_threads == 0:
        raise ValueError("n_threads=0 is invalid: use None for the OpenMP default, or a positive int")
    if n_threads < 0:
        n_threads = max(1, max_threads + 1 + n_threads)
    return n_threads if _openmp.openmp_enabled() else 1
