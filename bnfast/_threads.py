"""Resolve the ``n_threads`` argument the way scikit-learn does, and stay serial
in a process forked after bnfast ran multi-threaded (GNU OpenMP would hang there).
"""
import numbers
import os
import sys
import warnings

from . import _openmp

# The most threads a call may ask for (larger values raise ValueError, as 0 does):
# far above any core count, and within a C int, which the kernels take.
MAX_THREADS = 1 << 16

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Set once this process (or its parent, before a fork) has resolved a call to
# more than one thread: OpenMP may then have started its thread pool.
_went_parallel = False
# Set in a child forked after that: its copy of GNU libgomp's pool refers to
# threads that do not exist in the child, so its first parallel region would wait
# for them forever.  Every call of such a child runs on one thread.
_forked_after_parallel = False
_fork_warned = False

FORK_WARNING = (
    "bnfast runs single-threaded in this process: it was forked after bnfast ran "
    "multi-threaded OpenMP code, and OpenMP (GNU libgomp) cannot start threads in such a "
    "child (it would hang).  To keep threads in workers, start them with the 'spawn' or "
    "'forkserver' method, or fork before the first bnfast call."
)


def _after_fork_in_child():
    global _forked_after_parallel
    if _went_parallel:
        _forked_after_parallel = True


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_n_threads(n_threads):
    """Validate an ``n_threads`` argument; return it as an int, or None.

    Raises
    ------
    TypeError
        Not an int (bool included) or None.
    ValueError
        0, or beyond ``MAX_THREADS`` either way.
    """
    if type(n_threads) is int:
        if 0 < n_threads <= MAX_THREADS:  # fast path (an ABC check costs ~0.4 us)
            return n_threads
    elif n_threads is None:
        return None
    elif isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    n_threads = int(n_threads)
    if n_threads == 0:
        raise ValueError("n_threads=0 is invalid: use None for the OpenMP default, "
                         "or a positive int")
    if abs(n_threads) > MAX_THREADS:
        raise ValueError(f"n_threads={n_threads} is out of range: at most {MAX_THREADS} threads "
                         f"(or at least -{MAX_THREADS}, counting back from the maximum)")
    return n_threads


def resolve_threads(n_threads=None):
    """Return the number of OpenMP threads a kernel call should use.

    Parameters
    ----------
    n_threads : int or None
        ``None`` means the OpenMP maximum *now* (``omp_get_max_threads()``), so
        ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` are
        honoured; but 1 while other processes compete for the cores (the
        kernel preempts this process's threads more than 120 times a second:
        a team is only as fast as its preempted thread; see
        ``src/_openmp_helpers.pxd``).  A positive
        int is used as given; a negative one counts back from the maximum
        (``-1``: all, ``-2``: all but one).  ``0`` and values beyond
        ``MAX_THREADS`` (65536) either way are errors.

    Returns
    -------
    int
        From 1 to ``MAX_THREADS``.  A serial build always returns 1, and so
        does a process forked after bnfast ran multi-threaded (with a one-time
        ``RuntimeWarning``): OpenMP would hang there.

    Raises
    ------
    TypeError, ValueError
        See :func:`check_n_threads`.
    """
    global _went_parallel
    if n_threads is None:
        nt = _openmp.default_threads()
    else:
        nt = check_n_threads(n_threads)
        if nt < 0:
            nt = max(1, _openmp.max_threads() + 1 + nt)
        elif not _openmp.openmp_enabled():
            nt = 1
    if nt > 1:
        if _forked_after_parallel:
            _warn_forked()
            return 1
        _went_parallel = True
    return nt


def _warn_forked():
    global _fork_warned
    if not _fork_warned:
        _fork_warned = True
        # RuntimeWarning: a condition of the run time environment changes how the
        # call runs (not its result); shown by default, unlike ResourceWarning.
        warnings.warn(FORK_WARNING, RuntimeWarning, stacklevel=_caller_level())


def _caller_level():
    """The ``stacklevel`` of the first caller outside bnfast, as seen from _warn_forked."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
