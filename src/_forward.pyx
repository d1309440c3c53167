"""The forward entry: every batch norm call, functional or module, reaches the kernels here.

One compiled call per forward: statistics (training, or evaluation without
running statistics), the running-stat update, the per-channel coefficients
and the normalise pass with its epilogue (addend, ReLU, packed ReLU mask).
The dtype switch happens here, on the NumPy type number; the kernels
(``_batch_stats.pxd``, ``_affine.pxd``) have one body per mode.

Nothing here validates: ``bnfast.functional.normalize`` has checked and laid
out every argument (the contract is in :func:`forward`'s docstring), so a call
costs what the kernels cost plus well under a microsecond.
"""
cimport cython
cimport numpy as cnp
from libc.math cimport fabs, isfinite
from libc.string cimport memcmp, memcpy

from _dtypes cimport CHANNELS_FIRST, bnfast_bf16, bnfast_f16, real_t
from _aligned cimport aligned_free, aligned_malloc
from _affine cimport apply_first, apply_last, fill_table, table_len
from _arrays cimport Shape, data_or_null as _data, kernel_shape as _kernel_shape
from _arrays cimport load_doubles as _load
from _batch_stats cimport stats_first, stats_last, update_running
from _tiling cimport APPLY_WIDTH, tile_repeat

import numpy as _np

from bnfast._layout import aligned_empty as _aligned_empty

cnp.import_array()

cdef double _INF = float("inf")

cdef enum:
    # Outputs of at least this many bytes are written with non-temporal stores:
    # 4 MiB, twice a core's L2 (was 16 MiB; 2 threads, eval 8x64x56x56 float32
    # 247 -> 204 us, 4096x512 347 -> 296, 4096x1024 bfloat16 399 -> 353).
    STREAM_BYTES = 1 << 22


cdef void _fill(object mean, object var, object weight, object bias, const double* residual,
                Py_ssize_t C, double eps, Py_ssize_t repeat, double* coef, double* table,
                double* scratch) noexcept:
    """coef rows mean, invstd, scale, shift and the apply table (``fill_table``'s,
    the channels repeated ``repeat`` times) from (C,) vectors of any float dtype.

    ``mean`` None: coef rows 0 and 1 already hold the batch mean and biased
    variance, and ``residual`` the mean's (else NULL).  scratch: 2 * C doubles.
    """
    if mean is not None:
        _load(mean, C, coef)
        _load(var, C, coef + C)
    cdef double* w = NULL
    cdef double* b = NULL
    if weight is not None:
        w = scratch
        _load(weight, C, w)
    if bias is not None:
        b = scratch + C
        _load(bias, C, b)
    fill_table(coef, coef + C, w, b, residual, C, eps, repeat, coef, table)


@cython.auto_pickle(False)  # a cache entry: never pickled (a module's cache pickles empty)
cdef class CoefficientTable:
    """One set of evaluation coefficients and the inputs they were computed from.

    Immutable: its arrays are read-only and never rewritten, so a forward may
    keep it as its snapshot for backward, and a kernel may read its tables
    without the GIL while another thread's call replaces the cache's entry.

    Attributes
    ----------
    key : tuple of 4 (ndarray or None)
        Copies of running_mean, running_var, weight, bias.
    table : ndarray of shape (4, C), float64
        mean, invstd, scale, shift computed from ``key``.
    storage_table : ndarray of float64, shape (table_len(C),)
        The apply table for ``y = (x - m) * a + b`` without tiling, as
        ``_affine.fill_table`` lays it out (double rows, float rows, a flag).
    mean, invstd : ndarray of shape (C,), float64
        ``table[0]`` and ``table[1]``.
    weight : ndarray of shape (C,), or None
        ``key[2]``.
    """
    cdef readonly tuple key
    cdef readonly object table, storage_table, mean, invstd, weight
    cdef double eps

    cdef bint matches(self, object mean, object var, object weight, object bias,
                      Py_ssize_t C, double eps) noexcept:
        if self.eps != eps or cnp.PyArray_DIM(<cnp.ndarray>self.table, 1) != C:
            return False
        return (_same_bytes(self.key[0], mean) and _same_bytes(self.key[1], var)
                and _same_bytes(self.key[2], weight) and _same_bytes(self.key[3], bias))


