"""The compiled entries bound once and run on addresses (``BoundForward``, ``BoundBackward``).

They are what ``bnfast.torch``'s plans call; the NumPy API calls ``forward`` and
``backward``.  Both share one body below the entry, so a bound call must give
the very bits of the array entry (the pointers, the table rows and the weight
wired as there) and, like it, the float64 reference's values.
"""
import ml_dtypes
import numpy as np
import pytest

from bnfast import _forward, _layout
from bnfast._backward import BoundBackward
from bnfast._backward import backward as array_backward
from bnfast.testing import reference_batch_norm, reference_batch_norm_backward
from conftest import with_layout

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16),
          np.dtype(ml_dtypes.bfloat16)]
# Output vs the float64 reference, relative to the output's scale (~3).
REF_TOL = {"float32": 1e-5, "float64": 1e-12, "float16": 4e-3, "bfloat16": 3e-2}
SHAPES = [((6, 5, 3, 4), "contiguous"), ((6, 5, 3, 4), "channels_last"), ((40, 24), "contiguous"),
          ((3, 7, 11), "contiguous")]


def _bits(a):
    """``a``'s bits, for bitwise equality (NaN == NaN, -0.0 != 0.0)."""
    return np.ascontiguousarray(a).view(np.uint8)


def _address(a):
    return 0 if a is None else a.ctypes.data


