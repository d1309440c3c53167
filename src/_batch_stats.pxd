# Per-channel batch statistics (mean and biased variance) at the C level, float64
# accumulation; run by the forward entry (_forward.pyx).
#
# Two memory layouts, one pass over the input each:
#
# * stats_first: x is (N, C, S) C-contiguous (NCHW and friends).  Work is cut
#   into tasks of (channel, block of samples); each task streams its contiguous
#   runs once.  Tasks outnumber threads even when C is small, so a
#   (256, 3, 32, 32) batch is split over the batch as well as the channels.
# * stats_last: x is (M, C) C-contiguous (NHWC viewed as rows, and plain
#   (N, C)).  Rows are read as wide rows of k * C values so that small C still
#   gives long vectorisable inner loops; each block of wide rows yields one
#   partial per column.
#
# Partials are merged per channel in a fixed order (see _moments.pxd): the
# partition depends on the shape only, so any thread count gives the same bits.
#
# Means are accumulated relative to a per-channel origin (the channel's first
# value), then returned as the rounded float64 mean plus, optionally, the
# residual that rounding lost: the normalise pass subtracts the rounded mean
# (exact for data near it) and folds the residual into its shift, so float64
# data with mean 1e10 and std 1 normalises to ~1e-15 instead of ~1e-6.
# With one thread no OpenMP region is entered (one costs ~1 us even then).
from _dtypes cimport bnfast_bf16, bnfast_f16, real_t, store_double, to_double
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc

from _moments cimport (channel_origin, finite_or_zero, m2_fixup, merge_rows, merge_shifted,
                      shifted_colsums, shifted_sums, unshift_means)
from _tiling cimport RowBlocks, row_blocks
from _openmp_helpers cimport bnfast_thread_num, threads_for

cdef enum:
    # Elements per shifted-sum chunk (bounds cancellation error to ~eps * CHUNK).
    CHUNK = 4096
    # Elements per (channel, sample block) task in the channels-first layout.
    TASK_ELEMS = 32768
    # Channels-last blocks: about this many elements, at most MAX_BLOCK_ROWS rows.
    STATS_BLOCK_ELEMS = 32768
    MAX_BLOCK_ROWS = 4096


cdef inline void _finish(double* mean, double* m2, Py_ssize_t C, double count) noexcept nogil:
    """Turn the accumulated m2 (stored in the var array) into the biased variance."""
    cdef Py_ssize_t c
    for c in range(C):
        m2[c] = m2[c] / count


cdef inline void _first_task(const real_t* base, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             Py_ssize_t t, Py_ssize_t blocks, Py_ssize_t per_task,
                             const double* origin, double* part, double* part_m2) noexcept nogil:
    """Task t = (channel c, sample block b): the block's mean (relative to origin[c])
    and m2 into part[b * C + c]."""
    cdef Py_ssize_t c = t // blocks
    cdef Py_ssize_t b = t - c * blocks
    cdef double cnt = 0.0, mu = 0.0, m2 = 0.0, chunk_n = 0.0, s1 = 0.0, s2 = 0.0, shift = 0.0
    cdef Py_ssize_t n, s0, run
    cdef const real_t* run_start
    for n in range(b * per_task, min(N, (b + 1) * per_task)):
        # Runs of S values; a chunk may span several runs (small S).
        s0 = 0
        while s0 < S:
            run = min(S - s0, CHUNK)
            run_start = base + (n * C + c) * S + s0
            if chunk_n == 0.0:
                shift = finite_or_zero(to_double(run_start[0]))
            shifted_sums(run_start, run, shift, &s1, &s2)
            chunk_n = chunk_n + run
            s0 = s0 + run
            if chunk_n >= CHUNK:
                merge_shifted(&cnt, &mu, &m2, chunk_n, shift - origin[c], s1, s2)
                chunk_n = 0.0
                s1 = 0.0
                s2 = 0.0
    merge_shifted(&cnt, &mu, &m2, chunk_n, shift - origin[c], s1, s2)
    part[b * C + c] = mu
    part_m2[b * C + c] = m2


