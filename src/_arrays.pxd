# Reading validated ndarray arguments in the compiled entries (_forward.pyx,
# _backward.pyx): the kernel geometry of an array in a kernel layout, data
# pointers, and (C,) vectors of either float dtype and any stride as doubles.
# Nothing here validates: bnfast's Python layer has checked every argument.
cimport numpy as cnp
from libc.string cimport memcpy

from _dtypes cimport CHANNELS_FIRST, bnfast_bf16, bnfast_f16, to_double


cdef struct Shape:
    # x as the kernels see it: (N, C, S) channels-first, or N rows of C (S = 1)
    # channels-last; count = N * S values per channel.
    int layout
    Py_ssize_t N, C, S, count


cdef inline Shape kernel_shape(cnp.ndarray x, int layout) noexcept:
    """The geometry of ``x``, whose memory is already in ``layout`` (bnfast._layout)."""
    cdef Shape shape
    cdef Py_ssize_t S = 1
    cdef int d, ndim = cnp.PyArray_NDIM(x)
    for d in range(2, ndim):
        S *= cnp.PyArray_DIM(x, d)
    shape.layout = layout
    shape.C = cnp.PyArray_DIM(x, 1)
    if layout == CHANNELS_FIRST:
        if ndim == 2:  # a Fortran-ordered (N, C): one sample of C runs of N
            shape.N, shape.S = 1, cnp.PyArray_DIM(x, 0)
        else:
            shape.N, shape.S = cnp.PyArray_DIM(x, 0), S
    else:
        shape.N, shape.S = cnp.PyArray_DIM(x, 0) * S, 1
    shape.count = shape.N * shape.S
    return shape


cdef inline void* data_or_null(object a) noexcept:
    """The data pointer of an ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void load_doubles(object v, Py_ssize_t C, double* dst) noexcept:
    """A (C,) vector of any stride and any of the four float dtypes into doubles
    (exact).  The type number tells float32, float64 and float16 apart; the one
    other dtype bnfast's validation lets through is bfloat16 (ml_dtypes, whose
    type number is assigned at run time)."""
    cdef Py_ssize_t c, stride = cnp.PyArray_STRIDE(<cnp.ndarray>v, 0)
    cdef const char* p = <const char*>cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef int type_num = cnp.PyArray_TYPE(<cnp.ndarray>v)
    # Contiguous vectors (the usual case) in loops GCC vectorises: the strided
    # loop widened float32 one value at a time (~1 ns a channel).
    if type_num == cnp.NPY_FLOAT32 and stride == sizeof(float):
        for c in range(C):
            dst[c] = (<const float*>p)[c]
    elif type_num == cnp.NPY_FLOAT32:
        for c in range(C):
            dst[c] = (<const float*>(p + c * stride))[0]
    elif type_num == cnp.NPY_FLOAT64 and stride == sizeof(double):
        memcpy(dst, p, C * sizeof(double))
    elif type_num == cnp.NPY_FLOAT64:
        for c in range(C):
            dst[c] = (<const double*>(p + c * stride))[0]
    elif type_num == cnp.NPY_FLOAT16:
        for c in range(C):
            dst[c] = to_double((<const bnfast_f16*>(p + c * stride))[0])
    else:
        for c in range(C):
            dst[c] = to_double((<const bnfast_bf16*>(p + c * stride))[0])