cdef CoefficientTable _new_table(object mean, object var, object weight, object bias,
                                 Py_ssize_t C, double eps):
    cdef CoefficientTable entry = CoefficientTable.__new__(CoefficientTable)
    entry.key = tuple(None if p is None else _frozen_copy(p) for p in (mean, var, weight, bias))
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = 4, C
    cdef cnp.ndarray table = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    cdef double* coef = <double*>cnp.PyArray_DATA(table)
    # On a cache line, as the kernels' own tables (_aligned.pxd).
    cdef cnp.ndarray storage = _aligned_empty(table_len(C), _np.float64)
    storage.fill(0.0)
    cdef double* scratch = <double*>aligned_malloc(2 * C * sizeof(double) + 1)
    if scratch == NULL:
        raise MemoryError()
    _fill(mean, var, weight, bias, NULL, C, eps, 1, coef,
          <double*>cnp.PyArray_DATA(storage), scratch)
    aligned_free(scratch)
    cnp.PyArray_CLEARFLAGS(table, cnp.NPY_ARRAY_WRITEABLE)
    cnp.PyArray_CLEARFLAGS(storage, cnp.NPY_ARRAY_WRITEABLE)
    entry.table, entry.storage_table = table, storage
    entry.mean, entry.invstd, entry.weight = table[0], table[1], entry.key[2]
    entry.eps = eps
    return entry


cdef class CoefficientCache:
    """A module's last evaluation coefficients, reused while their inputs are bitwise equal.

    Holds the last :class:`CoefficientTable`; every call compares its key with
    the running mean, running variance, weight and bias byte for byte
    (``memcmp``: ~0.2 us for 512 channels, against ~1 us of square roots and
    divisions), and eps, so in-place edits of any of them are always seen.
    (Not a cache by array identity: NumPy has no version counter to trust.)
    A miss replaces the entry, never rewrites it: calls in flight keep theirs.

    Attributes
    ----------
    current : CoefficientTable or None
        The last entry (None when empty).
    """
    cdef readonly CoefficientTable current

    def __reduce__(self):
        # Copies and pickles of a module start with an empty cache.
        return (CoefficientCache, ())

    cdef CoefficientTable lookup(self, object mean, object var, object weight, object bias,
                                 Py_ssize_t C, double eps):
        """The entry for these inputs: the stored one if it matches, else a new one."""
        cdef CoefficientTable entry = self.current
        # The apply table serves float32 and float64 data alike: not part of the key.
        if entry is None or not entry.matches(mean, var, weight, bias, C, eps):
            entry = _new_table(mean, var, weight, bias, C, eps)
            self.current = entry
        return entry


cdef inline bint _same_bytes(object mine, object given) noexcept:
    """Both None, or a contiguous ``given`` of ``mine``'s dtype and bytes."""
    if mine is None or given is None:
        return mine is given
    return (cnp.PyArray_TYPE(<cnp.ndarray>mine) == cnp.PyArray_TYPE(<cnp.ndarray>given)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>given)
            and memcmp(cnp.PyArray_DATA(<cnp.ndarray>mine), cnp.PyArray_DATA(<cnp.ndarray>given),
                       cnp.PyArray_NBYTES(<cnp.ndarray>given)) == 0)


cdef cnp.ndarray _frozen_copy(object v):
    cdef cnp.ndarray copy = cnp.PyArray_NewCopy(<cnp.ndarray>v, cnp.NPY_CORDER)
    cnp.PyArray_CLEARFLAGS(copy, cnp.NPY_ARRAY_WRITEABLE)
    return copy


class RunningUpdateOverflow(OverflowError):
    """A running buffer's update would round to inf in its own dtype (``forward``'s
    ``limits``); args: (0 for running_mean or 1 for running_var, channel, value)."""


