"""One thread count for every implementation (``--threads N``)."""
import contextlib

__all__ = ["limit_threads"]


@contextlib.contextmanager
def limit_threads(n):
    """Limit OpenMP and BLAS thread pools to ``n`` (no-op for None).

    Uses ``threadpoolctl.threadpool_limits`` when installed; each
    implementation also receives ``n`` itself (bnfast ``n_threads``,
    ``torch.set_num_threads``, ONNX Runtime ``intra_op_num_threads``), so
    threadpoolctl only adds the BLAS pools of NumPy & co.

    Yields
    ------
    str or None
        A note when threadpoolctl is missing and the limit is partial.
    """
    if n is None:
        yield None
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "threadpoolctl is not installed: BLAS thread pools are not limited"
        return
    with threadpool_limits(limits=int(n)):
        yield None
