"""Memory layouts: channels-last in place, other strides copied, outputs keep the layout.

Also the hypothesis property test over shapes x layouts against the reference.
"""
import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfast
from conftest import (
    LAYOUT_ULPS,
    STAT_TOL,
    assert_close,
    assert_same,
    assert_within_ulps,
    channels_last,
    is_channels_last,
    make_input,
    make_params,
    make_running,
    reference_batch_norm,
    with_layout,
)

# Shapes for channels-last: 1d (N, C, L) stored as NLC, 2d NHWC, 3d NDHWC; small C,
# C=1, C just above the kernels' 64-value row width, row counts that do not
# fill a widened row, and a few multi-block sizes.
CL_SHAPES = [
    (4, 3, 7), (2, 1, 33), (3, 70, 5), (16, 5, 129),
    (2, 3, 5, 7), (4, 1, 6, 6), (3, 13, 3, 5), (2, 70, 3, 3), (8, 3, 64, 64), (2, 64, 17, 17),
    (2, 3, 2, 3, 4), (1, 1, 4, 4, 4), (2, 6, 3, 5, 7), (2, 3, 16, 32, 32),
]


@pytest.mark.parametrize("shape", CL_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_matches_contiguous(dtype, rng, shape, training):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    xl = channels_last(x)
    weight, bias = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    rm_l, rv_l = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=training)

    y = bnfast.batch_norm(x, rm, rv, weight, bias, training=training)
    yl = bnfast.batch_norm(xl, rm_l, rv_l, weight, bias, training=training)

    assert is_channels_last(yl) and yl.shape == shape and yl.dtype == dtype
    assert y.flags.c_contiguous
    assert_within_ulps(yl, y, LAYOUT_ULPS[dtype])
    assert_close(yl, ref.out, dtype)
    if dtype == np.float32:  # rounded once from double statistics
        np.testing.assert_array_equal(rm_l, rm)
        np.testing.assert_array_equal(rv_l, rv)
    else:
        np.testing.assert_allclose(rm_l, rm, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(rv_l, rv, rtol=1e-14)
    assert_close(rm_l, ref.running_mean, dtype, STAT_TOL)
    assert_close(rv_l, ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (4, 3, 9)),
                                       (bnfast.BatchNorm2d, (2, 3, 4, 5)),
                                       (bnfast.BatchNorm3d, (2, 3, 2, 3, 4))], ids=str)
def test_channels_last_modules(dtype, rng, cls, shape):
    x = make_input(rng, shape, dtype)
    a, b = cls(3, dtype=dtype), cls(3, dtype=dtype)
    for training in (True, True, False):
        a.train(training)
        b.train(training)
        y = a(x)
        yl = b(channels_last(x))
        assert is_channels_last(yl)
        assert_within_ulps(yl, y, LAYOUT_ULPS[dtype])
    assert_close(b.running_mean, a.running_mean, dtype, STAT_TOL)
    assert int(b.num_batches_tracked) == 2


def test_nlc_viewed_as_ncl(dtype, rng):
    # The 1d channels-last case as users write it: (N, L, C) data, transposed.
    nlc = make_input(rng, (5, 11, 4), dtype)
    ncl = nlc.transpose(0, 2, 1)
    y = bnfast.BatchNorm1d(4, dtype=dtype)(ncl)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    assert_close(y, reference_batch_norm(ncl, training=True).out, dtype)