def forward(x, int layout, running_mean, running_var, weight, bias, bint batch_stats,
            double momentum, double eps, addend, bint relu, out, int n_threads, coef, mask,
            CoefficientCache cache, limits=None):
    """Batch norm of ``x`` into ``out``: the one compiled forward.

    Parameters (all checked and laid out by the caller)
    ----------------------------------------------------
    x : ndarray, float32 or float64, ``ndim >= 2``, native byte order
        IN.  Memory in ``layout``: ``CHANNELS_FIRST`` (0), C-contiguous
        ``(N, C, *spatial)`` or a Fortran-ordered ``(N, C)``;
        ``CHANNELS_LAST`` (1), channels varying fastest (``nhwc.transpose``,
        or any C-contiguous array with one value per sample and channel).
    running_mean, running_var : (C,) float32/float64 ndarrays, or both None
        IN (evaluation: any strides, each its dtype) or INOUT (``batch_stats``:
        updated in place; then both C-contiguous, of one dtype).
    weight, bias : (C,) float32/float64 ndarrays of any strides, or None (1 and 0)
        IN.
    batch_stats : normalise with the batch's statistics (else the running ones)
    momentum : the running-stat update factor (with ``batch_stats``)
    eps : positive
    addend : None, or an ndarray of x's shape, dtype and layout; IN
    relu : apply ``max(y, 0)`` last
    out : ndarray of x's shape, dtype and layout; OUT (may be x or addend itself)
    n_threads : positive; the result does not depend on it
    coef : None, or a writable (4, C) float64 array; OUT: mean, invstd, scale, shift
    mask : None, or a zeroed writable uint8 array of ``ceil(x.size / 8)`` bytes;
        OUT: the ReLU mask bits ``not (out <= 0)`` in memory order
    cache : None, or the module's CoefficientCache (evaluation only)
    limits : None, or (mean_limit, var_limit): with ``batch_stats``, the
        magnitudes from which the running buffers' own dtypes round to inf (the
        float32 buffers given, or those the float64 copies given stand for).  A
        finite update that would raises RunningUpdateOverflow before anything is
        written (neither the buffers nor ``out``).

    Returns
    -------
    CoefficientTable or None
        The cache entry this call used (its snapshot for backward), if any.
    """
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef bint update = batch_stats and running_mean is not None
    cdef double mean_limit = _INF, var_limit = _INF
    if limits is not None:
        mean_limit, var_limit = limits
    return _forward(cnp.PyArray_DATA(xa), cnp.PyArray_TYPE(xa), _kernel_shape(xa, layout),
                    running_mean, running_var, weight, bias, batch_stats, momentum, eps,
                    _data(addend), _data(out), relu, n_threads,
                    NULL if coef is None else <double*>cnp.PyArray_DATA(<cnp.ndarray>coef),
                    <unsigned char*>_data(mask), cache,
                    _data(running_mean) if update else NULL,
                    _data(running_var) if update else NULL, mean_limit, var_limit)


