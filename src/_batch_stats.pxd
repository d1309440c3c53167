# Per-channel batch statistics (mean and biased variance) at the C level, float64
# accumulation (half data: float sums folded into float64); run by the forward
# entry (_forward.pyx).
#
# Two memory layouts, one pass over the input each, both read in memory order:
#
# * stats_first: x is (N, C, S) C-contiguous (NCHW and friends).  A task is a
#   block of samples times a block of channels; per sample it reads its
#   channels' runs (contiguous), gets each run's partial (count S, mean, m2)
#   from shifted sums against a value of the run, and folds that sample's row
#   of partials into the task's (one vectorised merge across channels).  Walking
#   a channel down the batch instead (one run per sample, a whole sample apart)
#   left the prefetchers idle: 2 values/ns on a 51 MB batch, where a copy does 6.
#   Short runs of a batch (_tiling.by_columns) go by columns instead
#   (_stats_first_cols): the batch as N rows of C * S values, summed down the
#   rows in tiles of whole channels, as stats_last does, then each channel's S
#   columns.
# * stats_last: x is (M, C) C-contiguous (NHWC viewed as rows, and plain
#   (N, C)).  Rows are read as wide rows of k * C values so that small C still
#   gives long vectorisable inner loops.  A task is a block of wide rows times
#   a column tile of at most TILE_COLS values, so the column accumulators stay
#   in L1 (a whole 4096-wide row's did not: 1.1 values/ns), and yields one
#   partial per column.
#
# Partials are merged per channel in a fixed order (see _moments.pxd): the
# partition depends on the shape only (never on the thread count or the
# storage type), so any thread count gives the same bits.  (Half data's leaves
# sum in float, folded into double: src/bnfast_stats.h.)
#
# Means are accumulated relative to a per-channel origin (the channel's first
# value), then returned as the rounded float64 mean plus, optionally, the
# residual that rounding lost: the normalise pass subtracts the rounded mean
# (exact for data near it) and folds the residual into its shift, so float64
# data with mean 1e10 and std 1 normalises to ~1e-15 instead of ~1e-6.
# With one thread no OpenMP region is entered (one costs ~1 us even then).
from _dtypes cimport fill_value, real_t, store_double, to_double
from cython.parallel cimport parallel
from _aligned cimport aligned_free, aligned_malloc

from _moments cimport (bnfast_group_sums, channel_origin, finite_or_zero, finite_shifts, m2_fixup,
                      merge_rows, merge_shifted, run_partials, shifted_colsums,
                      shifted_sums_runs, unshift_means)
from _tiling cimport (COLS_MAX_S, COLS_TILE, ColumnTasks, RowBlocks, SampleTasks, by_columns,
                     column_tasks, repeat_channels, row_blocks, sample_tasks)
from _openmp_helpers cimport (bnfast_claim, bnfast_claim_next, bnfast_claim_start, bnfast_shares,
                             bnfast_shares_init, bnfast_thread_num, threads_for)

cdef enum:
    # Longest piece of a run summed against one shift (bounds cancellation
    # error to ~eps * CHUNK).
    CHUNK = 4096
    # Channels-first tasks: per sample about RUN_ELEMS contiguous values (whole
    # channels), TASK_ELEMS values in all.
    RUN_ELEMS = 32768
    TASK_ELEMS = 32768
    # Channels-last tasks: column tiles of at most TILE_COLS values (2 * 512
    # doubles of accumulators: L1) times blocks of rows, about STATS_BLOCK_ELEMS
    # values (stats_block_elems: fewer in small arrays) and at most MAX_BLOCK_ROWS
    # rows (one shift per column and block).
    # Each (block, column) pays a scalar set-up and finish (the shift read and
    # stored in the storage type, the partial's fix-ups, its merge): with 64-row
    # blocks that was a quarter of a (4096, 1024) float16 training forward.
    STATS_BLOCK_ELEMS = 131072
    MAX_BLOCK_ROWS = 4096
    TILE_COLS = 512
    # Arrays under 4 * STATS_BLOCK_ELEMS values take blocks of a quarter of them
    # (at least MIN_STATS_BLOCK_ELEMS): four tasks for two threads, not one or two
    # (16x512x4x4 channels-last, 2 threads: one 131072-value task ran alone).
    MIN_STATS_BLOCK_ELEMS = 32768


