"""Backward pass: functional (plain and fused), modules, against a float64 NumPy
reference, central finite differences and torch autograd."""
import gc
import math
import weakref

import ml_dtypes
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bnfast
from bnfast.testing import reference_batch_norm_backward
from conftest import (
    assert_same,
    channels_last,
    is_channels_last,
    make_input,
    make_params,
    make_running,
    misaligned_empty,
    with_layout,
)

EPS = 1e-5

# Error bounds, relative to the scale of the terms that make up each result
# (see _grad_scale): float32 gradients are formed in float32 from double
# coefficients; parameter gradients are sums in double, rounded once.
REF_TOL = {np.float32: 1e-6, np.float64: 1e-13}
# vs torch at the same dtype: torch's float32 path is less exact than ours.
TORCH_TOL = {np.float32: 2e-5, np.float64: 1e-11}

# (20, 3, 6, 5): pass 1 by columns (a batch of short runs, _tiling.by_columns).
SHAPES = [(16, 5), (4, 3, 17), (4, 3, 6, 5), (2, 3, 4, 3, 5), (20, 3, 6, 5)]


def _grad_scale(x, dy, weight, invstd):
    """Magnitude of the terms of grad_input: |a| * (|dy| + |mean dy| + |xhat| * rms(dy))."""
    x64 = np.asarray(x, np.float64)
    C = x64.shape[1]
    axes = (0,) + tuple(range(2, x64.ndim))
    xhat = (x64 - x64.mean(axis=axes, keepdims=True)) * np.asarray(invstd).reshape(
        (1, C) + (1,) * (x64.ndim - 2))
    a = np.abs(np.asarray(invstd, np.float64) * (1.0 if weight is None else np.abs(weight)))
    dmax = np.abs(dy).max(initial=0.0)
    return float(a.max(initial=0.0) * dmax * (2.0 + np.abs(xhat).max(initial=0.0)))


def assert_grads(actual, expected, tol, scales):
    """Each non-None gradient within tol * its scale of the expected one."""
    for name, a, e, s in zip(("input", "weight", "bias", "addend"), actual, expected, scales):
        if e is None:
            assert a is None, name
            continue
        assert a is not None, name
        a64 = np.asarray(a, np.float64)
        e64 = np.asarray(e, np.float64)
        assert a64.shape == e64.shape, name
        err = np.abs(a64 - e64).max(initial=0.0)
        assert err <= tol * max(s, 1e-300), f"grad_{name}: error {err:.3g} > {tol:.1e} * {s:.3g}"


def _scales(x, dy, weight, mean, invstd):
    """Scales of (grad_input, grad_weight, grad_bias, grad_addend)."""
    C = x.shape[1]
    n = max(x.size // C, 1)
    x64 = np.asarray(x, np.float64)
    dev = np.abs(x64 - np.asarray(mean, np.float64).reshape((1, C) + (1,) * (x.ndim - 2))
                 ).max(initial=0.0)
    dmax = np.abs(dy).max(initial=0.0)
    return (_grad_scale(x, dy, weight, invstd),
            n * dev * dmax * np.abs(invstd).max(initial=0.0),
            n * dmax, dmax)


def _forward(x, training, weight=None, bias=None, addend=None, relu=False, seed=5):
    """bnfast forward with return_stats, on running stats that are not the defaults."""
    rm, rv = make_running(np.random.default_rng(seed), x.shape[1], x.dtype)
    return bnfast.batch_norm(x, rm, rv, weight, bias, training=training, addend=addend,
                             relu=relu, return_stats=True)


def _reduce_axes(x):
    return (0,) + tuple(range(2, x.ndim))


# -- functional vs the float64 reference -------------------------------------------------
# (N, C) has no channels-last layout of its own.
SHAPE_LAYOUTS = [(s, lay) for s in SHAPES for lay in ("contiguous", "channels_last", "strided")
                 if not (lay == "channels_last" and len(s) == 2)]


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_matches_float64_reference(dtype, rng, shape, layout, training, affine):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = with_layout(rng.standard_normal(shape).astype(dtype), layout)
    w, b = make_params(rng, shape[1], dtype)
    weight = None if affine == "none" else w
    bias = b if affine == "weight+bias" else None
    _, mean, invstd = _forward(x, training, weight, bias)
    got = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, training)
    ref = reference_batch_norm_backward(dy, x, weight, mean, invstd, training)[:3]
    assert_grads(got, ref, REF_TOL[dtype], _scales(x, dy, weight, mean, invstd))
    for g in got:
        assert g.dtype == dtype


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_input_keeps_the_input_layout(dtype, rng, training):
    shape = (3, 4, 5, 6)
    base = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for layout, check in (("contiguous", lambda g: g.flags.c_contiguous),
                          ("channels_last", is_channels_last),
                          ("strided", lambda g: g.flags.c_contiguous)):
        x = with_layout(base, layout)
        _, mean, invstd = _forward(x, training)
        gx = bnfast.batch_norm_backward(dy, x, None, mean, invstd, training)[0]
        assert check(gx), layout
    # (N, C) in Fortran order is a layout of its own: kept too.
    x2 = np.asfortranarray(make_input(rng, (40, 3), dtype))
    _, mean, invstd = _forward(x2, training)
    gx = bnfast.batch_norm_backward(np.ones_like(x2), x2, None, mean, invstd, training)[0]
    assert gx.flags.f_contiguous


def test_grad_output_in_another_layout(dtype, rng):
    shape = (4, 3, 5, 7)
    x = channels_last(make_input(rng, shape, dtype))
    dy = rng.standard_normal(shape).astype(dtype)  # contiguous
    w, _ = make_params(rng, 3, dtype)
    _, mean, invstd = _forward(x, True, w)
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd)
    same = bnfast.batch_norm_backward(channels_last(dy), x, w, mean, invstd)
    for a, b in zip(got, same):
        np.testing.assert_array_equal(a, b)
    assert is_channels_last(got[0])


