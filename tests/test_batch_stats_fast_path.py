"""The training fast path: ``bnfast._inference.normalize_with_batch_stats`` and what
runs through it (``batch_norm(..., training=True)`` on plain arrays, the modules'
training forward and their eval forward without running statistics).

Held bit for bit to the general path (``bnfast.functional._batch_norm``: the
same kernels reached through validation and memoryviews), to the float64
reference, and to torch; checked to step aside (returning None and writing
nothing, so that the general path validates and raises) for every argument
that is not plain; and checked to leave the module's state unchanged when a
call fails.
"""
import fractions
import itertools
import re

import numpy as np
import pytest

import bnfast
from bnfast import functional as F
from bnfast._inference import normalize_with_batch_stats
from conftest import (
    NonPlainArray,
    assert_same,
    other_float,
    read_only_copy,
    LAYOUT_ULPS,
    STAT_TOL,
    TOL,
    TORCH_TOL,
    assert_close,
    channels_last,
    make_input,
    make_params,
    make_running,
    reference_batch_norm,
    assert_within_ulps,
    strided,
    with_layout,
)

# ResNet's last block (N == 1), C < the channels-last tile width with S > 1,
# (N, C) rows, S == 1 in 3-D (rows again), a 5-D volume, many rows of few
# channels (several statistics blocks), and the smallest trainable batch of a
# wide row (2 values per channel, C >= 64).
SHAPES = [(1, 512, 7, 7), (4, 3, 5, 5), (16, 8), (3, 5, 1), (2, 4, 3, 3, 3), (100000, 3),
          (2, 70)]
PLAIN = {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d,
         5: bnfast.BatchNorm3d}
FUSED = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d, 4: bnfast.FusedBatchNorm2d,
         5: bnfast.FusedBatchNorm3d}
# (weight given, bias given)
PARAMS = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}
# (addend given, relu)
EPILOGUES = {"plain": (False, False), "addend": (True, False), "relu": (False, True),
             "relu+addend": (True, True)}
MOMENTA = (0.1, 0.0, 1.0)
# Batch statistics (float64 whatever the storage) vs the float64 reference.
STATS64_TOL = {np.float32: dict(rtol=1e-10, atol=1e-12), np.float64: dict(rtol=1e-10, atol=1e-12)}
EPS = 1e-5

# The general path, captured before any test replaces it with a counting spy.
_REAL_BATCH_NORM = F._batch_norm

def _general(x, rm, rv, w, b, training, momentum, eps=EPS, addend=None, relu=False, out=None,
             want_mask=False):
    """The general path: (out, save_mean, save_invstd, ReluMask or None); updates rm, rv."""
    return _REAL_BATCH_NORM(x, rm, rv, w, b, training, momentum, eps, addend=addend, relu=relu,
                            out=out, n_threads=None, want_mask=want_mask)


