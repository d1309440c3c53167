"""bnfast.dask: statistics and Batch Normalization of dask arrays, vs in-memory bnfast."""
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest

import bnfast
from bnfast import dask as bdask
from conftest import (
    assert_close,
    assert_same,
    assert_split_equal,
    make_input,
    make_params,
    make_running,
)

SHAPE = (23, 5, 6, 4)
# Chunkings along every axis, uneven ones included.
CHUNKINGS = [
    (23, 5, 6, 4),          # one block
    (4, 5, 6, 4),           # along N
    (5, 2, 6, 4),           # along N and C
    (23, 5, (1, 2, 3), 2),  # along the spatial axes
    (7, 3, 5, 3),           # everywhere
]


def reference_stats(x):
    x64 = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    return x64.mean(axis=1), x64.var(axis=1)


@pytest.fixture(params=["threads", "synchronous"])
def scheduler(request):
    with dask.config.set(scheduler=request.param):
        yield request.param


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_batch_stats(rng, dtype, chunks, scheduler):
    x = make_input(rng, SHAPE, dtype, loc=1000.0)
    mean, var, count = dask.compute(*bdask.batch_stats(da.from_array(x, chunks=chunks),
                                                       split_every=2))
    assert mean.dtype == var.dtype == np.float64 and count.dtype == np.int64
    np.testing.assert_array_equal(count, np.full(5, 23 * 24))
    ref_mean, ref_var = reference_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-15)
    np.testing.assert_allclose(var, ref_var, rtol=1e-12)


def test_float32_statistics_stay_exact():
    """dask's own float32 var on mean-1000 data errs by ~1e-4 relative; ours stays exact."""
    x = (1000 + np.random.default_rng(0).standard_normal((4096, 2, 8))).astype(np.float32)
    dx = da.from_array(x, chunks=(512, 2, 8))
    ours = bdask.batch_stats(dx)[1].compute()
    ref = reference_stats(x)[1]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_training_equals_in_memory(rng, dtype, chunks, scheduler):
    x = make_input(rng, SHAPE, dtype, loc=20.0)
    a = make_input(rng, SHAPE, dtype)
    w, b = make_params(rng, 5, dtype)
    rm, rv = make_running(rng, 5, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    for relu, addend in [(False, None), (True, a)]:
        dx = da.from_array(x, chunks=chunks)
        da_addend = None if addend is None else da.from_array(addend, chunks=(6, 5, 6, 4))
        y = bdask.batch_norm(dx, rm, rv, w, b, training=True, momentum=0.2, addend=da_addend,
                             relu=relu)
        assert y.chunks == dx.chunks and y.dtype == np.dtype(dtype)
        expected = bnfast.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.2,
                                     addend=addend, relu=relu)
        # Running buffers were updated once, when batch_norm returned.
        assert_split_equal(rm, rm2, dtype)
        assert_split_equal(rv, rv2, dtype)
        assert_split_equal(y.compute(), expected, dtype)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_evaluation_is_blockwise_and_exact(rng, dtype, chunks):
    x = make_input(rng, SHAPE, dtype)
    w, b = make_params(rng, 5, dtype)
    rm, rv = make_running(rng, 5, dtype)
    y = bdask.batch_norm(da.from_array(x, chunks=chunks), rm, rv, w, b, relu=True)
    expected = bnfast.batch_norm(x, rm, rv, w, b, relu=True)
    rm += 1  # the lazy result keeps the statistics it was given
    assert_same(y.compute(), expected)


def test_without_running_stats_uses_batch_stats(rng, dtype):
    x = make_input(rng, (9, 3), dtype)
    y = bdask.batch_norm(da.from_array(x, chunks=(4, 2)))
    assert_split_equal(y.compute(), bnfast.batch_norm(x, None, None, training=True), dtype)


def test_chunking_does_not_change_the_result(rng, dtype):
    x = make_input(rng, SHAPE, dtype, loc=5.0)
    results = [bdask.batch_norm(da.from_array(x, chunks=c), training=True).compute()
               for c in CHUNKINGS]
    for r in results[1:]:
        assert_split_equal(r, results[0], dtype)


def test_single_value_and_empty_batches():
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bdask.batch_norm(da.ones((1, 2), dtype=np.float32, chunks=1), rm, rv, training=True)
    y = bdask.batch_norm(da.ones((0, 2, 3), dtype=np.float32), rm, rv, training=True)
    assert y.compute().shape == (0, 2, 3)
    assert_same(rm, np.zeros(2, np.float32))
    assert_same(rv, np.ones(2, np.float32))


