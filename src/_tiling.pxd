# How channels-last (M, C) rows are widened: k rows of C values are read as one
# "wide row" of W = k * C values, so small C still gives long vector loops.
# Shared by the statistics, normalise and backward kernels so their tiles agree.

cdef enum:
    # Wide rows reach at least this many values (when C is smaller): the
    # statistics' rows (their accumulators stay in registers and L1) ...
    ROW_WIDTH = 64
    # ... and the elementwise passes' (normalise, backward dx): a short inner
    # loop per row costs its exit (a 64-value row ran ~1.3x slower than
    # 256-value rows; the coefficient tile still fits L1 many times over).
    APPLY_WIDTH = 256
    # W is made a multiple of this many values: whole SIMD vectors, no scalar tail.
    ROW_MULTIPLE = 8


cdef inline Py_ssize_t _gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef inline Py_ssize_t tile_repeat(Py_ssize_t C, Py_ssize_t width) noexcept nogil:
    """k, the rows per wide row: 1 for C >= width, else the smallest k with
    k * C >= width and k * C a multiple of ROW_MULTIPLE (C=3, width 64: k=24, W=72)."""
    if C >= width:
        return 1
    cdef Py_ssize_t step = ROW_MULTIPLE // _gcd(C, ROW_MULTIPLE)
    cdef Py_ssize_t k = (width + C - 1) // C
    return (k + step - 1) // step * step


cdef extern from "bnfast_table.h" nogil:
    void bnfast_repeat_row(void* row, size_t size, Py_ssize_t C, Py_ssize_t W)


cdef inline void repeat_channels(double* row, Py_ssize_t C, Py_ssize_t W) noexcept nogil:
    """A wide row of W = k * C per-channel values from its first C: the rest are
    their repeats (the tables' copy, bnfast_table.h)."""
    bnfast_repeat_row(row, sizeof(double), C, W)


cdef struct RowBlocks:
    Py_ssize_t k          # rows of C values per wide row
    Py_ssize_t W          # values per wide row: k * C
    Py_ssize_t rows       # whole wide rows; the M - rows * k rows left over are few
    Py_ssize_t per_block  # wide rows per block (the last block may have fewer)
    Py_ssize_t blocks


cdef inline RowBlocks row_blocks(Py_ssize_t M, Py_ssize_t C, Py_ssize_t block_elems,
                                 Py_ssize_t max_block_rows) noexcept nogil:
    """Cut M channels-last rows into blocks of wide rows, by the shape only
    (never the thread count), so reductions are bit-identical for any threads."""
    cdef RowBlocks t
    t.k = min(tile_repeat(C, ROW_WIDTH), M)
    t.W = t.k * C
    t.rows = M // t.k
    t.per_block = max(1, min(max_block_rows, block_elems // t.W))
    t.blocks = (t.rows + t.per_block - 1) // t.per_block
    return t


cdef struct SampleTasks:
    Py_ssize_t cpt        # channels per task
    Py_ssize_t npt        # samples per task
    Py_ssize_t cblocks    # channel blocks
    Py_ssize_t nblocks    # sample blocks; tasks = nblocks * cblocks


cdef inline SampleTasks sample_tasks(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                     Py_ssize_t run_elems, Py_ssize_t task_elems) noexcept nogil:
    """Cut channels-first (N, C, S) work into (sample block, channel block) tasks
    read in memory order: per sample about run_elems contiguous values (whole
    channels), task_elems in all; blocks as even as the counts allow (8 samples
    as 4 + 4, not 5 + 3).  By the shape only, so reductions are bit-identical
    for any thread count."""
    cdef SampleTasks t
    t.cpt = C if C * S <= run_elems else max(1, run_elems // S)
    t.npt = max(1, task_elems // (t.cpt * S))
    t.nblocks = (N + t.npt - 1) // t.npt
    t.npt = (N + t.nblocks - 1) // t.nblocks
    t.nblocks = (N + t.npt - 1) // t.npt
    t.cblocks = (C + t.cpt - 1) // t.cpt
    t.cpt = (C + t.cblocks - 1) // t.cblocks
    t.cblocks = (C + t.cpt - 1) // t.cpt
    return t


cdef struct ColumnTiles:
    Py_ssize_t tile       # columns per tile: a multiple of 8 (the last tile may be narrower)
    Py_ssize_t tiles      # tiles across the wide row


cdef inline ColumnTiles column_tiles(Py_ssize_t W, Py_ssize_t max_cols) noexcept nogil:
    """Cut a wide row of W values into tiles of equal width, at most max_cols (a
    multiple of 8) each but the last: W = 1030, 512 -> 3 tiles of 344, 344, 342.
    By the shape only; a (block, tile) task's column accumulators stay in L1."""
    cdef ColumnTiles t
    t.tiles = (W + max_cols - 1) // max_cols
    t.tile = ((W + t.tiles - 1) // t.tiles + 7) // 8 * 8
    t.tiles = (W + t.tile - 1) // t.tile
    return t


# Channels-first batches of short runs, summed by columns (the statistics and
# the backward's pass 1): the batch as N rows of C * S values, read down the
# rows in tiles of whole channels, as the channels-last kernels read theirs.
# Per (sample, channel) a run had cost its set-up, finish and merge: for a 7x7
# image that was most of the time (the runs' leaves latency-bound at ~9 ns a
# 49-value run on the Xeon VM).
cdef enum:
    COLS_MAX_S = 256        # runs of at most this many values (statistics) ...
    COLS_MAX_S_DOT = 64     # ... (backward: its column leaf sums 4 rows, not 8, in
                            # float; 16x128x14x14 went 7% slower by columns)
    COLS_MIN_ROWS = 16      # ... in batches of at least this many samples
    COLS_TILE = 1024        # values of a sample per tile (accumulators in L1)
    COLS_MAX_ROWS = 1024    # samples per block at most,
    COLS_TASK_ELEMS = 262144  # about this many values a task,
    COLS_SHIFT_ELEMS = 4096  # and at most this many a channel: one shift each (a
                            # value of the block; as stats' CHUNK, it bounds the
                            # cancellation error a far-off first value causes)


cdef struct ColumnTasks:
    Py_ssize_t cpt        # channels per tile (cpt * S columns)
    Py_ssize_t ctiles     # channel tiles
    Py_ssize_t npt        # samples per block
    Py_ssize_t nblocks    # sample blocks; tasks = nblocks * ctiles


cdef inline bint by_columns(Py_ssize_t N, Py_ssize_t S, Py_ssize_t max_s) noexcept nogil:
    """Whether an (N, C, S) channels-first reduction goes by columns (max_s:
    COLS_MAX_S or COLS_MAX_S_DOT)."""
    return S <= max_s and N >= COLS_MIN_ROWS


cdef inline ColumnTasks column_tasks(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    """Cut a by-columns reduction into (sample block, channel tile) tasks, both as
    even as the counts allow, by the shape only (any thread count: the same bits)."""
    cdef ColumnTasks t
    t.cpt = max(1, COLS_TILE // S)
    t.ctiles = (C + t.cpt - 1) // t.cpt
    t.cpt = (C + t.ctiles - 1) // t.ctiles
    t.ctiles = (C + t.cpt - 1) // t.cpt
    t.npt = max(COLS_MIN_ROWS, min(COLS_MAX_ROWS, COLS_TASK_ELEMS // (t.cpt * S),
                                   COLS_SHIFT_ELEMS // S))
    t.nblocks = (N + t.npt - 1) // t.npt
    t.npt = (N + t.nblocks - 1) // t.nblocks
    t.nblocks = (N + t.npt - 1) // t.npt
    return t
