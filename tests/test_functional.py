"""bnfast.batch_norm against the float64 reference and torch.nn.functional.batch_norm."""
import fractions
import itertools

import ml_dtypes
import numpy as np
import pytest

import bnfast
from conftest import (
    STAT_TOL,
    TOL,
    TORCH_TOL,
    assert_close,
    assert_same,
    channels_last,
    make_input,
    make_params,
    make_running,
    misaligned_empty,
    other_float,
    reference_batch_norm,
)

SHAPES = [(6, 4), (5, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5), (2, 1, 9, 9), (2, 65, 3, 3)]
AFFINE = ["none", "weight", "bias", "both"]


def _params(rng, C, dtype, affine):
    weight, bias = make_params(rng, C, dtype)
    return (weight if affine in ("weight", "both") else None,
            bias if affine in ("bias", "both") else None)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("track", [True, False], ids=["running", "no_running"])
def test_training_matches_reference(dtype, rng, shape, affine, track):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    x_before = x.copy()
    weight, bias = _params(rng, C, dtype, affine)
    rm, rv = make_running(rng, C, dtype) if track else (None, None)
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=True, momentum=0.3, eps=1e-4)

    y, save_mean, save_invstd = bnfast.batch_norm(x, rm, rv, weight, bias, training=True,
                                                  momentum=0.3, eps=1e-4, return_stats=True)

    assert y.shape == x.shape and y.dtype == dtype
    assert not np.shares_memory(y, x)
    assert_close(y, ref.out, dtype)
    np.testing.assert_array_equal(x, x_before)  # input untouched
    assert save_mean.dtype == save_invstd.dtype == np.float64
    assert save_mean.shape == save_invstd.shape == (C,)
    np.testing.assert_allclose(save_mean, ref.mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(save_invstd, ref.invstd, rtol=1e-12)
    if track:
        assert rm.dtype == rv.dtype == dtype
        assert_close(rm, ref.running_mean, dtype, STAT_TOL)
        assert_close(rv, ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_eval_matches_reference_and_leaves_buffers(dtype, rng, shape, affine):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    weight, bias = _params(rng, C, dtype, affine)
    rm, rv = make_running(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=False, eps=1e-3)

    y, save_mean, save_invstd = bnfast.batch_norm(x, rm, rv, weight, bias, training=False,
                                                  eps=1e-3, return_stats=True)

    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, ref.out, dtype)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(save_mean, rm0.astype(np.float64))
    np.testing.assert_allclose(save_invstd, ref.invstd, rtol=1e-14)


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["none", "both"])
def test_matches_torch_functional(dtype, rng, torch, shape, training, affine):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    weight, bias = _params(rng, C, dtype, affine)
    rm, rv = make_running(rng, C, dtype)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    expected = torch.nn.functional.batch_norm(
        torch.from_numpy(x), t_rm, t_rv,
        None if weight is None else torch.from_numpy(weight),
        None if bias is None else torch.from_numpy(bias),
        training=training, momentum=0.2, eps=1e-5).numpy()

    y = bnfast.batch_norm(x, rm, rv, weight, bias, training=training, momentum=0.2, eps=1e-5)

    assert_close(y, expected, dtype, TORCH_TOL)
    assert_close(rm, t_rm.numpy(), dtype, TORCH_TOL)
    assert_close(rv, t_rv.numpy(), dtype, TORCH_TOL)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
def test_momentum_extremes(dtype, rng, momentum):
    x = make_input(rng, (8, 3, 4), dtype)
    rm, rv = make_running(rng, 3, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, training=True, momentum=momentum)
    bnfast.batch_norm(x, rm, rv, training=True, momentum=momentum)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    assert_close(rv, ref.running_var, dtype, STAT_TOL)


def test_running_var_uses_unbiased_variance(dtype):
    # Two values per channel: biased var 1, unbiased var 2.
    x = np.array([[1.0, 10.0], [3.0, 14.0]], dtype=dtype)
    rm, rv = np.zeros(2, dtype), np.zeros(2, dtype)
    bnfast.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_array_equal(rm, np.array([2.0, 12.0], dtype))
    np.testing.assert_array_equal(rv, np.array([2.0, 8.0], dtype))