def test_wide_and_narrow_channels_last(dtype, rng):
    """C above the wide-row width, C that does not divide it, and M not a multiple of k."""
    for shape in [(3, 300, 2, 3), (7, 5, 3, 3), (2, 63, 5, 1), (1001, 3)]:
        x = with_layout(make_input(rng, shape, dtype), "channels_last" if len(shape) > 2
                        else "contiguous")
        dy = rng.standard_normal(shape).astype(dtype)
        w, _ = make_params(rng, shape[1], dtype)
        _, mean, invstd = _forward(x, True, w)
        got = bnfast.batch_norm_backward(dy, x, w, mean, invstd)
        ref = reference_batch_norm_backward(dy, x, w, mean, invstd, True)[:3]
        assert_grads(got, ref, REF_TOL[dtype], _scales(x, dy, w, mean, invstd))


def test_large_offset_float32_stays_exact(rng):
    """mean 1e6, std 1 in float32: x - mean must not lose the data (Sterbenz + folded error)."""
    shape = (8, 3, 9, 9)
    x = (1e6 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    for layout in ("contiguous", "channels_last"):
        xl = with_layout(x, layout)
        _, mean, invstd = _forward(xl, True)
        got = bnfast.batch_norm_backward(dy, xl, None, mean, invstd)
        ref = reference_batch_norm_backward(dy, x, None, mean, invstd, True)[:3]
        assert_grads(got, ref, REF_TOL[np.float32], _scales(x, dy, None, mean, invstd))


def test_one_value_per_channel_in_eval(dtype, rng):
    x = make_input(rng, (1, 4), dtype)
    dy = rng.standard_normal((1, 4)).astype(dtype)
    _, mean, invstd = _forward(x, False)
    got = bnfast.batch_norm_backward(dy, x, None, mean, invstd, False)
    ref = reference_batch_norm_backward(dy, x, None, mean, invstd, False)[:3]
    assert_grads(got, ref, REF_TOL[dtype], _scales(x, dy, None, mean, invstd))


def test_float32_saved_statistics_accepted(rng):
    """torch's save_mean/save_invstd are float32 tensors: accepted as they are."""
    x = make_input(rng, (6, 3, 4), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = _forward(x, True)
    m32, i32 = mean.astype(np.float32), invstd.astype(np.float32)
    got = bnfast.batch_norm_backward(dy, x, None, m32, i32)
    ref = reference_batch_norm_backward(dy, x, None, m32, i32, True)[:3]
    assert_grads(got, ref, REF_TOL[np.float32], _scales(x, dy, None, m32, i32))


def test_read_only_inputs(dtype, rng):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, _ = make_params(rng, 3, dtype)
    _, mean, invstd = _forward(x, True, w)
    y = bnfast.fused_batch_norm(x, None, None, w, training=True)
    expected = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd)
    for a in (x, dy, w, mean, invstd, y):
        a.setflags(write=False)
    got = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


# -- output_mask -------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, True, False), (False, False, False)])
def test_output_mask_returns_none_and_same_values(dtype, rng, training, mask):
    x = make_input(rng, (5, 4, 3, 3), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, _ = make_params(rng, 4, dtype)
    _, mean, invstd = _forward(x, training, w)
    full = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training, output_mask=mask)
    for want, g, f in zip(mask, got, full):
        if want:
            np.testing.assert_array_equal(g, f)
        else:
            assert g is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_output_mask_returns_none_and_same_values(dtype, rng, training, layout):
    x = with_layout(make_input(rng, (5, 4, 3, 3), dtype), layout)
    dy = rng.standard_normal(x.shape).astype(dtype)
    a = rng.standard_normal(x.shape).astype(dtype)
    w, b = make_params(rng, 4, dtype)
    y, mean, invstd = _forward(x, training, w, b, addend=a, relu=True)
    full = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training)
    for mask in [(True, False, False, False), (False, False, False, True),
                 (False, True, True, False), (True, True, True, False),
                 (False, True, False, True), (True, False, False, True)]:
        got = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training,
                                               output_mask=mask)
        for want, g, f in zip(mask, got, full):
            if want:
                np.testing.assert_array_equal(g, f)
            else:
                assert g is None


# -- finite differences --------------------------------------------------------------------
def _loss(x, dy, weight, bias, training, addend=None, relu=False):
    rm = np.linspace(-0.5, 0.5, x.shape[1])
    rv = np.linspace(0.5, 2.0, x.shape[1])
    y = bnfast.batch_norm(x, rm, rv, weight, bias, training=training, addend=addend, relu=relu)
    return float(np.sum(y * dy))


