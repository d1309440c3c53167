"""bnfast.dask: what dask adds per chunk, against in-memory bnfast on the same array.

One group per mode (eval, train): ``in-memory`` is ``bnfast.batch_norm`` on
the NumPy array; ``dask-K`` is :func:`bnfast.dask.batch_norm` on the same
values in K chunks along N, computed with dask's threaded scheduler (train:
the statistics' reduction, then the blockwise normalise).  The overhead per
chunk is ``(dask-K - in-memory) / K``; the slope between two K cancels dask's
fixed cost per compute.  Every result is checked before it is timed.
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
dask = pytest.importorskip("dask")

import dask.array as da  # noqa: E402

import bnfast  # noqa: E402
from bnfast import dask as bdask  # noqa: E402

SHAPE = (256, 64, 16, 16)
CHUNKS = [1, 16, 64, 256]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal(SHAPE, dtype=np.float32)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("impl", ["in-memory"] + [f"dask-{k}" for k in CHUNKS])
def test_dask_overhead(benchmark, data, mode, impl):
    C = SHAPE[1]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    training = mode == "train"
    expected = bnfast.batch_norm(data, rm.copy(), rv.copy(), training=training)
    if impl == "in-memory":
        def run():
            return bnfast.batch_norm(data, rm.copy(), rv.copy(), training=training)
    else:
        k = int(impl.split("-")[1])
        x = da.from_array(data, chunks=(SHAPE[0] // k,) + SHAPE[1:])

        def run():
            return bdask.batch_norm(x, rm.copy(), rv.copy(), training=training).compute(
                scheduler="threads")
    np.testing.assert_allclose(run(), expected, rtol=2e-6, atol=2e-6)
    benchmark.group = f"dask {mode} {SHAPE}"
    benchmark(run)