def test_normalises_with_biased_variance(dtype):
    x = np.array([[1.0], [3.0]], dtype=dtype)
    y = bnfast.batch_norm(x, None, None, training=True, eps=1e-5)
    expected = np.array([[-1.0], [1.0]]) / np.sqrt(1.0 + 1e-5)
    assert_close(y, expected, dtype)


def test_eval_formula_by_hand(dtype):
    x = np.array([[0.0, 1.0], [2.0, -3.0]], dtype=dtype)
    rm = np.array([1.0, -1.0], dtype)
    rv = np.array([4.0, 0.25], dtype)
    w = np.array([2.0, -1.0], dtype)
    b = np.array([0.5, 3.0], dtype)
    y = bnfast.batch_norm(x, rm, rv, w, b, eps=1e-6)
    inv = 1 / np.sqrt(np.array([4.0, 0.25]) + 1e-6)
    expected = (np.array([[0.0, 1.0], [2.0, -3.0]]) - [1.0, -1.0]) * inv * [2.0, -1.0] + [0.5, 3.0]
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 2, 4, 4), (0, 2, 2, 3, 3),
                                   (4, 3, 0), (2, 3, 0, 4), (4, 0), (4, 0, 5), (2, 0, 3, 3)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input(dtype, rng, shape, training):
    # Also no channels: (4, 0, 5) had killed the process (the tilings divide by C).
    C = shape[1]
    x = np.zeros(shape, dtype)
    weight, bias = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bnfast.batch_norm(x, rm, rv, weight, bias, training=training)
    assert y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 4, 4)], ids=str)
def test_empty_input_matches_torch(dtype, torch, shape):
    C = shape[1]
    x = np.zeros(shape, dtype)
    rm, rv = np.full(C, 0.5, dtype), np.full(C, 2.0, dtype)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv, training=True)
    y = bnfast.batch_norm(x, rm, rv, training=True)
    assert y.shape == tuple(expected.shape)
    np.testing.assert_array_equal(rm, t_rm.numpy())
    np.testing.assert_array_equal(rv, t_rv.numpy())


def test_two_values_per_channel_is_enough(dtype):
    # N=1 with a spatial size of 2, and N=2 without spatial dims: allowed.
    for x in (np.array([[[1.0, 3.0]]], dtype), np.array([[1.0], [3.0]], dtype)):
        y = bnfast.batch_norm(x, None, None, training=True)
        assert_close(y.ravel(), np.array([-1.0, 1.0]) / np.sqrt(1 + 1e-5), dtype)


def test_single_value_per_channel_allowed_in_eval(dtype):
    x = np.array([[2.0, 3.0, 4.0]], dtype)
    rm, rv = np.ones(3, dtype), np.full(3, 4.0, dtype)
    y = bnfast.batch_norm(x, rm, rv, training=False, eps=1e-5)
    assert_close(y, (np.array([[2.0, 3.0, 4.0]]) - 1) / np.sqrt(4 + 1e-5), dtype)


def test_read_only_input_and_parameters(dtype, rng):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    weight, bias = make_params(rng, 3, dtype)
    rm, rv = make_running(rng, 3, dtype)
    for a in (x, weight, bias, rm, rv):
        a.setflags(write=False)
    ref = reference_batch_norm(x, rm, rv, weight, bias)
    assert_close(bnfast.batch_norm(x, rm, rv, weight, bias), ref.out, dtype)
    # Training with read-only input (running buffers writable).
    rm2, rv2 = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm2, rv2, weight, bias, training=True)
    assert_close(bnfast.batch_norm(x, rm2, rv2, weight, bias, training=True), ref.out, dtype)
    assert_close(rm2, ref.running_mean, dtype, STAT_TOL)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_memory_mapped_input(dtype, rng, tmp_path, layout):
    x = make_input(rng, (4, 3, 6, 5), dtype)
    if layout == "channels_last":
        stored = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    else:
        stored = x
    path = tmp_path / "x.bin"
    stored.tofile(path)
    mm = np.memmap(path, dtype=dtype, mode="r", shape=stored.shape)
    xm = np.moveaxis(mm, -1, 1) if layout == "channels_last" else mm
    rm, rv = make_running(rng, 3, dtype)
    ref = reference_batch_norm(x, rm, rv, training=True)
    y = bnfast.batch_norm(xm, rm, rv, training=True)
    assert_close(y, ref.out, dtype)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    assert_close(rv, ref.running_var, dtype, STAT_TOL)
    ref_eval = reference_batch_norm(x, rm, rv)
    assert_close(bnfast.batch_norm(xm, rm, rv), ref_eval.out, dtype)
    del mm, xm


