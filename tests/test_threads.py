"""Thread count never changes a bit of the result (fixed, shape-only partitions)."""
import contextlib
import sys
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bnfast
from bnfast import _openmp
from bnfast._threads import resolve_threads
from conftest import (
    assert_close,
    assert_same,
    channels_last,
    make_input,
    make_params,
    reference_batch_norm,
)

# (shape, layout): C smaller than the thread count, tiny inputs that stay serial,
# large batches, a single sample with a large plane, 3-d volumes.
CASES = [
    ((256, 3, 32, 32), "contiguous"),
    ((256, 3, 32, 32), "channels_last"),
    ((512, 3), "contiguous"),
    ((65536, 3), "contiguous"),
    ((20000, 16), "contiguous"),
    ((1, 2, 512, 256), "contiguous"),
    ((1, 2, 512, 256), "channels_last"),
    ((4096, 5, 17), "contiguous"),
    ((4096, 5, 17), "channels_last"),
    ((8, 4, 16, 32, 32), "contiguous"),
    ((8, 4, 16, 32, 32), "channels_last"),
    ((3, 70, 33, 33), "channels_last"),
    ((131, 46, 7, 7), "contiguous"),
]


def _layout(x, layout):
    return channels_last(x) if layout == "channels_last" else x


def _params(x):
    return make_params(np.random.default_rng(1), x.shape[1], x.dtype)


def _run(x, n_threads=None, training=True, addend=None):
    C = x.shape[1]
    weight, bias = _params(x)
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, weight, bias, training=training,
                                        addend=addend, relu=addend is not None,
                                        n_threads=n_threads, return_stats=True)
    return y, rm, rv, mean, invstd


def _assert_identical(a, b):
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
        assert u.dtype == v.dtype


@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_explicit_thread_counts_bit_identical(dtype, rng, shape, layout):
    x = _layout(make_input(rng, shape, dtype), layout)
    one = _run(x, n_threads=1)
    for n in (2, 3, -1):
        _assert_identical(_run(x, n_threads=n), one)
    # And the answer is right (not just consistently wrong).
    weight, bias = _params(x)
    assert_close(one[0], reference_batch_norm(x, None, None, weight, bias, training=True).out,
                 dtype)


@pytest.mark.parametrize("shape,layout", CASES[:3] + CASES[8:10], ids=str)
def test_threadpool_limits_bit_identical(dtype, rng, shape, layout):
    x = _layout(make_input(rng, shape, dtype), layout)
    with threadpool_limits(1, "openmp"):
        assert resolve_threads(None) == 1
        serial = _run(x)
        serial_eval = _run(x, training=False)
    with threadpool_limits(2, "openmp"):
        # The limit caps the default; it may be 1 while other processes are busy.
        assert _openmp.max_threads() == (2 if bnfast.openmp_enabled() else 1)
        assert 1 <= resolve_threads(None) <= _openmp.max_threads()
        _assert_identical(_run(x), serial)
        _assert_identical(_run(x, training=False), serial_eval)


def test_large_input_bit_identical(rng):
    # ~13 MB float32, channels-first and channels-last, with the fused epilogue.
    x = make_input(rng, (64, 48, 32, 34), np.float32)
    addend = make_input(rng, x.shape, np.float32, 0.0, 1.0)
    for xv in (x, channels_last(x)):
        one = _run(xv, n_threads=1, addend=addend)
        _assert_identical(_run(xv, n_threads=2, addend=addend), one)
        _assert_identical(_run(xv, n_threads=5, addend=addend), one)
    ref = reference_batch_norm(x[:8], training=True)
    assert_close(bnfast.batch_norm(x[:8], None, None, training=True), ref.out, np.float32)


def test_module_sequence_bit_identical(dtype, rng):
    xs = [make_input(rng, (128, 3, 24, 24), dtype, loc=float(i)) for i in range(3)]
    results = []
    for n in (1, 2):
        m = bnfast.BatchNorm2d(3, momentum=None, dtype=dtype, n_threads=n)
        ys = [m(x) for x in xs] + [m.eval()(xs[0])]
        results.append((ys, m.running_mean.copy(), m.running_var.copy()))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_resolve_threads():
    max_threads = _openmp.max_threads()
    # The maximum, or 1 while another process competes for the cores.
    assert resolve_threads(None) in (1, max_threads)
    assert _openmp.default_threads() in (1, max_threads)
    if bnfast.openmp_enabled():
        assert resolve_threads(1) == 1
        assert resolve_threads(3) == 3
        assert resolve_threads(-1) == max_threads
        assert resolve_threads(-2) == max(1, max_threads - 1)
    assert resolve_threads(-1000) == 1
    with pytest.raises(ValueError, match="n_threads=0"):
        resolve_threads(0)
    with threadpool_limits(1, "openmp"):
        assert resolve_threads(None) == 1
        assert resolve_threads(-1) == 1


@pytest.mark.parametrize("n_threads", [-1, -2, -1000, 1, 2, 7, np.int64(2)])
def test_n_threads_values_accepted(rng, n_threads):
    x = make_input(rng, (64, 3, 32, 32), np.float64)
    y = bnfast.batch_norm(x, None, None, training=True, n_threads=n_threads)
    assert_close(y, reference_batch_norm(x, training=True).out, np.float64)
    m = bnfast.BatchNorm2d(3, dtype=np.float64, n_threads=n_threads)
    np.testing.assert_array_equal(m(x), y)


def test_openmp_is_reported():
    assert isinstance(bnfast.openmp_enabled(), bool)
    assert _openmp.max_threads() >= 1


