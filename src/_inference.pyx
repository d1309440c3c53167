"""Batch norm from ndarray objects in one compiled call: the small-input paths.

A module's eval call on a small array (ResNet's last block: (1, 512, 7, 7), ~3 us
of copying) used to spend ~15 us around the kernel: Python validation, eight
typed-memoryview acquisitions, an OpenMP region for one thread and 512 square
roots.  The entries here check what they need through the NumPy C API
(nanoseconds each) and run the kernels of ``_batch_stats.pxd`` and
``_affine.pxd`` directly:

* ``normalize_with_running_stats`` (evaluation) reuses the coefficients while
  the running statistics, weight, bias and eps are bitwise unchanged
  (``CoefficientCache``);
* ``normalize_with_batch_stats`` (training, and evaluation without running
  statistics) computes the batch statistics, updates the running ones and
  normalises, in one call.

They accept only the plain case and return None for anything else, so the
Python layer stays the one place that validates and explains errors.
"""
cimport numpy as cnp
from cython cimport floating
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from _affine cimport apply_table, fill_coefficients, fill_table, make_table, table_len
from _batch_stats cimport stats_first, stats_last, update_running
from _tiling cimport tile_repeat
from _openmp_helpers cimport bnfast_max_threads

cnp.import_array()


cdef class CoefficientCache:
    """The last coefficient table of one module, reused while its inputs are bitwise equal.

    Keeps a copy of the running mean, running variance, weight and bias (and
    eps) the table was computed from; every call compares them byte for byte
    (``memcmp``: ~0.2 us for 512 channels, against ~1 us of square roots and
    divisions), so in-place edits of any of them are always seen.  (Not a
    cache by array identity: numpy has no version counter to trust.)

    Both arrays are read-only and replaced, never rewritten, on a miss: a
    backward may hold views of them (the forward's statistics and weight).

    Attributes
    ----------
    key : ndarray of shape (4, C) in the storage dtype, or None
        running_mean, running_var, weight, bias as last used (rows of an
        absent weight or bias are unspecified).
    table : ndarray of shape (4, C), float64, or None
        mean, invstd, scale, shift computed from ``key``.
    storage_table : ndarray of shape (_affine.table_len(C),), float64, or None
        The apply table for ``y = (x - m) * a + b`` (``_affine.fill_table``
        with no tiling: ``[m | a | b]`` in double, then in float32, then the
        flag saying whether float32 data may use the float rows).
    mean, invstd : ndarray of shape (C,), float64, or None
        ``table[0]`` and ``table[1]``.
    weight : ndarray of shape (C,), or None
        ``key[2]`` when a weight was given.
    """
    cdef readonly object key
    cdef readonly object table
    cdef readonly object storage_table
    # Views made once per miss, for what a backward keeps (row indexing per call costs).
    cdef readonly object mean, invstd, weight
    cdef int present      # bit 0: weight given, bit 1: bias given
    cdef double eps

    def __reduce__(self):
        # Copies and pickles of a module start with an empty cache.
        return (CoefficientCache, ())

    cdef double* lookup(self, int typenum, Py_ssize_t C, double eps, object mean, object var,
                        object weight, object bias) except NULL:
        """The coefficients for these inputs: the stored ones if they match, else new ones."""
        cdef const void* parts[4]
        parts[0] = cnp.PyArray_DATA(<cnp.ndarray>mean)
        parts[1] = cnp.PyArray_DATA(<cnp.ndarray>var)
        parts[2] = _data_or_null(weight)
        parts[3] = _data_or_null(bias)
        cdef int present = (weight is not None) | ((bias is not None) << 1)
        cdef Py_ssize_t row = C * (4 if typenum == cnp.NPY_FLOAT32 else 8)
        cdef char* stored
        cdef int i
        if self.key is not None and self.eps == eps and self.present == present \
                and cnp.PyArray_TYPE(<cnp.ndarray>self.key) == typenum \
                and cnp.PyArray_DIM(<cnp.ndarray>self.key, 1) == C:
            stored = <char*>cnp.PyArray_DATA(<cnp.ndarray>self.key)
            for i in range(4):
                if parts[i] != NULL and memcmp(parts[i], stored + i * row, row) != 0:
                    break
            else:
                return <double*>cnp.PyArray_DATA(<cnp.ndarray>self.table)
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = 4, C
        cdef cnp.ndarray key = cnp.PyArray_ZEROS(2, dims, typenum, 0)
        cdef cnp.ndarray table = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
        stored = <char*>cnp.PyArray_DATA(key)
        for i in range(4):
            if parts[i] != NULL:
                memcpy(stored + i * row, parts[i], row)
        cdef double* coef = <double*>cnp.PyArray_DATA(table)
        _compute_coefficients(typenum, C, eps, parts, coef)
        dims[0] = table_len(C)
        cdef cnp.ndarray storage = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT64, 0)
        fill_table(coef, C, 1, <double*>cnp.PyArray_DATA(storage), NULL)
        for arr in (key, table, storage):
            cnp.PyArray_CLEARFLAGS(<cnp.ndarray>arr, cnp.NPY_ARRAY_WRITEABLE)
        self.key, self.table, self.storage_table = key, table, storage
        self.eps, self.present = eps, present
        self.mean, self.invstd = table[0], table[1]
        self.weight = key[2] if weight is not None else None
        return <double*>cnp.PyArray_DATA(table)