cdef inline Py_ssize_t stats_block_elems(Py_ssize_t total) noexcept nogil:
    """Values per channels-last statistics task for an array of ``total`` values."""
    return min(<Py_ssize_t>STATS_BLOCK_ELEMS, max(<Py_ssize_t>MIN_STATS_BLOCK_ELEMS, total // 4))


cdef inline void _finish(double* mean, double* m2, Py_ssize_t C, double count) noexcept nogil:
    """Turn the accumulated m2 (stored in the var array) into the biased variance."""
    cdef Py_ssize_t c
    for c in range(C):
        m2[c] = m2[c] / count


cdef inline void _run_partials(const real_t* x, Py_ssize_t runs, Py_ssize_t S,
                               const double* origin, double* pmean, double* pm2,
                               double* scratch) noexcept nogil:
    """Partials of runs consecutive runs of S values (run r at x + r * S): the mean
    relative to origin[r] into pmean[r], m2 into pm2[r].  scratch: 3 * runs doubles."""
    cdef double* shift = scratch
    cdef double* s1 = scratch + runs
    cdef double* s2 = scratch + 2 * runs
    cdef double inv_n = 1.0 / <double>S
    cdef double cnt, mu, m2
    cdef Py_ssize_t r, s0, piece
    if S <= CHUNK:  # one shifted sum per run, the runs in one leaf call
        shifted_sums_runs(x, runs, S, shift, s1, s2)
        run_partials(shift, origin, s1, s2, runs, inv_n, pmean, pm2)
        return
    for r in range(runs):  # long runs: pieces of CHUNK, merged in order
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        s0 = 0
        while s0 < S:
            piece = min(S - s0, CHUNK)
            shifted_sums_runs(x + r * S + s0, 1, piece, shift, s1, s2)
            merge_shifted(&cnt, &mu, &m2, <double>piece, shift[0] - origin[r], s1[0], s2[0])
            s0 = s0 + piece
        pmean[r] = mu
        pm2[r] = m2


cdef inline void _first_task(const real_t* x, Py_ssize_t t, Py_ssize_t N, Py_ssize_t C,
                             Py_ssize_t S, Py_ssize_t cpt, Py_ssize_t npt, Py_ssize_t cblocks,
                             const double* origin, double* part, double* part_m2,
                             double* scratch) noexcept nogil:
    """Task t = (sample block nb, channel block cb): its channels' partials (mean
    relative to origin, m2) into part[nb * C + c], part_m2[nb * C + c].
    scratch: 5 * cpt doubles."""
    cdef Py_ssize_t nb = t // cblocks
    cdef Py_ssize_t cb = t - nb * cblocks
    cdef Py_ssize_t c0 = cb * cpt
    cdef Py_ssize_t w = min(C, c0 + cpt) - c0
    cdef double* acc_mean = part + nb * C + c0
    cdef double* acc_m2 = part_m2 + nb * C + c0
    cdef double* pmean = scratch
    cdef double* pm2 = scratch + w
    cdef Py_ssize_t n = nb * npt
    cdef double n_a = <double>S
    # The first sample's partials are the task's: merging them into empty
    # accumulators gives the same bits (a partial mean is never -0.0), and a
    # 7x7 image's tasks hold one sample each.
    _run_partials(x + (n * C + c0) * S, w, S, origin + c0, acc_mean, acc_m2, scratch + 2 * w)
    for n in range(nb * npt + 1, min(N, (nb + 1) * npt)):
        _run_partials(x + (n * C + c0) * S, w, S, origin + c0, pmean, pm2, scratch + 2 * w)
        merge_rows(acc_mean, acc_m2, pmean, pm2, w, n_a, <double>S)
        n_a = n_a + S


cdef inline void _merge_sample_blocks(double* mean, double* var, const double* part,
                                      const double* part_m2, const double* origin,
                                      double* residual, Py_ssize_t N, Py_ssize_t C,
                                      Py_ssize_t S, Py_ssize_t npt,
                                      Py_ssize_t nblocks) noexcept nogil:
    """The channels-first tasks' partials ([sample block][channel], mean relative to
    origin, m2) merged per channel in block order, then finished: mean, biased
    variance and residual (see stats_first)."""
    cdef Py_ssize_t b, c, n
    for c in range(C):
        mean[c] = 0.0
        var[c] = 0.0
    for b in range(nblocks):
        n = min(N, (b + 1) * npt) - b * npt
        merge_rows(mean, var, part + b * C, part_m2 + b * C, C,
                   <double>(b * npt * S), <double>(n * S))
    _finish(mean, var, C, <double>(N * S))
    unshift_means(mean, residual, origin, C)


cdef inline void _cols_task(const real_t* x, Py_ssize_t t, Py_ssize_t N, Py_ssize_t C,
                            Py_ssize_t S, Py_ssize_t cpt, Py_ssize_t npt, Py_ssize_t ctiles,
                            const double* origin, double* part, double* part_m2,
                            real_t* shift, double* scratch) noexcept nogil:
    """Task t = (sample block nb, channel tile): its channels' partials (mean
    relative to origin, m2) into part[nb * C + c], part_m2[nb * C + c].

    The block's rows of the tile's w * S values are summed by column (each
    column against its channel's shift: the channel's first value in the
    block), then each channel's S columns in double.  scratch: 2 * (COLS_TILE
    + 8) + 3 * cpt doubles; shift: COLS_TILE values."""
    cdef Py_ssize_t nb = t // ctiles
    cdef Py_ssize_t c0 = (t - nb * ctiles) * cpt
    cdef Py_ssize_t w = min(C, c0 + cpt) - c0
    cdef Py_ssize_t n0 = nb * npt
    cdef Py_ssize_t rows = min(N, n0 + npt) - n0
    cdef const real_t* first = x + (n0 * C + c0) * S
    # s2 COLS_TILE + 8 doubles after s1: no 4K aliasing between s1[j] and s2[j].
    cdef double* s1 = scratch
    cdef double* s2 = scratch + COLS_TILE + 8
    cdef double* kc = s2 + COLS_TILE + 8
    cdef double* g1 = kc + cpt
    cdef double* g2 = g1 + cpt
    cdef Py_ssize_t c
    for c in range(w):
        kc[c] = finite_or_zero(to_double(first[c * S]))
        # Exact (a value of the data, or 0): stored once and copied.  A half type's
        # conversion of each of the S copies was a tenth of a 32x2048x7x7 float16
        # training forward's samples.
        store_double(&shift[c * S], kc[c])
        fill_value(shift + c * S + 1, S - 1, shift[c * S])
    shifted_colsums(first, rows, w * S, C * S, shift, s1, s2)
    bnfast_group_sums(s1, w, S, g1)
    bnfast_group_sums(s2, w, S, g2)
    run_partials(kc, origin + c0, g1, g2, w, 1.0 / <double>(rows * S),
                 part + nb * C + c0, part_m2 + nb * C + c0)


cdef inline int stats_first(const real_t* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                            double* mean, double* var, int n_threads,
                            double* residual) noexcept nogil:
    """Mean and biased variance per channel of (N, C, S), all > 0.  -1 without memory.

    ``residual`` (C,), or NULL: receives the exact mean minus the float64 one.
    """
    if by_columns(N, S, COLS_MAX_S):
        return _stats_first_cols(x, N, C, S, mean, var, n_threads, residual)
    # Tasks: samples [nb * npt, +npt) x channels [cb * cpt, +cpt), by the shape only.
    cdef SampleTasks cut = sample_tasks(N, C, S, RUN_ELEMS, TASK_ELEMS)
    cdef Py_ssize_t cpt = cut.cpt, npt = cut.npt, nblocks = cut.nblocks, cblocks = cut.cblocks
    cdef Py_ssize_t tasks = nblocks * cblocks
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, N * C * S, n_threads)
    # Partials laid out [sample block][channel] so the merge runs along channels;
    # then the origins; then each thread's scratch (allocated up front: a thread
    # that skipped the worksharing loop on a failed malloc would hang the others).
    cdef Py_ssize_t slice_len = 5 * cpt + 8
    cdef double* part = <double*>aligned_malloc(
        (2 * nblocks * C + C + nt * slice_len) * sizeof(double))
    if part == NULL:
        return -1
    cdef double* part_m2 = part + nblocks * C
    cdef double* origin = part + 2 * nblocks * C
    cdef double* scratch = origin + C
    cdef Py_ssize_t t = 0, c
    for c in range(C):
        origin[c] = channel_origin(to_double(x[c * S]))
    if nt == 1:
        for t in range(tasks):
            _first_task(x, t, N, C, S, cpt, npt, cblocks, origin, part, part_m2, scratch)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _first_task(x, t, N, C, S, cpt, npt, cblocks, origin, part, part_m2,
                            scratch + slice_len * bnfast_thread_num())
                t = bnfast_claim_next(&shares, &claim)
    _merge_sample_blocks(mean, var, part, part_m2, origin, residual, N, C, S, npt, nblocks)
    aligned_free(part)
    return 0


cdef inline int _stats_first_cols(const real_t* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                  double* mean, double* var, int n_threads,
                                  double* residual) noexcept nogil:
    """stats_first of short runs (7x7 images and friends), by columns: the batch
    as N rows of C * S values, summed down the rows (channels-last's column sums,
    AVX-512 for half data) in tasks of (sample block, tile of whole channels).
    Each (sample, channel) had cost a run's set-up and finish and a partial's
    merge: 32x2048x7x7 statistics on the Xeon VM, one thread, bfloat16 700 -> 433
    us, float16 665 -> 417, float32 859 -> 604.  A task's column accumulators
    stay in L1; tasks by the shape only, as stats_first's."""
    cdef ColumnTasks split = column_tasks(N, C, S)
    cdef Py_ssize_t cpt = split.cpt, ctiles = split.ctiles
    cdef Py_ssize_t npt = split.npt, nblocks = split.nblocks
    cdef Py_ssize_t tasks = nblocks * ctiles
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, N * C * S, n_threads)
    cdef Py_ssize_t slice_len = 2 * (COLS_TILE + 8) + 3 * cpt + 8
    cdef double* part = <double*>aligned_malloc(
        (2 * nblocks * C + C + nt * slice_len) * sizeof(double))
    cdef real_t* shifts = <real_t*>aligned_malloc(nt * (COLS_TILE + 32) * sizeof(real_t))
    if part == NULL or shifts == NULL:
        aligned_free(part)
        aligned_free(shifts)
        return -1
    cdef double* part_m2 = part + nblocks * C
    cdef double* origin = part + 2 * nblocks * C
    cdef double* scratch = origin + C
    cdef Py_ssize_t t = 0, c
    for c in range(C):
        origin[c] = channel_origin(to_double(x[c * S]))
    if nt == 1:
        for t in range(tasks):
            _cols_task(x, t, N, C, S, cpt, npt, ctiles, origin, part, part_m2, shifts, scratch)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _cols_task(x, t, N, C, S, cpt, npt, ctiles, origin, part, part_m2,
                           shifts + (COLS_TILE + 32) * bnfast_thread_num(),
                           scratch + slice_len * bnfast_thread_num())
                t = bnfast_claim_next(&shares, &claim)
    _merge_sample_blocks(mean, var, part, part_m2, origin, residual, N, C, S, npt, nblocks)
    aligned_free(shifts)
    aligned_free(part)
    return 0