cdef CoefficientTable _forward(const void* xp, int data_type, Shape shape, object running_mean,
                               object running_var, object weight, object bias,
                               bint batch_stats, double momentum, double eps, const void* ap,
                               void* yp, bint relu, int n_threads, double* coef,
                               unsigned char* bits, CoefficientCache cache, void* update_mean,
                               void* update_var, double mean_limit=_INF, double var_limit=_INF):
    """:func:`forward` on the data's addresses (its arguments as there; coef NULL: none).

    The running update (with ``batch_stats``) goes to ``update_mean`` and
    ``update_var``: C contiguous values each, of ``running_mean``'s dtype,
    holding the running statistics to update (the buffers themselves, or copies
    of them for a functional caller); NULL: none.  ``mean_limit``/``var_limit``:
    :func:`forward`'s ``limits``."""
    cdef Py_ssize_t C = shape.C
    cdef Py_ssize_t count = shape.count
    cdef Py_ssize_t k
    cdef double* table_coef
    cdef const double* table = NULL
    cdef double* residual = NULL   # the batch mean's rounding error, folded into the shift
    cdef double* scratch = NULL
    cdef int status = 0
    # A local reference: the entry's tables stay alive while the kernel reads them.
    cdef CoefficientTable entry = None
    if C == 0:  # no channels, nothing to compute (the tilings divide by C)
        return None
    # Channels-last rows read a tile: the channels repeated k times.
    k = 1 if shape.layout == CHANNELS_FIRST else tile_repeat(C, APPLY_WIDTH)
    if cache is not None and not batch_stats:
        entry = cache.lookup(running_mean, running_var, weight, bias, C, eps)
        if coef != NULL:
            memcpy(coef, cnp.PyArray_DATA(<cnp.ndarray>entry.table), 4 * C * sizeof(double))
        if k == 1:
            table = <const double*>cnp.PyArray_DATA(<cnp.ndarray>entry.storage_table)
    try:
        if table == NULL:
            # The table (on a cache line: its start), weight/bias as doubles
            # (2 * C), the mean's residual (C), and the coefficient rows unless
            # the caller's are used (4 * C).
            scratch = <double*>aligned_malloc((table_len(k * C) + 7 * C) * sizeof(double))
            if scratch == NULL:
                raise MemoryError()
            table = scratch
            residual = scratch + table_len(k * C)
            table_coef = residual + 3 * C if coef == NULL or entry is not None else coef
            if entry is not None:
                # The cached coefficients, tiled: computed again from the entry's inputs.
                _fill(entry.key[0], entry.key[1], entry.key[2], entry.key[3], NULL, C, eps, k,
                      table_coef, scratch, residual + C)
            elif batch_stats:
                status = _batch_moments(xp, data_type, shape, table_coef, residual, n_threads)
                if status == 0 and update_mean != NULL and count > 0:
                    if mean_limit != _INF or var_limit != _INF:
                        _check_update(update_mean, update_var,
                                      cnp.PyArray_TYPE(<cnp.ndarray>running_mean), table_coef,
                                      C, count, momentum, mean_limit, var_limit)
                    _update_running(update_mean, update_var,
                                    cnp.PyArray_TYPE(<cnp.ndarray>running_mean), table_coef, C,
                                    count, momentum)
                _fill(None, None, weight, bias, residual, C, eps, k, table_coef, scratch,
                      residual + C)
            else:
                _fill(running_mean, running_var, weight, bias, NULL, C, eps, k, table_coef,
                      scratch, residual + C)
        if status == 0 and count > 0:
            _normalize(xp, data_type, ap, yp, shape, k, table, relu, n_threads, bits)
    finally:
        aligned_free(scratch)
    if status:
        raise MemoryError()
    return entry


@cython.auto_pickle(False)
cdef class SavedStats:
    """A training forward's (4, C) float64 table (mean, invstd, scale, shift) for its
    backward, in memory of its own (freed with this object).

    Attributes
    ----------
    address : int
        The table's address (``BoundBackward.run``'s ``saved``).
    channels : int
        C.
    """
    cdef double* coef
    cdef readonly Py_ssize_t channels

    def __dealloc__(self):
        aligned_free(self.coef)

    @property
    def address(self):
        return <size_t>self.coef

    def table(self):
        """A copy of the (4, C) table, as an ndarray."""
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = 4, self.channels
        cdef cnp.ndarray copy = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
        memcpy(cnp.PyArray_DATA(copy), self.coef, 4 * self.channels * sizeof(double))
        return copy