cdef void _compute_coefficients(int typenum, Py_ssize_t C, double eps, const void** parts,
                                double* coef) noexcept:
    """fill_coefficients on [mean, var, weight or NULL, bias or NULL] of typenum."""
    if typenum == cnp.NPY_FLOAT32:
        fill_coefficients(<const float*>parts[0], <const float*>parts[1],
                          <const float*>parts[2], <const float*>parts[3], C, eps, coef)
    else:
        fill_coefficients(<const double*>parts[0], <const double*>parts[1],
                          <const double*>parts[2], <const double*>parts[3], C, eps, coef)


cdef bint _is_plain(object a, int typenum) noexcept:
    """An exact ndarray of typenum, native byte order, C-contiguous."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_ISNOTSWAPPED(arr)
            and cnp.PyArray_IS_C_CONTIGUOUS(arr))


cdef bint _is_vector(object v, int typenum, Py_ssize_t C) noexcept:
    """A plain (C,) array of typenum."""
    return (_is_plain(v, typenum) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>v, 0) == C)


cdef bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef bint _apart_or_same(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Two C-contiguous arrays of one shape and dtype: the same elements, or no overlap."""
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(a)
    return pa == pb or pa + nbytes <= pb or pb + nbytes <= pa


cdef void* _data_or_null(object a) noexcept:
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef struct Call:
    # What the checks of a plain call found; S == 0 means N rows of C (channels-last).
    int typenum
    Py_ssize_t N, C, S
    int n_threads


cdef bint _check_call(object x, object weight, object bias, object eps, object addend,
                      bint relu, object out, object n_threads, object mask, Call* call):
    """The checks both entries share (see normalize_with_running_stats); fills call."""
    if not cnp.PyArray_CheckExact(x):
        return False
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(xa)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        return False
    cdef int ndim = cnp.PyArray_NDIM(xa)
    if ndim < 2 or not _is_plain(x, typenum) or cnp.PyArray_SIZE(xa) == 0:
        return False
    cdef Py_ssize_t C = cnp.PyArray_DIM(xa, 1), S = 1
    cdef int d
    for d in range(2, ndim):
        S *= cnp.PyArray_DIM(xa, d)
    if not ((weight is None or _is_vector(weight, typenum, C))
            and (bias is None or _is_vector(bias, typenum, C))):
        return False
    if not (type(eps) is float and <double>eps > 0.0):
        return False
    if n_threads is None:
        call.n_threads = bnfast_max_threads()
    elif type(n_threads) is int and 0 < n_threads <= 1 << 16:
        call.n_threads = n_threads
    else:
        return False
    if addend is not None and not (_is_plain(addend, typenum)
                                   and _same_shape(<cnp.ndarray>addend, xa)
                                   and _apart_or_same(<cnp.ndarray>addend, xa)):
        return False
    if out is not None and not (_is_plain(out, typenum) and _same_shape(<cnp.ndarray>out, xa)
                                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
                                and _apart_or_same(<cnp.ndarray>out, xa)
                                and (addend is None
                                     or _apart_or_same(<cnp.ndarray>out, <cnp.ndarray>addend))):
        return False
    if mask is not None and not (_is_plain(mask, cnp.NPY_UINT8)
                                 and cnp.PyArray_SIZE(<cnp.ndarray>mask)
                                 == (cnp.PyArray_SIZE(xa) + 7) // 8
                                 and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>mask)):
        return False
    call.typenum = typenum
    call.N = cnp.PyArray_DIM(xa, 0)
    call.C = C
    # A C-contiguous array with one value per (sample, channel) is the rows layout.
    call.S = 0 if S == 1 else S
    return True


