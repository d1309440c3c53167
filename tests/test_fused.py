"""The fused epilogue: relu(batch_norm(x) + addend), functional and FusedBatchNormXd."""
import numpy as np
import pytest

import bnfast
from conftest import (
    STAT_TOL,
    TORCH_TOL,
    assert_close,
    channels_last,
    make_input,
    make_params,
    make_running,
    reference_batch_norm,
    with_layout,
)

SHAPES = [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 4, 5), (16, 3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no_addend"])
def test_fused_matches_reference(dtype, rng, shape, training, with_addend):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    weight, bias = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if with_addend else None
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=training, addend=addend,
                               relu=True)
    # The specification written out: max(0, BN(x) + addend).
    plain = reference_batch_norm(x, rm, rv, weight, bias, training=training).out
    np.testing.assert_array_equal(
        ref.out, np.maximum(plain + (0 if addend is None else addend.astype(np.float64)), 0))

    y, save_mean, save_invstd = bnfast.fused_batch_norm(
        x, rm, rv, weight, bias, addend, training=training, return_stats=True)

    assert y.shape == shape and y.dtype == dtype
    assert_close(y, ref.out, dtype)
    assert (y >= 0).all()
    assert (y == 0).any() and (y > 0).any()  # the relu did something, and not everything
    np.testing.assert_allclose(save_mean, ref.mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(save_invstd, ref.invstd, rtol=1e-12)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    assert_close(rv, ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("relu", [False, True])
def test_addend_without_fused_relu(dtype, rng, relu):
    x = make_input(rng, (4, 3, 5), dtype)
    addend = make_input(rng, x.shape, dtype, 0.0, 3.0)
    ref = reference_batch_norm(x, training=True, addend=addend, relu=relu)
    y = bnfast.batch_norm(x, None, None, training=True, addend=addend, relu=relu)
    assert_close(y, ref.out, dtype)
    if not relu:
        assert (y < 0).any()


def test_fused_equals_batch_norm_with_relu(dtype, rng):
    x = make_input(rng, (8, 3, 6, 6), dtype)
    addend = make_input(rng, x.shape, dtype, 0.0, 1.0)
    a = bnfast.fused_batch_norm(x, None, None, addend=addend, training=True)
    b = bnfast.batch_norm(x, None, None, training=True, addend=addend, relu=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no_addend"])
def test_fused_matches_torch_composed(dtype, rng, torch, shape, training, with_addend):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    weight, bias = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if with_addend else None
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    t = torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv, torch.from_numpy(weight),
                                       torch.from_numpy(bias), training=training, momentum=0.3)
    if addend is not None:
        t = t + torch.from_numpy(addend)
    expected = torch.relu(t).numpy()

    y = bnfast.fused_batch_norm(x, rm, rv, weight, bias, addend, training=training, momentum=0.3)

    assert_close(y, expected, dtype, TORCH_TOL)
    assert_close(rm, t_rm.numpy(), dtype, TORCH_TOL)
    assert_close(rv, t_rv.numpy(), dtype, TORCH_TOL)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("target", ["input", "addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place(dtype, rng, layout, target, training):
    x = make_input(rng, (4, 3, 5, 6), dtype)
    addend = make_input(rng, x.shape, dtype, loc=0.0, scale=1.0)
    rm, rv = make_running(rng, 3, dtype)
    ref = reference_batch_norm(x, rm, rv, training=training, addend=addend, relu=True)
    xl, al = with_layout(x, layout), with_layout(addend, layout)
    out = xl if target == "input" else al
    y = bnfast.fused_batch_norm(xl, rm, rv, addend=al, training=training, out=out)
    assert y is out
    assert_close(out, ref.out, dtype)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    other = al if target == "input" else xl
    np.testing.assert_array_equal(other, addend if target == "input" else x)


def test_addend_is_input(dtype, rng):
    # relu(BN(x) + x), in place on x: every element is read before it is written.
    x = make_input(rng, (4, 3, 5, 6), dtype)
    ref = reference_batch_norm(x, training=True, addend=x, relu=True)
    assert_close(bnfast.fused_batch_norm(x, None, None, addend=x, training=True), ref.out, dtype)
    y = bnfast.fused_batch_norm(x, None, None, addend=x, training=True, out=x)
    assert y is x
    assert_close(x, ref.out, dtype)


def test_in_place_on_overlapping_addend(dtype, rng):
    # out overlaps addend with a shift: must behave as if computed out of place.
    buf = make_input(rng, (3, 2, 4, 9), dtype, loc=0.0, scale=1.0)
    x = make_input(rng, (3, 2, 4, 8), dtype)
    addend, out = buf[..., :8], buf[..., 1:]
    ref = reference_batch_norm(x, training=True, addend=addend.copy(), relu=True)
    assert bnfast.fused_batch_norm(x, None, None, addend=addend, training=True, out=out) is out
    assert_close(out, ref.out, dtype)


def test_relu_keeps_nan(dtype):
    x = np.array([[1.0, np.nan], [-1.0, 2.0], [3.0, 5.0]], dtype)
    rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
    addend = np.array([[0.0, 0.0], [np.nan, 0.0], [-100.0, 0.0]], dtype)
    y = bnfast.fused_batch_norm(x, rm, rv, addend=addend)
    assert np.isnan(y[0, 1]) and np.isnan(y[1, 0])
    assert y[2, 0] == 0 and y[1, 1] > 0


# -- modules ---------------------------------------------------------------------------
KINDS = [
    (bnfast.FusedBatchNorm1d, "BatchNorm1d", (6, 3)),
    (bnfast.FusedBatchNorm1d, "BatchNorm1d", (4, 3, 5)),
    (bnfast.FusedBatchNorm2d, "BatchNorm2d", (3, 3, 4, 5)),
    (bnfast.FusedBatchNorm3d, "BatchNorm3d", (2, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("cls,tname,shape", KINDS, ids=["1d-2D", "1d-3D", "2d", "3d"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
def test_fused_module_matches_torch(dtype, rng, torch, cls, tname, shape, track, momentum):
    m = cls(3, momentum=momentum, track_running_stats=track, dtype=dtype)
    tm = getattr(torch.nn, tname)(3, momentum=momentum, track_running_stats=track,
                                  dtype=getattr(torch, np.dtype(dtype).name))
    w, b = make_params(rng, 3, dtype)
    m.weight[...], m.bias[...] = w, b
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))
    for step, (training, with_addend) in enumerate(
            [(True, True), (True, False), (False, True), (False, False), (True, True)]):
        m.train(training)
        tm.train(training)
        x = make_input(rng, shape, dtype, loc=float(step))
        addend = make_input(rng, shape, dtype, 0.0, 1.0) if with_addend else None
        if momentum is None:  # cumulative average over the counted steps
            factor = 1.0 / (int(m.num_batches_tracked) + 1) if track else 0.0
        else:
            factor = momentum
        ref = reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                   training=training or not track, addend=addend, relu=True,
                                   momentum=factor)
        y = m(x, addend) if with_addend else m(x)
        with torch.no_grad():
            t = tm(torch.from_numpy(x))
            if addend is not None:
                t = t + torch.from_numpy(addend)
            expected = torch.relu(t).numpy()
        assert_close(y, expected, dtype, TORCH_TOL)
        assert_close(y, ref.out, dtype)
        if track:
            assert_close(m.running_mean, tm.running_mean.numpy(), dtype, TORCH_TOL)
            assert_close(m.running_var, tm.running_var.numpy(), dtype, TORCH_TOL)
            assert_close(m.running_mean, ref.running_mean, dtype, STAT_TOL)
            assert int(m.num_batches_tracked) == int(tm.num_batches_tracked)


@pytest.mark.parametrize("target", ["input", "addend", "new"])
def test_fused_module_out(dtype, rng, target):
    m = bnfast.FusedBatchNorm2d(3, dtype=dtype)
    x = make_input(rng, (2, 3, 4, 4), dtype)
    addend = make_input(rng, x.shape, dtype, 0.0, 1.0)
    ref = reference_batch_norm(x, m.running_mean, m.running_var, training=True, addend=addend,
                               relu=True)
    out = {"input": x, "addend": addend, "new": np.empty_like(x)}[target]
    assert m(x, addend, out=out) is out
    assert_close(out, ref.out, dtype)


def test_fused_module_is_a_batchnorm():
    m = bnfast.FusedBatchNorm3d(4, eps=1e-3, momentum=None, affine=False)
    assert isinstance(m, bnfast.BatchNorm3d)
    assert m.eps == 1e-3 and m.momentum is None and m.weight is None
    assert repr(m) == ("FusedBatchNorm3d(4, eps=0.001, momentum=None, affine=False, bias=False, "
                       "track_running_stats=True)")


# -- the ReLU mask a fused module keeps for backward -------------------------------------
@pytest.mark.parametrize("shape", [(5, 3), (3, 5, 7), (4, 3, 49, 49), (2, 5, 3, 9, 11),
                                   (40, 7, 61), (3000, 5)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_module_mask_packed_in_forward_equals_relu_mask(dtype, rng, shape, layout, n_threads):
    # The forward packs the mask inside its normalise pass, block by block (blocks
    # of runs whose lengths are not multiples of 8 here); it must equal packing the
    # output afterwards, bit for bit, for any thread count and layout.
    x = make_input(rng, shape, dtype)
    if layout == "channels_last" and x.ndim > 2:
        x = channels_last(x)
    elif layout == "strided":
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    cls = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d,
           4: bnfast.FusedBatchNorm2d, 5: bnfast.FusedBatchNorm3d}[x.ndim]
    m = cls(shape[1], dtype=dtype, n_threads=n_threads)
    y = m(x, addend=np.full_like(x, -0.25))
    saved = m._saved.relu_mask
    np.testing.assert_array_equal(saved.to_array(), ~(y <= 0))
    expected = bnfast.relu_mask(y)
    if expected.layout == saved.layout:
        np.testing.assert_array_equal(saved.bits, expected.bits)
    # and the backward it feeds equals the functional one given the output itself
    dy = make_input(rng, shape, dtype)
    gx, ga = m.backward(dy)
    _, mean, invstd = bnfast.fused_batch_norm(x, None, None, training=True, return_stats=True,
                                              addend=np.full_like(x, -0.25))
    ref = bnfast.fused_batch_norm_backward(dy, x, y, m.weight, mean, invstd, True)
    np.testing.assert_array_equal(gx, ref[0])
    np.testing.assert_array_equal(ga, ref[3])