def _assert_close(actual, expected, dtype, table=TOL):
    """conftest.assert_close, with a quick vectorised pass first (big arrays)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape == e.shape and np.all(np.abs(a - e) <= table[dtype]["atol"]
                                     + table[dtype]["rtol"] * np.abs(e)):
        return
    assert_close(actual, expected, dtype, table)  # NaN-aware, with the message


def _copies(*arrays):
    return tuple(None if a is None else a.copy() for a in arrays)


def _params(rng, C, dtype, which="weight+bias"):
    w, b = make_params(rng, C, dtype)
    has_w, has_b = PARAMS[which]
    return (w if has_w else None), (b if has_b else None)


# -- 1. functional: the fast path is the general path, bit for bit ------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
def test_functional_training_fast_path_equals_general_path(dtype, rng, general_path, shape,
                                                           params, running):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = _params(rng, C, dtype, params)
    addend0 = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    rm0, rv0 = make_running(rng, C, dtype)
    x_before, addend_before = x.copy(), addend0.copy()
    base = reference_batch_norm(x, rm0, rv0, w, b, training=True, momentum=0.1, eps=EPS)
    for (epilogue, (with_addend, relu)), momentum in itertools.product(EPILOGUES.items(),
                                                                        MOMENTA):
        case = f"{epilogue}, momentum={momentum}"
        addend = addend0 if with_addend else None
        rm, rv = _copies(rm0, rv0) if running else (None, None)
        erm, erv = _copies(rm, rv)
        general_path.calls = 0
        if relu:
            y, mean, invstd = bnfast.fused_batch_norm(x, rm, rv, w, b, addend, training=True,
                                                      momentum=momentum, eps=EPS,
                                                      return_stats=True)
        else:
            y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True,
                                                momentum=momentum, eps=EPS, addend=addend,
                                                return_stats=True)
        assert general_path.calls == 0, f"{case}: the plain call did not take the fast path"
        assert y is not x and y.flags.c_contiguous, case
        ey, emean, einvstd, _ = _general(x, erm, erv, w, b, True, momentum, addend=addend,
                                         relu=relu)
        assert_same(y, ey, case)
        assert_same(mean, emean, case)
        assert_same(invstd, einvstd, case)
        if running:
            assert_same(rm, erm, case)
            assert_same(rv, erv, case)

        # Independently: the float64 formula (the output does not depend on the
        # momentum), and what momentum 0 and 1 mean exactly.
        if momentum == 0.1:
            ref_out = base.out if addend is None else base.out + addend.astype(np.float64)
            _assert_close(y, np.maximum(ref_out, 0.0) if relu else ref_out, dtype)
            assert_close(mean, base.mean, dtype, STATS64_TOL)
            assert_close(invstd, base.invstd, dtype, STATS64_TOL)
            if running:
                assert_close(rm, base.running_mean, dtype, STAT_TOL)
                assert_close(rv, base.running_var, dtype, STAT_TOL)
        elif running and momentum == 0.0:
            assert_same(rm, rm0, case)
            assert_same(rv, rv0, case)
        elif running and momentum == 1.0:
            assert_same(rm, mean.astype(dtype), case)
    assert_same(x, x_before)  # inputs are read, never written
    assert_same(addend0, addend_before)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8), (3, 5, 1)], ids=str)
def test_functional_training_without_return_stats_and_read_only_input(dtype, rng, general_path,
                                                                      shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    x.flags.writeable = False  # a read-only input is still plain
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    erm, erv = _copies(rm, rv)
    general_path.calls = 0
    y = bnfast.batch_norm(x, rm, rv, w, b, training=True)
    assert general_path.calls == 0
    assert type(y) is np.ndarray
    ey = _general(x, erm, erv, w, b, True, 0.1)[0]
    assert_same(y, ey)
    assert_same(rm, erm)
    assert_same(rv, erv)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8), (6, 70)], ids=str)
@pytest.mark.parametrize("target", ["fresh", "input", "addend"])
def test_functional_training_out_on_fast_path(dtype, rng, general_path, shape, target):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    erm, erv = _copies(rm, rv)
    ey, emean, einvstd, _ = _general(x, erm, erv, w, b, True, 0.1, addend=addend, relu=True)
    out = {"fresh": np.full(shape, np.nan, dtype), "input": x, "addend": addend}[target]
    general_path.calls = 0
    y, mean, invstd = bnfast.fused_batch_norm(x, rm, rv, w, b, addend, training=True, out=out,
                                              return_stats=True)
    assert general_path.calls == 0
    assert y is out
    assert_same(y, ey)
    assert_same(mean, emean)  # statistics of x before it was overwritten
    assert_same(invstd, einvstd)
    assert_same(rm, erm)
    assert_same(rv, erv)


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (4, 3, 5, 5), (16, 8), (3, 5, 1),
                                   (2, 4, 3, 3, 3), (2, 70)], ids=str)
def test_functional_training_fast_path_matches_torch(dtype, rng, torch, general_path, shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3,
                                        return_stats=True)
    assert general_path.calls == 0
    yt, tmean, tinvstd = torch.native_batch_norm(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), trm, trv, True, 0.3, 1e-3)
    assert_close(y, yt.numpy(), dtype, TORCH_TOL)
    assert_close(rm, trm.numpy(), dtype, TORCH_TOL)
    assert_close(rv, trv.numpy(), dtype, TORCH_TOL)
    assert_close(mean, tmean.double().numpy(), dtype, TORCH_TOL)
    assert_close(invstd, tinvstd.double().numpy(), dtype, TORCH_TOL)


def test_running_buffers_that_are_views_are_updated_in_place(dtype, rng, general_path):
    # Rows of one (2, C) array are plain (contiguous views): written in place.
    # Every other element of a longer array is not plain: the general path
    # updates through a copy and writes back.  Same values either way.
    shape = (4, 6, 3, 3)
    x = make_input(rng, shape, dtype)
    rm0, rv0 = make_running(rng, 6, dtype)
    rows = np.stack([rm0, rv0])
    general_path.calls = 0
    y_rows = bnfast.batch_norm(x, rows[0], rows[1], training=True)
    assert general_path.calls == 0
    spread = np.zeros(24, dtype)
    spread[0:12:2], spread[12:24:2] = rm0, rv0
    y_spread = bnfast.batch_norm(x, spread[0:12:2], spread[12:24:2], training=True)
    assert general_path.calls == 1
    assert_same(y_rows, y_spread)
    assert_same(rows[0], spread[0:12:2])
    assert_same(rows[1], spread[12:24:2])
    np.testing.assert_array_equal(spread[1::2], 0)  # the gaps are untouched
    ref = reference_batch_norm(x, rm0, rv0, training=True)
    assert_close(rows[0], ref.running_mean, dtype, STAT_TOL)
    assert_close(rows[1], ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("layout,shape", [("fortran", (16, 8)), ("fortran", (6, 70)),
                                          ("channels_last", (4, 3, 5, 5)),
                                          ("strided", (4, 3, 5, 5)), ("strided", (16, 8))],
                         ids=str)
def test_equal_non_plain_input_takes_general_path_with_same_result(dtype, rng, general_path,
                                                                   layout, shape):
    # The same values in other memory: the general path (another statistics
    # kernel for Fortran (N, C) and channels-last, a C-order copy for strided).
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, dtype)
    rm, rv = _copies(rm0, rv0)
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    assert general_path.calls == 0
    grm, grv = _copies(rm0, rv0)
    xl = with_layout(x, layout)
    gy, gmean, ginvstd = bnfast.batch_norm(xl, grm, grv, w, b, training=True,
                                           return_stats=True)
    assert general_path.calls == 1
    assert gy.strides == xl.strides or layout == "strided"
    if layout == "strided":  # copied to C order: the fast path's kernels, bit for bit
        for actual, expected in ((gy, y), (gmean, mean), (ginvstd, invstd), (grm, rm),
                                 (grv, rv)):
            assert_same(np.ascontiguousarray(actual), expected)
    else:
        assert_within_ulps(gy, y, LAYOUT_ULPS[dtype])
        assert_close(gmean, mean, dtype, STATS64_TOL)
        assert_close(ginvstd, invstd, dtype, STATS64_TOL)
        assert_close(grm, rm, dtype, STAT_TOL)
        assert_close(grv, rv, dtype, STAT_TOL)


# -- 2. modules: the fast path is the general path, and torch ----------------------
def _train_module(rng, shape, dtype, *, fused=False, momentum=0.1, affine=True, eps=EPS):
    """A training-mode module of ``shape``'s kind with non-default parameters and buffers."""
    C = shape[1]
    m = (FUSED if fused else PLAIN)[len(shape)](C, eps=eps, momentum=momentum, affine=affine,
                                                dtype=dtype)
    if affine:
        m.weight[...], m.bias[...] = make_params(rng, C, dtype)
    m.running_mean[...], m.running_var[...] = make_running(rng, C, dtype)
    return m


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_module_training_fast_path_equals_general_path(dtype, rng, general_path, shape, fused,
                                                       grad):
    m = _train_module(rng, shape, dtype, fused=fused)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if fused else None
    erm, erv = _copies(m.running_mean, m.running_var)
    ey, emean, einvstd, emask = _general(x, erm, erv, m.weight, m.bias, True, 0.1, m.eps,
                                         addend=addend, relu=fused, want_mask=True)
    args = (x, addend) if fused else (x,)
    general_path.calls = 0
    if grad:
        y = m(*args)
    else:
        with bnfast.no_grad():
            y = m(*args)
    assert general_path.calls == 0, "the plain training call did not take the fast path"
    assert_same(y, ey)
    assert_same(m.running_mean, erm)
    assert_same(m.running_var, erv)
    assert int(m.num_batches_tracked) == 1
    if not grad:
        assert m._saved is None
        return
    saved = m._saved
    assert saved.batch_stats is True
    assert_same(saved.mean, emean)
    assert_same(saved.invstd, einvstd)
    assert_same(saved.weight, m.weight)
    assert not np.may_share_memory(saved.weight, m.weight)  # a snapshot
    if fused:
        assert saved.relu_mask.layout == emask.layout
        np.testing.assert_array_equal(saved.relu_mask.to_array(), ey > 0)
        np.testing.assert_array_equal(saved.relu_mask.to_array(), emask.to_array())
    else:
        assert saved.relu_mask is None


