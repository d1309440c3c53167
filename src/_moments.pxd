# Building blocks for numerically stable per-channel moments, shared (inlined)
# by the statistics and backward kernels.  Everything accumulates in double.
#
# A "partial" is (count, mean, m2) with m2 = sum((x - mean)**2).  Partials are
# produced by shifted one-pass sums over a chunk (the shift is a value *from*
# that chunk, which bounds the cancellation in s2 - s1**2/n to about
# eps * (1 + n) relative) and combined with Chan et al.'s pairwise update.
# Chunks are cut by the array's shape only, never by the thread count, so the
# result is bit-identical for any number of threads.
from _dtypes cimport bnfast_bf16, bnfast_f16, bnfast_widen_bf16, bnfast_widen_f16, real_t


cdef extern from "bnfast_merge.h" nogil:
    void bnfast_merge_rows(double* mean, double* m2, const double* pmean, const double* pm2,
                           Py_ssize_t C, double n_a, double n_b)
    double bnfast_m2_fixup(double m2, double s1, double s2)
    void bnfast_group_sums(const double* v, Py_ssize_t groups, Py_ssize_t len, double* out)
    void bnfast_run_partials(const double* shift, const double* origin, const double* s1,
                             const double* s2, Py_ssize_t w, double inv_n, double* pmean,
                             double* pm2)


cdef extern from "bnfast_stats.h" nogil:
    # The statistics' leaves, one body for every storage type (half widened in registers).
    void bnfast_shifted_sums_runs_f32(const float* x, Py_ssize_t runs, Py_ssize_t n,
                                      double* shift, double* s1, double* s2)
    void bnfast_shifted_sums_runs_f64(const double* x, Py_ssize_t runs, Py_ssize_t n,
                                      double* shift, double* s1, double* s2)
    void bnfast_shifted_sums_runs_f16(const bnfast_f16* x, Py_ssize_t runs, Py_ssize_t n,
                                      double* shift, double* s1, double* s2)
    void bnfast_shifted_sums_runs_bf16(const bnfast_bf16* x, Py_ssize_t runs, Py_ssize_t n,
                                       double* shift, double* s1, double* s2)
    void bnfast_shifted_colsums_f32(const float* x, Py_ssize_t rows, Py_ssize_t W,
                                    Py_ssize_t stride, const float* shift, double* s1,
                                    double* s2)
    void bnfast_shifted_colsums_f64(const double* x, Py_ssize_t rows, Py_ssize_t W,
                                    Py_ssize_t stride, const double* shift, double* s1,
                                    double* s2)
    void bnfast_shifted_colsums_f16(const bnfast_f16* x, Py_ssize_t rows, Py_ssize_t W,
                                    Py_ssize_t stride, const bnfast_f16* shift, double* s1,
                                    double* s2)
    void bnfast_shifted_colsums_bf16(const bnfast_bf16* x, Py_ssize_t rows, Py_ssize_t W,
                                     Py_ssize_t stride, const bnfast_bf16* shift, double* s1,
                                     double* s2)


cdef inline void shifted_sums_runs(const real_t* x, Py_ssize_t runs, Py_ssize_t n,
                                   double* shift, double* s1, double* s2) noexcept nogil:
    """Runs r < runs of n values at x + r * n: s1[r] = sum(x - shift[r]),
    s2[r] = sum((x - shift[r])**2) (SIMD leaf, bnfast_stats.h)."""
    if real_t is float:
        bnfast_shifted_sums_runs_f32(x, runs, n, shift, s1, s2)
    elif real_t is double:
        bnfast_shifted_sums_runs_f64(x, runs, n, shift, s1, s2)
    elif real_t is bnfast_f16:
        bnfast_shifted_sums_runs_f16(x, runs, n, shift, s1, s2)
    else:
        bnfast_shifted_sums_runs_bf16(x, runs, n, shift, s1, s2)


cdef inline void shifted_colsums(const real_t* x, Py_ssize_t rows, Py_ssize_t W,
                                 Py_ssize_t stride, const real_t* shift, double* s1,
                                 double* s2) noexcept nogil:
    """Columns j < W of rows r < rows at x + r * stride: s1[j] += sum(x[r, j] - shift[j]),
    s2[j] += the squares (SIMD leaf, bnfast_stats.h)."""
    if real_t is float:
        bnfast_shifted_colsums_f32(x, rows, W, stride, shift, s1, s2)
    elif real_t is double:
        bnfast_shifted_colsums_f64(x, rows, W, stride, shift, s1, s2)
    elif real_t is bnfast_f16:
        bnfast_shifted_colsums_f16(x, rows, W, stride, shift, s1, s2)
    else:
        bnfast_shifted_colsums_bf16(x, rows, W, stride, shift, s1, s2)


cdef inline double finite_or_zero(double v) noexcept nogil:
    """A usable shift: an infinite one would turn the chunk's +inf into NaN (inf - inf)."""
    return v if v - v == 0.0 else 0.0