cdef inline int stats_first(const real_t* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                            double* mean, double* var, int n_threads,
                            double* residual) noexcept nogil:
    """Mean and biased variance per channel of (N, C, S), all > 0.  -1 without memory.

    ``residual`` (C,), or NULL: receives the exact mean minus the float64 one.
    """
    cdef Py_ssize_t per_task = TASK_ELEMS // S if S < TASK_ELEMS else 1
    cdef Py_ssize_t blocks = (N + per_task - 1) // per_task
    cdef Py_ssize_t tasks = C * blocks
    # Partials laid out [block][channel] so the merge runs along channels.
    cdef double* part = <double*>malloc((2 * tasks + C) * sizeof(double))
    if part == NULL:
        return -1
    cdef double* part_m2 = part + tasks
    cdef double* origin = part + 2 * tasks
    cdef Py_ssize_t t, b, c, n
    for c in range(C):
        origin[c] = channel_origin(to_double(x[c * S]))
    cdef int nt = threads_for(tasks, N * C * S, n_threads)
    if nt == 1:
        for t in range(tasks):
            _first_task(x, N, C, S, t, blocks, per_task, origin, part, part_m2)
    else:
        for t in prange(tasks, schedule='dynamic', chunksize=1, num_threads=nt):
            _first_task(x, N, C, S, t, blocks, per_task, origin, part, part_m2)
    for c in range(C):
        mean[c] = 0.0
        var[c] = 0.0
    for b in range(blocks):
        n = min(N, (b + 1) * per_task) - b * per_task
        merge_rows(mean, var, part + b * C, part_m2 + b * C, C,
                   <double>(b * per_task * S), <double>(n * S))
    _finish(mean, var, C, <double>(N * S))
    unshift_means(mean, residual, origin, C)
    free(part)
    return 0


cdef inline void _last_block(const real_t* base, Py_ssize_t b, Py_ssize_t rows,
                             Py_ssize_t per_block, Py_ssize_t W, real_t* shift, double* s1,
                             double* s2, const double* origin, double* part,
                             double* part_m2, float* stage) noexcept nogil:
    """Block b of wide rows: per-column mean (relative to origin[j], the column's
    channel origin) and m2 into part[b * W:], part_m2[b * W:].  stage: the half
    types' scratch (shifted_colsums)."""
    cdef Py_ssize_t j
    for j in range(W):
        s1[j] = 0.0
        s2[j] = 0.0
    cdef Py_ssize_t r_end = min(rows, (b + 1) * per_block)
    # Shift: the block's first wide row (values from the chunk).
    cdef const real_t* first = base + b * per_block * W
    for j in range(W):
        store_double(&shift[j], finite_or_zero(to_double(first[j])))  # exact
    shifted_colsums(first, r_end - b * per_block, W, shift, s1, s2, stage)
    cdef double inv_cnt = 1.0 / <double>(r_end - b * per_block)
    # Plain arithmetic first (vectorises), rare fix-ups after.
    for j in range(W):
        part[b * W + j] = (to_double(shift[j]) - origin[j]) + s1[j] * inv_cnt
        part_m2[b * W + j] = s2[j] - s1[j] * (s1[j] * inv_cnt)
    for j in range(W):
        if not part_m2[b * W + j] >= 0.0:
            part_m2[b * W + j] = m2_fixup(part_m2[b * W + j], s1[j], s2[j])