def test_array_like_input():
    data = [[1.0, 2.0], [3.0, 5.0], [4.0, -1.0]]
    y = bnfast.batch_norm(data, None, None, training=True)
    assert y.dtype == np.float64  # np.asarray(list of floats)
    assert_close(y, reference_batch_norm(np.array(data), training=True).out, np.float64)
    # Array-like parameters too.
    y = bnfast.batch_norm(np.array(data), [0.0, 1.0], [1.0, 4.0], [2.0, 1.0], [0.0, 1.0])
    ref = reference_batch_norm(np.array(data), [0.0, 1.0], [1.0, 4.0], [2.0, 1.0], [0.0, 1.0])
    assert_close(y, ref.out, np.float64)


def test_running_buffers_of_other_dtype_update_in_place(rng):
    x = make_input(rng, (6, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float64), np.ones(3, np.float64)
    ref = reference_batch_norm(x, rm, rv, training=True)
    y = bnfast.batch_norm(x, rm, rv, training=True)
    assert y.dtype == np.float32
    assert_close(y, ref.out, np.float32)
    # float64 buffers get the float64 update, not one rounded to float32.
    assert_close(rm, ref.running_mean, np.float64, STAT_TOL)
    assert_close(rv, ref.running_var, np.float64, STAT_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_argument(dtype, rng, training):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    rm, rv = make_running(rng, 3, dtype)
    ref = reference_batch_norm(x, rm, rv, training=training)
    out = np.full_like(x, np.nan)
    y = bnfast.batch_norm(x, rm, rv, training=training, out=out)
    assert y is out
    assert_close(out, ref.out, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_is_input(dtype, rng, training):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    rm, rv = make_running(rng, 3, dtype)
    ref = reference_batch_norm(x, rm, rv, training=training)
    y = bnfast.batch_norm(x, rm, rv, training=training, out=x)
    assert y is x
    assert_close(x, ref.out, dtype)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)


def test_out_partially_overlapping_input(dtype, rng):
    # out is x shifted by one element along W: in-place elementwise would read
    # values it already wrote.
    buf = make_input(rng, (3, 2, 4, 9), dtype)
    x = buf[..., :8]
    out = buf[..., 1:]
    ref = reference_batch_norm(x.copy(), training=True)
    y = bnfast.batch_norm(x, None, None, training=True, out=out)
    assert y is out
    assert_close(out, ref.out, dtype)


def test_out_of_other_layout(dtype, rng):
    # A Fortran-ordered out for a C-contiguous input (and vice versa) is filled correctly.
    x = make_input(rng, (3, 4, 5, 6), dtype)
    ref = reference_batch_norm(x, training=True)
    out = np.zeros(x.shape, dtype, order="F")
    assert bnfast.batch_norm(x, None, None, training=True, out=out) is out
    assert_close(out, ref.out, dtype)
    xf = np.asfortranarray(x)
    out = np.zeros(x.shape, dtype)
    assert bnfast.batch_norm(xf, None, None, training=True, out=out) is out
    assert_close(out, ref.out, dtype)


@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5, 10.0])
def test_eps_values(dtype, rng, eps):
    x = make_input(rng, (5, 3, 4), dtype)
    rm, rv = make_running(rng, 3, dtype)
    for training in (True, False):
        ref = reference_batch_norm(x, rm.copy(), rv.copy(), training=training, eps=eps)
        y = bnfast.batch_norm(x, rm.copy(), rv.copy(), training=training, eps=eps)
        assert_close(y, ref.out, dtype)


def test_integer_like_hyperparameters(dtype, rng):
    # momentum=1 / eps=1 as Python ints (and NumPy scalars) are real numbers too.
    x = make_input(rng, (5, 3), dtype)
    rm, rv = make_running(rng, 3, dtype)
    ref = reference_batch_norm(x, rm, rv, training=True, momentum=1, eps=1)
    y = bnfast.batch_norm(x, rm, rv, training=True, momentum=np.float32(1), eps=np.int64(1))
    assert_close(y, ref.out, dtype)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)