C = 4
# (bnfast class, torch class name, input shapes for successive steps)
KINDS = {
    "1d-2D": (bnfast.BatchNorm1d, "BatchNorm1d", [(6, C), (5, C), (9, C), (2, C)]),
    "1d-3D": (bnfast.BatchNorm1d, "BatchNorm1d", [(5, C, 7), (3, C, 4), (2, C, 9), (4, C, 1)]),
    "2d": (bnfast.BatchNorm2d, "BatchNorm2d", [(4, C, 5, 6), (2, C, 3, 3), (1, C, 4, 2),
                                               (3, C, 1, 1)]),
    "3d": (bnfast.BatchNorm3d, "BatchNorm3d", [(3, C, 3, 4, 5), (2, C, 2, 3, 3),
                                               (1, C, 4, 3, 2)]),
}
# Two training steps, eval, training again (the cumulative average goes on), eval, training.
SEQUENCE = [True, True, False, True, False, True, True]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
def test_module_sequence_matches_torch_and_general_path(dtype, rng, torch, general_path, kind,
                                                        momentum, track):
    cls, tname, shapes = KINDS[kind]
    eps = 1e-4
    m = cls(C, eps=eps, momentum=momentum, track_running_stats=track, dtype=dtype)
    tm = getattr(torch.nn, tname)(C, eps=eps, momentum=momentum, track_running_stats=track,
                                  dtype=getattr(torch, np.dtype(dtype).name))
    w, b = make_params(rng, C, dtype)
    m.weight[...], m.bias[...] = w, b
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))
    state = m.state_dict()  # arrays, not copies: they must see every update
    nbt = 0
    for step, training in enumerate(SEQUENCE):
        m.train(training)
        tm.train(training)
        x = make_input(rng, shapes[step % len(shapes)], dtype, loc=step - 2.0, scale=1.0 + step)
        use_batch = training or not track
        # What the module should do, on the general path with copies of its buffers.
        factor = 0.0 if momentum is None else momentum
        if training and track:
            nbt += 1
            if momentum is None:
                factor = 1.0 / nbt
        erm, erv = _copies(m.running_mean, m.running_var)
        ey = _general(x, erm, erv, w, b, use_batch, factor, eps)[0]

        general_path.calls = 0
        y = m(x)
        assert general_path.calls == 0, step
        with torch.no_grad():
            yt = tm(torch.from_numpy(x)).numpy()

        assert_same(y, ey, f"step {step}")
        assert_close(y, yt, dtype, TORCH_TOL)
        if not track:
            assert all(getattr(m, k) is None for k in BUFFERS)
            assert all(getattr(tm, k) is None for k in BUFFERS)
            continue
        assert_same(m.running_mean, erm, f"step {step}")
        assert_same(m.running_var, erv, f"step {step}")
        assert_close(m.running_mean, tm.running_mean.numpy(), dtype, TORCH_TOL)
        assert_close(m.running_var, tm.running_var.numpy(), dtype, TORCH_TOL)
        assert m.num_batches_tracked.dtype == np.int64 and m.num_batches_tracked.shape == ()
        assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == nbt, step
        assert state["num_batches_tracked"] is m.num_batches_tracked
        assert int(state["num_batches_tracked"]) == nbt
        assert state["running_mean"] is m.running_mean


def test_cumulative_average_through_fast_path_is_mean_of_batch_statistics(dtype, rng,
                                                                         general_path):
    m = bnfast.BatchNorm2d(3, momentum=None, dtype=dtype)
    means, unbiased = [], []
    for n in (4, 7, 5, 9):
        x = make_input(rng, (n, 3, 2, 3), dtype)
        m(x)
        x64 = x.astype(np.float64)
        means.append(x64.mean(axis=(0, 2, 3)))
        unbiased.append(x64.var(axis=(0, 2, 3), ddof=1))
        if len(means) == 1:  # factor 1: the first batch's statistics exactly
            assert_same(m.running_mean, m._saved.mean.astype(dtype))
    assert general_path.calls == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m.running_mean, np.mean(means, axis=0), **tol)
    np.testing.assert_allclose(m.running_var, np.mean(unbiased, axis=0), **tol)
    assert int(m.num_batches_tracked) == 4


@pytest.mark.parametrize("kind", ["1d-2D", "2d"])
def test_track_running_stats_false_train_and_eval_match_torch(dtype, rng, torch, general_path,
                                                              kind):
    cls, tname, shapes = KINDS[kind]
    m = cls(C, track_running_stats=False, dtype=dtype)
    tm = getattr(torch.nn, tname)(C, track_running_stats=False,
                                  dtype=getattr(torch, np.dtype(dtype).name))
    for step, training in enumerate([True, False, True, False]):
        m.train(training)
        tm.train(training)
        x = make_input(rng, shapes[step], dtype, loc=3.0 * step - 4.0)
        general_path.calls = 0
        y = m(x)
        assert general_path.calls == 0
        with torch.no_grad():
            yt = tm(torch.from_numpy(x)).numpy()
        assert_close(y, yt, dtype, TORCH_TOL)
        assert_same(y, _general(x, None, None, m.weight, m.bias, True, 0.1)[0])
        assert_close(y, reference_batch_norm(x, training=True).out, dtype)
        assert m.running_mean is None and m.num_batches_tracked is None