# ==============================================================================

# Behaviour once held by the "fast path equals general path" suites (issue 9, part 4).
# =====================================================================================

@pytest.mark.parametrize("shape,layout", [((8, 64, 16, 16), "contiguous"),
                                          ((8, 64, 16, 16), "channels_last"),
                                          ((4096, 24), "contiguous")], ids=str)
def test_fused_module_forward_and_backward_bit_identical(dtype, rng, shape, layout):
    # Training and evaluation steps of a fused module (the ReLU mask saved for backward
    # included): the same bits for 1, 2 and 3 threads.
    x = _layout(make_input(rng, shape, dtype), layout)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b = _params(x)
    cls = bnfast.FusedBatchNorm2d if len(shape) == 4 else bnfast.FusedBatchNorm1d
    results = []
    for n in (1, 2, 3):
        m = cls(shape[1], dtype=dtype, n_threads=n)
        m.weight[...], m.bias[...] = w, b
        got = []
        for training in (True, False):
            m.train(training)
            got.append(m(x, addend))
            got.extend(m.backward(g))
            got.extend(a.copy() for a in (m.running_mean, m.running_var, m.weight_grad,
                                          m.bias_grad))
        results.append(got)
    for got in results[1:]:
        for a, e in zip(got, results[0]):
            assert_same(a, e)
    ref = reference_batch_norm(x, None, None, w, b, training=True, addend=addend, relu=True)
    assert_close(results[0][0], ref.out, dtype)


@pytest.mark.parametrize("shape,calls", [
    ((2, 16, 4, 4), 500),
    ((8, 16), 500),
    ((1, 4096, 16, 16), 40),  # large C: a freed table would not be reused at once
], ids=str)
def test_concurrent_eval_calls_while_weight_is_rewritten(rng, shape, calls):
    # Two threads call one eval module while a third swaps its weight between two value
    # sets in place: every output is one of the two valid outputs, never a mix.
    dtype = np.float32
    C = shape[1]
    m = bnfast.BatchNorm2d(C, dtype=dtype) if len(shape) == 4 else bnfast.BatchNorm1d(C)
    m.running_mean[...] = rng.uniform(-1, 1, C)
    m.running_var[...] = rng.uniform(0.5, 2, C)
    m.eval()
    x = make_input(rng, shape, dtype)
    wa = rng.uniform(0.5, 2.0, C).astype(dtype)
    wb = (wa * -1.5 + 0.25).astype(dtype)
    valid = [bnfast.batch_norm(x, m.running_mean, m.running_var, w, m.bias) for w in (wa, wb)]
    for v, w in zip(valid, (wa, wb)):
        assert_close(v, reference_batch_norm(x, m.running_mean, m.running_var, w, m.bias).out,
                     dtype)
    m.weight[...] = wa
    small = x[:1, :, :1] if len(shape) == 4 else x[:2]  # a quick call that refreshes the cache
    stop = threading.Event()
    seen = [0, 0]
    bad = []

    def call(grad):
        with contextlib.nullcontext() if grad else bnfast.no_grad():
            for _ in range(calls):
                y = m(x)
                for i, v in enumerate(valid):
                    if np.array_equal(y, v):
                        seen[i] += 1
                        break
                else:
                    bad.append(y)

    def swap():
        while not stop.is_set():
            for w in (wb, wa):
                np.copyto(m.weight, w)  # C values: numpy holds the GIL for the copy
                with bnfast.no_grad():
                    m(small)
                time.sleep(0)  # let the callers run with this value

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        writer = threading.Thread(target=swap)
        callers = [threading.Thread(target=call, args=(grad,)) for grad in (True, False)]
        writer.start()
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        stop.set()
        writer.join()
    finally:
        sys.setswitchinterval(interval)
    assert not bad, f"{len(bad)} of {2 * calls} outputs matched neither weight"
    assert seen[0] > 0 and seen[1] > 0, seen  # the swaps were seen mid-run


def test_relu_mask_bit_identical(dtype, rng):
    # Pass 1 of the fused backward packs the mask in blocks handed out to the threads.
    x = make_input(rng, (9, 5, 123, 129), dtype)
    y = bnfast.fused_batch_norm(x, None, None, training=True,
                                addend=make_input(rng, x.shape, dtype))
    for yv in (y, channels_last(y)):
        one = bnfast.relu_mask(yv, n_threads=1).to_array()
        np.testing.assert_array_equal(one, ~(yv <= 0))
        for n in (2, 3, 7):
            np.testing.assert_array_equal(bnfast.relu_mask(yv, n_threads=n).to_array(), one)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_default_threads_bit_identical_over_calls(dtype, rng, layout):
    # Whatever the default picks call to call (the OpenMP maximum, or 1 while the
    # machine is busy), forward and backward give the bits of n_threads=1.
    x = _layout(make_input(rng, (16, 24, 40, 44), dtype), layout)
    dy = _layout(make_input(rng, x.shape, dtype), layout)
    weight, bias = _params(x)
    _, mean, invstd = bnfast.batch_norm(x, None, None, weight, bias, training=True,
                                        n_threads=1, return_stats=True)

    def run(n):
        y = bnfast.batch_norm(x, None, None, weight, bias, training=True, n_threads=n)
        grads = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, n_threads=n)
        return (y,) + tuple(grads)

    one = run(1)
    for _ in range(5):
        _assert_identical(run(None), one)
    for n in (2, 3):
        _assert_identical(run(n), one)
