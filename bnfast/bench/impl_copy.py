"""The roofline: ``np.copyto`` of the same array (``np.add`` of x and the addend for fused_eval)."""
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .base import Implementation, Prepared, team_threads

__all__ = ["CopyRoofline"]

_ALIGN = 4096  # chunk boundaries on page multiples: no false sharing, whole pages per thread


class CopyRoofline(Implementation):
    """Memory traffic with no arithmetic worth the name: the speed limit for a pass over ``x``.

    ``eval``, ``train``, ``backward``: ``np.copyto(y, x)`` (read x, write y).
    ``fused_eval``: ``np.add(x, addend, out=y)`` (read two arrays, write one),
    the same traffic as the fused operation.  Half-precision arrays are viewed
    as int16 (the same bytes; the values are not used).

    One NumPy call is single-threaded, while bnfast runs ``n`` threads: one
    core rarely saturates memory, so the roofline also runs the call on ``n``
    contiguous chunks in ``n`` threads (NumPy releases the GIL) and keeps
    whichever of the two is faster for the case (the threaded one loses on
    arrays small enough for the dispatch to dominate).  ``n`` is the thread
    count bnfast uses.
    """

    name = "copy"
    version = np.__version__

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        self.n_threads = team_threads(threads)
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    @property
    def effective_threads(self):
        return self.n_threads

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()

    def prepare(self, case, inputs):
        x = inputs.x
        srcs = (x, inputs.addend) if case.mode == "fused_eval" else (x,)
        if x.itemsize == 2:
            # Half precision: the same bytes as int16, so that np.add moves them at
            # memory speed (NumPy adds float16/bfloat16 through float32 conversions).
            x = x.view(np.int16)
            srcs = tuple(a.view(np.int16) for a in srcs)
        y = np.empty_like(x)
        op = np.add if case.mode == "fused_eval" else np.copyto

        if op is np.copyto:
            def serial():
                np.copyto(y, x)
        else:
            def serial():
                np.add(x, srcs[1], out=y)

        name = "np.add" if op is np.add else "np.copyto"
        if self._pool is None:
            return Prepared(run=serial, note=f"{name}, 1 thread")
        chunks = self._chunks(y, srcs)
        pool = self._pool

        if op is np.copyto:
            def part(c):
                np.copyto(c[0], c[1])
        else:
            def part(c):
                np.add(c[1], c[2], out=c[0])

        def threaded():
            for _ in pool.map(part, chunks):
                pass

        if _quick_time(threaded) < _quick_time(serial):
            return Prepared(run=threaded,
                            note=f"{name} on {len(chunks)} chunks in {self.n_threads} threads")
        return Prepared(run=serial,
                        note=f"{name}, 1 thread (faster than {self.n_threads} threads here)")

    def _chunks(self, y, srcs):
        flat = [a.reshape(-1) for a in (y,) + srcs]
        n = flat[0].size
        step = -(-n // self.n_threads)
        align = max(1, _ALIGN // y.itemsize)
        step = -(-step // align) * align
        return [tuple(a[i:i + step] for a in flat) for i in range(0, n, step)]

    @staticmethod
    def bytes_moved(case):
        """Bytes the roofline operation moves: 3 arrays for fused_eval, else 2."""
        return (3 if case.mode == "fused_eval" else 2) * case.nbytes


def _quick_time(fn, calls=5):
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