cdef bint _is_coef(object coef, Py_ssize_t C) noexcept:
    """None, or a writable (4, C) float64 table to fill."""
    return coef is None or (_is_plain(coef, cnp.NPY_FLOAT64)
                            and cnp.PyArray_NDIM(<cnp.ndarray>coef) == 2
                            and cnp.PyArray_DIM(<cnp.ndarray>coef, 0) == 4
                            and cnp.PyArray_DIM(<cnp.ndarray>coef, 1) == C
                            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>coef))


cdef object _output(object x, object out):
    """out, or a new C-contiguous array like x."""
    if out is not None:
        return out
    cdef cnp.ndarray xa = <cnp.ndarray>x
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa), cnp.PyArray_TYPE(xa), 0)


def normalize_with_running_stats(x, running_mean, running_var, weight, bias, eps,
                                 addend, bint relu, out, n_threads, coef, mask, cache):
    """Evaluation-mode batch norm in one call, or None if the arguments are not plain.

    Plain means: ``x`` an exact C-contiguous float32/float64 ndarray with
    ``ndim >= 2`` and no zero-length axis; ``running_mean``, ``running_var``
    and ``weight``/``bias`` (or None) contiguous ``(C,)`` arrays of x's dtype;
    ``addend`` (or None) and ``out`` (or None: a new array) C-contiguous, of
    x's shape and dtype, each either the very elements of x/addend or apart
    from them, ``out`` writable; ``eps`` a positive float; ``n_threads`` None
    or a positive int; ``coef`` None or a writable (4, C) float64 array that
    receives the coefficient table (rows mean, invstd, scale, shift); ``mask``
    None or a writable uint8 array of ``ceil(x.size / 8)`` bytes for the ReLU
    mask bits (as ``_normalize.channels_first`` packs them); ``cache`` None or
    a :class:`CoefficientCache`.  On None the caller takes the general path,
    which validates and raises the right error.

    Returns
    -------
    ndarray or None
        The output (``out`` if given).
    """
    cdef Call call
    if not _check_call(x, weight, bias, eps, addend, relu, out, n_threads, mask, &call):
        return None
    cdef int typenum = call.typenum
    cdef Py_ssize_t C = call.C
    if not (_is_vector(running_mean, typenum, C) and _is_vector(running_var, typenum, C)
            and _is_coef(coef, C)):
        return None
    if cache is not None and type(cache) is not CoefficientCache:
        return None

    # Coefficients with the GIL held: a shared cache is never read while
    # another thread replaces its arrays (and the arrays are never rewritten).
    cdef const void* parts[4]
    cdef double* table_coef
    cdef double* scratch = NULL
    cdef object storage = None   # the cache's [m | a | b], usable as is without tiling
    if cache is not None:
        table_coef = (<CoefficientCache>cache).lookup(typenum, C, eps, running_mean,
                                                      running_var, weight, bias)
        if coef is not None:
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>coef), table_coef, 4 * C * sizeof(double))
        if call.S or tile_repeat(C) == 1:
            storage = (<CoefficientCache>cache).storage_table
    else:
        if coef is not None:
            table_coef = <double*>cnp.PyArray_DATA(<cnp.ndarray>coef)
        else:
            table_coef = scratch = <double*>malloc(4 * C * sizeof(double))
            if scratch == NULL:
                raise MemoryError()
        parts[0] = cnp.PyArray_DATA(<cnp.ndarray>running_mean)
        parts[1] = cnp.PyArray_DATA(<cnp.ndarray>running_var)
        parts[2] = _data_or_null(weight)
        parts[3] = _data_or_null(bias)
        _compute_coefficients(typenum, C, eps, parts, table_coef)
    out = _output(x, out)
    cdef int status
    try:
        status = _apply_call(x, addend, out, &call, table_coef, NULL,
                             <const double*>_data_or_null(storage), relu, mask)
    finally:
        free(scratch)
    if status:
        raise MemoryError()
    return out