@cython.auto_pickle(False)
cdef class BoundForward:
    """:func:`forward` with every argument but the data fixed, run on addresses.

    For callers that check a configuration once and then call it many times
    with data of one geometry (``bnfast.torch``'s plans): a call passes the
    addresses of the input, addend, output and mask (0 for none), with no
    NumPy array made per call.  The arguments are :func:`forward`'s, checked
    and laid out by the caller; ``x`` gives the data's geometry (shape,
    strides, dtype, ``layout``) and is not kept.  The (C,) vectors are kept
    and read at every call.
    """
    cdef Shape shape
    cdef int data_type
    cdef object running_mean, running_var, weight, bias
    cdef bint batch_stats, relu
    cdef double eps
    cdef CoefficientCache cache

    def __init__(self, x, int layout, running_mean, running_var, weight, bias,
                 bint batch_stats, double eps, bint relu, CoefficientCache cache):
        self.shape = _kernel_shape(<cnp.ndarray?>x, layout)
        self.data_type = cnp.PyArray_TYPE(<cnp.ndarray>x)
        self.running_mean, self.running_var = running_mean, running_var
        self.weight, self.bias = weight, bias
        self.batch_stats, self.eps, self.relu, self.cache = batch_stats, eps, relu, cache

    def run(self, size_t x, size_t addend, size_t out, double momentum, int n_threads,
            bint want_stats, size_t mask, size_t table=0, size_t update_mean=0,
            size_t update_var=0):
        """Normalise the data at ``x`` into ``out`` (``addend``, ``mask``: 0 for none;
        ``mask``: zeroed, as :func:`forward`'s).  Returns a :class:`SavedStats`
        with ``want_stats``, else None.

        For a functional caller (``torch.ops.bnfast``): ``table``, the address
        of a C-contiguous (4, C) float64 array to write the statistics into
        (instead of a :class:`SavedStats`); ``update_mean`` and ``update_var``,
        addresses of C contiguous values of the bound buffers' dtype, copies of
        them, updated instead of them (training with running statistics)."""
        cdef SavedStats saved = None
        cdef double* coef = <double*>table
        cdef bint update = self.batch_stats and self.running_mean is not None
        if update and update_mean == 0:
            update_mean = <size_t>_data(self.running_mean)
            update_var = <size_t>_data(self.running_var)
        if want_stats and table == 0:
            saved = SavedStats.__new__(SavedStats)
            saved.coef = <double*>aligned_malloc(4 * self.shape.C * sizeof(double) + 1)
            if saved.coef == NULL:
                raise MemoryError()
            saved.channels = self.shape.C
            coef = saved.coef
        _forward(<const void*>x, self.data_type, self.shape, self.running_mean,
                 self.running_var, self.weight, self.bias, self.batch_stats, momentum,
                 self.eps, <const void*>addend, <void*>out, self.relu, n_threads, coef,
                 <unsigned char*>mask, self.cache, <void*>update_mean if update else NULL,
                 <void*>update_var if update else NULL)
        return saved


def moments(x, int layout, int n_threads):
    """Per-channel batch mean and biased variance of ``x`` (float64, shape (C,) each).

    The statistics of a training forward, without the normalise pass: the
    record of one chunk (rank, dask block) for merging with others.  ``x`` as
    in :func:`forward` (checked and laid out by the caller); an empty batch
    gives zeros.  Returns ``(mean, var, residual)``: ``residual`` is what the
    float64 rounding of the mean lost (the exact mean is ``mean + residual``).
    """
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Shape shape = _kernel_shape(xa, layout)
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = 3, shape.C
    cdef cnp.ndarray result = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    cdef double* rows = <double*>cnp.PyArray_DATA(result)
    if _batch_moments(cnp.PyArray_DATA(xa), cnp.PyArray_TYPE(xa), shape, rows,
                      rows + 2 * shape.C, n_threads):
        raise MemoryError()
    return result[0], result[1], result[2]


cdef int _batch_moments(const void* xp, int data_type, Shape shape, double* coef,
                        double* residual, int n_threads) noexcept:
    """Batch mean and biased variance into coef rows 0 and 1, and the exact mean's
    residual (zeros for an empty batch)."""
    cdef Py_ssize_t c
    if shape.count == 0 or shape.C == 0:
        for c in range(2 * shape.C):
            coef[c] = 0.0
        for c in range(shape.C):
            residual[c] = 0.0
        return 0
    if data_type == cnp.NPY_FLOAT32:
        return _moments(<const float*>xp, shape, coef, residual, n_threads)
    if data_type == cnp.NPY_FLOAT64:
        return _moments(<const double*>xp, shape, coef, residual, n_threads)
    if data_type == cnp.NPY_FLOAT16:
        return _moments(<const bnfast_f16*>xp, shape, coef, residual, n_threads)
    return _moments(<const bnfast_bf16*>xp, shape, coef, residual, n_threads)  # bfloat16


