"""Batch Normalization of dask arrays: batches larger than memory, or spread over a cluster.

* :func:`batch_stats`: per-channel ``(mean, var, count)`` of an ``(N, C, *spatial)``
  dask array chunked along any axes, by ``dask.array.reduction`` with bnfast's
  statistics records as partials (float64, from the training kernel, whatever
  the input dtype) and the one merge (:mod:`bnfast._records`) as combine and
  aggregate.  dask's own float32 ``var`` errs by ~1e-4 relative on mean-1000
  data; these statistics are as exact as the in-memory kernel's.
* :func:`batch_norm`: training (the statistics, computed once; running buffers
  updated once; then a blockwise normalise) and evaluation (``map_blocks`` with
  the running statistics, no reduction), with the fused addend and ReLU.
  Output chunks are the input's.
* :func:`population_stats`: the exact mean and variance of a whole data set
  (a dask array, or an iterable of batches), to recalibrate a module's running
  statistics ("precise BN") with the population's, not an average of batch
  variances.

Results equal in-memory bnfast on the same data within 1 ulp (float32) or
1e-12 relative (float64, while |mean| / std stays below ~1e4), whatever the
chunking.  The merged mean is one float64, while the in-memory kernel also
carries what rounding the mean lost: float64 data at mean 1e10, std 1,
normalise to ~1e-6 of the exact result here, ~1e-15 in memory.
"""
import numpy as np

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError('bnfast.dask needs dask: pip install "bnfast[dask]"') from exc

from . import functional as F
from ._dtypes import SUPPORTED_TEXT, is_supported
from ._records import Record, merge, record_of, running_update
from ._threads import check_n_threads
from ._validation import (
    check_channel_vector,
    check_eps,
    check_flag,
    check_momentum,
    check_running_stats,
)

__all__ = ["batch_norm", "batch_stats", "population_stats"]

# What the reduction's aggregate returns per channel (a record, as one array).
STATS_DTYPE = np.dtype([("count", np.int64), ("mean", np.float64), ("m2", np.float64)])


def _check_dask_input(x, name="x"):
    """A dask array (array-likes are wrapped) of a supported float dtype, ndim >= 2."""
    if not isinstance(x, da.Array):
        x = da.asarray(x)
    if not is_supported(x.dtype):
        raise TypeError(f"{name} must be a {SUPPORTED_TEXT} array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C, *spatial) with at least 2 dimensions, "
                         f"got shape {x.shape}")
    if any(np.isnan(s) for s in x.shape):
        raise ValueError(f"{name} must have known chunk sizes (call x.compute_chunk_sizes())")
    return x


# -- the reduction ----------------------------------------------------------------------
def _flatten(parts):
    """The partials dask hands over (nested lists, one level per reduced axis), in order."""
    if isinstance(parts, list):
        for p in parts:
            yield from _flatten(p)
    else:
        yield parts


def _chunk(block, axis, keepdims, computing_meta=False):
    if computing_meta:
        return np.empty((0,) * block.ndim, STATS_DTYPE)
    return record_of(block, n_threads=1)  # dask runs blocks in parallel already


def _combine(parts, axis, keepdims):
    return merge(list(_flatten(parts)))


def _aggregate(parts, axis, keepdims):
    rec = merge(list(_flatten(parts)))
    out = np.empty(rec.mean.shape, STATS_DTYPE)
    out["count"] = rec.count
    out["mean"] = rec.mean
    out["m2"] = rec.m2
    return out


def _stats(x, split_every):
    """The per-channel records of ``x`` as a lazy (C,) array of STATS_DTYPE."""
    axes = (0,) + tuple(range(2, x.ndim))
    return da.reduction(x, _chunk, _aggregate, combine=_combine, axis=axes, dtype=STATS_DTYPE,
                        concatenate=False, split_every=split_every,
                        meta=np.empty((0,), STATS_DTYPE), name="bnfast-batch-stats")


def _record(stats):
    """A computed (C,) STATS_DTYPE array as one Record (count is the same for every channel)."""
    count = int(stats["count"][0]) if stats.shape[0] else 0
    return Record(count, np.ascontiguousarray(stats["mean"]), np.ascontiguousarray(stats["m2"]))


def batch_stats(x, *, split_every=None):
    """Per-channel mean, biased variance and count of an ``(N, C, *spatial)`` dask array.

    Parameters
    ----------
    x : dask.array.Array (or array_like), float32 or float64
        Chunked along any axes.
    split_every : int, optional
        dask's tree-reduction fan-in (see ``dask.array.reduction``).

    Returns
    -------
    mean, var, count : dask.array.Array of shape (C,)
        Lazy: float64, float64 (biased, as normalisation uses) and int64
        (values per channel).  Compute them together:
        ``dask.compute(*batch_stats(x))``.

    Examples
    --------
    >>> import dask, dask.array as da, numpy as np
    >>> from bnfast.dask import batch_stats
    >>> x = da.from_array(np.arange(12.0).reshape(6, 2), chunks=(2, 1))
    >>> dask.compute(*batch_stats(x))
    (array([5., 6.]), array([11.66666667, 11.66666667]), array([6, 6]))
    """
    x = _check_dask_input(x)
    stats = _stats(x, split_every)
    return stats["mean"], stats["m2"] / stats["count"], stats["count"]