def test_validation():
    x = da.ones((4, 3), dtype=np.float32, chunks=2)
    with pytest.raises(TypeError, match="float32 or float64"):
        bdask.batch_norm(da.ones((4, 3), dtype=np.int32), None, None)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bdask.batch_stats(da.ones(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bdask.batch_norm(x, weight=np.ones(4, np.float32), training=True)
    with pytest.raises(ValueError, match="both be arrays or both be None"):
        bdask.batch_norm(x, None, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="addend must have the input's dtype"):
        bdask.batch_norm(x, training=True, addend=da.ones((4, 3), dtype=np.float64))
    with pytest.raises(ValueError, match="eps must be positive"):
        bdask.batch_norm(x, training=True, eps=0.0)
    with pytest.raises(TypeError, match="training must be a bool, got str"):
        bdask.batch_norm(x, training="False")


@pytest.mark.parametrize("n_threads, error", [(0, ValueError), (1.5, TypeError),
                                              ("2", TypeError), (10**6, ValueError)])
def test_bad_n_threads_raises_before_the_buffers_change(n_threads, error):
    # As in-memory bnfast: at the call, not at compute() after the running update.
    x = da.from_array(np.arange(24.0).reshape(6, 4), chunks=3)
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(error, match="n_threads"):
        bdask.batch_norm(x, rm, rv, training=True, n_threads=n_threads)
    with pytest.raises(error, match="n_threads"):
        bnfast.batch_norm(x.compute(), rm.copy(), rv.copy(), training=True,
                          n_threads=n_threads)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_population_stats_into_a_torch_module_is_a_type_error(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((8, 3)).astype(np.float32)
    bn = torch.nn.BatchNorm1d(3)
    with pytest.raises(TypeError, match="module must be a bnfast BatchNorm .* BatchNorm1d"):
        bdask.population_stats([x], module=bn)
    assert torch.equal(bn.running_var, torch.ones(3))


def test_population_stats_of_one_ndarray_is_one_batch(rng):
    x = rng.standard_normal((8, 3, 2)).astype(np.float32)
    got = bdask.population_stats(x)
    expected = bdask.population_stats([x])
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert got[2] == 16


def test_population_stats(rng, dtype):
    batches = [make_input(rng, (n, 3, 4), dtype, loc=float(n)) for n in (5, 1, 8, 2)]
    whole = np.concatenate(batches)
    ref_mean, ref_var = reference_stats(whole)
    mean, var, count = bdask.population_stats(batches)
    assert count == 16 * 4
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-14)
    np.testing.assert_allclose(var, ref_var, rtol=1e-12)
    # Not the average of the batch variances (the batch means differ).
    assert not np.allclose(np.mean([reference_stats(b)[1] for b in batches], axis=0), ref_var)
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    mean2, var2, _ = bdask.population_stats(da.from_array(whole, chunks=(3, 2, 4)), module=m)
    np.testing.assert_allclose(mean2, ref_mean, rtol=1e-14)
    assert_close(m.running_mean, ref_mean, dtype)
    assert_close(m.running_var, whole.astype(np.float64).var(axis=(0, 2), ddof=1), dtype)


def test_distributed_local_cluster():
    """Two worker processes (one cluster for both dtypes: it takes seconds to start)."""
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(5)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        for dtype in (np.float32, np.float64):
            x = make_input(rng, SHAPE, dtype, loc=100.0)
            rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
            rm2, rv2 = rm.copy(), rv.copy()
            dx = da.from_array(x, chunks=(5, 3, 6, 4))
            mean, var, _ = dask.compute(*bdask.batch_stats(dx))
            y = bdask.batch_norm(dx, rm, rv, training=True).compute()
            ref_mean, ref_var = reference_stats(x)
            np.testing.assert_allclose(mean, ref_mean, rtol=1e-15)
            np.testing.assert_allclose(var, ref_var, rtol=1e-12)
            assert_split_equal(y, bnfast.batch_norm(x, rm2, rv2, training=True), dtype)
            assert_split_equal(rm, rm2, dtype)
            assert_split_equal(rv, rv2, dtype)


def test_missing_dask_names_the_extra():
    code = ("import sys; sys.modules['dask'] = None; sys.modules['dask.array'] = None\n"
            "try:\n    import bnfast.dask\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 'pip install "bnfast[dask]"' in out


def test_two_normalisations_in_one_graph(rng, dtype):
    """Each call has keys of its own: computed together, neither overwrites the other."""
    x = make_input(rng, (8, 3, 4), dtype)
    dx = da.from_array(x, chunks=(4, 3, 2))
    rm, rv = make_running(rng, 3, dtype)
    y_eval = bdask.batch_norm(dx, rm, rv)
    y_train = bdask.batch_norm(dx, training=True)
    y_eval2 = bdask.batch_norm(dx, rm + 1, rv)
    a, b, c = dask.compute(y_eval, y_train, y_eval2)
    assert_same(a, bnfast.batch_norm(x, rm, rv))
    assert_same(c, bnfast.batch_norm(x, rm + 1, rv))
    assert_split_equal(b, bnfast.batch_norm(x, None, None, training=True), dtype)