def _case(shape, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = with_layout((rng.standard_normal(shape) * 2 + 0.5).astype(dtype), layout)
    addend = with_layout(rng.standard_normal(shape).astype(dtype), layout)
    dy = with_layout(rng.standard_normal(shape).astype(dtype), layout)
    vectors = [(rng.random(C) - 0.5).astype(np.float32) for _ in range(3)]
    weight, bias, running_mean = vectors
    running_var = (rng.random(C) + 0.5).astype(np.float32)
    return x, addend, dy, weight, bias, running_mean, running_var


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_bound_forward_is_the_array_forward(dtype, shape, layout, training, fused):
    x, addend, _, weight, bias, running_mean, running_var = _case(shape, layout, dtype)
    kernel_layout = _layout.layout_of(x)
    if not fused:
        addend = None
    results = []
    for bound in (False, True):
        rm, rv = running_mean.copy(), running_var.copy()
        out = np.empty_like(x)
        bits = np.zeros((x.size + 7) // 8, np.uint8) if fused else None
        if bound:
            call = _forward.BoundForward(x, kernel_layout, rm, rv, weight, bias, training, 1e-5,
                                         fused, _forward.CoefficientCache())
            saved = call.run(_address(x), _address(addend), _address(out), 0.1, 2, True,
                             _address(bits))
            assert saved.channels == shape[1]
            coef = saved.table()
        else:
            coef = np.empty((4, shape[1]))
            _forward.forward(x, kernel_layout, rm, rv, weight, bias, training, 0.1, 1e-5, addend,
                             fused, out, 2, coef, bits, _forward.CoefficientCache())
        results.append((out, coef, bits, rm, rv))
    for mine, array_entry in zip(*results):
        if array_entry is not None:
            np.testing.assert_array_equal(_bits(mine), _bits(array_entry))
    # and the reference's values
    expected = reference_batch_norm(
        x.astype(np.float64), running_mean, running_var, weight, bias, training=training,
        eps=1e-5, addend=None if addend is None else addend.astype(np.float64), relu=fused).out
    out = results[1][0].astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=0, atol=REF_TOL[dtype.name] * 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bound_forward_functional_form(dtype, shape, layout, training):
    # torch.ops.bnfast's road: the table written where the caller says, the running
    # update written into copies of the buffers, the bound buffers left as they were.
    x, _, _, weight, bias, running_mean, running_var = _case(shape, layout, dtype)
    kernel_layout = _layout.layout_of(x)
    rm, rv = running_mean.copy(), running_var.copy()
    call = _forward.BoundForward(x, kernel_layout, rm, rv, weight, bias, training, 1e-5, False,
                                 _forward.CoefficientCache())
    out, table = np.empty_like(x), np.full((4, shape[1]), np.nan)
    new_mean, new_var = rm.copy(), rv.copy()
    assert call.run(_address(x), 0, _address(out), 0.1, 2, True, 0, table=_address(table),
                    update_mean=_address(new_mean), update_var=_address(new_var)) is None
    np.testing.assert_array_equal(_bits(rm), _bits(running_mean))
    np.testing.assert_array_equal(_bits(rv), _bits(running_var))
    # ... and the same bits as the in-place form
    out_in_place = np.empty_like(x)
    saved = call.run(_address(x), 0, _address(out_in_place), 0.1, 2, True, 0)
    np.testing.assert_array_equal(_bits(out), _bits(out_in_place))
    np.testing.assert_array_equal(_bits(table), _bits(saved.table()))
    np.testing.assert_array_equal(_bits(new_mean), _bits(rm))
    np.testing.assert_array_equal(_bits(new_var), _bits(rv))
    if training:  # torch's update: unbiased variance, momentum 0.1
        n = x.size // shape[1]
        axes = (0,) + tuple(range(2, x.ndim))
        x64 = x.astype(np.float64)
        # (float32 buffers: one rounding of terms of order 1)
        np.testing.assert_allclose(new_mean, 0.9 * running_mean + 0.1 * x64.mean(axis=axes),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            new_var, 0.9 * running_var + 0.1 * x64.var(axis=axes) * n / (n - 1), rtol=1e-6,
            atol=1e-6)
    else:
        np.testing.assert_array_equal(_bits(new_mean), _bits(running_mean))


def test_bound_forward_without_stats_saves_nothing():
    x, _, _, weight, bias, rm, rv = _case((4, 3, 2, 2), "contiguous", np.float32)
    call = _forward.BoundForward(x, 0, rm, rv, weight, bias, False, 1e-5, False, None)
    out = np.empty_like(x)
    assert call.run(_address(x), 0, _address(out), 0.0, 1, False, 0) is None
    expected = reference_batch_norm(x.astype(np.float64), rm, rv, weight, bias, training=False,
                                    eps=1e-5)[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight"])
def test_bound_backward_is_the_array_backward(dtype, shape, layout, training, fused, affine):
    x, addend, dy, weight, bias, running_mean, running_var = _case(shape, layout, dtype)
    if not affine:
        weight = None
    kernel_layout = _layout.layout_of(x)
    C = shape[1]
    # The forward's table, from the bound forward (what the plans save).
    out = np.empty_like(x)
    bits = np.zeros((x.size + 7) // 8, np.uint8) if fused else None
    saved = _forward.BoundForward(
        x, kernel_layout, running_mean.copy(), running_var.copy(), weight, bias, training, 1e-5,
        fused, None).run(_address(x), _address(addend if fused else None), _address(out), 0.1, 2,
                         True, _address(bits))
    table = saved.table()
    compute = np.float64 if dtype == np.float64 else np.float32
    gx_bound, ga_bound = np.empty_like(x), np.empty_like(x) if fused else None
    gw_bound, gb_bound = np.empty(C, compute), np.empty(C, compute)
    BoundBackward(x, weight, kernel_layout, training).run(
        _address(x), _address(dy), _address(bits), saved.address, saved.address + 8 * C,
        _address(gx_bound),
        _address(ga_bound), _address(gw_bound), _address(gb_bound), False, 2)
    gx, ga = np.empty_like(x), np.empty_like(x) if fused else None
    gw, gb = array_backward(x, dy, bits, table[0], table[1], weight, gx, ga, True, True,
                            kernel_layout, training, False, 2)
    for mine, array_entry in ((gx_bound, gx), (ga_bound, ga), (gw_bound, gw), (gb_bound, gb)):
        if array_entry is not None:
            np.testing.assert_array_equal(_bits(mine), _bits(array_entry))
    # and the reference's values (the ReLU gated by the forward's output)
    expected = reference_batch_norm_backward(
        dy.astype(np.float64), x.astype(np.float64), weight, table[0], table[1],
        training=training, output=out.astype(np.float64) if fused else None)
    for mine, exact in ((gx_bound, expected[0]), (gw_bound, expected[1]),
                        (gb_bound, expected[2]), (ga_bound, expected[3] if fused else None)):
        if exact is not None:
            scale = max(np.abs(exact).max(), 1.0)
            np.testing.assert_allclose(mine.astype(np.float64), exact, rtol=0,
                                       atol=REF_TOL[dtype.name] * scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)],
                         ids=lambda d: d.name)
def test_bound_forward_streams_as_the_array_forward(layout, dtype):
    # 4 MiB and more: both write with non-temporal stores (forward()'s rule).
    shape = (8, 32, 64, 64) if dtype.itemsize == 4 else (8, 32, 64, 128)
    x, _, _, weight, bias, running_mean, running_var = _case(shape, layout, dtype)
    assert x.nbytes >= 1 << 22
    kernel_layout = _layout.layout_of(x)
    outs = [np.empty_like(x), np.empty_like(x)]
    _forward.BoundForward(x, kernel_layout, running_mean.copy(), running_var.copy(), weight,
                          bias, True, 1e-5, False, None).run(
        _address(x), 0, _address(outs[0]), 0.1, 2, False, 0)
    _forward.forward(x, kernel_layout, running_mean.copy(), running_var.copy(), weight, bias,
                     True, 0.1, 1e-5, None, False, outs[1], 2, None, None, None)
    np.testing.assert_array_equal(_bits(outs[0]), _bits(outs[1]))
    expected = reference_batch_norm(x.astype(np.float64), running_mean, running_var, weight,
                                    bias, training=True, eps=1e-5).out
    np.testing.assert_allclose(outs[0].astype(np.float64), expected, rtol=0,
                               atol=REF_TOL[dtype.name] * 3)