cdef int _moments(const real_t* xp, Shape shape, double* coef, double* residual,
                  int n_threads) noexcept:
    cdef int status
    with nogil:
        if shape.layout == CHANNELS_FIRST:
            status = stats_first(xp, shape.N, shape.C, shape.S, coef, coef + shape.C, n_threads,
                                 residual)
        else:
            status = stats_last(xp, shape.N, shape.C, coef, coef + shape.C, n_threads, residual)
    return status


cdef void _check_update(const void* running_mean, const void* running_var, int data_type,
                        const double* coef, Py_ssize_t C, Py_ssize_t count, double momentum,
                        double mean_limit, double var_limit) except *:
    """Raise RunningUpdateOverflow if update_running would give a finite value of at
    least its buffer's limit (the same arithmetic: the same values)."""
    cdef Py_ssize_t c
    cdef double keep = 1.0 - momentum
    cdef double unbias = <double>count / (<double>count - 1.0)
    cdef double old_mean, old_var, value
    for c in range(C):
        if data_type == cnp.NPY_FLOAT32:
            old_mean = (<const float*>running_mean)[c]
            old_var = (<const float*>running_var)[c]
        else:
            old_mean = (<const double*>running_mean)[c]
            old_var = (<const double*>running_var)[c]
        value = keep * old_mean + momentum * coef[c]
        if isfinite(value) and fabs(value) >= mean_limit:
            raise RunningUpdateOverflow(0, c, value)
        value = keep * old_var + momentum * (coef[C + c] * unbias)
        if isfinite(value) and fabs(value) >= var_limit:
            raise RunningUpdateOverflow(1, c, value)


cdef void _update_running(void* running_mean, void* running_var, int data_type,
                          const double* coef, Py_ssize_t C, Py_ssize_t count,
                          double momentum) noexcept:
    """PyTorch's update of both buffers (contiguous, of one dtype), from the batch mean and
    biased variance."""
    if data_type == cnp.NPY_FLOAT32:
        update_running(<float*>running_mean, <float*>running_var, coef, coef + C, C,
                       <double>count, momentum)
    else:
        update_running(<double*>running_mean, <double*>running_var, coef, coef + C, C,
                       <double>count, momentum)


cdef void _normalize(const void* xp, int data_type, const void* ap, void* yp, Shape shape,
                     Py_ssize_t k, const double* table, bint relu, int n_threads,
                     unsigned char* bits) noexcept:
    """The type-number switch of the normalise pass (validation admits four dtypes;
    the one without a fixed type number is bfloat16)."""
    if data_type == cnp.NPY_FLOAT32:
        _apply(<const float*>xp, <const float*>ap, <float*>yp, shape, k, table, relu,
               n_threads, bits)
    elif data_type == cnp.NPY_FLOAT64:
        _apply(<const double*>xp, <const double*>ap, <double*>yp, shape, k, table, relu,
               n_threads, bits)
    elif data_type == cnp.NPY_FLOAT16:
        _apply(<const bnfast_f16*>xp, <const bnfast_f16*>ap, <bnfast_f16*>yp, shape, k,
               table, relu, n_threads, bits)
    else:
        _apply(<const bnfast_bf16*>xp, <const bnfast_bf16*>ap, <bnfast_bf16*>yp, shape, k,
               table, relu, n_threads, bits)


cdef void _apply(const real_t* xp, const real_t* ap, real_t* yp, Shape shape, Py_ssize_t k,
                 const double* table, bint relu, int n_threads, unsigned char* bits) noexcept:
    """The normalise pass with ``table``: fill_table's, the channels repeated k times
    (1 for channels-first data, tile_repeat's for channels-last rows)."""
    # Outputs of STREAM_BYTES and more take non-temporal stores.
    cdef bint stream = shape.N * shape.C * shape.S * <Py_ssize_t>sizeof(real_t) >= STREAM_BYTES
    with nogil:
        if shape.layout == CHANNELS_FIRST:
            apply_first(xp, ap, yp, shape.N, shape.C, shape.S, table, relu, n_threads, bits,
                        stream)
        else:
            apply_last(xp, ap, yp, shape.N, shape.C, k, table, relu, n_threads, bits, stream)
