"""``--busy N``: neighbour processes running bnfast while the benchmark measures.

CPU inference servers run several worker processes side by side; when they
share the cores, a thread of one process is preempted by another and every
parallel call that waits for it stalls.  Each neighbour is a separate Python
process (started with ``spawn``, so it shares nothing with this one) that
calls a training ``bnfast.batch_norm`` on a :data:`WORKLOAD` array in a loop,
with bnfast's default thread count, until the benchmark ends.  Compare the
mean times (stalls included) with those of a quiet run.
"""
import contextlib
import multiprocessing
import time

__all__ = ["WORKLOAD", "neighbours"]

#: What every neighbour runs in a loop.
WORKLOAD = {"call": "bnfast.batch_norm(x, None, None, training=True, out=out)",
            "shape": [8, 64, 56, 56], "dtype": "float32", "threads": "default"}


def _neighbour(stop, calls):
    import numpy as np

    import bnfast

    x = np.random.default_rng(0).standard_normal(WORKLOAD["shape"], dtype=WORKLOAD["dtype"])
    out = np.empty_like(x)
    while not stop.is_set():
        bnfast.batch_norm(x, None, None, training=True, out=out)
        calls.value += 1


@contextlib.contextmanager
def neighbours(n, timeout=120.0):
    """Run ``n`` neighbour processes for the duration of the ``with`` block.

    Returns once every neighbour has made its first call.  Yields a dict
    (the JSON's ``neighbours``): ``processes``, ``workload`` (:data:`WORKLOAD`)
    and ``calls``, each neighbour's number of calls, filled in on exit.

    Raises
    ------
    RuntimeError
        A neighbour died or did not start within ``timeout`` seconds.
    """
    info = {"processes": n, "workload": WORKLOAD, "calls": None}
    if n == 0:
        yield info
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    counters = [ctx.RawValue("q", 0) for _ in range(n)]  # one writer each
    procs = [ctx.Process(target=_neighbour, args=(stop, c), daemon=True, name=f"bnfast-busy-{i}")
             for i, c in enumerate(counters)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while not all(c.value for c in counters):
            if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a --busy neighbour process failed to start")
            time.sleep(0.01)
        yield info
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        info["calls"] = [c.value for c in counters]