@pytest.mark.parametrize("shape", [(4, 3, 7), (2, 3, 5, 7), (2, 3, 2, 3, 4), (4, 1, 6, 6)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_in_place_without_copy(dtype, rng, shape, training):
    x = make_input(rng, shape, dtype)
    rm, rv = make_running(rng, shape[1], dtype)
    ref = reference_batch_norm(x, rm, rv, training=training)
    xl = channels_last(x)
    y = bnfast.batch_norm(xl, rm, rv, training=training, out=xl)
    assert y is xl and np.shares_memory(y, xl) and is_channels_last(xl)
    assert_close(xl, ref.out, dtype)


def _peak_allocation(func):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        func()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_common_layouts_allocate_no_copy(rng, layout):
    # NumPy reports its data buffers to tracemalloc: in place on a 2 MB input,
    # bnfast may allocate (C,) vectors and scratch, never a copy of x.
    x = with_layout(make_input(rng, (8, 4, 128, 128), np.float32), layout)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    peak = _peak_allocation(lambda: bnfast.batch_norm(x, rm, rv, training=True, out=x))
    assert peak < x.nbytes // 8
    peak = _peak_allocation(lambda: bnfast.batch_norm(x, rm, rv, training=False, out=x))
    assert peak < x.nbytes // 8


def test_strided_input_is_copied_once(rng):
    # The same measurement sees the documented copy for an arbitrary stride pattern.
    x = with_layout(make_input(rng, (8, 4, 128, 128), np.float32), "strided")
    peak = _peak_allocation(lambda: bnfast.batch_norm(x, None, None, training=True, out=x))
    assert x.nbytes <= peak < 3 * x.nbytes


def _strided_views(x):
    yield "every-other-W", np.ascontiguousarray(np.repeat(x, 2, axis=-1))[..., ::2]
    yield "every-other-N", np.repeat(x, 2, axis=0)[::2]
    yield "negative-W", np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    yield "swapped-HW", np.ascontiguousarray(x.swapaxes(-1, -2)).swapaxes(-1, -2)
    yield "fortran", np.asfortranarray(x)
    yield "channel-slice", np.repeat(x, 2, axis=1)[:, ::2]
    yield "cl-batch-slice", channels_last(np.repeat(x, 2, axis=0))[::2]


@pytest.mark.parametrize("shape", [(4, 3, 6), (3, 3, 4, 6), (2, 3, 2, 4, 6)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_input(dtype, rng, shape, training):
    x = make_input(rng, shape, dtype)
    weight, bias = make_params(rng, shape[1], dtype)
    rm0, rv0 = make_running(rng, shape[1], dtype)
    ref = reference_batch_norm(x, rm0, rv0, weight, bias, training=training)
    for name, view in _strided_views(x):
        np.testing.assert_array_equal(view, x)
        rm, rv = rm0.copy(), rv0.copy()
        before = view.copy()
        y = bnfast.batch_norm(view, rm, rv, weight, bias, training=training)
        assert y.shape == shape and y.dtype == dtype, name
        assert y.flags.c_contiguous or is_channels_last(y), name
        assert not np.shares_memory(y, view), name
        np.testing.assert_array_equal(view, before, err_msg=name)
        assert_close(y, ref.out, dtype)
        assert_close(rm, ref.running_mean, dtype, STAT_TOL)
        assert_close(rv, ref.running_var, dtype, STAT_TOL)


def test_non_contiguous_in_place(dtype, rng):
    # out=view of a strided input: the result lands in the view, the gaps are untouched.
    big = make_input(rng, (3, 4, 5, 12), dtype)
    view = big[..., ::2]
    gaps = big[..., 1::2].copy()
    ref = reference_batch_norm(view, training=True)
    assert bnfast.batch_norm(view, None, None, training=True, out=view) is view
    assert_close(view, ref.out, dtype)
    np.testing.assert_array_equal(big[..., 1::2], gaps)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fortran_2d_input_keeps_order(dtype, rng, training):
    x = make_input(rng, (37, 5), dtype)
    xf = np.asfortranarray(x)
    rm, rv = make_running(rng, 5, dtype)
    rm_c, rv_c = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, training=training)
    y = bnfast.batch_norm(xf, rm, rv, training=training)
    yc = bnfast.batch_norm(x, rm_c, rv_c, training=training)
    assert y.flags.f_contiguous and yc.flags.c_contiguous
    assert_close(y, ref.out, dtype)
    assert_within_ulps(y, yc, LAYOUT_ULPS[dtype])
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    # In place on the Fortran array.
    assert bnfast.batch_norm(xf, rm, rv, training=False, out=xf) is xf
    assert xf.flags.f_contiguous


@pytest.mark.parametrize("shape", [(6, 3, 1), (4, 3, 1, 1), (5, 2, 1, 1, 1)], ids=str)
def test_singleton_spatial_dims(dtype, rng, shape):
    # S == 1: contiguous and channels-last coincide.
    x = make_input(rng, shape, dtype)
    ref = reference_batch_norm(x, training=True)
    y = bnfast.batch_norm(x, None, None, training=True)
    assert_close(y, ref.out, dtype)
    assert y.flags.c_contiguous
    assert_close(bnfast.batch_norm(x.reshape(shape[:2]), None, None, training=True),
                 ref.out.reshape(shape[:2]), dtype)


@pytest.mark.parametrize("x_layout,other_layout", [("channels_last", "contiguous"),
                                                   ("contiguous", "channels_last"),
                                                   ("channels_last", "strided"),
                                                   ("strided", "channels_last")])
def test_addend_and_out_in_other_layouts(dtype, rng, x_layout, other_layout):
    x = make_input(rng, (3, 4, 5, 6), dtype)
    addend = make_input(rng, x.shape, dtype, loc=0.0, scale=1.0)
    ref = reference_batch_norm(x, training=True, addend=addend, relu=True)
    xl = with_layout(x, x_layout)
    al = with_layout(addend, other_layout)
    y = bnfast.batch_norm(xl, None, None, training=True, addend=al, relu=True)
    assert_close(y, ref.out, dtype)
    out = with_layout(np.zeros_like(x), other_layout)
    assert bnfast.batch_norm(xl, None, None, training=True, addend=al, relu=True, out=out) is out
    assert_close(out, ref.out, dtype)
    np.testing.assert_array_equal(al, addend)


# -- property test ---------------------------------------------------------------------
@st.composite
def _cases(draw):
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 7))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    shape = (n, c) + spatial
    layouts = ["contiguous", "channels_last", "strided"] + (["fortran"] if not spatial else [])
    return dict(
        shape=shape,
        layout=draw(st.sampled_from(layouts)),
        addend_layout=draw(st.sampled_from(layouts)),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        training=draw(st.booleans()),
        affine=draw(st.booleans()),
        addend=draw(st.booleans()),
        relu=draw(st.booleans()),
        out=draw(st.sampled_from(["new", "input", "addend"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    C = shape[1]
    x = make_input(rng, shape, dtype)
    weight, bias = make_params(rng, C, dtype) if case["affine"] else (None, None)
    rm, rv = make_running(rng, C, dtype)
    addend = make_input(rng, shape, dtype, 0.0, 1.0) if case["addend"] else None
    xv = with_layout(x, case["layout"])
    av = None if addend is None else with_layout(addend, case["addend_layout"])
    out = {"new": None, "input": xv, "addend": av}[case["out"]]
    kwargs = dict(training=case["training"], addend=av, relu=case["relu"], out=out)
    if case["training"] and math.prod(shape) // C == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bnfast.batch_norm(xv, rm, rv, weight, bias, **kwargs)
        return
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=case["training"],
                               addend=addend, relu=case["relu"])
    y = bnfast.batch_norm(xv, rm, rv, weight, bias, **kwargs)
    assert y.shape == shape and y.dtype == dtype
    if out is not None:
        assert y is out
    elif case["layout"] == "channels_last":
        assert is_channels_last(y)
    assert_close(y, ref.out, dtype)
    assert_close(rm, ref.running_mean, dtype, STAT_TOL)
    assert_close(rv, ref.running_var, dtype, STAT_TOL)


# =====================================================================================
# Behaviour once held by the "fast path equals general path" suites (issue 9, part 4).
# =====================================================================================
EVAL_LAYOUT_SHAPES = [(2, 3, 5, 7), (3, 70, 5), (2, 64, 17, 17), (2, 6, 3, 5, 7), (6, 70),
                      (16, 8)]


@pytest.mark.parametrize("shape", EVAL_LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "fortran"])
def test_eval_is_bit_identical_across_layouts(dtype, rng, shape, layout):
    # Evaluation is elementwise with per-channel coefficients: the memory layout of the
    # input (and of addend and out) cannot change a bit of the result.
    if layout == "fortran" and len(shape) != 2:
        return
    C = shape[1]
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    xl, al = with_layout(x, layout), with_layout(addend, layout)
    for kwargs in (dict(), dict(relu=True), dict(addend=addend, relu=True)):
        expected = bnfast.batch_norm(x, rm, rv, w, b, **kwargs)
        if "addend" in kwargs:
            kwargs = dict(kwargs, addend=al)
        y = bnfast.batch_norm(xl, rm, rv, w, b, **kwargs)
        assert_same(np.ascontiguousarray(y), expected)
        if layout == "channels_last" and len(shape) > 2:
            assert is_channels_last(y)
    assert_close(expected, reference_batch_norm(x, rm, rv, w, b, addend=addend, relu=True).out,
                 dtype)
    # A module in eval, the same.
    m = {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d,
         5: bnfast.BatchNorm3d}[len(shape)](C, dtype=dtype).eval()
    m.weight[...], m.bias[...], m.running_mean[...], m.running_var[...] = w, b, rm, rv
    assert_same(np.ascontiguousarray(m(xl)), m(x))


# Channels-last rows of C <= 128 channels (a multiple of 16) take the coefficients
# from registers on AVX-512 (src/bnfast_rows.h), other rows from the table;
# (4, 64, 128, 128) is large enough for streaming stores.  NaN (with
# payloads), infinities in the values, the addend and the coefficients: every
# epilogue must give the channels-first leaf's bits.
REGISTER_ROW_SHAPES = [(5, 16, 3, 3), (3, 48, 4, 5), (2, 128, 3, 5), (37, 32), (4, 144, 3, 3),
                       (4, 64, 128, 128)]


def _nan(payload):
    return np.array([0x7FC00000 | payload], np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("shape", REGISTER_ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_channels_last_rows_give_channels_first_bits(rng, shape, dtype):
    C = shape[1]
    x = make_input(rng, shape, np.float32)
    addend = make_input(rng, shape, np.float32, loc=0.0, scale=1.0)
    xs, adds = x.reshape(-1), addend.reshape(-1)
    xs[::97], xs[5::89], xs[7::83] = _nan(1 << 16), np.inf, -np.inf
    adds[3::61], adds[::97] = _nan(2 << 16), _nan(3 << 16)  # the second where x is NaN too
    x, addend = x.astype(dtype), addend.astype(dtype)  # payloads in the bits halves keep
    w, b = make_params(rng, C, np.float32)
    rm, rv = make_running(rng, C, np.float32)
    rm[1], w[2], b[3] = _nan(4 << 16), np.inf, _nan(5 << 16)
    b[5], rm[5] = _nan(6 << 16), _nan(7 << 16)
    # (Half data takes float32 parameters: the float rows; float64 keeps the table.)
    xl, al = with_layout(x, "channels_last"), with_layout(addend, "channels_last")
    # The channels-first side: (N, C) rows are channels-last, their Fortran order is not.
    xf, af = (x, addend) if x.ndim > 2 else (np.asfortranarray(x), np.asfortranarray(addend))
    bits = np.uint32 if dtype == np.float32 else np.uint16
    for with_addend, relu in [(False, False), (False, True), (True, False), (True, True)]:
        expected = bnfast.batch_norm(xf, rm, rv, w, b, addend=af if with_addend else None,
                                     relu=relu)
        y = bnfast.batch_norm(xl, rm, rv, w, b, addend=al if with_addend else None, relu=relu)
        assert is_channels_last(y) or y.ndim == 2
        np.testing.assert_array_equal(np.ascontiguousarray(y).view(bits),
                                      np.ascontiguousarray(expected).view(bits),
                                      err_msg=f"addend={with_addend}, relu={relu}")


@pytest.mark.parametrize("layout,shape", [("fortran", (16, 8)), ("fortran", (6, 70)),
                                          ("channels_last", (4, 3, 5, 5)),
                                          ("channels_last", (2, 70, 3, 3)),
                                          ("strided", (4, 3, 5, 5)), ("strided", (16, 8))],
                         ids=str)
def test_training_in_other_layouts_agrees_with_contiguous(dtype, rng, layout, shape):
    # The same values in other memory: within a few ulps of the C-contiguous call
    # (another summation order), and bit for bit where the input is copied to C order.
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm0, rv0 = make_running(rng, C, dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    lrm, lrv = rm0.copy(), rv0.copy()
    xl = with_layout(x, layout)
    ly, lmean, linvstd = bnfast.batch_norm(xl, lrm, lrv, w, b, training=True, return_stats=True)
    if layout == "strided":
        assert ly.flags.c_contiguous
        for actual, expected in ((ly, y), (lmean, mean), (linvstd, invstd), (lrm, rm),
                                 (lrv, rv)):
            assert_same(actual, expected)
    else:
        assert ly.strides == xl.strides
        assert_within_ulps(ly, y, LAYOUT_ULPS[dtype])
        stats_tol = {np.float32: dict(rtol=1e-10, atol=1e-12),
                     np.float64: dict(rtol=1e-10, atol=1e-12)}
        assert_close(lmean, mean, dtype, stats_tol)
        assert_close(linvstd, invstd, dtype, stats_tol)
        assert_close(lrm, rm, dtype, STAT_TOL)
        assert_close(lrv, rv, dtype, STAT_TOL)
    ref = reference_batch_norm(x, rm0, rv0, w, b, training=True)
    assert_close(ly, ref.out, dtype)
    assert_close(lrm, ref.running_mean, dtype, STAT_TOL)


# -- outputs bnfast allocates start on a cache line ---------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("order", ["C", "F", "channels_last"])
def test_large_new_outputs_are_aligned_with_empty_like_strides(dtype, order):
    from bnfast._dtypes import resolve_dtype
    from bnfast._layout import ALIGNED_BYTES, empty_like_aligned

    dt = resolve_dtype(dtype)
    if order == "F":
        x = np.zeros((ALIGNED_BYTES // dt.itemsize // 64, 64), dt, order="F")
    else:
        x = np.zeros((ALIGNED_BYTES // (64 * 32 * 32 * dt.itemsize), 64, 32, 32), dt)
        if order == "channels_last":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = empty_like_aligned(x)
    reference = np.empty_like(x)
    assert (y.shape, y.strides, y.dtype) == (reference.shape, reference.strides, reference.dtype)
    assert y.ctypes.data % 64 == 0
    y[...] = 1  # the whole span is writable memory of its own
    assert not np.shares_memory(y, x)
    if x.ndim == 4:
        out = bnfast.batch_norm(x, None, None, training=True)
        assert out.ctypes.data % 64 == 0 and out.strides == x.strides


def test_outputs_into_interleaved_halves_of_one_buffer(dtype, rng):
    # DenseNet's pattern: a BatchNorm of one half of a concatenation along the channels
    # written into the other half.  The halves' address ranges interleave without a
    # shared element: no "wrote its output over it" error, no temporary.
    buf = make_input(rng, (4, 6, 5, 5), dtype)
    x, into = buf[:, :3], buf[:, 3:]
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    expected = bnfast.BatchNorm2d(3, dtype=dtype)(x.copy())
    assert m(x, out=into) is into
    assert_same(into, expected)
    g = make_input(rng, x.shape, dtype)
    gx = m.backward(g, retain_graph=True)
    reference = bnfast.BatchNorm2d(3, dtype=dtype)
    reference(x.copy())
    assert_same(gx, reference.backward(g.copy()))
    # grad_input into the input's neighbour while the graph is kept; out and addend_out
    # of the fused backward in the two halves of one buffer.
    grads = np.zeros((4, 6, 5, 5), dtype)
    assert_same(m.backward(g, out=grads[:, 3:]), gx)
    y, mean, invstd = bnfast.fused_batch_norm(x, None, None, addend=g, training=True,
                                              return_stats=True)
    expected = bnfast.fused_batch_norm_backward(g, x, y, None, mean, invstd)
    got = bnfast.fused_batch_norm_backward(g, x, y, None, mean, invstd, out=grads[:, :3],
                                           addend_out=grads[:, 3:])
    assert got[0] is not None and np.shares_memory(got[0], grads)
    assert_same(grads[:, :3], expected[0])
    assert_same(grads[:, 3:], expected[3])


def test_masked_arrays_are_refused(rng):
    # np.asarray drops the mask: masked values would enter the statistics unseen.
    x = make_input(rng, (4, 2, 3), np.float32)
    masked = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    with pytest.raises(TypeError, match="input is a masked array, whose mask bnfast would "
                                        "ignore"):
        bnfast.batch_norm(masked, None, None, training=True)
    with pytest.raises(TypeError, match="out is a masked array"):
        bnfast.batch_norm(x, None, None, training=True, out=masked)
    with pytest.raises(TypeError, match="addend is a masked array"):
        bnfast.fused_batch_norm(x, None, None, addend=masked, training=True)
    with pytest.raises(TypeError, match="weight is a masked array"):
        bnfast.batch_norm(x, None, None, np.ma.masked_array(np.ones(2, np.float32)),
                          training=True)