cdef inline void finite_shifts(const real_t* src, Py_ssize_t n, real_t* shift, double* value,
                               float* stage) noexcept nogil:
    """Shifts from the values src[:n]: value[j] = finite_or_zero(src[j]) and shift[j]
    the same in the storage type.  Half types through one bulk widening into
    ``stage`` (n floats) and a copy of the bits (a finite value is its own shift):
    their scalar conversions, two a column, were 9% of a channels-last
    32x2048x7x7 float16 training forward."""
    cdef Py_ssize_t j
    cdef double v
    if real_t is bnfast_f16 or real_t is bnfast_bf16:
        if real_t is bnfast_f16:
            bnfast_widen_f16(src, stage, n)
        else:
            bnfast_widen_bf16(src, stage, n)
        for j in range(n):
            value[j] = finite_or_zero(stage[j])
            if value[j] == stage[j]:  # finite (NaN and inf became 0.0)
                shift[j] = src[j]
            else:
                shift[j].bits = 0
    else:
        for j in range(n):
            v = finite_or_zero(src[j])
            shift[j] = <real_t>v  # exact
            value[j] = v


cdef inline double m2_from_sums(double inv_n, double s1, double s2) noexcept nogil:
    """sum((x - mean)**2) from shifted sums over n values: s2 - s1**2 / n, never negative.

    Finite data whose squares overflowed (|x| > 1e154 in float64) gives inf,
    as PyTorch's variance does, not inf - inf = NaN.  NaN data stays NaN.
    """
    cdef double m2 = s2 - s1 * (s1 * inv_n)
    if m2 >= 0.0:  # the common case, predictable
        return m2
    return m2_fixup(m2, s1, s2)


cdef inline double m2_fixup(double m2, double s1, double s2) noexcept nogil:
    """The rare cases of m2_from_sums: a tiny negative from rounding, or NaN
    (bnfast_merge.h, which the vector partials share)."""
    return bnfast_m2_fixup(m2, s1, s2)


cdef inline double merged_mean(double mean_a, double mean_b, double r) noexcept nogil:
    """(1 - r) * mean_a + r * mean_b, as mean_a + (mean_b - mean_a) * r.

    That form keeps equal means exact (a constant channel normalises to exactly
    0); where the difference is not finite (an infinite mean) the weighted form
    gives +-inf like PyTorch instead of inf - inf = NaN.
    """
    cdef double m = mean_a + (mean_b - mean_a) * r
    cdef double weighted = mean_a * (1.0 - r) + mean_b * r
    return m if m == m else weighted  # both computed: a select, so the loop vectorises


cdef inline void merge_shifted(double* count, double* mean, double* m2,
                               double n, double shift, double s1, double s2) noexcept nogil:
    """Merge a chunk given by its shifted sums into the partial (count, mean, m2)."""
    if n <= 0:
        return
    cdef double inv_n = 1.0 / n
    merge_partial(count, mean, m2, n, shift + s1 * inv_n, m2_from_sums(inv_n, s1, s2))


cdef inline void merge_rows(double* mean, double* m2, const double* part_mean,
                            const double* part_m2, Py_ssize_t C, double n_a, double n_b) noexcept nogil:
    """Fold C partials that all count n_b into C accumulators that all count n_a.

    Every channel sees the same counts, so the ratios are computed once; the
    channel loop is bnfast_merge_rows (vector code: merged_mean's operations,
    its select a mask).
    """
    bnfast_merge_rows(mean, m2, part_mean, part_m2, C, n_a, n_b)


cdef inline void run_partials(const double* shift, const double* origin, const double* s1,
                              const double* s2, Py_ssize_t w, double inv_n, double* pmean,
                              double* pm2) noexcept nogil:
    """Partials of w runs of n values (inv_n = 1 / n) from their shifted sums: the
    mean relative to origin[r] into pmean[r], m2 (m2_from_sums's) into pm2[r]
    (bnfast_merge.h: vector code, the fix-ups only where one is needed)."""
    bnfast_run_partials(shift, origin, s1, s2, w, inv_n, pmean, pm2)


cdef inline void merge_partial(double* count, double* mean, double* m2,
                               double n_b, double mean_b, double m2_b) noexcept nogil:
    """Chan et al.: fold the partial (n_b, mean_b, m2_b) into (count, mean, m2)."""
    if n_b <= 0:
        return
    cdef double n_a = count[0]
    cdef double n = n_a + n_b
    cdef double r = n_b / n
    cdef double delta = mean_b - mean[0]
    # With n_a == 0 this gives mean_b and m2_b exactly; a constant channel keeps
    # delta == 0, so its mean stays exact and its m2 stays 0.
    mean[0] = merged_mean(mean[0], mean_b, r)
    m2[0] = m2[0] + m2_b + delta * (delta * (n_a * r))
    count[0] = n


cdef inline double channel_origin(double first_value) noexcept nogil:
    """The per-channel origin the statistics are accumulated from: a data value.

    Partial means are kept relative to it (small numbers for data far from
    zero, so merges round at the scale of the spread, not of the offset) and it
    is added back once, with its rounding error kept (see unshift_means).
    """
    return finite_or_zero(first_value)


cdef inline void unshift_means(double* mean, double* residual, const double* origin,
                               Py_ssize_t C) noexcept nogil:
    """mean[c] (relative to origin[c]) becomes origin[c] + mean[c] rounded to double;
    residual[c] (if not NULL) gets what that rounding lost, exactly (Knuth's
    TwoSum), so mean + residual is the mean as accumulated.  A non-finite mean
    has residual 0.
    """
    cdef Py_ssize_t c
    cdef double a, d, s, bb, lo
    for c in range(C):
        a = origin[c]
        d = mean[c]
        s = a + d
        mean[c] = s
        if residual != NULL:
            bb = s - a
            lo = (a - (s - bb)) + (d - bb)
            residual[c] = lo if lo - lo == 0.0 else 0.0