def normalize_with_batch_stats(x, running_mean, running_var, weight, bias, eps, momentum,
                               addend, bint relu, out, n_threads, coef, mask):
    """Batch norm with batch statistics in one call, or None if the arguments are not plain.

    Training (and evaluation without running statistics): the per-channel
    mean and biased variance of ``x`` normalise it; when ``running_mean`` and
    ``running_var`` are given they are updated in place with ``momentum`` (a
    float: the module's factor) and the unbiased variance, as
    ``functional.batch_norm`` does.  Plain as in
    :func:`normalize_with_running_stats`, and: more than one value per
    channel; running buffers both None or both writable (C,) arrays of x's
    dtype; ``momentum`` a float.  ``coef`` (optional) receives the batch mean,
    invstd, scale and shift.

    Returns
    -------
    ndarray or None
        The output (``out`` if given).
    """
    cdef Call call
    if not _check_call(x, weight, bias, eps, addend, relu, out, n_threads, mask, &call):
        return None
    cdef int typenum = call.typenum
    cdef Py_ssize_t C = call.C
    if call.N * (call.S if call.S else 1) < 2 or type(momentum) is not float \
            or not _is_coef(coef, C):
        return None
    if running_mean is not None or running_var is not None:
        if not (_is_vector(running_mean, typenum, C) and _is_vector(running_var, typenum, C)
                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
            return None
    out = _output(x, out)
    cdef double* table_coef
    # The batch mean's residual (C), then the coefficients unless coef is given (4 * C).
    cdef double* scratch = <double*>malloc((C if coef is not None else 5 * C) * sizeof(double))
    if scratch == NULL:
        raise MemoryError()
    cdef double* residual = scratch
    if coef is not None:
        table_coef = <double*>cnp.PyArray_DATA(<cnp.ndarray>coef)
    else:
        table_coef = scratch + C
    cdef int status
    try:
        if typenum == cnp.NPY_FLOAT32:
            status = _batch_coefficients[float](
                <const float*>cnp.PyArray_DATA(<cnp.ndarray>x), &call,
                <float*>_data_or_null(running_mean), <float*>_data_or_null(running_var),
                <const float*>_data_or_null(weight), <const float*>_data_or_null(bias),
                eps, momentum, table_coef, residual)
        else:
            status = _batch_coefficients[double](
                <const double*>cnp.PyArray_DATA(<cnp.ndarray>x), &call,
                <double*>_data_or_null(running_mean), <double*>_data_or_null(running_var),
                <const double*>_data_or_null(weight), <const double*>_data_or_null(bias),
                eps, momentum, table_coef, residual)
        if status == 0:
            status = _apply_call(x, addend, out, &call, table_coef, residual, NULL, relu, mask)
    finally:
        free(scratch)
    if status:
        raise MemoryError()
    return out


cdef int _batch_coefficients(const floating* xp, const Call* call, floating* running_mean,
                             floating* running_var, const floating* weight,
                             const floating* bias, double eps, double momentum,
                             double* coef, double* residual) noexcept:
    """Batch mean and variance into coef rows 0 and 1 (the mean's residual into
    residual), the running update, then the coefficients in place (row 1 becomes
    invstd).  -1 without memory."""
    cdef Py_ssize_t C = call.C, count = call.N * (call.S if call.S else 1)
    cdef int status
    with nogil:
        if call.S:
            status = stats_first(xp, call.N, C, call.S, coef, coef + C, call.n_threads,
                                 residual)
        else:
            status = stats_last(xp, call.N, C, coef, coef + C, call.n_threads, residual)
        if status == 0:
            if running_mean != NULL:
                update_running(running_mean, running_var, coef, coef + C, C, <double>count,
                               momentum)
            fill_coefficients(<const double*>coef, <const double*>(coef + C), weight, bias, C,
                              eps, coef)
    return status


cdef int _apply_call(object x, object addend, object out, const Call* call, const double* coef,
                     const double* residual, const double* table, bint relu,
                     object mask) noexcept:
    """Apply the coefficients (with the mean's residual, or NULL), or the ready
    table, to x into out.  -1 without memory."""
    if call.typenum == cnp.NPY_FLOAT32:
        return _apply[float](
            <const float*>cnp.PyArray_DATA(<cnp.ndarray>x), <const float*>_data_or_null(addend),
            <float*>_data_or_null(out), call.N, call.C, call.S, coef, residual, table,
            relu, call.n_threads, <unsigned char*>_data_or_null(mask))
    return _apply[double](
        <const double*>cnp.PyArray_DATA(<cnp.ndarray>x), <const double*>_data_or_null(addend),
        <double*>_data_or_null(out), call.N, call.C, call.S, coef, residual, table,
        relu, call.n_threads, <unsigned char*>_data_or_null(mask))


cdef int _apply(const floating* xp, const floating* ap, floating* yp, Py_ssize_t N,
                Py_ssize_t C, Py_ssize_t S, const double* coef, const double* residual,
                const double* table, bint relu, int n_threads, unsigned char* bits) noexcept:
    """Apply ``table`` (or one made from coef here, GIL held: coef may be the
    cache's) without the GIL.  S == 0: N rows of C.  Returns -1 without memory."""
    cdef double* own = NULL
    if table == NULL:
        if make_table(coef, C, S, &own, residual):
            return -1
        table = own
    with nogil:
        apply_table(xp, ap, yp, N, C, S, table, relu, n_threads, bits)
    free(own)
    return 0