# -- 3. fallbacks: the general path still validates and explains ---------------------
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
def test_one_value_per_channel_in_training_raises(dtype, rng, torch, general_path, shape,
                                                  running):
    x = make_input(rng, shape, dtype)
    rm0, rv0 = make_running(rng, 4, dtype)
    rm, rv = _copies(rm0, rv0) if running else (None, None)
    message = ("^" + re.escape("Expected more than 1 value per channel when training, got "
                               f"input size {tuple(shape)}"))
    for call in (lambda: bnfast.batch_norm(x, rm, rv, training=True),
                 lambda: bnfast.fused_batch_norm(x, rm, rv, training=True, return_stats=True)):
        general_path.calls = 0
        with pytest.raises(ValueError, match=message):
            call()
        assert general_path.calls == 1
    if running:
        assert_same(rm, rm0)
        assert_same(rv, rv0)

    # Modules: training, and eval without running statistics, raise (as torch); the
    # module is unchanged; eval with running statistics works.
    m = PLAIN[len(shape)](4, dtype=dtype)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(x)
    tm = getattr(torch.nn, type(m).__name__)(4, dtype=getattr(torch, np.dtype(dtype).name))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tm(torch.from_numpy(x))
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)
    assert m._saved is None
    m.eval()
    assert_close(m(x), reference_batch_norm(x, m.running_mean, m.running_var).out, dtype)
    m_no = PLAIN[len(shape)](4, track_running_stats=False, dtype=dtype).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m_no(x)


@pytest.mark.parametrize("which", ["running_mean", "running_var", "both"])
def test_read_only_running_buffers_raise_in_training(dtype, rng, general_path, which):
    shape = (4, 3, 5, 5)
    x = make_input(rng, shape, dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    rm, rv = _copies(rm0, rv0)
    for name, buf in (("running_mean", rm), ("running_var", rv)):
        if which in (name, "both"):
            buf.flags.writeable = False
    first = "running_var" if which == "running_var" else "running_mean"
    general_path.calls = 0
    with pytest.raises(ValueError, match=rf"^{first} must be a writable numpy array"):
        bnfast.batch_norm(x, rm, rv, training=True)
    assert general_path.calls == 1
    assert_same(rm, rm0)  # the writable one is not updated either
    assert_same(rv, rv0)

    m = bnfast.BatchNorm2d(3, dtype=dtype)
    m.running_mean[...], m.running_var[...] = rm0, rv0
    for name in ("running_mean", "running_var"):
        if which in (name, "both"):
            getattr(m, name).flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{first} must be a writable numpy array"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    assert_same(m.running_mean, rm0)
    assert_same(m.running_var, rv0)
    # Read-only buffers are fine where they are only read.
    m.eval()
    assert_same(m(x), _general(x, rm0, rv0, m.weight, m.bias, False, 0.1)[0])


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_only_one_running_buffer_raises(dtype, rng, general_path, missing):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    rm, rv = _copies(rm0, rv0)
    args = dict(running_mean=rm, running_var=rv)
    args[missing] = None
    general_path.calls = 0
    with pytest.raises(ValueError, match="running_mean and running_var must both be arrays or "
                                         "both be None"):
        bnfast.batch_norm(x, training=True, **args)
    assert general_path.calls == 1
    assert_same(rm, rm0)
    assert_same(rv, rv0)


@pytest.mark.parametrize("momentum", ["0.1", True, False, None, 0.1j],
                         ids=["str", "True", "False", "None", "complex"])
def test_non_real_momentum_raises_type_error(dtype, rng, general_path, momentum):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    rm, rv = _copies(rm0, rv0)
    general_path.calls = 0
    with pytest.raises(TypeError, match="momentum must be a real number"):
        bnfast.batch_norm(x, rm, rv, training=True, momentum=momentum)
    assert general_path.calls == 1
    assert_same(rm, rm0)
    assert_same(rv, rv0)
    if momentum is None:
        return  # None is the module's cumulative average, not a factor
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    m.momentum = momentum  # past the constructor's check
    with pytest.raises(TypeError, match="momentum must be a real number"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)


@pytest.mark.parametrize("momentum", [np.float64(0.1), np.float32(0.25), 1, 0,
                                      fractions.Fraction(1, 4)],
                         ids=["np.float64", "np.float32", "int-1", "int-0", "Fraction"])
def test_real_non_float_momentum_works_via_fallback(dtype, rng, general_path, momentum):
    shape = (4, 3, 5, 5)
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, 3, dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    rm, rv = _copies(rm0, rv0)
    erm, erv = _copies(rm0, rv0)
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum,
                                        return_stats=True)
    assert general_path.calls == 1
    ey, emean, einvstd = bnfast.batch_norm(x, erm, erv, w, b, training=True,
                                           momentum=float(momentum), return_stats=True)
    assert general_path.calls == 1  # the float momentum is plain
    for actual, expected in ((y, ey), (mean, emean), (invstd, einvstd), (rm, erm), (rv, erv)):
        assert_same(actual, expected)

    # A module built with it: the same steps as with the float.
    m = bnfast.BatchNorm2d(3, momentum=momentum, dtype=dtype)
    mf = bnfast.BatchNorm2d(3, momentum=float(momentum), dtype=dtype)
    for _ in range(2):
        assert_same(m(x), mf(x))
    assert_same(m.running_mean, mf.running_mean)
    assert_same(m.running_var, mf.running_var)
    assert int(m.num_batches_tracked) == int(mf.num_batches_tracked) == 2


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8)], ids=str)
def test_running_buffers_of_other_dtype_work_via_fallback(dtype, rng, general_path, shape):
    other = other_float(dtype)
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, other)
    rm, rv = _copies(rm0, rv0)
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    assert general_path.calls == 1
    assert rm.dtype == rv.dtype == other
    # The output depends on the batch only: the fast path's bits.
    ey, emean, einvstd = bnfast.batch_norm(x, None, None, w, b, training=True,
                                           return_stats=True)
    assert general_path.calls == 1
    assert_same(y, ey)
    assert_same(mean, emean)
    assert_same(invstd, einvstd)
    ref = reference_batch_norm(x, rm0, rv0, w, b, training=True)
    assert_close(rm, ref.running_mean, other, STAT_TOL)
    assert_close(rv, ref.running_var, other, STAT_TOL)
    if dtype == np.float64:
        # Update in float64, rounded once into float32: as the fast path on
        # float64 buffers, then rounded.
        frm, frv = rm0.astype(np.float64), rv0.astype(np.float64)
        bnfast.batch_norm(x, frm, frv, w, b, training=True)
        assert_same(rm, frm.astype(np.float32))
        assert_same(rv, frv.astype(np.float32))