def _numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 2, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_central_finite_differences_float64(rng, shape, training):
    x = make_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    w, b = make_params(rng, shape[1], np.float64)
    y, mean, invstd = bnfast.batch_norm(
        x, np.linspace(-0.5, 0.5, shape[1]), np.linspace(0.5, 2.0, shape[1]), w, b,
        training=training, return_stats=True)
    gx, gw, gb = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
    f = lambda: _loss(x, dy, w, b, training)  # noqa: E731 (reads the arrays it perturbs)
    np.testing.assert_allclose(gx, _numeric_grad(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, _numeric_grad(f, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, _numeric_grad(f, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_central_finite_differences_float64(rng, training):
    shape = (4, 2, 5)
    x = make_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    a = rng.standard_normal(shape)
    w, b = make_params(rng, 2, np.float64)
    y, mean, invstd = bnfast.batch_norm(
        x, np.linspace(-0.5, 0.5, 2), np.linspace(0.5, 2.0, 2), w, b, training=training,
        addend=a, relu=True, return_stats=True)
    # Keep away from the ReLU's kink, where a difference quotient means nothing.
    pre = bnfast.batch_norm(x, np.linspace(-0.5, 0.5, 2), np.linspace(0.5, 2.0, 2), w, b,
                            training=training, addend=a)
    a[np.abs(pre) < 1e-3] += 0.01
    y = bnfast.batch_norm(x, np.linspace(-0.5, 0.5, 2), np.linspace(0.5, 2.0, 2), w, b,
                          training=training, addend=a, relu=True)
    assert (y == 0).any() and (y > 0).any()
    gx, gw, gb, ga = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training)
    f = lambda: _loss(x, dy, w, b, training, addend=a, relu=True)  # noqa: E731
    np.testing.assert_allclose(gx, _numeric_grad(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, _numeric_grad(f, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, _numeric_grad(f, b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ga, _numeric_grad(f, a), rtol=1e-6, atol=1e-7)


# -- torch autograd ------------------------------------------------------------------------
def _torch_grads(torch, x, dy, weight, bias, training, running=None, addend=None, relu=False):
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    tw = None if weight is None else torch.tensor(weight, requires_grad=True)
    tb = None if bias is None else torch.tensor(bias, requires_grad=True)
    ta = None if addend is None else torch.tensor(np.ascontiguousarray(addend), requires_grad=True)
    rm, rv = (None, None) if running is None else (torch.tensor(r.copy()) for r in running)
    y = torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, training, 0.1, EPS)
    if ta is not None:
        y = y + ta
    if relu:
        y = torch.relu(y)
    y.backward(torch.tensor(np.ascontiguousarray(dy)))
    grads = [tx.grad, None if tw is None else tw.grad, None if tb is None else tb.grad,
             None if ta is None else ta.grad]
    return [None if g is None else g.numpy() for g in grads]


@pytest.mark.parametrize("shape", [(32, 6), (8, 5, 11), (4, 3, 7, 5), (2, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_matches_torch_autograd(torch, dtype, rng, shape, layout, training, affine):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = make_params(rng, shape[1], dtype)
    weight = None if affine == "none" else w
    bias = b if affine == "weight+bias" else None
    running = make_running(rng, shape[1], dtype)
    _, mean, invstd = bnfast.batch_norm(x, running[0].copy(), running[1].copy(), weight, bias,
                                        training=training, return_stats=True)
    got = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, training,
                                     output_mask=(True, weight is not None, bias is not None))
    ref = _torch_grads(torch, x, dy, weight, bias, training, running)[:3]
    assert_grads(got, ref, TORCH_TOL[dtype], _scales(x, dy, weight, mean, invstd))
    if layout == "channels_last" and len(shape) > 2:
        assert is_channels_last(got[0])


@pytest.mark.parametrize("shape", [(64, 2, 3), (4, 3, 6, 5)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_native_batch_norm_backward(torch, dtype, rng, shape, training):
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, _ = make_params(rng, shape[1], dtype)
    rm, rv = make_running(rng, shape[1], dtype)
    _, mean, invstd = bnfast.batch_norm(x, rm.copy(), rv.copy(), w, None, training=training,
                                        return_stats=True)
    t = torch.tensor
    if training:
        ref = torch.ops.aten.native_batch_norm_backward(
            t(dy), t(x), t(w), None, None, t(mean.astype(dtype)), t(invstd.astype(dtype)),
            True, EPS, [True, True, True])
    else:
        ref = torch.ops.aten.native_batch_norm_backward(
            t(dy), t(x), t(w), t(rm), t(rv), None, None, False, EPS, [True, True, True])
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
    assert_grads(got, [r.numpy() for r in ref], TORCH_TOL[dtype], _scales(x, dy, w, mean, invstd))


@pytest.mark.parametrize("shape", [(32, 6), (4, 3, 7, 5), (2, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no-addend"])
def test_fused_matches_torch_composed_ops(torch, dtype, rng, shape, layout, training, with_addend):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    addend = with_layout(rng.standard_normal(shape).astype(dtype), layout) if with_addend else None
    w, b = make_params(rng, shape[1], dtype)
    running = make_running(rng, shape[1], dtype)
    y, mean, invstd = bnfast.fused_batch_norm(x, running[0].copy(), running[1].copy(), w, b,
                                              addend, training, return_stats=True)
    assert (y == 0).any() and (y > 0).any()
    got = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training,
                                           output_mask=(True, True, True, with_addend))
    ref = _torch_grads(torch, x, dy, w, b, training, running, addend, relu=True)
    assert_grads(got, ref, TORCH_TOL[dtype], _scales(x, dy, w, mean, invstd))
    if layout == "channels_last" and len(shape) > 2:
        assert is_channels_last(got[0])
        if with_addend:
            assert is_channels_last(got[3])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channel_vectors_of_any_dtype_and_stride(dtype, rng, training):
    """weight, save_mean and save_invstd are read as doubles whatever their dtype and
    stride: the same bits as contiguous float64 copies."""
    x = make_input(rng, (6, 5, 4, 3), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = make_params(rng, 5, np.float32)  # float32 values: exact in either dtype
    w, b = w.astype(dtype), b.astype(dtype)
    _, mean, invstd = _forward(x, training, w, b)
    other = np.float32 if dtype == np.float64 else np.float64

    def strided(v, dt):
        holder = np.zeros((v.size, 3), dt)
        holder[:, 1] = v
        return holder[:, 1]  # a view with a stride of 3 values

    expected = bnfast.batch_norm_backward(dy, x, w.astype(np.float64), mean, invstd, training)
    for wv, mv, iv in [(strided(w, dtype), strided(mean, np.float64), strided(invstd, np.float64)),
                       (w.astype(other), mean, invstd)]:
        got = bnfast.batch_norm_backward(dy, x, wv, mv, iv, training)
        # Parameter gradients come in the weight's dtype, as torch's.
        assert got[1].dtype == got[2].dtype == wv.dtype
        for u, v in zip(got, expected):
            np.testing.assert_array_equal(u, v.astype(u.dtype))
    # float32 statistics are exact in float64: the same bits as their float64 copies.
    m32, i32 = mean.astype(np.float32), invstd.astype(np.float32)
    got = bnfast.batch_norm_backward(dy, x, w, m32, i32, training)
    expected = bnfast.batch_norm_backward(dy, x, w, m32.astype(np.float64),
                                          i32.astype(np.float64), training)
    for u, v in zip(got, expected):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_fortran_ordered_2d_input(dtype, rng, training):
    """An (N, C) Fortran-ordered input is channels-first (C runs of N): the mask packed
    from its output, or given as relu_mask(output), must follow that order."""
    x = np.asfortranarray(make_input(rng, (40, 3), dtype))
    dy = np.asfortranarray(rng.standard_normal(x.shape).astype(dtype))
    add = rng.standard_normal(x.shape).astype(dtype)
    w, b = make_params(rng, 3, dtype)
    y, mean, invstd = _forward(x, training, w, b, addend=add, relu=True)
    assert y.flags.f_contiguous
    mask = bnfast.relu_mask(y)
    assert str(mask.layout) == "channels_first"
    np.testing.assert_array_equal(mask.to_array(), ~(y <= 0))
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, training, output=y)
    for output in (y, mask, bnfast.relu_mask(np.ascontiguousarray(y))):
        got = bnfast.fused_batch_norm_backward(dy, x, output, w, mean, invstd, training)
        assert_grads(got, ref, REF_TOL[dtype], _scales(x, ref[3], w, mean, invstd) + (0.0,))
        assert got[0].flags.f_contiguous and got[3].flags.f_contiguous


# -- channels-last rows wider than pass 1's column tile (1024 values) -----------------------
# (259, 1030): two tiles of 520 and 510 columns (the last ragged: 2 columns past
# the 4-wide vectors) over blocks of 128, 128 and 3 rows (the last row by row);
# (2, 2100, 9, 9) channels-last: three tiles (704, 704, 692) over 128 + 34 rows.
TILE_CASES = [((259, 1030), "contiguous"), ((2, 2100, 9, 9), "channels_last")]


@pytest.mark.parametrize("shape,layout", TILE_CASES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_column_tiles_match_reference_and_torch(torch, dtype, rng, shape, layout, fused):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = make_params(rng, shape[1], dtype)
    y, mean, invstd = _forward(x, True, w, b, relu=fused)
    if fused:
        got = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd)
    else:
        got = bnfast.batch_norm_backward(dy, x, w, mean, invstd)
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, True,
                                        output=y if fused else None)
    g = ref[3] if fused else dy
    scales = _scales(x, g, w, mean, invstd)
    assert_grads(got, ref[:len(got)], REF_TOL[dtype], scales)
    # torch: of the same module without an addend (no grad_addend).
    assert_grads(got[:3], _torch_grads(torch, x, dy, w, b, True, relu=fused)[:3],
                 TORCH_TOL[dtype], scales)
    if layout == "channels_last":
        assert is_channels_last(got[0])


# -- the fused variant: mask semantics ------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fused_equals_plain_backward_of_masked_gradient(dtype, rng, layout):
    shape = (6, 5, 7, 3)
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = make_params(rng, 5, dtype)
    for training in (True, False):
        y, mean, invstd = _forward(x, training, w, b, relu=True)
        gx, gw, gb, ga = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training)
        masked = np.where(y <= 0, 0, dy).astype(dtype)
        np.testing.assert_array_equal(ga, masked)
        plain = bnfast.batch_norm_backward(masked, x, w, mean, invstd, training)
        assert_grads((gx, gw, gb), plain, REF_TOL[dtype], _scales(x, masked, w, mean, invstd))


def test_relu_mask_packs_where_the_gradient_passes(dtype, rng):
    y = rng.standard_normal((3, 4, 5, 7)).astype(dtype)
    y[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    y[1, 2, 3, :2] = [np.inf, -np.inf]
    for layout in ("contiguous", "channels_last", "strided"):
        m = bnfast.relu_mask(with_layout(y, layout))
        expected = ~(y <= 0)  # torch's threshold_backward: NaN passes the gradient
        np.testing.assert_array_equal(m.to_array(), expected)
        assert m.shape == y.shape
        assert m.nbytes == math.ceil(y.size / 8)
    m2 = bnfast.relu_mask(np.asfortranarray(y[:, :, 0, 0]))
    np.testing.assert_array_equal(m2.to_array(), ~(y[:, :, 0, 0] <= 0))


def test_fused_mask_from_output_or_relu_mask_identical(dtype, rng):
    shape = (5, 3, 8, 9)
    for layout in ("contiguous", "channels_last"):
        x = with_layout(make_input(rng, shape, dtype), layout)
        dy = rng.standard_normal(shape).astype(dtype)
        y, mean, invstd = _forward(x, True, relu=True)
        a = bnfast.fused_batch_norm_backward(dy, x, y, None, mean, invstd)
        b = bnfast.fused_batch_norm_backward(dy, x, bnfast.relu_mask(y), None, mean, invstd)
        # A mask packed in the other layout is converted.
        other = channels_last(np.ascontiguousarray(y)) if layout == "contiguous" \
            else np.ascontiguousarray(y)
        c = bnfast.fused_batch_norm_backward(dy, x, bnfast.relu_mask(other), None, mean, invstd)
        for u, v, w in zip(a, b, c):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w)


@pytest.mark.parametrize("shape", [(4, 2, 3), (4, 2, 19), (37, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_mask", [(True, True, True, True), (True, False, False, True),
                                         (True, True, True, False), (False, False, False, True)])
def test_masked_out_nan_gradient_gives_zero_and_nan_output_passes(dtype, rng, shape, training,
                                                                  output_mask):
    """torch.threshold_backward: where(out <= 0, 0, grad), a select, not a product.

    The output masks route the mask through each kernel: pass 1 writing the
    addend's gradient, pass 2 selecting on its own, with and without it.
    """
    x = make_input(rng, shape, dtype)
    y, mean, invstd = _forward(x, training, relu=True)
    dy = np.ones(shape, dtype)
    dy[y <= 0] = np.nan  # only where the ReLU blocks: must not leak
    y_nan = y.copy()
    y_nan.flat[0] = np.nan  # a NaN output passes its gradient
    dy.flat[0] = 7.0
    got = bnfast.fused_batch_norm_backward(dy, x, y_nan, None, mean, invstd, training,
                                           output_mask=output_mask)
    for g in got:
        assert g is None or np.isfinite(g).all()
    gx, gw, gb, ga = got
    if ga is not None:
        assert ga.flat[0] == 7.0
        np.testing.assert_array_equal(ga, np.where(y_nan <= 0, 0, dy))
    if gx is not None:
        clean = np.where(y_nan <= 0, 0, dy)
        ref = reference_batch_norm_backward(clean, x, None, mean, invstd, training)
        assert_grads((gx,), ref[:1], REF_TOL[dtype], _scales(x, clean, None, mean, invstd))


@pytest.mark.parametrize("shape", [(3, 5, 1001), (1, 1, 9), (9, 7), (5000, 3), (2, 3, 5, 7)],
                         ids=str)
def test_fused_unaligned_mask_offsets(dtype, rng, shape):
    """Runs and blocks that start at any bit of a mask byte (odd S, odd C)."""
    for layout in ("contiguous", "channels_last"):
        x = with_layout(make_input(rng, shape, dtype), layout)
        dy = rng.standard_normal(shape).astype(dtype)
        for training in (True, False):
            y, mean, invstd = _forward(x, training, relu=True)
            got = bnfast.fused_batch_norm_backward(dy, x, y, None, mean, invstd, training)
            ref = reference_batch_norm_backward(dy, x, None, mean, invstd, training, output=y)
            assert_grads(got, (ref[0], ref[1], ref[2], ref[3]), REF_TOL[dtype],
                         _scales(x, ref[3], None, mean, invstd))


# -- empty and degenerate inputs -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0)], ids=str)
def test_empty_batch(dtype, shape):
    x = np.zeros(shape, dtype)
    mean, invstd = np.zeros(3), np.ones(3)
    for training in (True, False):
        gx, gw, gb = bnfast.batch_norm_backward(np.zeros_like(x), x, np.ones(3, dtype), mean,
                                                invstd, training)
        assert gx.shape == shape and gx.dtype == dtype
        np.testing.assert_array_equal(gw, np.zeros(3, dtype))
        np.testing.assert_array_equal(gb, np.zeros(3, dtype))
        fused = bnfast.fused_batch_norm_backward(np.zeros_like(x), x, x, None, mean, invstd,
                                                 training)
        assert fused[0].shape == shape and fused[3].shape == shape
        np.testing.assert_array_equal(fused[1], np.zeros(3, dtype))


# -- threads --------------------------------------------------------------------------------
THREAD_CASES = [
    ((256, 3, 32, 32), "contiguous"),
    ((256, 3, 32, 32), "channels_last"),
    ((64, 129, 7, 7), "contiguous"),
    ((64, 129, 7, 7), "channels_last"),
    ((20000, 16), "contiguous"),
    ((1, 2, 512, 256), "contiguous"),
    ((3, 70, 33, 33), "channels_last"),
    ((8, 4, 16, 32, 32), "channels_last"),
    # Small batches whose pass 1 alone may run in a parallel region (REDUCE_COST).
    ((1, 512, 7, 7), "contiguous"),
    ((1, 512, 7, 7), "channels_last"),
    ((256, 96), "contiguous"),
    # Pass 1 by columns: 2 sample blocks x 3 channel tiles, the last of each
    # shorter (66 + 65 samples, 16 + 16 + 14 channels).
    ((131, 46, 7, 7), "contiguous"),
    # Rows cut into column tiles (TILE_CASES).
    ((259, 1030), "contiguous"),
    ((2, 2100, 9, 9), "channels_last"),
]


@pytest.mark.parametrize("shape,layout", THREAD_CASES, ids=str)
def test_thread_count_never_changes_a_bit(dtype, rng, shape, layout):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    a = rng.standard_normal(shape).astype(dtype)
    w, b = make_params(rng, shape[1], dtype)
    y, mean, invstd = _forward(x, True, w, b, addend=a, relu=True)

    def run(n):
        plain = bnfast.batch_norm_backward(dy, x, w, mean, invstd, n_threads=n)
        fused = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, n_threads=n)
        fused_no_addend = bnfast.fused_batch_norm_backward(
            dy, x, y, w, mean, invstd, n_threads=n, output_mask=(True, True, True, False))
        return plain + fused + fused_no_addend

    one = run(1)
    with threadpool_limits(1, "openmp"):
        limited = run(None)
    for n_threads in (2, 3):
        for u, v in zip(one, run(n_threads)):
            np.testing.assert_array_equal(u, v)
    for u, v in zip(one, limited):
        np.testing.assert_array_equal(u, v)
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, True)
    assert_grads(one[:3], ref[:3], REF_TOL[dtype], _scales(x, dy, w, mean, invstd))


# -- validation ---------------------------------------------------------------------------
def test_errors(rng):
    x = make_input(rng, (4, 3, 5), np.float32)
    dy = np.ones_like(x)
    mean, invstd = np.zeros(3), np.ones(3)
    bnb = bnfast.batch_norm_backward
    with pytest.raises(TypeError, match="grad_output"):
        bnb(dy.astype(np.float64), x, None, mean, invstd)
    with pytest.raises(TypeError, match="input"):
        bnb(dy, x.astype(np.int32), None, mean, invstd)
    with pytest.raises(ValueError, match="grad_output"):
        bnb(dy[:2], x, None, mean, invstd)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bnb(dy[0, 0], x[0, 0], None, mean, invstd)
    with pytest.raises(ValueError, match="weight"):
        bnb(dy, x, np.ones(4, np.float32), mean, invstd)
    with pytest.raises(ValueError, match="save_mean"):
        bnb(dy, x, None, None, invstd)
    with pytest.raises(ValueError, match="save_invstd"):
        bnb(dy, x, None, mean, np.ones(2))
    with pytest.raises(ValueError, match="eps"):
        bnb(dy, x, None, mean, invstd, eps=0.0)
    with pytest.raises(ValueError, match="output_mask"):
        bnb(dy, x, None, mean, invstd, output_mask=(True, True))
    with pytest.raises(ValueError, match="output_mask"):
        bnb(dy, x, None, mean, invstd, output_mask=(1, 1, 1))
    with pytest.raises(ValueError, match="n_threads"):
        bnb(dy, x, None, mean, invstd, n_threads=0)
    fbb = bnfast.fused_batch_norm_backward
    with pytest.raises(ValueError, match="output"):
        fbb(dy, x, x[:1], None, mean, invstd)
    with pytest.raises(TypeError, match="output"):
        fbb(dy, x, x.astype(np.float64), None, mean, invstd)
    with pytest.raises(ValueError, match="ReluMask"):
        fbb(dy, x, bnfast.relu_mask(x[:1]), None, mean, invstd)
    with pytest.raises(ValueError, match="output_mask"):
        fbb(dy, x, x, None, mean, invstd, output_mask=(True, True, True))
    good = bnfast.relu_mask(x)
    for bad in (bnfast.ReluMask(good.bits[:-1], x.shape, good.layout),
                bnfast.ReluMask(good.bits.astype(np.int64), x.shape, good.layout),
                bnfast.ReluMask(good.bits, x.shape, "nchw")):
        with pytest.raises(ValueError, match="malformed"):
            fbb(dy, x, bad, None, mean, invstd)


# -- modules ------------------------------------------------------------------------------
MODULES = [(bnfast.BatchNorm1d, (16, 4)), (bnfast.BatchNorm1d, (8, 4, 5)),
           (bnfast.BatchNorm2d, (4, 4, 5, 6)), (bnfast.BatchNorm3d, (2, 4, 3, 4, 5))]


def _torch_module(torch, cls, m):
    tm = getattr(torch.nn, cls.__name__.replace("Fused", ""))(
        m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats, dtype=getattr(torch, m.dtype.name))
    if m.affine and m.bias is None:
        tm.bias = None
    state = {k: torch.tensor(np.array(v)) for k, v in m.state_dict().items()}
    tm.load_state_dict(state, strict=False)
    return tm


@pytest.mark.parametrize("cls,shape", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-running-stats"])
@pytest.mark.parametrize("affine", ["affine", "no-affine", "no-bias"])
def test_module_backward_matches_torch(torch, dtype, rng, cls, shape, mode, affine):
    m = cls(shape[1], affine=affine != "no-affine", bias=affine != "no-bias",
            track_running_stats=mode != "eval-no-running-stats", dtype=dtype)
    if m.affine:
        w, b = make_params(rng, shape[1], dtype)
        m.weight[...] = w
        if m.bias is not None:
            m.bias[...] = b
    if m.track_running_stats:
        m.running_mean[...], m.running_var[...] = make_running(rng, shape[1], dtype)
    tm = _torch_module(torch, cls, m)
    if mode != "train":
        m.eval()
        tm.eval()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    m(x)
    gx = m.backward(dy)
    tx = torch.tensor(x, requires_grad=True)
    tm(tx).backward(torch.tensor(dy))
    tw = None if tm.weight is None else tm.weight.grad.numpy()
    tb = None if tm.bias is None else tm.bias.grad.numpy()
    assert_grads((gx, m.weight_grad, m.bias_grad), (tx.grad.numpy(), tw, tb),
                 TORCH_TOL[dtype], _scales(x, dy, m.weight, _mean_of(m, x), _invstd_of(m, x)))
    assert gx.dtype == dtype
    for g in (m.weight_grad, m.bias_grad):
        assert g is None or (g.dtype == dtype and g.shape == (shape[1],))


def _mean_of(m, x):
    if m.training or m.running_mean is None:
        return x.astype(np.float64).mean(axis=_reduce_axes(x))
    return m.running_mean.astype(np.float64)


def _invstd_of(m, x):
    if m.training or m.running_var is None:
        return 1.0 / np.sqrt(np.var(x.astype(np.float64), axis=_reduce_axes(x)) + m.eps)
    return 1.0 / np.sqrt(m.running_var.astype(np.float64) + m.eps)


def test_module_gradients_accumulate_and_zero_grad(rng):
    m = bnfast.BatchNorm2d(3, dtype=np.float64)
    m.weight[...] = [0.5, 1.5, 2.0]
    x1, x2 = make_input(rng, (4, 3, 5, 5), np.float64), make_input(rng, (2, 3, 5, 5), np.float64)
    d1, d2 = rng.standard_normal(x1.shape), rng.standard_normal(x2.shape)
    assert m.weight_grad is None and m.bias_grad is None
    m(x1)
    m.backward(d1)
    first_w, first_b = m.weight_grad.copy(), m.bias_grad.copy()
    m(x2)
    m.backward(d2)
    _, mean2, invstd2 = bnfast.batch_norm(x2, None, None, m.weight, training=True,
                                          return_stats=True)
    _, gw2, gb2 = bnfast.batch_norm_backward(d2, x2, m.weight, mean2, invstd2)
    np.testing.assert_allclose(m.weight_grad, first_w + gw2, rtol=1e-14)
    np.testing.assert_allclose(m.bias_grad, first_b + gb2, rtol=1e-14)
    grad = m.weight_grad
    m.zero_grad(set_to_none=False)
    assert m.weight_grad is grad  # zeroed in place, like torch's zero_grad(set_to_none=False)
    np.testing.assert_array_equal(m.weight_grad, 0)
    np.testing.assert_array_equal(m.bias_grad, 0)
    m.zero_grad()
    assert m.weight_grad is None and m.bias_grad is None


def test_module_backward_without_forward_raises():
    m = bnfast.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="forward"):
        m.backward(np.ones((4, 3), np.float32))


def test_module_backward_twice_needs_retain_graph(rng):
    m = bnfast.BatchNorm1d(3, dtype=np.float64)
    x = make_input(rng, (6, 3), np.float64)
    dy = rng.standard_normal(x.shape)
    m(x)
    g1 = m.backward(dy, retain_graph=True)
    g2 = m.backward(dy)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_allclose(m.bias_grad, 2 * dy.sum(axis=0), rtol=1e-14)
    with pytest.raises(RuntimeError, match="already"):
        m.backward(dy)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_module_backward_out_over_a_retained_input_raises(rng, fused):
    # The saved input is the forward's own array: a grad_input written over it would be
    # read back by the retained graph's next backward (silently wrong, 7.7 off).
    m = (bnfast.FusedBatchNorm1d if fused else bnfast.BatchNorm1d)(3, dtype=np.float64)
    x = make_input(rng, (6, 3, 4), np.float64)
    dy = rng.standard_normal(x.shape)
    m(x, np.zeros_like(x)) if fused else m(x)
    expected = m.backward(dy, retain_graph=True)
    for out in (x, x[:, :, ::-1]):
        with pytest.raises(ValueError, match="retain_graph=True keeps for another backward"):
            m.backward(dy, out=out, retain_graph=True)
    got = m.backward(dy, out=x)  # the last backward may write over it
    assert (got[0] if fused else got) is x
    np.testing.assert_array_equal(x, expected[0] if fused else expected)


def test_module_under_no_grad_saves_nothing(rng):
    m = bnfast.FusedBatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (2, 3, 4, 4), np.float64)
    with bnfast.no_grad():
        y = m(x)
        assert not bnfast.backward.is_grad_enabled()
    assert bnfast.backward.is_grad_enabled()
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None  # the input is not kept alive
    with pytest.raises(RuntimeError, match="no_grad"):
        m.backward(np.ones_like(y))


def test_module_in_place_forward_cannot_backward(rng):
    m = bnfast.BatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (2, 3, 4, 4), np.float64)
    m(x, out=x)
    with pytest.raises(RuntimeError, match="out=input"):
        m.backward(np.ones_like(x))


def test_module_backward_validates_grad_output_and_out(rng):
    """A module's backward checks what its caller passes (grad_output, out); a call
    that raises keeps what the forward saved."""
    m = bnfast.BatchNorm2d(3)
    x = make_input(rng, (4, 3, 5, 5), np.float32)
    y = m(x)
    with pytest.raises(ValueError, match="grad_output"):
        m.backward(np.ones((4, 3, 5, 4), np.float32))
    with pytest.raises(TypeError, match="grad_output"):
        m.backward(np.ones_like(y, dtype=np.float64))
    with pytest.raises(TypeError, match="out"):
        m.backward(np.ones_like(y), out=np.empty_like(y, dtype=np.float64))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty_like(y)
        ro.flags.writeable = False
        m.backward(np.ones_like(y), out=ro)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    gx = m.backward(dy)
    _, mean, invstd = bnfast.batch_norm(x, None, None, training=True, return_stats=True)
    expected = bnfast.batch_norm_backward(dy, x, m.weight, mean, invstd)
    np.testing.assert_array_equal(gx, expected[0])
    np.testing.assert_array_equal(m.weight_grad, expected[1])
    np.testing.assert_array_equal(m.bias_grad, expected[2])


def test_module_backward_out(rng):
    m = bnfast.FusedBatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (2, 3, 4, 4), np.float64)
    dy = rng.standard_normal(x.shape)
    m(x, np.zeros_like(x))
    expected, ga = m.backward(dy, retain_graph=True)
    out = np.empty_like(x)
    got, ga2 = m.backward(dy, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(ga2, ga)


def test_module_uses_forward_time_weight(rng):
    m = bnfast.BatchNorm1d(3, dtype=np.float64)
    m.weight[...] = [1.0, 2.0, 3.0]
    x = make_input(rng, (6, 3), np.float64)
    dy = rng.standard_normal(x.shape)
    m(x)
    w = m.weight.copy()
    m.weight *= 10  # e.g. an optimizer step between forward and backward
    gx = m.backward(dy)
    _, mean, invstd = bnfast.batch_norm(x, None, None, w, training=True, return_stats=True)
    np.testing.assert_allclose(gx, bnfast.batch_norm_backward(dy, x, w, mean, invstd)[0],
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("cls,shape", [(bnfast.FusedBatchNorm1d, (16, 4)),
                                       (bnfast.FusedBatchNorm2d, (4, 4, 5, 6)),
                                       (bnfast.FusedBatchNorm3d, (2, 4, 3, 4, 5))],
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no-addend"])
def test_fused_module_backward_matches_torch(torch, dtype, rng, cls, shape, mode, with_addend):
    m = cls(shape[1], dtype=dtype)
    w, b = make_params(rng, shape[1], dtype)
    m.weight[...], m.bias[...] = w, b
    m.running_mean[...], m.running_var[...] = make_running(rng, shape[1], dtype)
    running = (m.running_mean.copy(), m.running_var.copy())
    if mode == "eval":
        m.eval()
    x = make_input(rng, shape, dtype)
    if len(shape) > 2:
        x = channels_last(x)
    a = rng.standard_normal(shape).astype(dtype) if with_addend else None
    dy = rng.standard_normal(shape).astype(dtype)
    y = m(x, a)
    gx, ga = m.backward(dy)
    ref = _torch_grads(torch, x, dy, w, b, mode == "train", running, a, relu=True)
    scales = _scales(x, dy, w, _mean_of(m, x), _invstd_of(m, x))
    assert_grads((gx, m.weight_grad, m.bias_grad, ga), ref, TORCH_TOL[dtype], scales)
    if not with_addend:
        assert ga is None
    if len(shape) > 2:
        assert is_channels_last(gx)
    # The ReLU mask is kept packed, not as the output: the output can be freed.
    ref_y = weakref.ref(y)
    del y
    gc.collect()
    assert ref_y() is None


def test_fused_module_keeps_mask_compact(rng):
    m = bnfast.FusedBatchNorm2d(8)
    x = make_input(rng, (4, 8, 16, 16), np.float32)
    m(x)
    saved = [v for v in vars(m).values() if isinstance(v, np.ndarray)]
    assert all(v.nbytes < x.nbytes // 8 for v in saved if v is not x)
    mask = m._saved.relu_mask
    assert mask.nbytes == x.size // 8


def test_fused_module_in_place_on_addend_still_backward(rng):
    m = bnfast.FusedBatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (2, 3, 4, 4), np.float64)
    a = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    y_ref = m(x, a.copy())
    gx_ref, ga_ref = m.backward(dy)
    m.zero_grad()
    y = m(x, a, out=a)
    assert y is a
    np.testing.assert_array_equal(y, y_ref)
    gx, ga = m.backward(dy)
    np.testing.assert_array_equal(gx, gx_ref)
    np.testing.assert_array_equal(ga, ga_ref)


# -- out= and streaming stores ---------------------------------------------------------------
def _keep_layout_copy(a):
    return np.copy(a, order="K")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_out_direct_in_place_and_overlapping(dtype, rng, layout):
    shape = (4, 3, 8, 8)
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = with_layout(rng.standard_normal(shape).astype(dtype), layout)
    w, _ = make_params(rng, 3, dtype)
    _, mean, invstd = _forward(x, True, w)
    expected = bnfast.batch_norm_backward(dy, x, w, mean, invstd)[0]

    out = np.empty_like(x)
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd, out=out)[0]
    assert got is out
    np.testing.assert_array_equal(out, expected)
    # In place on grad_output, and on input.
    d2 = _keep_layout_copy(dy)
    assert bnfast.batch_norm_backward(d2, x, w, mean, invstd, out=d2)[0] is d2
    np.testing.assert_array_equal(d2, expected)
    x2 = _keep_layout_copy(x)
    bnfast.batch_norm_backward(dy, x2, w, mean, invstd, out=x2)
    np.testing.assert_array_equal(x2, expected)
    # out in the other layout, and out overlapping grad_output partially.
    other = np.empty(shape, dtype) if layout == "channels_last" else channels_last(
        np.empty(shape, dtype))
    bnfast.batch_norm_backward(dy, x, w, mean, invstd, out=other)
    np.testing.assert_array_equal(other, expected)
    big = np.zeros(x.size + 1, dtype)
    d3 = big[:-1].reshape(shape)
    d3[...] = dy
    shifted = big[1:].reshape(shape)
    bnfast.batch_norm_backward(d3, x, w, mean, invstd, out=shifted)
    np.testing.assert_array_equal(shifted, expected)


def test_out_validation(rng):
    x = make_input(rng, (4, 3, 5), np.float32)
    mean, invstd = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match="out"):
        bnfast.batch_norm_backward(x, x, None, mean, invstd, out=np.empty(x.shape))
    with pytest.raises(ValueError, match="out"):
        bnfast.batch_norm_backward(x, x, None, mean, invstd, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="out"):
        bnfast.batch_norm_backward(x, x, None, mean, invstd, out=[0.0])
    ro = np.empty_like(x)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        bnfast.batch_norm_backward(x, x, None, mean, invstd, out=ro)
    both = np.empty_like(x)
    with pytest.raises(ValueError, match="share memory"):
        bnfast.fused_batch_norm_backward(x, x, x, None, mean, invstd, out=both, addend_out=both)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_addend_out_may_be_grad_output(dtype, rng, training):
    shape = (4, 3, 6, 6)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    a = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = _forward(x, training, addend=a, relu=True)
    expected = bnfast.fused_batch_norm_backward(dy, x, y, None, mean, invstd, training)
    d2, x2 = dy.copy(), x.copy()
    got = bnfast.fused_batch_norm_backward(d2, x, y, None, mean, invstd, training,
                                           addend_out=d2)
    assert got[3] is d2
    # addend_out on the input: x is still needed by pass 2, so a temporary is used.
    got2 = bnfast.fused_batch_norm_backward(dy, x2, y, None, mean, invstd, training,
                                            addend_out=x2)
    out = np.empty_like(x)
    got3 = bnfast.fused_batch_norm_backward(dy, x, y, None, mean, invstd, training, out=out)
    assert got3[0] is out
    for g in (got, got2, got3):
        for u, v in zip(g, expected):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("shape,layout", [((4, 8, 16, 16), "contiguous"),
                                          ((4, 8, 7, 7), "contiguous"),
                                          ((4, 3, 16, 16), "channels_last"),
                                          ((4, 64, 5, 5), "channels_last"),
                                          ((300, 1000), "contiguous"),
                                          ((300, 6), "contiguous")], ids=str)
def test_streaming_stores_give_the_same_bits(dtype, rng, shape, layout, monkeypatch):
    x = with_layout(make_input(rng, shape, dtype), layout)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = make_params(rng, shape[1], dtype)
    y, mean, invstd = _forward(x, True, w, b, relu=True)

    def run(training):
        return (bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
                + bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, training))

    monkeypatch.setattr(bnfast.backward, "STREAM_BYTES", 1 << 62)
    cached = run(True) + run(False)
    monkeypatch.setattr(bnfast.backward, "STREAM_BYTES", 0)
    streamed = run(True) + run(False)
    for u, v in zip(cached, streamed):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dtype, offset", [(np.float32, 2), (np.float16, 1),
                                           (ml_dtypes.bfloat16, 1), (np.float32, 52),
                                           (np.float16, 6), (ml_dtypes.bfloat16, 18)],
                         ids=["float32", "float16", "bfloat16", "float32-element-aligned",
                              "float16-element-aligned", "bfloat16-element-aligned"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_out_of_a_streamed_size_gets_the_aligned_bits(rng, dtype, offset, layout):
    # 4.8 MB of 7x7 images: grad_input this large streams, from any element-aligned
    # start (the flat leaves reach the 64-byte line first); out= (and addend_out=)
    # views off their itemsize take plain stores.
    shape = (24 if np.dtype(dtype).itemsize == 4 else 48, 1024, 7, 7)
    x, dy = make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype)
    x, dy = with_layout(x, layout), with_layout(dy, layout)
    C = shape[1]
    pdtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    w = rng.uniform(0.5, 1.5, C).astype(pdtype)
    y, mean, invstd = bnfast.batch_norm(x, np.zeros(C, pdtype), np.ones(C, pdtype), w, None,
                                        training=True, relu=True, return_stats=True)
    def empty():
        if layout == "contiguous":
            return misaligned_empty(shape, dtype, offset)
        return np.moveaxis(misaligned_empty((shape[0], *shape[2:], shape[1]), dtype, offset),
                           -1, 1)

    out = empty()
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd, True, out=out)
    assert got[0] is out
    assert_same(out, bnfast.batch_norm_backward(dy, x, w, mean, invstd, True)[0])
    # The fused backward's masked dx and the addend's gradient, both misaligned.
    addend_out = empty()
    got = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, True, out=out,
                                           addend_out=addend_out)
    expected = bnfast.fused_batch_norm_backward(dy, x, y, w, mean, invstd, True)
    assert got[0] is out and got[3] is addend_out
    assert_same(out, expected[0])
    assert_same(addend_out, expected[3])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_parameter_gradients_in_torchs_dtype(rng, torch, fused):
    # native_batch_norm_backward: the weight's dtype, or without a weight the input's.
    import ml_dtypes
    to_torch = {np.dtype(np.float16): torch.float16, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
                np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
    cases = [(np.float16, np.float16), (np.float16, np.float32), (np.float16, None),
             (ml_dtypes.bfloat16, ml_dtypes.bfloat16), (ml_dtypes.bfloat16, None),
             (np.float32, np.float32), (np.float32, None), (np.float64, None)]
    for xdt, wdt in cases:
        x = make_input(rng, (4, 3, 5), np.float32).astype(xdt)
        w = None if wdt is None else np.full(3, 1.5, wdt)
        y, mean, invstd = bnfast.batch_norm(x, None, None, w, training=True, return_stats=True)
        if fused:
            got = bnfast.fused_batch_norm_backward(x, x, y, w, mean, invstd)[1:3]
        else:
            got = bnfast.batch_norm_backward(x, x, w, mean, invstd)[1:]
        tx = torch.from_numpy(x.astype(np.float32)).to(to_torch[np.dtype(xdt)])
        tw = None if w is None else torch.from_numpy(w.astype(np.float32)).to(
            to_torch[np.dtype(wdt)])
        _, tm, ti = torch.ops.aten.native_batch_norm(tx, tw, None, None, None, True, 0.1, 1e-5)
        want = torch.ops.aten.native_batch_norm_backward(tx, tx, tw, None, None, tm, ti, True,
                                                         1e-5, [True, True, True])[1:]
        assert [to_torch[g.dtype] for g in got] == [t.dtype for t in want], (xdt, wdt)