def test_repeated_calls_accumulate_like_torch(dtype, rng, torch):
    # Ten training steps on different batches: the running buffers follow torch's.
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
    for step in range(10):
        x = make_input(rng, (3 + step, 4, 5), dtype)
        bnfast.batch_norm(x, rm, rv, training=True, momentum=0.25)
        torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv, training=True,
                                       momentum=0.25)
        ref = reference_batch_norm(x, ref_rm, ref_rv, training=True, momentum=0.25)
        ref_rm, ref_rv = ref.running_mean, ref.running_var
    assert_close(rm, t_rm.numpy(), dtype, TORCH_TOL)
    assert_close(rv, t_rv.numpy(), dtype, TORCH_TOL)
    # Each step rounds once to the storage type: errors add up over ten steps.
    tol = {k: {n: v * 10 for n, v in t.items()} for k, t in STAT_TOL.items()}
    assert_close(rm, ref_rm, dtype, tol)
    assert_close(rv, ref_rv, dtype, tol)


def test_all_option_combinations_small(dtype, rng):
    # Every (weight, bias, running, training, relu, addend) combination on one input.
    x = make_input(rng, (4, 3, 3), dtype)
    weight, bias = make_params(rng, 3, dtype)
    addend = make_input(rng, x.shape, dtype, loc=0.0, scale=1.0)
    for w, b, running, training, relu, add in itertools.product(
            (None, weight), (None, bias), (False, True), (False, True), (False, True),
            (None, addend)):
        if not training and not running:
            continue  # evaluation needs running stats (tested in test_errors)
        rm, rv = make_running(np.random.default_rng(1), 3, dtype) if running else (None, None)
        ref = reference_batch_norm(x, rm, rv, w, b, training=training, addend=add, relu=relu)
        y = bnfast.batch_norm(x, rm, rv, w, b, training=training, addend=add, relu=relu)
        assert_close(y, ref.out, dtype)
        if running:
            assert_close(rm, ref.running_mean, dtype, STAT_TOL)
            assert_close(rv, ref.running_var, dtype, STAT_TOL)


# =====================================================================================
# Behaviour once held by the "fast path equals general path" suites (issue 9, part 4):
# every argument form, through the one public road, against the reference and torch.
# =====================================================================================
# ResNet's last block (N == 1), C < the channels-last tile width with S > 1, (N, C)
# rows, S == 1 in 3-D, a 5-D volume, and the smallest batch of a wide row.
TRAIN_SHAPES = [(1, 512, 7, 7), (4, 3, 5, 5), (16, 8), (3, 5, 1), (2, 4, 3, 3, 3), (2, 70)]
# (addend given, relu)
EPILOGUES = {"plain": (False, False), "addend": (True, False), "relu": (False, True),
             "relu+addend": (True, True)}