def _fail_one_value(m, x, extra):
    one = (slice(0, 1), slice(None)) + (slice(0, 1),) * (x.ndim - 2)
    return m(x[one], *(e[one] for e in extra))


def _fail_read_only_var(m, x, extra):
    m.running_var.flags.writeable = False
    try:
        return m(x, *extra)
    finally:
        m.running_var.flags.writeable = True


def _fail_momentum(m, x, extra):
    saved, m.momentum = m.momentum, "0.1"
    try:
        return m(x, *extra)
    finally:
        m.momentum = saved


def _fail_channels(m, x, extra):
    bigger = np.concatenate([x, x[:, :1]], axis=1)
    return m(bigger, *(np.concatenate([e, e[:, :1]], axis=1) for e in extra))


def _fail_dtype(m, x, extra):
    return m(x.astype(other_float(x.dtype)), *(e.astype(other_float(e.dtype)) for e in extra))


def _fail_eps(m, x, extra):
    saved, m.eps = m.eps, 0.0
    try:
        return m(x, *extra)
    finally:
        m.eps = saved


def _fail_threads(m, x, extra):
    saved, m.n_threads = m.n_threads, 0
    try:
        return m(x, *extra)
    finally:
        m.n_threads = saved


def _fail_addend(m, x, extra):
    return m(x, x[:1].copy())


FAILURES = {
    "one-value-per-channel": (_fail_one_value, ValueError),
    "read-only-running_var": (_fail_read_only_var, ValueError),
    "momentum-str": (_fail_momentum, TypeError),
    "wrong-channels": (_fail_channels, ValueError),
    "wrong-dtype": (_fail_dtype, TypeError),
    "eps-zero": (_fail_eps, ValueError),
    "n_threads-zero": (_fail_threads, ValueError),
    "addend-wrong-shape": (_fail_addend, ValueError),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 3)], ids=str)
def test_failed_call_leaves_module_unchanged(dtype, rng, failure, shape):
    # Cumulative average: a count bumped by the failed call would change the next
    # step's factor (1 instead of 1/2), so the next step shows it as well.
    fail, error = FAILURES[failure]
    fused = failure == "addend-wrong-shape"
    m = _train_module(rng, shape, dtype, fused=fused, momentum=None)
    x0 = make_input(rng, shape, dtype, loc=1.0)
    x = make_input(rng, shape, dtype, loc=-2.0)
    extra = (make_input(rng, shape, dtype, 0.0, 1.0),) if fused else ()
    m(x0, *extra)
    before = {k: np.array(getattr(m, k)) for k in BUFFERS + ("weight", "bias")}
    with pytest.raises(error):
        fail(m, x, extra)
    for k, v in before.items():
        assert_same(np.asarray(getattr(m, k)), v, k)
    # The next plain step is the second one: factor 1/2.
    erm, erv = _copies(m.running_mean, m.running_var)
    ey = _general(x, erm, erv, m.weight, m.bias, True, 0.5, m.eps, addend=extra[0] if fused
                  else None, relu=fused)[0]
    assert_same(m(x, *extra), ey)
    assert_same(m.running_mean, erm)
    assert_same(m.running_var, erv)
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_wrong_channel_count_raises_without_params_or_buffers(dtype, rng, training, grad,
                                                              fused):
    # With neither weight/bias nor running buffers the one-call path has no (C,)
    # array to compare x against: the module's own channel check must still hold,
    # whatever the grad mode and the input's memory layout.
    m = (FUSED if fused else PLAIN)[4](4, affine=False, track_running_stats=False,
                                       dtype=dtype).train(training)
    x = make_input(rng, (2, 5, 3, 3), dtype)
    for xin in (x, channels_last(x)):
        with pytest.raises(ValueError, match=r"expected input with 4 channels.*\(2, 5, 3, 3\)"):
            if grad:
                m(xin)
            else:
                with bnfast.no_grad():
                    m(xin)


# -- 4. numerics through the fast path ----------------------------------------------
NUMERIC_SHAPES = [(8, 3, 5, 5), (64, 5), (100000, 3), (3, 5, 1), (2, 70), (40, 3, 100, 12)]