cdef inline int stats_last(const real_t* base, Py_ssize_t M, Py_ssize_t C, double* mean,
                           double* var, int n_threads, double* residual) noexcept nogil:
    """Mean and biased variance per channel of (M, C) rows, both > 0.  -1 without memory.

    ``residual``: as in stats_first.
    """
    # Wide rows of W = k * C values (long inner loops for small C), in blocks.
    cdef RowBlocks tiling = row_blocks(M, C, STATS_BLOCK_ELEMS, MAX_BLOCK_ROWS)
    cdef Py_ssize_t k = tiling.k, W = tiling.W, rows = tiling.rows
    cdef Py_ssize_t per_block = tiling.per_block, blocks = tiling.blocks
    cdef int nt = threads_for(blocks, M * C, n_threads)
    # Partial means and m2 per (block, column); counts follow from the block.
    cdef double* part = <double*>malloc((2 * blocks * W + W) * sizeof(double))
    # Per-thread column sums, allocated up front: a thread that skipped the
    # worksharing loop on a failed malloc would deadlock the others.
    # Each thread's slice is padded to whole cache lines (no false sharing).
    cdef Py_ssize_t slice_len = (2 * W + 7) // 8 * 8 + 8
    cdef double* scratch = <double*>malloc(nt * slice_len * sizeof(double))
    # Per-thread column shifts in the storage type (the SIMD leaf reads them so).
    cdef real_t* shifts = <real_t*>malloc(nt * slice_len * sizeof(real_t))
    # Per-thread staging for the half types: four rows and the shifts as floats.
    cdef Py_ssize_t stage_len = (5 * W + 15) // 16 * 16 + 16
    cdef float* stages = NULL
    cdef bint staged = real_t is bnfast_f16 or real_t is bnfast_bf16
    if staged:
        stages = <float*>malloc(nt * stage_len * sizeof(float))
    if part == NULL or scratch == NULL or shifts == NULL or (staged and stages == NULL):
        free(part)
        free(scratch)
        free(shifts)
        free(stages)
        return -1
    cdef double* part_m2 = part + blocks * W
    # Channel origins (row 0), tiled over the wide row.
    cdef double* origin = part + 2 * blocks * W
    cdef double* s1 = scratch      # (set per thread below; initialised for the compiler)
    cdef real_t* shift = shifts
    cdef float* stage = stages
    cdef Py_ssize_t b, r, j, l
    cdef double cnt, n_a
    for j in range(W):
        origin[j] = channel_origin(to_double(base[j % C]))
    if nt == 1:
        for b in range(blocks):
            _last_block(base, b, rows, per_block, W, shifts, scratch, scratch + W, origin, part,
                        part_m2, stages)
    else:
        with parallel(num_threads=nt):
            s1 = scratch + slice_len * bnfast_thread_num()
            shift = shifts + slice_len * bnfast_thread_num()
            stage = NULL if stages == NULL else stages + stage_len * bnfast_thread_num()
            for b in prange(blocks, schedule='dynamic', chunksize=1):
                _last_block(base, b, rows, per_block, W, shift, s1, s1 + W, origin, part,
                            part_m2, stage)
    # Fold (block, lane) partials in order, then the rows that did not fill a
    # wide row (count 1; scratch holds the values and their m2: 0, or NaN for a
    # non-finite value, as a chunk's shifted sums give).
    for j in range(C):
        mean[j] = 0.0
        var[j] = 0.0
    n_a = 0.0
    for b in range(blocks):
        cnt = <double>(min(rows, (b + 1) * per_block) - b * per_block)
        for l in range(k):
            merge_rows(mean, var, part + b * W + l * C, part_m2 + b * W + l * C, C, n_a, cnt)
            n_a = n_a + cnt
    for r in range(rows * k, M):
        for j in range(C):
            scratch[j] = to_double(base[r * C + j]) - origin[j]
            scratch[C + j] = scratch[j] - scratch[j]
        merge_rows(mean, var, scratch, scratch + C, C, n_a, 1.0)
        n_a = n_a + 1.0
    _finish(mean, var, C, <double>M)
    unshift_means(mean, residual, origin, C)
    free(stages)
    free(shifts)
    free(scratch)
    free(part)
    return 0


cdef inline void update_running(real_t* running_mean, real_t* running_var,
                                const double* mean, const double* var, Py_ssize_t C,
                                double count, double momentum) noexcept nogil:
    """PyTorch's running-stat update, computed in double and rounded once.

    running = (1 - momentum) * running + momentum * batch, with the unbiased
    variance var * count / (count - 1) for running_var.
    """
    cdef Py_ssize_t c
    cdef double keep = 1.0 - momentum
    cdef double unbias = count / (count - 1.0)
    for c in range(C):
        store_double(&running_mean[c], keep * to_double(running_mean[c]) + momentum * mean[c])
        store_double(&running_var[c],
                     keep * to_double(running_var[c]) + momentum * (var[c] * unbias))