def population_stats(data, *, module=None, split_every=None):
    """The exact mean and variance of a whole data set, per channel ("precise BN").

    One record per batch (or chunk), merged: the population's statistics,
    not an average of per-batch variances (which misses the spread of the
    batch means).

    Parameters
    ----------
    data : dask.array.Array, an ndarray, or an iterable of array_like batches
        ``(N, C, *spatial)`` values (batches may differ in N; an ndarray is
        one batch).
    module : bnfast BatchNorm module, optional
        If given, its ``running_mean`` and ``running_var`` are set to the
        population mean and the *unbiased* population variance (PyTorch's
        convention for running_var), in the module's dtype.
    split_every : int, optional
        For a dask array, as :func:`batch_stats`.

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        ``var`` is the biased (population) variance.
    count : int
        Values per channel.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> from bnfast.dask import population_stats
    >>> batches = [np.array([[0.0], [2.0]]), np.array([[10.0], [12.0]])]
    >>> population_stats(batches)
    (array([6.]), array([26.]), 4)
    """
    if isinstance(data, da.Array):
        rec = _record(_stats(_check_dask_input(data, "data"), split_every).compute())
    else:
        if isinstance(data, np.ndarray):  # one array is one batch, not an iterable of rows
            data = [data]
        records = [record_of(batch) for batch in data]
        if not records:
            raise ValueError("population_stats needs at least one batch")
        rec = merge(records)
    if rec.count == 0:
        raise ValueError("population_stats needs at least one value per channel")
    if module is not None:
        if not isinstance(getattr(module, "running_mean", None), (np.ndarray, type(None))):
            raise TypeError(f"module must be a bnfast BatchNorm (NumPy buffers), got "
                            f"{type(module).__name__}: for a torch module, copy the returned "
                            "mean and the unbiased variance into its buffers")
        if module.running_mean is None:
            raise ValueError("module has no running statistics (track_running_stats=False)")
        # running = 0 * running + 1 * population: the population's, rounded once.
        running_update(module.running_mean, module.running_var, rec, 1.0)
    return rec.mean, rec.var, rec.count


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, addend=None, relu=False, n_threads=None,
               split_every=None):
    """Batch Normalization of a dask array, as :func:`bnfast.batch_norm` of the whole array.

    Training (and evaluation without running statistics) computes the batch
    statistics first (:func:`batch_stats`, one ``compute``), updates the
    running buffers **once, in place**, then returns the lazy blockwise
    normalise.  Evaluation returns a lazy ``map_blocks`` over the running
    statistics, computing nothing.

    Parameters
    ----------
    x : dask.array.Array (or array_like), shape (N, C, *spatial)
        float32 or float64, chunked along any axes.
    running_mean, running_var, weight, bias, training, momentum, eps, relu, n_threads
        As :func:`bnfast.batch_norm` (the (C,) vectors are NumPy arrays;
        ``n_threads`` is per block).
    addend : dask.array.Array or array_like, optional
        x's shape and dtype; rechunked to x's chunks if they differ.
    split_every : int, optional
        The statistics' reduction fan-in (see :func:`batch_stats`).

    Returns
    -------
    dask.array.Array
        x's shape, dtype and chunks.

    Raises
    ------
    TypeError, ValueError
        As :func:`bnfast.batch_norm`; a single value per channel in training.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> from bnfast import dask as bdask
    >>> x = da.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), chunks=(2, 2))
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> bdask.batch_norm(x, rm, rv, training=True).compute().round(3)
    array([[-1.342, -1.342],
           [-0.447, -0.447],
           [ 0.447,  0.447],
           [ 1.342,  1.342]], dtype=float32)
    >>> rm
    array([0.3, 0.4], dtype=float32)
    """
    x = _check_dask_input(x)
    n_threads = check_n_threads(n_threads)  # now, not at compute(): buffers update first
    C = x.shape[1]
    training = check_flag(training, "training")
    batch_stats_ = training or (running_mean is None and running_var is None)
    momentum = check_momentum(momentum) if training else 0.0
    running_mean, running_var = check_running_stats(running_mean, running_var, C,
                                                    batch_stats_)
    weight = check_channel_vector(weight, "weight", C)
    bias = check_channel_vector(bias, "bias", C)
    eps = check_eps(eps, batch_stats_)
    if addend is not None:
        addend = _check_dask_input(addend, "addend")
        if addend.shape != x.shape:
            raise ValueError(f"addend must have the input's shape {x.shape}, "
                             f"got shape {addend.shape}")
        if addend.dtype != x.dtype:
            raise TypeError(f"addend must have the input's dtype {x.dtype}, got {addend.dtype}")
        if addend.chunks != x.chunks:
            addend = addend.rechunk(x.chunks)
    if batch_stats_:
        rec = _record(_stats(x, split_every).compute())
        if rec.count == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")
        if training and running_mean is not None and rec.count > 0:
            running_update(running_mean, running_var, rec, momentum)
        mean = rec.mean
        var = rec.var if rec.count > 0 else np.ones(C)
    else:
        # Snapshots: the lazy result must not see later in-place updates of the buffers.
        mean, var = running_mean.copy(), running_var.copy()
    if weight is not None:
        weight = weight.copy()
    if bias is not None:
        bias = bias.copy()
    args = [x] if addend is None else [x, addend]
    return da.map_blocks(_normalize_block, *args, mean=mean, var=var, weight=weight, bias=bias,
                         eps=eps, relu=bool(relu), n_threads=n_threads, dtype=x.dtype,
                         meta=np.empty((0,) * x.ndim, x.dtype), token="bnfast-batch-norm")


def _normalize_block(block, addend=None, *, mean, var, weight, bias, eps, relu, n_threads,
                     block_info=None):
    """One block normalised with given statistics (bnfast's evaluation arithmetic)."""
    lo, hi = block_info[0]["array-location"][1]
    channel = slice(lo, hi)
    return F.batch_norm(block, mean[channel], var[channel],
                        None if weight is None else weight[channel],
                        None if bias is None else bias[channel], False, 0.0, eps,
                        addend=addend, relu=relu, n_threads=n_threads)