@pytest.mark.parametrize("shape", NUMERIC_SHAPES, ids=str)
def test_constant_channel_normalises_to_exactly_zero(dtype, rng, general_path, shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    x[:, 1] = dtype(3.7)
    x[:, C - 1] = dtype(-1234.5678)
    rm0, rv0 = make_running(rng, C, dtype)
    w = make_params(rng, C, dtype)[0]
    rm, rv = _copies(rm0, rv0)
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, None, training=True, return_stats=True)
    y_nb = bnfast.batch_norm(x, None, None, training=True)
    assert general_path.calls == 0
    for c in (1, C - 1):
        assert np.all(y[:, c] == 0), c
        assert np.all(y_nb[:, c] == 0), c
        assert mean[c] == float(x.reshape(shape[0], C, -1)[0, c, 0])
        assert invstd[c] == 1.0 / np.sqrt(EPS)
        assert rv[c] == dtype(0.9 * float(rv0[c]))  # unbiased variance 0
    # A bias is then the whole output.
    b = make_params(rng, C, dtype)[1]
    y_b = bnfast.batch_norm(x, None, None, w, b, training=True)
    for c in (1, C - 1):
        assert np.all(y_b[:, c] == b[c]), c


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (20000, 3), (2, 70), (3, 5, 1)], ids=str)
def test_data_far_from_zero(dtype, rng, general_path, shape):
    # float32 with mean 1e6 and std 1: one ulp of the data is 0.0625, yet the
    # output is within 1e-4 of the float64 result for the same values.
    x = (1e6 + rng.standard_normal(shape)).astype(dtype)
    rm, rv = make_running(rng, shape[1], dtype)
    ref = reference_batch_norm(x, rm, rv, training=True)
    general_path.calls = 0
    y = bnfast.batch_norm(x, rm, rv, training=True)
    assert general_path.calls == 0
    err = np.abs(y.astype(np.float64) - ref.out).max()
    assert err <= 1e-4, err
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    np.testing.assert_allclose(rv, ref.running_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (64, 5), (100000, 3), (2, 70), (3, 5, 1)],
                         ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_value_stays_in_its_channel(dtype, rng, general_path, shape, bad, where):
    # First: the value a block's shift would be taken from; last: the rows
    # merged one by one after the wide rows (channels-last statistics).
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, dtype)
    clean_rm, clean_rv = _copies(rm0, rv0)
    clean, cmean, cinvstd = bnfast.batch_norm(x, clean_rm, clean_rv, w, b, training=True,
                                              return_stats=True)
    xb = x.copy()
    n = 0 if where == "first" else shape[0] - 1
    idx = (n, 1) + ((0,) if where == "first" else (-1,)) * (len(shape) - 2)
    xb[idx] = bad
    rm, rv = _copies(rm0, rv0)
    general_path.calls = 0
    y, mean, invstd = bnfast.batch_norm(xb, rm, rv, w, b, training=True, return_stats=True)
    assert general_path.calls == 0
    others = [c for c in range(C) if c != 1]
    ref = reference_batch_norm(xb, rm0, rv0, w, b, training=True)
    assert np.isnan(ref.running_var[1]) and np.isnan(ref.invstd[1])
    assert np.isnan(y[:, 1]).all()  # torch: the whole channel
    # torch (and the reference): an Inf makes the variance NaN (Inf - Inf), wherever it is.
    assert np.isnan(rv[1]), f"running_var[1] = {rv[1]}, expected NaN (as torch)"
    assert np.isnan(invstd[1]), f"save_invstd[1] = {invstd[1]}, expected NaN (as torch)"
    assert not np.isfinite(rm[1]) and not np.isfinite(mean[1])
    assert_same(y[:, others], clean[:, others])
    assert_same(rm[others], clean_rm[others])
    assert_same(rv[others], clean_rv[others])
    assert_same(mean[others], cmean[others])
    assert_same(invstd[others], cinvstd[others])
    erm, erv = _copies(rm0, rv0)
    assert_same(y, _general(xb, erm, erv, w, b, True, 0.1)[0])
    assert_same(rm, erm)
    assert_same(rv, erv)


@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (40000, 24), (4096, 96, 1), (100000, 3),
                                   (64, 3, 40, 40)], ids=str)