cdef inline void _last_task(const real_t* base, Py_ssize_t t, Py_ssize_t tiles,
                            Py_ssize_t tile, Py_ssize_t rows, Py_ssize_t per_block,
                            Py_ssize_t W, real_t* shift, double* s1, double* s2,
                            const double* origin, double* part, double* part_m2) noexcept nogil:
    """Task t = (block b of wide rows, column tile): per-column mean (relative to
    origin[j], the column's channel origin) and m2 into part[b * W + j],
    part_m2[b * W + j] for the tile's columns j (s1, s2, shift: tile values each)."""
    cdef Py_ssize_t b = t // tiles
    cdef Py_ssize_t j0 = (t - b * tiles) * tile
    cdef Py_ssize_t jn = min(W - j0, tile)
    cdef Py_ssize_t nrows = min(rows, (b + 1) * per_block) - b * per_block
    cdef double inv_cnt = 1.0 / <double>nrows
    # Shift: the block's first wide row (values from the chunk).
    cdef const real_t* first = base + b * per_block * W + j0
    cdef double* pm = part + b * W + j0
    cdef double* pm2 = part_m2 + b * W + j0
    cdef Py_ssize_t j
    # The shifts in the storage type and as doubles (in pm until the column sums are
    # in); s2 stages a half type's widened values (the column sums write it next).
    finite_shifts(first, jn, shift, pm, <float*>s2)
    shifted_colsums(first, nrows, jn, W, shift, s1, s2)
    # Plain arithmetic first (vectorises), rare fix-ups after.
    for j in range(jn):
        pm[j] = (pm[j] - origin[j0 + j]) + s1[j] * inv_cnt
        pm2[j] = s2[j] - s1[j] * (s1[j] * inv_cnt)
    for j in range(jn):
        if not pm2[j] >= 0.0:
            pm2[j] = m2_fixup(pm2[j], s1[j], s2[j])


