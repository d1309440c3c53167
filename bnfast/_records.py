"""One statistics record per chunk of a batch, and the one merge that combines them.

A :class:`Record` is what a chunk of an ``(N, C, *spatial)`` batch says about its
channels: the number of values per channel (``count``, one int for all channels)
and, per channel, the float64 ``mean`` and ``m2 = sum((x - mean)**2)``.  MPI
ranks (:mod:`bnfast.sync`) and dask chunks (:mod:`bnfast.dask`) produce one each
with :func:`record_of` and combine them with :func:`merge`, always in the order
given (rank order, chunk order), so every participant that merges the same
records gets the same bits.

Why this matches the kernels: :func:`record_of` takes ``mean`` and the biased
variance from ``bnfast._forward.moments``, the training forward's statistics
kernel, and :func:`merge` is the kernels' own combination of partials
(``src/_moments.pxd``: ``merge_partial``/``merge_rows``, Chan et al.), written
with the same operations in the same order::

    r = n_b / (n_a + n_b)
    delta = mean_b - mean_a
    mean = mean_a + (mean_b - mean_a) * r      (the weighted form where that is NaN)
    m2 = m2_a + m2_b + delta * (delta * (n_a * r))

starting, as the kernels do, from an empty accumulator (count 0, zeros).  The
kernels fold their OpenMP blocks' partials with these formulas, so a batch split
over ranks or chunks is merged exactly as a batch split over blocks: the
results differ only in the float64 rounding of the partials (tested to stay
within 1 ulp of the output dtype).
"""
import math
from typing import Sequence

import numpy as np

from . import _forward, _layout
from ._threads import resolve_threads
from ._validation import check_input, check_running_update

__all__ = ["Record", "merge", "record_of"]


class Record:
    """Per-channel statistics of a chunk: ``count`` values each, their ``mean`` and ``m2``.

    Attributes
    ----------
    count : int
        Values per channel (``N * prod(spatial)``); 0 for an empty chunk.
    mean : ndarray of float64, shape (C,)
    m2 : ndarray of float64, shape (C,)
        ``sum((x - mean)**2)`` per channel (``var * count``).
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        self.count = int(count)
        self.mean = mean
        self.m2 = m2

    def __repr__(self):
        return f"Record(count={self.count}, mean={self.mean!r}, m2={self.m2!r})"

    @property
    def var(self):
        """The biased (population) variance ``m2 / count`` (NaN for an empty record)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / self.count

    def to_buffer(self, out=None):
        """The record as ``2C + 1`` float64 words: ``[count (int64 bits), mean, m2]``.

        The wire format of one rank's record: one buffer, one collective.
        """
        C = self.mean.shape[0]
        buf = np.empty(2 * C + 1, np.float64) if out is None else out
        buf[:1].view(np.int64)[0] = self.count
        buf[1:C + 1] = self.mean
        buf[C + 1:] = self.m2
        return buf

    @classmethod
    def from_buffer(cls, buf):
        """The inverse of :meth:`to_buffer` (copies: the buffer may be reused)."""
        C = (buf.shape[0] - 1) // 2
        return cls(int(buf[:1].view(np.int64)[0]), buf[1:C + 1].copy(), buf[C + 1:].copy())


def empty_record(num_channels):
    """The record of no values: count 0, zeros (the merge's starting accumulator)."""
    return Record(0, np.zeros(num_channels), np.zeros(num_channels))


def record_of(x, *, n_threads=None):
    """The statistics record of a chunk ``x`` of shape ``(N, C, *spatial)``.

    Computed by the training forward's statistics kernel (float64 partials,
    whatever ``x``'s dtype), so merging the records of a split batch gives the
    statistics of the whole batch.

    Parameters
    ----------
    x : array_like, shape (N, C, *spatial)
        float32 or float64; any memory layout (as :func:`bnfast.batch_norm`).
        May be empty (N == 0 or a zero spatial size): count 0.
    n_threads : int, optional
        OpenMP threads; the record does not depend on it.

    Returns
    -------
    Record

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._records import merge, record_of
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> r = merge([record_of(x[:2]), record_of(x[2:])])
    >>> r.count, r.mean, r.var
    (6, array([5., 6.]), array([11.66666667, 11.66666667]))
    """
    x = check_input(x)
    nt = resolve_threads(n_threads)
    count = x.shape[0] * math.prod(x.shape[2:])
    C = x.shape[1]
    if count == 0 or C == 0:
        return empty_record(C)
    x, layout = _layout.in_kernel_layout(x)
    mean, var, _ = _forward.moments(x, layout, nt)
    return Record(count, mean, var * count)


def merge(records: Sequence[Record]):
    """Merge records in the order given (Chan et al., as the kernels merge partials).

    Empty records (count 0) are skipped, so an empty chunk or rank changes
    nothing.  The order is part of the result's bits: callers that must agree
    (every MPI rank) merge the same records in the same order.

    Parameters
    ----------
    records : sequence of Record
        All of one channel count.

    Returns
    -------
    Record
        The statistics of all the records' values together.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._records import Record, merge
    >>> merge([Record(2, np.array([1.0]), np.array([2.0])),
    ...        Record(2, np.array([3.0]), np.array([2.0]))])
    Record(count=4, mean=array([2.]), m2=array([8.]))
    """
    if not records:
        raise ValueError("merge needs at least one record")
    C = records[0].mean.shape[0]
    count = 0
    mean = np.zeros(C)
    m2 = np.zeros(C)
    with np.errstate(invalid="ignore", over="ignore"):
        for rec in records:
            if rec.mean.shape != (C,) or rec.m2.shape != (C,):
                raise ValueError(f"records must all have {C} channels, got mean of shape "
                                 f"{rec.mean.shape} and m2 of shape {rec.m2.shape}")
            if rec.count <= 0:
                continue
            n_a = float(count)
            r = rec.count / (n_a + rec.count)  # double division, as the kernels'
            delta = rec.mean - mean
            m2 = m2 + rec.m2 + delta * (delta * (n_a * r))
            mean = _merged_mean(mean, rec.mean, r)
            count += rec.count
    return Record(count, mean, m2)


def _merged_mean(mean_a, mean_b, r):
    """``mean_a + (mean_b - mean_a) * r``; the weighted form where that is NaN (an
    infinite mean: inf - inf), as ``_moments.merged_mean``."""
    m = mean_a + (mean_b - mean_a) * r
    nan = m != m
    if nan.any():
        m[nan] = (mean_a * (1.0 - r) + mean_b * r)[nan]
    return m


def running_update(running_mean, running_var, record, momentum):
    """PyTorch's running-stat update from a merged ``record`` (count > 1), in place.

    As the kernels' ``update_running``: computed in double and rounded once,
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    variance ``var * count / (count - 1)``.

    Raises ValueError for a record of one value per channel (no unbiased
    variance) and, as the core, OverflowError before anything is written when a
    half-precision buffer cannot hold its update.
    """
    if record.count <= 1:
        raise ValueError("the unbiased running variance needs more than 1 value per channel, "
                         f"got {record.count}")
    keep = 1.0 - momentum
    count = float(record.count)
    unbias = count / (count - 1.0)
    var = record.m2 / count
    new_mean = keep * running_mean.astype(np.float64) + momentum * record.mean
    new_var = keep * running_var.astype(np.float64) + momentum * (var * unbias)
    check_running_update((new_mean, new_var), running_mean, running_var)
    np.copyto(running_mean, new_mean, casting="unsafe")
    np.copyto(running_var, new_var, casting="unsafe")
