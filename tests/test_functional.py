"""bnfast.batch_norm against the float64 reference and torch.nn.functional.batch_norm."""
import itertools

import numpy as np
import pytest

import bnfast
from conftest import (
    STAT_TOL,
    TORCH_TOL,
    assert_close,
    make_input,
    make_params,
    make_running,
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
                                   (4, 3, 0), (2, 3, 0, 4)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input(dtype, rng, shape, training):
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