cdef inline int stats_last(const real_t* base, Py_ssize_t M, Py_ssize_t C, double* mean,
                           double* var, int n_threads, double* residual) noexcept nogil:
    """Mean and biased variance per channel of (M, C) rows, both > 0.  -1 without memory.

    ``residual``: as in stats_first.
    """
    # Wide rows of W = k * C values (long inner loops for small C), cut into
    # column tiles of equal width (a multiple of 8, but the last) and blocks
    # of rows: a task is a (block, tile), about stats_block_elems(M * C) values.
    cdef Py_ssize_t block_elems = stats_block_elems(M * C)
    cdef RowBlocks tiling = row_blocks(M, C, block_elems, MAX_BLOCK_ROWS)
    cdef Py_ssize_t k = tiling.k, W = tiling.W, rows = tiling.rows
    cdef Py_ssize_t tiles = (W + TILE_COLS - 1) // TILE_COLS
    cdef Py_ssize_t tile = ((W + tiles - 1) // tiles + 7) // 8 * 8
    tiles = (W + tile - 1) // tile
    cdef Py_ssize_t per_block = max(1, min(MAX_BLOCK_ROWS, block_elems // tile))
    cdef Py_ssize_t blocks = (rows + per_block - 1) // per_block
    cdef Py_ssize_t tasks = blocks * tiles
    cdef bnfast_shares shares
    cdef bnfast_claim claim
    cdef int nt = threads_for(tasks, M * C, n_threads)
    # Partial means and m2 per (block, column); counts follow from the block.
    cdef double* part = <double*>aligned_malloc((2 * blocks * W + W) * sizeof(double))
    # Per-thread column sums and shifts, allocated up front (see stats_first):
    # s2 TILE_COLS + 8 doubles after s1, as s1 + tile could be a multiple of
    # 4 KiB away and the load of s2[j] wait on the store to s1[j] (4K
    # aliasing).  Slices padded to whole cache lines (no false sharing); at
    # least 2 * C doubles in all (the leftover rows' values and m2 at the end).
    cdef Py_ssize_t slice_len = 2 * (TILE_COLS + 8) + 8
    cdef double* scratch = <double*>aligned_malloc(max(nt * slice_len, 2 * C) * sizeof(double))
    # (The shifts in the storage type: the SIMD leaf reads them so.)
    cdef real_t* shifts = <real_t*>aligned_malloc(nt * (TILE_COLS + 32) * sizeof(real_t))
    if part == NULL or scratch == NULL or shifts == NULL:
        aligned_free(part)
        aligned_free(scratch)
        aligned_free(shifts)
        return -1
    cdef double* part_m2 = part + blocks * W
    # Channel origins (row 0), tiled over the wide row.
    cdef double* origin = part + 2 * blocks * W
    cdef double* s1 = scratch      # (set per thread below; initialised for the compiler)
    cdef real_t* shift = shifts
    cdef Py_ssize_t t = 0, b, r, j, l
    cdef double cnt, n_a
    for j in range(C):
        origin[j] = channel_origin(to_double(base[j]))
    repeat_channels(origin, C, W)
    if nt == 1:
        for t in range(tasks):
            _last_task(base, t, tiles, tile, rows, per_block, W, shifts, scratch,
                       scratch + TILE_COLS + 8, origin, part, part_m2)
    else:
        bnfast_shares_init(&shares, tasks, nt)
        with parallel(num_threads=nt):
            s1 = scratch + slice_len * bnfast_thread_num()
            shift = shifts + (TILE_COLS + 32) * bnfast_thread_num()
            claim = bnfast_claim_start(&shares, bnfast_thread_num())
            t = bnfast_claim_next(&shares, &claim)
            while t >= 0:
                _last_task(base, t, tiles, tile, rows, per_block, W, shift, s1,
                           s1 + TILE_COLS + 8, origin, part, part_m2)
                t = bnfast_claim_next(&shares, &claim)
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
    aligned_free(shifts)
    aligned_free(scratch)
    aligned_free(part)
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