# Batch statistics (computed in float64 whatever the storage) vs the float64 reference.
STATS64_TOL = {np.float32: dict(rtol=1e-10, atol=1e-12), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _copies(*arrays):
    return tuple(None if a is None else a.copy() for a in arrays)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("running", [True, False], ids=["running", "no_running"])
def test_training_epilogues_momenta_and_stats(dtype, rng, shape, affine, running):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    x.flags.writeable = False  # read, never written
    w, b = _params(rng, C, dtype, affine)
    addend0 = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    addend0.flags.writeable = False
    rm0, rv0 = make_running(rng, C, dtype)
    base = reference_batch_norm(x, rm0, rv0, w, b, training=True, momentum=0.1)
    for (epilogue, (with_addend, relu)), momentum in itertools.product(EPILOGUES.items(),
                                                                        (0.1, 0.0, 1.0)):
        case = f"{epilogue}, momentum={momentum}"
        addend = addend0 if with_addend else None
        rm, rv = _copies(rm0, rv0) if running else (None, None)
        f = bnfast.fused_batch_norm if relu else bnfast.batch_norm
        kwargs = dict(addend=addend) if relu else dict(addend=addend, relu=False)
        y, mean, invstd = f(x, rm, rv, w, b, training=True, momentum=momentum,
                            return_stats=True, **kwargs)
        assert type(y) is np.ndarray and y.dtype == dtype and y.flags.c_contiguous, case
        # The output and the statistics do not depend on the momentum.
        expected = base.out if addend is None else base.out + addend.astype(np.float64)
        assert_close(y, np.maximum(expected, 0.0) if relu else expected, dtype)
        assert mean.dtype == invstd.dtype == np.float64 and mean.shape == (C,)
        assert_close(mean, base.mean, dtype, STATS64_TOL)
        assert_close(invstd, base.invstd, dtype, STATS64_TOL)
        if not running:
            continue
        if momentum == 0.1:
            assert_close(rm, base.running_mean, dtype, STAT_TOL)
            assert_close(rv, base.running_var, dtype, STAT_TOL)
        elif momentum == 0.0:  # exactly unchanged
            assert_same(rm, rm0, case)
            assert_same(rv, rv0, case)
        else:  # exactly the batch statistics, rounded once
            assert_same(rm, mean.astype(dtype), case)
            n = x.size // C  # the unbiased batch variance
            assert_close(rv, (base.invstd ** -2 - 1e-5) * n / (n - 1), dtype, STAT_TOL)


# Channels-first batches of short runs (S <= 256, N >= 16) are summed by columns
# (src/_batch_stats.pxd): the first batch on either side of both bounds, runs of
# 2, a last channel tile narrower and a last sample block shorter than the others
# (131 samples of 46 7x7 channels: tiles of 16, 16 and 14 channels, blocks of 66
# and 65 samples), a batch of 9 values a run (S * rows per shift capped at 4096:
# 8 blocks), and runs that hold 1e6 + noise.  (S == 1 is (N, C) rows.)
SHORT_RUN_SHAPES = [(15, 6, 7, 7), (16, 6, 7, 7), (16, 3, 256), (16, 3, 257), (32, 5, 2),
                    (131, 46, 7, 7), (3600, 2, 3, 3)]


@pytest.mark.parametrize("shape", SHORT_RUN_SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_training_statistics_of_short_runs(dtype, rng, shape, offset):
    x = make_input(rng, shape, dtype) + dtype(offset)
    rm, rv = make_running(rng, shape[1], dtype)
    base = reference_batch_norm(x, rm.copy(), rv.copy(), training=True, momentum=0.1)
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, training=True, momentum=0.1,
                                        return_stats=True)
    assert_close(mean, base.mean, dtype, STATS64_TOL)
    assert_close(invstd, base.invstd, dtype, STATS64_TOL)
    if offset == 0.0:
        # (With the offset, x - mean itself carries ~1e-16 * 1e6 of rounding: see
        # test_stability.py's large-offset tests.)
        assert_close(y, base.out, dtype)
    assert_close(rm, base.running_mean, dtype, STAT_TOL)
    assert_close(rv, base.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (4, 3, 5, 5), (16, 8), (2, 4, 3, 3, 3),
                                   (2, 70)], ids=str)
def test_training_matches_torch_native_batch_norm(dtype, rng, torch, shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3,
                                        return_stats=True)
    yt, tmean, tinvstd = torch.native_batch_norm(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), trm, trv, True, 0.3, 1e-3)
    assert_close(y, yt.numpy(), dtype, TORCH_TOL)
    assert_close(rm, trm.numpy(), dtype, TORCH_TOL)
    assert_close(rv, trv.numpy(), dtype, TORCH_TOL)
    assert_close(mean, tmean.double().numpy(), dtype, TORCH_TOL)
    assert_close(invstd, tinvstd.double().numpy(), dtype, TORCH_TOL)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8), (6, 70)], ids=str)
