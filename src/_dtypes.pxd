# Types shared by every compiled module: the kernel layouts (the values of
# bnfast._layout.Layout) and, in one place, the storage types of the data.
# Every kernel body is written once over real_t (accumulating in double, or in
# float for the half types' elementwise passes); the half types reach the float32
# SIMD leaves' arithmetic by widening (in registers, or staged: bnfast_half.h).

cdef extern from "bnfast_half.h" nogil:
    # 16-bit storage, distinct C types (no implicit conversions).
    ctypedef struct bnfast_f16:
        unsigned short bits
    ctypedef struct bnfast_bf16:
        unsigned short bits
    float bnfast_f16_to_float(bnfast_f16 h)
    float bnfast_bf16_to_float(bnfast_bf16 h)
    bnfast_f16 bnfast_double_to_f16(double d)
    bnfast_bf16 bnfast_double_to_bf16(double d)
    # Bulk widening (F16C, or AVX2's shift for bfloat16, picked at run time).
    void bnfast_widen_f16(const bnfast_f16* src, float* dst, Py_ssize_t n)
    void bnfast_widen_bf16(const bnfast_bf16* src, float* dst, Py_ssize_t n)

ctypedef fused real_t:
    float
    double
    bnfast_f16
    bnfast_bf16

cdef enum Layout:
    CHANNELS_FIRST = 0   # (N, C, S), C-contiguous
    CHANNELS_LAST = 1    # (M, C) rows, C varies fastest


cdef inline double to_double(real_t v) noexcept nogil:
    """A stored value as a double (exact)."""
    if real_t is bnfast_f16:
        return bnfast_f16_to_float(v)
    elif real_t is bnfast_bf16:
        return bnfast_bf16_to_float(v)
    else:
        return v


cdef inline void store_double(real_t* p, double v) noexcept nogil:
    """p[0] = v rounded once to the storage type (to nearest even)."""
    if real_t is bnfast_f16:
        p[0] = bnfast_double_to_f16(v)
    elif real_t is bnfast_bf16:
        p[0] = bnfast_double_to_bf16(v)
    else:
        p[0] = <real_t>v


cdef inline void fill_value(real_t* p, Py_ssize_t n, real_t v) noexcept nogil:
    """p[0:n] = v in a loop the compiler vectorises (the half types as their bits:
    a loop of struct copies stayed one 16-bit store at a time)."""
    cdef Py_ssize_t i
    cdef unsigned short bits
    if real_t is bnfast_f16 or real_t is bnfast_bf16:
        bits = v.bits
        for i in range(n):
            (<unsigned short*>p)[i] = bits
    else:
        for i in range(n):
            p[i] = v