def test_thread_counts_bit_identical(dtype, rng, shape):
    # Large enough for several blocks and tasks; results never depend on the threads.
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, dtype)
    results = []
    for nt in (1, 2, 3, None):
        rm, rv = _copies(rm0, rv0)
        coef = np.empty((4, C))
        bits = np.zeros((x.size + 7) // 8, np.uint8)
        y = normalize_with_batch_stats(x, rm, rv, w, b, EPS, 0.1, None, True, None, nt, coef,
                                       bits)
        assert y is not None
        results.append((y, rm, rv, coef, bits))
        if nt in (1, 2):  # and through the functional layer
            rm_f, rv_f = _copies(rm0, rv0)
            y_f = bnfast.batch_norm(x, rm_f, rv_f, w, b, training=True, relu=True,
                                    n_threads=nt)
            results.append((y_f, rm_f, rv_f))
    for got in results[1:]:
        for a, e in zip(got, results[0]):
            assert_same(a, e)
    y, rm, rv, coef, bits = results[0]
    np.testing.assert_array_equal(
        np.unpackbits(bits, count=x.size, bitorder="little").astype(bool), (y > 0).reshape(-1))
    assert_close(y, reference_batch_norm(x, rm0, rv0, w, b, training=True, relu=True).out,
                 dtype)


# -- 5. backward after a training fast forward ---------------------------------------
def _torch_train_grads(torch, x, g, w, b, eps, addend=None, relu=False):
    """torch's (grad_input, grad_weight, grad_bias, grad_addend) of a training batch norm."""
    xt = torch.from_numpy(x.copy()).requires_grad_()
    wt = None if w is None else torch.from_numpy(w.copy()).requires_grad_()
    bt = None if b is None else torch.from_numpy(b.copy()).requires_grad_()
    at = None if addend is None else torch.from_numpy(addend.copy()).requires_grad_()
    y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    if at is not None:
        y = y + at
    if relu:
        y = torch.relu(y)
    y.backward(torch.from_numpy(g))
    return tuple(None if t is None else t.grad.numpy() for t in (xt, wt, bt, at))


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (3, 8, 1), (1, 512, 7, 7)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_backward_after_training_fast_forward(dtype, rng, torch, general_path, shape, affine):
    m = _train_module(rng, shape, dtype, affine=affine)
    x = make_input(rng, shape, dtype)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0 = _copies(m.weight, m.bias)
    _, mean0, invstd0, _ = _general(x, *_copies(m.running_mean, m.running_var), w0, b0, True,
                                    0.1, m.eps)
    general_path.calls = 0
    m(x)
    assert general_path.calls == 0
    if affine:  # edit everything in place between forward and backward
        m.weight[...] *= 3
        m.bias[...] -= 2
    m.running_mean[...] += 1
    m.running_var[...] *= 4
    gx = m.backward(g)

    gx_ref, gw_ref, gb_ref = bnfast.batch_norm_backward(
        g, x, w0, mean0, invstd0, training=True, eps=m.eps,
        output_mask=(True, affine, affine))
    assert_same(gx, gx_ref)
    tgx, tgw, tgb, _ = _torch_train_grads(torch, x, g, w0, b0, m.eps)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    if affine:
        assert_same(m.weight_grad, gw_ref)
        assert_same(m.bias_grad, gb_ref)
        assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
        assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)
    else:
        assert m.weight_grad is None and m.bias_grad is None
    # The float64 formula for the input gradient.
    axes = (0,) + tuple(range(2, len(shape)))
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    xhat = (x64 - x64.mean(axis=axes).reshape(bshape)) / np.sqrt(
        x64.var(axis=axes).reshape(bshape) + m.eps)
    inv = 1.0 / np.sqrt(x64.var(axis=axes) + m.eps)
    wv = np.ones(shape[1]) if w0 is None else w0.astype(np.float64)
    gx64 = (wv * inv).reshape(bshape) * (
        g64 - g64.mean(axis=axes, keepdims=True)
        - xhat * (g64 * xhat).mean(axis=axes, keepdims=True))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gx, gx64, **tol)


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (5, 6)], ids=str)
def test_fused_backward_after_training_fast_forward(dtype, rng, torch, general_path, shape):
    m = _train_module(rng, shape, dtype, fused=True)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0 = _copies(m.weight, m.bias)
    y0, mean0, invstd0, _ = _general(x, *_copies(m.running_mean, m.running_var), w0, b0, True,
                                     0.1, m.eps, addend=addend, relu=True)
    general_path.calls = 0
    y = m(x, addend)
    assert general_path.calls == 0
    assert_same(y, y0)
    m.weight[...] = -m.weight
    m.bias[...] += 5
    gx, ga = m.backward(g)

    gx_ref, gw_ref, gb_ref, ga_ref = bnfast.fused_batch_norm_backward(
        g, x, y0, w0, mean0, invstd0, training=True, eps=m.eps)
    assert_same(gx, gx_ref)
    assert_same(ga, ga_ref)
    assert_same(m.weight_grad, gw_ref)
    assert_same(m.bias_grad, gb_ref)
    tgx, tgw, tgb, tga = _torch_train_grads(torch, x, g, w0, b0, m.eps, addend, relu=True)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    assert_close(ga, tga, dtype, TORCH_TOL)
    assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
    assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)


def test_saved_statistics_are_not_overwritten_by_the_next_forward(dtype, rng):
    # Each training forward fills its own coefficient table: a backward with
    # retain_graph, a second forward, then the first's state is still its own.
    m = _train_module(rng, (2, 4, 3, 3), dtype)
    x1 = make_input(rng, (2, 4, 3, 3), dtype, loc=1.0)
    x2 = make_input(rng, (2, 4, 3, 3), dtype, loc=-3.0)
    m(x1)
    saved = m._saved
    kept = {k: getattr(saved, k).copy() for k in ("weight", "mean", "invstd")}
    m.weight[...] += 1
    m(x2)
    for k, v in kept.items():
        assert_same(getattr(saved, k), v, k)
    assert not np.array_equal(m._saved.mean, kept["mean"])