@pytest.mark.parametrize("target", ["fresh", "input", "addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_out_targets(dtype, rng, shape, target, training):
    # out= a fresh array, the input itself or the addend itself: the statistics are
    # those of x before it is overwritten; nothing else is written.
    C = shape[1]
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    x0, addend0 = x.copy(), addend.copy()
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    ref = reference_batch_norm(x0, rm, rv, w, b, training=training, addend=addend0, relu=True)
    out = {"fresh": np.full(shape, np.nan, dtype), "input": x, "addend": addend}[target]
    y, mean, invstd = bnfast.fused_batch_norm(x, rm, rv, w, b, addend, training=training,
                                              out=out, return_stats=True)
    assert y is out
    assert_close(y, ref.out, dtype)
    assert_close(mean, ref.mean, dtype, STATS64_TOL)
    assert_close(invstd, ref.invstd, dtype, STATS64_TOL)
    if training:
        assert_close(rm, ref.running_mean, dtype, STAT_TOL)
        assert_close(rv, ref.running_var, dtype, STAT_TOL)
    if target != "input":
        assert_same(x, x0)
    if target != "addend":
        assert_same(addend, addend0)


@pytest.mark.parametrize("shift", [1, 7, -1], ids=["1", "7", "size-1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("partner", ["input", "addend"])
def test_out_partially_overlapping_input_or_addend(dtype, rng, shift, training, partner):
    # out and the input (or the addend) in one buffer, ``shift`` elements apart.
    shape = (2, 4, 3, 3)
    n = int(np.prod(shape))
    shift = n - 1 if shift == -1 else shift
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    rm, rv = make_running(rng, 4, dtype)
    ref = reference_batch_norm(x, rm, rv, training=training, addend=addend, relu=True)
    buf = np.zeros(n + shift, dtype)
    shared, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
    if partner == "input":
        shared[...] = x
        x = shared
    else:
        shared[...] = addend
        addend = shared
    y = bnfast.fused_batch_norm(x, rm, rv, None, None, addend, training=training, out=out)
    assert y is out
    assert_close(y, ref.out, dtype)


def test_running_buffers_that_are_views_are_updated_in_place(dtype, rng):
    # Rows of one (2, C) array (contiguous views), and every other element of a longer
    # array (strided views): both are updated in place, to the same values.
    x = make_input(rng, (4, 6, 3, 3), dtype)
    rm0, rv0 = make_running(rng, 6, dtype)
    rows = np.stack([rm0, rv0])
    y_rows = bnfast.batch_norm(x, rows[0], rows[1], training=True)
    spread = np.zeros(24, dtype)
    spread[0:12:2], spread[12:24:2] = rm0, rv0
    y_spread = bnfast.batch_norm(x, spread[0:12:2], spread[12:24:2], training=True)
    assert_same(y_rows, y_spread)
    assert_same(rows[0], spread[0:12:2])
    assert_same(rows[1], spread[12:24:2])
    np.testing.assert_array_equal(spread[1::2], 0)  # the gaps are untouched
    ref = reference_batch_norm(x, rm0, rv0, training=True)
    assert_close(rows[0], ref.running_mean, dtype, STAT_TOL)
    assert_close(rows[1], ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8)], ids=str)
def test_running_buffers_of_other_dtype_do_not_change_the_output(dtype, rng, shape):
    other = other_float(dtype)
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, other)
    rm, rv = _copies(rm0, rv0)
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    assert rm.dtype == rv.dtype == other
    # The output depends on the batch only: the bits of the call without buffers.
    ey, emean, einvstd = bnfast.batch_norm(x, None, None, w, b, training=True, return_stats=True)
    assert_same(y, ey)
    assert_same(mean, emean)
    assert_same(invstd, einvstd)
    ref = reference_batch_norm(x, rm0, rv0, w, b, training=True)
    assert_close(rm, ref.running_mean, other, STAT_TOL)
    assert_close(rv, ref.running_var, other, STAT_TOL)
    if dtype == np.float64:  # float32 buffers: the float64 update rounded once
        frm, frv = rm0.astype(np.float64), rv0.astype(np.float64)
        bnfast.batch_norm(x, frm, frv, w, b, training=True)
        assert_same(rm, frm.astype(np.float32))
        assert_same(rv, frv.astype(np.float32))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_and_mixed_dtype_channel_vectors(dtype, rng, training):
    # (C,) vectors that are views with a stride, or of the other float dtype (float64
    # parameters with float32 data), give the values they hold.
    shape, C = (4, 5, 3, 3), 5
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, other_float(dtype))
    rm0, rv0 = make_running(rng, C, dtype)
    big = np.zeros((4, 2 * C), dtype)
    big[0, ::2], big[1, ::2], big[2, ::2], big[3, ::2] = w, b, rm0, rv0
    ws, bs, rms, rvs = big[0, ::2], big[1, ::2], big[2, ::2], big[3, ::2]
    for args in ((w, b, rm0.copy(), rv0.copy()), (ws, bs, rms, rvs),
                 (w[::-1][::-1], bs, rm0.astype(other_float(dtype)), rv0.copy())):
        ref = reference_batch_norm(x, *args[2:], *args[:2], training=training)
        y = bnfast.batch_norm(x, args[2], args[3], args[0], args[1], training=training)
        assert y.dtype == dtype
        assert_close(y, ref.out, dtype)
        if training:
            assert_close(args[2], ref.running_mean, args[2].dtype.type, STAT_TOL)
            assert_close(args[3], ref.running_var, args[3].dtype.type, STAT_TOL)
    np.testing.assert_array_equal(big[:, 1::2], 0)  # the gaps are untouched


