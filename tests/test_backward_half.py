"""Half-precision (float16, bfloat16) backward kernels, through the compiled entry.

These tests call ``bnfast._backward.backward`` and ``pack_positive`` directly,
as ``bnfast.backward._run`` does, because the public API's half-precision
support (validation admitting the half dtypes) lands separately; once it has,
the public functions reach exactly these kernels.

What is held: half data gives the same sums as the same values stored as
float32 (``grad_weight``/``grad_bias`` bit-identical, float32 arrays), and
``grad_input`` is float32's ``grad_input`` of the same values rounded once to
the half type (bit-identical) -- except the sums without a mask, which run
in float (``src/bnfast_float_sums.h``): float32-exact sums,
``grad_input`` within an ulp of float32's; all against the float64 reference
too; any thread count gives the same bits; outputs may alias ``grad_output``.
"""
import ml_dtypes
import numpy as np
import pytest

from bnfast import _backward, _layout
from bnfast.testing import reference_batch_norm, reference_batch_norm_backward
from conftest import make_input, make_params, with_layout

HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
HALF_IDS = ["float16", "bfloat16"]

# (shape, layout): channels-first with short (7x7) and long (17x17, > 4096) runs,
# batches of short runs (pass 1 by columns, _tiling.by_columns: 20 samples of 5x5;
# 131 of 46 7x7 channels, the last sample block and channel tile shorter),
# Fortran (N, C); channels-last with C < 64 (wide rows of several samples, rows
# left over; several blocks), C > 512, rows wider than a staged block (C = 1100), and
# rows summed one at a time (C = 200: float32 rows of 800 bytes, BNFAST_ROW_GROUP);
# rows cut into pass 1's column tiles (C = 1030: 520 + 510 columns over blocks of 128,
# 128 and 3 rows; C = 2100: 3 tiles over 128 + 34 rows).
CASES = [
    ((6, 5, 7, 7), "contiguous"),
    ((20, 5, 5, 5), "contiguous"),
    ((131, 46, 7, 7), "contiguous"),
    ((4, 3, 17, 17), "contiguous"),
    ((3, 4, 67, 65), "contiguous"),
    ((37, 6), "fortran"),
    ((5, 3, 9, 7), "channels_last"),
    ((7, 16, 5, 3), "channels_last"),
    ((64, 8, 20, 20), "channels_last"),
    ((9, 640, 2, 3), "channels_last"),
    ((23, 1100), "contiguous"),
    ((40, 200), "contiguous"),
    ((259, 1030), "contiguous"),
    ((2, 2100, 9, 9), "channels_last"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]

# (grad_input, grad_weight, grad_bias, grad_addend) wanted.
OUTPUTS = [(True, True, True, True), (True, False, False, False), (False, True, True, False),
           (False, False, False, True)]


def _bits(y, n_threads=1):
    """The packed ReLU mask of y (already in its kernel layout)."""
    bits = np.empty((y.size + 7) // 8, np.uint8)
    _backward.pack_positive(y, bits, n_threads)
    return bits


def _call(x, dy, mean, invstd, weight, training, relu_out=None, want=(True,) * 4,
          n_threads=2, dx=None, g=None, stream=False):
    """One backward through the compiled entry; (grad_input, weight, bias, addend)."""
    x, layout = _layout.in_kernel_layout(x)
    dy = _layout.to_layout(dy, layout)
    bits = None if relu_out is None else _bits(_layout.to_layout(relu_out, layout))
    if dx is None and want[0]:
        dx = np.empty_like(x)
    if g is None and want[3] and bits is not None:
        g = np.empty_like(x)
    gw, gb = _backward.backward(x, dy, bits, mean, invstd, weight, dx, g, want[1], want[2],
                                layout, training, stream, n_threads)
    return dx, gw, gb, g


def _data(rng, shape, layout, dtype, relu):
    """x, dy, (relu output or None), mean, invstd, weight: half arrays in layout,
    float32 vectors (the statistics of x's values, as a training forward saves)."""
    x = with_layout(make_input(rng, shape, np.float32).astype(dtype), layout)
    dy = with_layout(rng.standard_normal(shape).astype(dtype), layout)
    fwd = reference_batch_norm(x.astype(np.float64), training=True, eps=1e-5)
    mean, invstd = fwd.mean.astype(np.float32), fwd.invstd.astype(np.float32)
    weight = make_params(rng, shape[1], np.float32)[0]
    out = None
    if relu:
        out = with_layout(rng.standard_normal(shape).astype(dtype), layout)
        out[(0,) * out.ndim] = 0.0  # exactly 0: the ReLU passes nothing there
    return x, dy, out, mean, invstd, weight


def _as(a, dtype):
    return None if a is None else a.astype(dtype)


def assert_bits(actual, expected, name):
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    np.testing.assert_array_equal(actual.view(np.uint16 if actual.itemsize == 2 else
                                              np.uint32 if actual.itemsize == 4 else np.uint64),
                                  expected.view(np.uint16 if expected.itemsize == 2 else
                                                np.uint32 if expected.itemsize == 4 else
                                                np.uint64), err_msg=name)


def assert_half_ulp(actual, expected64):
    """Half ``actual`` within one ulp of its dtype of ``expected64`` rounded to it."""
    mantissa, tiny = (10, 2.0**-14) if actual.dtype == np.float16 else (7, 2.0**-126)
    r = expected64.astype(actual.dtype).astype(np.float64)
    ulp = np.ldexp(1.0, np.frexp(np.maximum(np.abs(r), tiny))[1] - 1 - mantissa)
    assert np.all(np.abs(actual.astype(np.float64) - r) <= ulp)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_bits_of_float32_on_the_same_values(rng, dtype, shape, layout, training, fused):
    x, dy, out, mean, invstd, weight = _data(rng, shape, layout, dtype, fused)
    half = _call(x, dy, mean, invstd, weight, training, out)
    single = _call(_as(x, np.float32), _as(dy, np.float32), mean, invstd, weight, training,
                   _as(out, np.float32))
    if not fused:  # pass 1 sums in float without a mask (either layout)
        assert_half_ulp(half[0], single[0].astype(np.float64))
        np.testing.assert_allclose(half[1], single[1], rtol=4e-6, atol=4e-6)
        np.testing.assert_allclose(half[2], single[2], rtol=4e-6, atol=4e-6)
    else:
        assert_bits(half[0], single[0].astype(dtype), "grad_input")
        assert_bits(half[1], single[1], "grad_weight")  # float32 arrays, the same sums
        assert_bits(half[2], single[2], "grad_bias")
    if fused:
        assert_bits(half[3], single[3].astype(dtype), "grad_addend")
        np.testing.assert_array_equal(half[3], np.where(out > 0, dy, 0))
    # The kernel writes grad_input in x's layout.
    assert half[0].strides == _layout.in_kernel_layout(x)[0].strides


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_matches_float64_reference(rng, dtype, shape, layout, training, fused):
    x, dy, out, mean, invstd, weight = _data(rng, shape, layout, dtype, fused)
    dx, gw, gb, g = _call(x, dy, mean, invstd, weight, training, out)
    f64 = [_as(a, np.float64) for a in (dy, x, weight, mean, invstd, out)]
    ref = reference_batch_norm_backward(*f64[:5], training, output=f64[5])
    # grad_input: the reference rounded to the half type, give or take one half
    # ulp, plus float arithmetic's error on the scale of its terms.
    a = np.abs(f64[4] * f64[2]).max()
    scale = a * np.abs(f64[0]).max() * (2.0 + np.abs((f64[1] - f64[3].reshape(
        (1, -1) + (1,) * (x.ndim - 2))) * f64[4].reshape((1, -1) + (1,) * (x.ndim - 2))).max())
    ulp = np.spacing(np.abs(ref.grad_input).astype(dtype)).astype(np.float64)
    err = np.abs(dx.astype(np.float64) - ref.grad_input)
    assert np.all(err <= ulp + 1e-6 * scale), float((err - ulp).max())
    # grad_weight, grad_bias: float32, sums in double rounded once.
    assert gw.dtype == gb.dtype == np.float32
    n = x.size // x.shape[1]
    dmax = np.abs(f64[0]).max()
    np.testing.assert_allclose(gb, ref.grad_bias, rtol=0, atol=1e-6 * n * dmax)
    dev = np.abs(f64[1] - f64[3].reshape((1, -1) + (1,) * (x.ndim - 2))).max()
    np.testing.assert_allclose(gw, ref.grad_weight, rtol=0,
                               atol=1e-6 * n * dmax * dev * np.abs(f64[4]).max())
    if fused:
        np.testing.assert_array_equal(g.astype(np.float64), ref.grad_addend)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("want", OUTPUTS, ids=lambda w: "".join("xwbg"[i] for i in range(4)
                                                                 if w[i]))
def test_one_and_two_threads_bit_identical(rng, dtype, shape, layout, want):
    x, dy, out, mean, invstd, weight = _data(rng, shape, layout, dtype, True)
    for training in (True, False):
        for relu_out in (None, out):
            one = _call(x, dy, mean, invstd, weight, training, relu_out, want, n_threads=1)
            two = _call(x, dy, mean, invstd, weight, training, relu_out, want, n_threads=2)
            for name, u, v in zip(("input", "weight", "bias", "addend"), one, two):
                assert (u is None) == (v is None), name
                if u is not None:
                    assert_bits(u, v, name)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_outputs_may_alias_grad_output(rng, dtype, shape, layout, training):
    x, dy, out, mean, invstd, weight = _data(rng, shape, layout, dtype, True)
    for relu_out in (None, out):
        expected = _call(x, dy, mean, invstd, weight, training, relu_out)
        dyk = _layout.in_kernel_layout(dy.copy(order="K"))[0]  # written in place
        got = _call(x, dyk, mean, invstd, weight, training, relu_out, dx=dyk)
        assert got[0] is dyk
        assert_bits(dyk, expected[0], "grad_input in grad_output")
        xk = _layout.in_kernel_layout(x.copy(order="K"))[0]
        got = _call(xk, dy, mean, invstd, weight, training, relu_out, dx=xk)
        assert_bits(xk, expected[0], "grad_input in x")
        if relu_out is not None:  # grad_addend written over grad_output
            dyk = _layout.in_kernel_layout(dy.copy(order="K"))[0]
            got = _call(x, dyk, mean, invstd, weight, training, relu_out, g=dyk)
            assert_bits(got[0], expected[0], "grad_input beside grad_addend in grad_output")
            assert_bits(dyk, expected[3], "grad_addend in grad_output")


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,layout", CASES + [((2, 3, 8, 8), "contiguous")],
                         ids=CASE_IDS + ["2x3x8x8-contiguous"])
def test_streaming_stores_give_the_same_bits(rng, dtype, shape, layout):
    # Non-temporal stores (arrays far beyond the caches) where every run starts on a
    # 16-byte boundary (8x8 runs; channels-last tiles), plain stores elsewhere.
    x, dy, out, mean, invstd, weight = _data(rng, shape, layout, dtype, True)
    for training in (True, False):
        for relu_out in (None, out):
            plain = _call(x, dy, mean, invstd, weight, training, relu_out)
            streamed = _call(x, dy, mean, invstd, weight, training, relu_out, stream=True)
            for name, u, v in zip(("input", "weight", "bias", "addend"), plain, streamed):
                assert (u is None) == (v is None), name  # addend: only with a mask
                if u is not None:
                    assert_bits(v, u, name)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("n", [1, 7, 8, 100, 4099, 70001])
def test_pack_positive(rng, dtype, n):
    y = rng.standard_normal(n).astype(dtype)
    y[:: 5] = 0.0
    y[1:: 7] = -0.0
    y[2:: 11] = np.nan
    y[3:: 13] = -np.inf
    with np.errstate(invalid="ignore"):  # NaN <= 0 is False: the gradient passes
        expected = np.packbits(~(y <= 0), bitorder="little")
    for n_threads in (1, 2):
        np.testing.assert_array_equal(_bits(y, n_threads), expected)


@pytest.mark.parametrize("dtype, param_dtype", [(np.float32, np.float32),
                                                (np.float64, np.float64),
                                                (np.float16, np.float32),
                                                (ml_dtypes.bfloat16, np.float32)])
def test_parameter_gradients_dtype(rng, dtype, param_dtype):
    x, dy, _, mean, invstd, weight = _data(rng, (4, 3, 5), "contiguous", dtype, False)
    dx, gw, gb, _ = _call(x, dy, mean, invstd, weight, True)
    assert dx.dtype == np.dtype(dtype)
    assert gw.dtype == gb.dtype == np.dtype(param_dtype)


@pytest.mark.parametrize("shape", [(8, 3, 7, 7), (2, 3, 40, 40), (16, 2, 2, 2)], ids=str)
def test_float_sums_are_float32_exact_far_from_zero(rng, shape):
    # Data far from zero with a float64 mean that float cannot hold: the float
    # sums run against the mean rounded to float, and the rounding is added
    # back in double (sum((x - m) * dy) = sum((x - m_f) * dy) + (m_f - m) * sum(dy)).
    # Without that term grad_weight would be off by ~1e-4 relative here.
    x = (1000.0 + rng.standard_normal(shape)).astype(np.float16)
    dy = (1.0 + rng.standard_normal(shape)).astype(np.float16)
    fwd = reference_batch_norm(x.astype(np.float64), training=True, eps=1e-5)
    weight = np.ones(shape[1], np.float32)
    _, gw, gb, _ = _call(x, dy, fwd.mean, fwd.invstd, weight, True, want=(False, True, True,
                                                                           False))
    ref = reference_batch_norm_backward(dy, x, weight, fwd.mean, fwd.invstd, True)
    axes = (0,) + tuple(range(2, len(shape)))
    xc = x.astype(np.float64) - fwd.mean.reshape((1, -1) + (1,) * (len(shape) - 2))
    scale_w = (np.abs(xc * dy.astype(np.float64))).sum(axis=axes) * fwd.invstd
    scale_b = np.abs(dy.astype(np.float64)).sum(axis=axes)
    tol = 20 * 2.0**-24
    assert np.all(np.abs(gw - ref.grad_weight) <= tol * scale_w + 2.0**-24 * np.abs(gw))
    assert np.all(np.abs(gb - ref.grad_bias) <= tol * scale_b + 2.0**-24 * np.abs(gb))