# -- 6. normalize_with_batch_stats itself ---------------------------------------------
def _direct_args(rng, dtype, shape=(3, 4, 5, 5)):
    """Plain arguments of the fused kind (addend, relu, out, coef, mask)."""
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    return dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, eps=EPS, momentum=0.1,
                addend=make_input(rng, shape, dtype, loc=0.0, scale=1.0), relu=True,
                out=np.full(shape, 7, dtype), n_threads=None, coef=np.full((4, C), 7.0),
                mask=np.zeros((x.size + 7) // 8, np.uint8))


def _for_shape(shape):
    """The arguments remade (by the test) for x of ``shape``: a marker."""
    return lambda a: {"__shape__": shape}


def _other_channels(a):
    x = np.concatenate([a["x"], a["x"][:, :1]], axis=1)
    return dict(x=x, addend=None, out=None, mask=None, coef=None)


NOT_PLAIN = {
    "x-fortran": lambda a: dict(x=np.asfortranarray(a["x"])),
    "x-channels-last": lambda a: dict(x=channels_last(a["x"])),
    "x-strided": lambda a: dict(x=strided(a["x"])),
    "x-subclass": lambda a: dict(x=a["x"].view(NonPlainArray)),
    "x-list": lambda a: dict(x=a["x"].tolist()),
    "x-other-dtype": lambda a: dict(x=a["x"].astype(other_float(a["x"].dtype))),
    "x-byteswapped": lambda a: dict(x=a["x"].astype(a["x"].dtype.newbyteorder())),
    "x-2d-fortran": lambda a: dict(x=np.asfortranarray(a["x"].reshape(3, -1)), addend=None,
                                   out=None, mask=None, coef=None, running_mean=None,
                                   running_var=None, weight=None, bias=None),
    "x-empty-batch": lambda a: dict(x=a["x"][:0], out=None, addend=None, mask=None),
    "x-empty-spatial": lambda a: dict(x=a["x"][:, :, :0], out=None, addend=None, mask=None),
    "one-value-2d": _for_shape((1, 4)),
    "one-value-3d": _for_shape((1, 4, 1)),
    "one-value-4d": _for_shape((1, 4, 1, 1)),
    "momentum-int": lambda a: dict(momentum=1),
    "momentum-int-0": lambda a: dict(momentum=0),
    "momentum-np.float64": lambda a: dict(momentum=np.float64(0.1)),
    "momentum-np.float32": lambda a: dict(momentum=np.float32(0.1)),
    "momentum-bool": lambda a: dict(momentum=True),
    "momentum-str": lambda a: dict(momentum="0.1"),
    "momentum-None": lambda a: dict(momentum=None),
    "running_mean-read-only": lambda a: dict(running_mean=read_only_copy(a["running_mean"])),
    "running_var-read-only": lambda a: dict(running_var=read_only_copy(a["running_var"])),
    "running_mean-None": lambda a: dict(running_mean=None),
    "running_var-None": lambda a: dict(running_var=None),
    "running_mean-other-dtype": lambda a: dict(
        running_mean=a["running_mean"].astype(other_float(a["x"].dtype))),
    "running_both-other-dtype": lambda a: dict(
        running_mean=a["running_mean"].astype(other_float(a["x"].dtype)),
        running_var=a["running_var"].astype(other_float(a["x"].dtype))),
    "running_var-strided": lambda a: dict(running_var=np.repeat(a["running_var"], 2)[::2]),
    "running_var-list": lambda a: dict(running_var=a["running_var"].tolist()),
    "running_mean-too-long": lambda a: dict(running_mean=np.append(a["running_mean"], 0)),
    "running_var-too-short": lambda a: dict(running_var=a["running_var"][:-1].copy()),
    "running-2d": lambda a: dict(running_mean=a["running_mean"][None],
                                 running_var=a["running_var"][None]),
    "x-other-channel-count": _other_channels,
    "weight-too-short": lambda a: dict(weight=a["weight"][:-1].copy()),
    "bias-other-dtype": lambda a: dict(bias=a["bias"].astype(other_float(a["x"].dtype))),
    "eps-int": lambda a: dict(eps=1),
    "eps-zero": lambda a: dict(eps=0.0),
    "eps-nan": lambda a: dict(eps=float("nan")),
    "n_threads-zero": lambda a: dict(n_threads=0),
    "n_threads-np.int64": lambda a: dict(n_threads=np.int64(2)),
    "addend-fortran": lambda a: dict(addend=np.asfortranarray(a["addend"])),
    "out-read-only": lambda a: dict(out=read_only_copy(a["out"])),
    "out-strided": lambda a: dict(out=strided(a["out"])),
    "coef-float32": lambda a: dict(coef=a["coef"].astype(np.float32)),
    "coef-wrong-shape": lambda a: dict(coef=a["coef"][:3].copy()),
    "coef-read-only": lambda a: dict(coef=read_only_copy(a["coef"])),
    "mask-too-short": lambda a: dict(mask=a["mask"][:-1].copy()),
    "mask-read-only": lambda a: dict(mask=read_only_copy(a["mask"])),
}


@pytest.mark.parametrize("case", list(NOT_PLAIN))
def test_direct_entry_returns_none_and_writes_nothing(dtype, rng, case):
    args = _direct_args(rng, dtype)
    change = NOT_PLAIN[case](args)
    if "__shape__" in change:
        args = _direct_args(rng, dtype, change["__shape__"])
    else:
        args.update(change)
    names = ("x", "running_mean", "running_var", "weight", "bias", "addend", "out", "coef",
             "mask")
    snapshots = {k: args[k].copy() for k in names if isinstance(args[k], np.ndarray)}
    assert normalize_with_batch_stats(**args) is None
    for k, v in snapshots.items():
        assert_same(args[k], v, k)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (16, 8), (3, 5, 1), (2, 70)], ids=str)
def test_direct_entry_plain_arguments_work(dtype, rng, shape):
    # The baseline of the test above: its unmodified arguments are plain.
    args = _direct_args(rng, dtype, shape)
    x, addend, w, b = args["x"], args["addend"], args["weight"], args["bias"]
    erm, erv = _copies(args["running_mean"], args["running_var"])
    expected, mean, invstd, mask = _general(x, erm, erv, w, b, True, 0.1, addend=addend,
                                            relu=True, want_mask=True)
    y = normalize_with_batch_stats(**args)
    assert y is args["out"]
    assert_same(y, expected)
    assert_same(args["running_mean"], erm)
    assert_same(args["running_var"], erv)
    np.testing.assert_array_equal(args["mask"], mask.bits)
    coef = args["coef"]
    assert_same(coef[0], mean)
    assert_same(coef[1], invstd)
    assert_same(coef[2], invstd * w.astype(np.float64))
    assert_same(coef[3], b.astype(np.float64))


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (16, 8)], ids=str)
def test_direct_entry_without_running_buffers_coef_or_params(dtype, rng, shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    coef = np.full((4, C), np.nan)
    y = normalize_with_batch_stats(x, None, None, None, None, 1e-3, 0.1, None, False, None, 1,
                                   coef, None)
    ey, emean, einvstd, _ = _general(x, None, None, None, None, True, 0.1, 1e-3)
    assert_same(y, ey)
    assert_same(coef[0], emean)
    assert_same(coef[1], einvstd)
    assert_same(coef[2], einvstd)  # no weight: scale is invstd
    assert_same(coef[3], np.zeros(C))  # no bias: shift is 0
    ref = reference_batch_norm(x, training=True, eps=1e-3)
    assert_close(y, ref.out, dtype)
    # The momentum is irrelevant without buffers, but must still be a float.
    y2 = normalize_with_batch_stats(x, None, None, None, None, 1e-3, 0.7, None, False, None,
                                    None, None, None)
    assert_same(y2, ey)


def test_direct_entry_out_is_x_or_addend(dtype, rng):
    for target in ("x", "addend"):
        args = _direct_args(rng, dtype)
        erm, erv = _copies(args["running_mean"], args["running_var"])
        expected = _general(args["x"], erm, erv, args["weight"], args["bias"], True, 0.1,
                            addend=args["addend"], relu=True)[0]
        args["out"] = args[target]
        y = normalize_with_batch_stats(**args)
        assert y is args[target]
        assert_same(y, expected, target)
        assert_same(args["running_mean"], erm)