@pytest.mark.parametrize("value", [np.float64(0.25), np.float32(0.25), 1, 0,
                                   fractions.Fraction(1, 4)],
                         ids=["np.float64", "np.float32", "int-1", "int-0", "Fraction"])
def test_real_non_float_momentum_and_eps_equal_their_float(dtype, rng, value):
    # NumPy scalars, ints and other real numbers behave as float(value), bit for bit.
    x = make_input(rng, (4, 3, 5, 5), dtype)
    w, b = make_params(rng, 3, dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    eps = value if value else 1e-5  # eps must be positive
    results = []
    for m, e in ((value, eps), (float(value), float(eps))):
        rm, rv = _copies(rm0, rv0)
        results.append(bnfast.batch_norm(x, rm, rv, w, b, training=True, momentum=m, eps=e,
                                         return_stats=True) + (rm, rv))
        results.append((bnfast.batch_norm(x, rm0, rv0, w, b, eps=e),))
    for a, e in zip(results[0] + results[1], results[2] + results[3]):
        assert_same(a, e)
    ref = reference_batch_norm(x, rm0, rv0, w, b, training=True, momentum=float(value),
                               eps=float(eps))
    assert_close(results[0][0], ref.out, dtype)
    assert_close(results[0][3], ref.running_mean, dtype, STAT_TOL)


@pytest.mark.parametrize("momentum", ["0.1", True, False, None, 0.1j],
                         ids=["str", "True", "False", "None", "complex"])
def test_non_real_momentum_raises_type_error_and_changes_nothing(dtype, rng, momentum):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    rm0, rv0 = make_running(rng, 3, dtype)
    rm, rv = _copies(rm0, rv0)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        bnfast.batch_norm(x, rm, rv, training=True, momentum=momentum)
    assert_same(rm, rm0)
    assert_same(rv, rv0)
    # Evaluation does not use the momentum.
    assert_close(bnfast.batch_norm(x, rm, rv, momentum=momentum),
                 reference_batch_norm(x, rm0, rv0).out, dtype)


class _Subclass(np.ndarray):
    """An ndarray subclass: it must behave exactly as the ndarray it views."""


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ndarray_subclasses_behave_like_ndarrays(dtype, rng, training):
    shape = (2, 4, 3, 3)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b = make_params(rng, 4, dtype)
    rm0, rv0 = make_running(rng, 4, dtype)
    rm, rv = _copies(rm0, rv0)
    expected = bnfast.batch_norm(x, rm, rv, w, b, training=training, addend=addend, relu=True,
                                 return_stats=True) + (rm, rv)
    sub = [a.copy().view(_Subclass) for a in (x, rm0, rv0, w, b, addend)]
    y, mean, invstd = bnfast.batch_norm(sub[0], sub[1], sub[2], sub[3], sub[4],
                                        training=training, addend=sub[5], relu=True,
                                        return_stats=True)
    assert type(y) is np.ndarray
    for actual, e in zip((y, mean, invstd, sub[1], sub[2]), expected):
        assert_same(np.asarray(actual), e)
    assert_close(y, reference_batch_norm(x, rm0, rv0, w, b, training=training, addend=addend,
                                         relu=True).out, dtype)
    # An out= of a subclass is written.
    out = np.zeros(shape, dtype).view(_Subclass)
    bnfast.batch_norm(x, rm0.copy(), rv0.copy(), w, b, training=training, addend=addend,
                      relu=True, out=out)
    assert_same(np.asarray(out), expected[0])


def test_out_of_a_subclass_is_returned(rng):
    x = make_input(rng, (2, 4, 3, 3), np.float32)
    out = np.zeros(x.shape, np.float32).view(_Subclass)
    assert bnfast.batch_norm(x, None, None, training=True, out=out) is out


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (2, 3, 0), (0, 2, 4, 4), (4, 0, 5)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input_with_every_option(dtype, rng, shape, training):
    # An empty batch with addend, relu, out and return_stats: an empty output, buffers
    # unchanged (no batch, no update), the running statistics returned in eval.
    C = shape[1]
    x = np.zeros(shape, dtype)
    rm0, rv0 = make_running(rng, C, dtype)
    rm, rv = _copies(rm0, rv0)
    w, b = make_params(rng, C, dtype)
    out = np.zeros(shape, dtype)
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=training, addend=x.copy(),
                                        relu=True, out=out, return_stats=True)
    assert y is out and y.size == 0
    assert_same(rm, rm0)
    assert_same(rv, rv0)
    if not training:
        assert_close(mean, rm0, dtype, STATS64_TOL)
        assert_close(invstd, 1 / np.sqrt(rv0.astype(np.float64) + 1e-5), dtype, TOL)


# -- outputs far beyond the caches: non-temporal stores ------------------------------------
@pytest.mark.parametrize("dtype, shape", [(np.float32, (16, 64, 64, 64)),
                                          (np.float64, (8, 64, 64, 64)),
                                          (np.float16, (32, 64, 64, 64)),
                                          (ml_dtypes.bfloat16, (32, 64, 64, 64)),
                                          # 7x7 images: runs not 16 bytes long (flat leaves)
                                          (np.float32, (24, 1024, 7, 7)),
                                          (np.float16, (48, 1024, 7, 7)),
                                          (ml_dtypes.bfloat16, (48, 1024, 7, 7))],
                         ids=["float32", "float64", "float16", "bfloat16", "float32-7x7",
                              "float16-7x7", "bfloat16-7x7"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("epilogue", ["plain", "relu", "addend", "addend_relu", "in_place"])
def test_streamed_output_has_the_bits_of_cached_stores(rng, dtype, shape, layout, epilogue):
    # 16.8 MB outputs take non-temporal stores; one sample's 0.5-2 MB slice does not.
    # Evaluation is elementwise, so slice by slice must give the same bits.
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, 0.0, 1.0) if "addend" in epilogue else None
    if layout == "channels_last":
        x = channels_last(x)
        addend = None if addend is None else channels_last(addend)
    C = shape[1]
    # Half data takes float32 parameters (PyTorch's rule).
    pdtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    rm, rv = rng.normal(size=C).astype(pdtype), rng.uniform(0.5, 2.0, C).astype(pdtype)
    w, b = rng.normal(size=C).astype(pdtype), rng.normal(size=C).astype(pdtype)
    relu = "relu" in epilogue

    def run(xs, adds, out=None):
        return bnfast.batch_norm(xs, rm, rv, w, b, addend=adds, relu=relu, out=out)

    sliced = np.concatenate([run(x[n:n + 1], None if addend is None else addend[n:n + 1])
                             for n in range(shape[0])])
    whole = run(x, addend, out=x if epilogue == "in_place" else None)
    np.testing.assert_array_equal(whole, sliced)



@pytest.mark.parametrize("dtype, offset", [(np.float32, 2), (np.float16, 1),
                                           (ml_dtypes.bfloat16, 1), (np.float32, 52),
                                           (np.float16, 6), (ml_dtypes.bfloat16, 18)],
                         ids=["float32", "float16", "bfloat16", "float32-element-aligned",
                              "float16-element-aligned", "bfloat16-element-aligned"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_out_of_a_streamed_size_gets_the_aligned_bits(rng, dtype, offset, training,
                                                                 layout):
    # 4.8 MB of 7x7 images: outputs this large stream, from any element-aligned start
    # (the flat leaves reach the 64-byte line first); an out= view off its itemsize
    # (legal in NumPy) takes plain stores.
    shape = (24 if np.dtype(dtype).itemsize == 4 else 48, 1024, 7, 7)
    x = make_input(rng, shape, dtype)
    if layout == "channels_last":
        x = channels_last(x)
    C = shape[1]
    w, b = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    pdtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    w, b = w.astype(pdtype), b.astype(pdtype)

    def run(out):
        rm, rv = np.zeros(C, pdtype), np.ones(C, pdtype)
        return bnfast.batch_norm(x, rm, rv, w, b, training=training, out=out)

    out = misaligned_empty(shape, dtype, offset)
    if layout == "channels_last":
        nhwc = (shape[0], *shape[2:], shape[1])
        out = np.moveaxis(misaligned_empty(nhwc, dtype, offset), -1, 1)
    assert run(out) is out
    assert_same(out, run(None))
