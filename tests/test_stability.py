"""Numerical stability: constant channels, large offsets, extreme magnitudes, NaN and Inf."""
import numpy as np
import pytest

import bnfast
from bnfast._dtypes import resolve_dtype
from conftest import (
    STAT_TOL,
    TOL,
    assert_close,
    channels_last,
    make_input,
    reference_batch_norm,
)

LAYOUTS = ["contiguous", "channels_last"]


def _in(x, layout):
    return channels_last(x) if layout == "channels_last" else x


# -- constant channels -----------------------------------------------------------------
# (24, 3, 7, 7), (40, 3, 5): channels-first short runs of a batch, summed by columns.
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (4, 3, 5, 5), (2, 3, 3, 4, 5),
                                   (64, 3, 64, 64), (2, 3, 96, 100), (3, 70, 9, 9),
                                   (24, 3, 7, 7), (40, 3, 5)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [7.3, -1e6 / 3, 0.1])
def test_constant_channel_normalises_to_exactly_zero(dtype, rng, shape, layout, value):
    x = make_input(rng, shape, dtype)
    x[:, 1] = dtype(value)
    rm, rv = np.zeros(shape[1], dtype), np.ones(shape[1], dtype)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True, momentum=0.1)
    assert np.all(y[:, 1] == 0), np.abs(y[:, 1]).max()
    assert np.any(y[:, 0] != 0)
    # Batch variance exactly 0: running_var = 0.9 * 1 + 0.1 * 0, rounded once.
    assert rv[1] == dtype(0.9)
    assert rm[1] == dtype(0.1 * float(dtype(value)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_channel_gives_exactly_bias(dtype, rng, layout):
    x = make_input(rng, (8, 4, 6, 6), dtype)
    x[:, 2] = dtype(123.456)
    weight = np.array([1.5, -2.0, 3.25, 0.5], dtype)
    bias = np.array([0.1, 0.2, -0.3, 0.4], dtype)
    y = bnfast.batch_norm(_in(x, layout), None, None, weight, bias, training=True)
    assert np.all(y[:, 2] == bias[2])
    y = bnfast.fused_batch_norm(_in(x, layout), None, None, weight, bias, training=True)
    assert np.all(y[:, 2] == 0)  # relu(-0.3)


def test_all_channels_constant(dtype):
    x = np.broadcast_to(np.array([1.0, -2.5, 1e4], dtype).reshape(1, 3, 1, 1), (4, 3, 5, 5)).copy()
    for xv in (x, channels_last(x)):
        np.testing.assert_array_equal(bnfast.batch_norm(xv, None, None, training=True), 0)


# -- large offsets ---------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e6, -1e6, 1e7])
@pytest.mark.parametrize("shape", [(16, 4, 8, 8), (32, 2, 64, 64), (4096, 3), (3, 5, 300)],
                         ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_large_offset(rng, torch, offset, shape, layout):
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    ref = reference_batch_norm(x, rm, rv, training=True)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True)
    err = np.abs(y - ref.out).max()
    t_err = np.abs(torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
                   .numpy() - ref.out).max()
    assert err <= 1e-4, f"bnfast error {err:.3g} (torch: {t_err:.3g})"
    assert_close(rm, ref.running_mean, np.float32, STAT_TOL)
    assert_close(rv, ref.running_var, np.float32, STAT_TOL)
    # Evaluation with those statistics: (x - m) is exact for m near x, so as good.
    rm_e = ref.mean.astype(np.float32)
    rv_e = (1 / ref.invstd ** 2 - 1e-5).astype(np.float32)
    ref_e = reference_batch_norm(x, rm_e, rv_e)
    assert np.abs(bnfast.batch_norm(_in(x, layout), rm_e, rv_e) - ref_e.out).max() <= 1e-4


@pytest.mark.parametrize("offset", [1e8, -1e12, 1e14])
@pytest.mark.parametrize("shape", [(16, 4, 8, 8), (32, 2, 64, 64), (4096, 3)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_large_offset(rng, offset, shape, layout):
    # float64 stores the mean in float64: half an ulp of the offset is unavoidable,
    # a few ulps are allowed; a naive sum of squares would lose everything.
    x = rng.standard_normal(shape) + offset
    ref = reference_batch_norm(x, training=True)
    y = bnfast.batch_norm(_in(x, layout), None, None, training=True)
    bound = 8 * np.spacing(abs(offset)) * ref.invstd.max()
    assert np.abs(y - ref.out).max() <= bound
    assert np.abs(y).max() < 6  # still normalised


# The long double reference: extended precision (64-bit significand) on x86; where long
# double is just double (or double-double, whose spacing is irregular) it proves nothing.
EXTENDED = np.finfo(np.longdouble).nmant == 63
needs_extended = pytest.mark.skipif(
    not EXTENDED, reason="np.longdouble is not x87 extended precision on this platform")


def _long_double_reference(x, weight, bias, eps, mean=None, var=None):
    """y, mean of batch norm in long double; batch statistics when mean is None.

    The batch mean is taken after subtracting one data value per channel (exact in
    long double): a long double sum of values near 1e10 would itself round by ~1e-9.
    """
    L = np.longdouble
    axes = (0,) + tuple(range(2, x.ndim))
    sh = (1, -1) + (1,) * (x.ndim - 2)
    xl = x.astype(L)
    if mean is None:
        k = xl[(0, slice(None)) + (0,) * (x.ndim - 2)].reshape(sh)
        d = xl - k
        md = d.mean(axis=axes)
        var = ((d - md.reshape(sh)) ** 2).mean(axis=axes)
        centered, mean = d - md.reshape(sh), md + k.ravel()
    else:
        mean, var = mean.astype(L), var.astype(L)
        centered = xl - mean.reshape(sh)
    y = centered / np.sqrt(var.reshape(sh) + L(eps)) * weight.astype(L).reshape(sh) \
        + bias.astype(L).reshape(sh)
    return y, mean


# Largest error allowed against the long double reference (issue 9, section 6): it must
# not grow with the offset.  float64 gets ~1e-15 here (the mean's rounding residual is
# carried into the shift), float32 its own rounding.
OFFSET_BOUND = [(np.float64, 1e8, 1e-9), (np.float64, -1e10, 1e-7), (np.float64, 1e10, 1e-7),
                (np.float64, 1e12, 1e-7), (np.float32, 1e6, 1e-6), (np.float32, -1e6, 1e-6)]


@needs_extended
@pytest.mark.parametrize("dt, offset, bound", OFFSET_BOUND, ids=str)
@pytest.mark.parametrize("shape", [(16, 4, 8, 8), (4096, 3), (32, 2, 64, 64), (3, 5, 300)],
                         ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_offset_against_long_double(rng, dt, offset, bound, shape, layout):
    C = shape[1]
    x = (rng.standard_normal(shape) + offset).astype(dt)
    w = rng.uniform(0.5, 2.0, C).astype(dt)
    b = rng.uniform(-1.0, 1.0, C).astype(dt)
    # Training: batch statistics.
    y, save_mean, _ = bnfast.batch_norm(_in(x, layout), None, None, w, b, training=True,
                                        return_stats=True)
    ref, ref_mean = _long_double_reference(x, w, b, 1e-5)
    err = float(np.abs(y.astype(np.longdouble) - ref).max())
    assert err <= bound, f"train: max error {err:.3g} > {bound:g}"
    # save_mean keeps its meaning: the mean, to within an ulp of float64.
    assert np.all(np.abs(save_mean - ref_mean) <= np.spacing(np.abs(save_mean)))
    # Evaluation with running statistics near the data: exact w.r.t. the given mean.
    rm = (x.astype(np.longdouble).mean(axis=(0,) + tuple(range(2, x.ndim)))).astype(dt)
    rv = rng.uniform(0.5, 2.0, C).astype(dt)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, w, b)
    ref, _ = _long_double_reference(x, w, b, 1e-5, rm, rv)
    err = float(np.abs(y.astype(np.longdouble) - ref).max())
    assert err <= bound, f"eval: max error {err:.3g} > {bound:g}"


@needs_extended
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_offset_fused_against_long_double(rng, layout):
    # The addend and the ReLU are added in double and rounded once too.
    x = rng.standard_normal((8, 3, 6, 6)) + 1e10
    addend = rng.standard_normal(x.shape)
    y = bnfast.fused_batch_norm(_in(x, layout), None, None, addend=_in(addend, layout),
                                training=True)
    ref, _ = _long_double_reference(x, np.ones(3), np.zeros(3), 1e-5)
    ref = np.maximum(ref + addend.astype(np.longdouble), 0)
    assert float(np.abs(y.astype(np.longdouble) - ref).max()) <= 1e-12


# -- scales and values beyond float32's range in the normalise step --------------------
@pytest.mark.parametrize("eps", [1e-300, 1e-80])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_constant_channel_tiny_eps_gives_exactly_bias(rng, eps, layout):
    # The scale 1/sqrt(eps) (up to 1e150) does not fit float32; the normalise step
    # computes in double, where 0 * 1e150 + bias is exactly the bias (not 0 * inf = NaN).
    shape = (4, 3, 5, 5)
    x = make_input(rng, shape, np.float32)
    x[:, 1] = np.float32(2.5)
    w = np.array([1.0, 3.0, 1.0], np.float32)
    b = np.array([0.1, -0.2, 0.3], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y = bnfast.batch_norm(_in(x, layout), None, None, w, b, training=True, eps=eps)
        assert np.all(y[:, 1] == b[1]), np.unique(y[:, 1])
        y = bnfast.fused_batch_norm(_in(x, layout), None, None, w, -b, training=True, eps=eps)
        assert np.all(y[:, 1] == -b[1])  # relu(0.2)
        # Evaluation: the running variance 0, the running mean the channel's value.
        rm = np.array([0.0, 2.5, 0.0], np.float32)
        rv = np.array([1.0, 0.0, 1.0], np.float32)
        y = bnfast.batch_norm(_in(x, layout), rm, rv, w, b, eps=eps)
        assert np.all(y[:, 1] == b[1]), np.unique(y[:, 1])
    assert np.isfinite(y[:, [0, 2]]).all()


def _is_rounding_of(y, exact):
    """y (float32) is the float64 value ``exact`` rounded to float32 (within half an ulp)."""
    half_ulp = 0.5 * np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.all(np.abs(y.astype(np.float64) - exact) <= half_ulp * (1 + 1e-9))


@pytest.mark.parametrize("shape", [(8, 2, 3, 3), (64, 2), (5, 2, 70)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_values_near_max_normalise_finite(rng, shape, layout):
    # x - mean overflows float32 (|x| ~ 3e38 of both signs); the statistics are right
    # (double) and the normalise step computes in double too: the exact result, rounded.
    x = (rng.uniform(-1, 1, shape) * 3.3e38).astype(np.float32)
    w = np.array([1.5, -0.5], np.float32)
    b = np.array([0.25, 1.0], np.float32)
    with np.errstate(over="ignore"):  # the running variance (~1e76) does not fit float32
        y = bnfast.batch_norm(_in(x, layout), None, None, w, b, training=True)
        ref = reference_batch_norm(x, None, None, w, b, training=True)
        assert np.isfinite(y).all()
        assert _is_rounding_of(y, ref.out)
        addend = rng.standard_normal(shape).astype(np.float32)
        y = bnfast.fused_batch_norm(_in(x, layout), None, None, w, b, _in(addend, layout),
                                    training=True)
        assert _is_rounding_of(y, np.maximum(ref.out + addend, 0))
    # Evaluation with a running mean of the other sign: x - mean ~ -6e38.
    rm = np.full(2, 3e38, np.float32)
    rv = np.full(2, 3e38, np.float32)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, w, b)
    assert np.isfinite(y).all()
    assert _is_rounding_of(y, reference_batch_norm(x, rm, rv, w, b).out)


# -- extreme magnitudes ----------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e100, 1e-100, 1e150])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_extreme_magnitudes(rng, scale, layout):
    x = make_input(rng, (8, 3, 5, 5), np.float64) * scale
    eps = 1e-5 * min(1.0, scale * scale)  # keep eps below the variance
    rm, rv = np.zeros(3), np.full(3, scale * scale)
    ref = reference_batch_norm(x, rm, rv, training=True, eps=eps)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True, eps=eps)
    assert np.isfinite(y).all()
    assert_close(y, ref.out, np.float64)
    np.testing.assert_allclose(rm, ref.running_mean, rtol=1e-12)
    np.testing.assert_allclose(rv, ref.running_var, rtol=1e-12)
    # Evaluation with running stats of that magnitude.
    assert_close(bnfast.batch_norm(_in(x, layout), rm, rv, eps=eps),
                 reference_batch_norm(x, rm, rv, eps=eps).out, np.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_huge_values(rng, torch, layout):
    # Values ~1e30: the variance (~1e60) only exists in double, where bnfast computes it.
    x = (make_input(rng, (8, 3, 5, 5), np.float64) * 1e30).astype(np.float32)
    rm, rv = np.zeros(3), np.ones(3)  # float64: running_var = 1e59 fits
    ref = reference_batch_norm(x, rm, rv, training=True)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True)
    assert np.isfinite(y).all()
    assert_close(y, ref.out, np.float32)
    np.testing.assert_allclose(rm, ref.running_mean, rtol=1e-6)
    np.testing.assert_allclose(rv, ref.running_var, rtol=1e-6)
    # float32 buffers cannot hold 1e59: torch writes inf (its evaluation then gives
    # all zeros without a word); bnfast raises and changes nothing, as for half buffers.
    rm32, rv32, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.full_like(x, 7)
    with pytest.raises(OverflowError, match="running_var of dtype float32 cannot hold its "
                                            "update: channel 0"):
        bnfast.batch_norm(_in(x, layout), rm32, rv32, training=True, out=_in(out, layout))
    assert (rm32 == 0).all() and (rv32 == 1).all() and (out == 7).all()
    t_rv = torch.ones(3)
    torch.nn.functional.batch_norm(torch.from_numpy(x), torch.zeros(3), t_rv, training=True)
    assert torch.isinf(t_rv).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_tiny_values(rng, layout):
    # Values ~1e-30: variance ~1e-60 underflows float32 but not double; with an eps
    # below it the output is a proper N(0, 1)-like normalisation.
    x = (make_input(rng, (8, 3, 5, 5), np.float64) * 1e-30).astype(np.float32)
    for eps in (1e-70, 1e-5):
        ref = reference_batch_norm(x, training=True, eps=eps)
        y = bnfast.batch_norm(_in(x, layout), None, None, training=True, eps=eps)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, ref.out, rtol=1e-5, atol=1e-5 * np.abs(ref.out).max())
    assert np.abs(bnfast.batch_norm(x, None, None, training=True, eps=1e-70)).max() > 1


# -- NaN and Inf -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(6, 4), (4, 4, 5, 5), (16, 4, 64, 64), (2, 4, 3, 4, 5),
                                   (20, 4, 7, 7)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_value_confined_to_its_channel(dtype, rng, bad, shape, layout):
    x = make_input(rng, shape, dtype)
    idx = (shape[0] - 1, 2) + tuple(s // 2 for s in shape[2:])
    x[idx] = bad
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    ref = reference_batch_norm(x, rm, rv, training=True)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True)
    good = [0, 1, 3]
    assert np.isfinite(y[:, good]).all()
    assert_close(y[:, good], ref.out[:, good], dtype)
    assert_close(rm[good], ref.running_mean[good], dtype, STAT_TOL)
    assert_close(rv[good], ref.running_var[good], dtype, STAT_TOL)
    # The bad channel, as torch: mean NaN for NaN, +-inf for +-inf (wherever the
    # value sits: first or later chunk, block or lane); NaN variance; all-NaN output.
    assert np.isnan(y[:, 2]).all()
    assert np.isnan(rv[2])
    if np.isnan(bad):
        assert np.isnan(rm[2])
    else:
        assert rm[2] == 0.1 * bad


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 4, 5, 5), (16, 4, 64, 64), (20, 4, 7, 7)],
                         ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_infinite_value_gives_infinite_mean_anywhere(dtype, rng, bad, where, shape, layout):
    # An infinite value that starts a chunk (the shift) or meets a finite partial
    # in a merge once gave NaN (inf - inf); torch's mean is +-inf.
    x = make_input(rng, shape, dtype)
    n = {"first": 0, "middle": shape[0] // 2, "last": shape[0] - 1}[where]
    x[(n, 2) + tuple(0 for _ in shape[2:])] = bad
    _, save_mean, _ = bnfast.batch_norm(_in(x, layout), None, None, training=True,
                                        return_stats=True)
    assert save_mean[2] == bad
    assert np.isfinite(save_mean[[0, 1, 3]]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_squares_overflow_like_torch(rng, torch, layout):
    # |x| ~ 1e154..1e300: squared deviations overflow float64.  torch reports an
    # infinite variance and normalises to 0; inf - inf must not turn that into NaN.
    for scale in (1e155, 1e300):
        x = make_input(rng, (4, 3, 5, 5), np.float64) * scale
        rm, rv = np.zeros(3), np.ones(3)
        t_rm, t_rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        expected = torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv,
                                                  training=True).numpy()
        y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True)
        assert not np.isnan(y).any()
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(rv, t_rv.numpy())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_like_torch(dtype, rng, torch, bad):
    x = make_input(rng, (4, 3, 5, 5), dtype)
    x[1, 1, 2, 3] = bad
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv,
                                              training=True).numpy()
    y = bnfast.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert np.isfinite(rm[[0, 2]]).all() and np.isfinite(rv[[0, 2]]).all()
    for ours, theirs in ((rm, t_rm.numpy()), (rv, t_rv.numpy())):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_in_eval_stays_elementwise(dtype, rng, layout):
    x = make_input(rng, (4, 3, 6, 6), dtype)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 1, 1] = np.inf
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y = bnfast.batch_norm(_in(x, layout), rm, rv)
    assert np.isnan(y[0, 0, 0, 0]) and y[1, 1, 1, 1] == np.inf
    assert np.isfinite(y).sum() == y.size - 2
    # A NaN running variance poisons only its channel.
    rv[2] = np.nan
    y = bnfast.batch_norm(_in(x, layout), rm, rv)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[2:, :2]).all()


@pytest.mark.parametrize("data", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_infinite_running_mean_gives_the_infinite_output(rng, data, layout):
    # (x - inf) * a + b is -inf, as the float64 reference and torch give: the float rows'
    # fold of m's rounding (m - (float)m) must not turn it into inf - inf = NaN.
    dtype = resolve_dtype(data)
    pdtype = np.float32 if dtype.itemsize == 2 else dtype
    x = make_input(rng, (4, 3, 5, 6), np.float64).astype(dtype)
    rm = np.array([np.inf, -np.inf, 0.25], pdtype)
    rv, w, b = np.ones(3, pdtype), np.array([1.5, -2.0, 1.0], pdtype), np.full(3, 0.5, pdtype)
    y = bnfast.batch_norm(_in(x, layout), rm, rv, w, b)
    expected = reference_batch_norm(x.astype(np.float64), rm, rv, w, b).out
    np.testing.assert_array_equal(y[:, :2].astype(np.float64), expected[:, :2])  # -inf, -inf
    assert np.all(np.isneginf(y[:, :2].astype(np.float64)))
    assert np.all(np.isfinite(y[:, 2].astype(np.float64)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_batch_accuracy(rng, layout):
    # 2M values per channel (many chunks and blocks): float32 stays at float32 accuracy.
    x = make_input(rng, (128, 2, 128, 128), np.float32, loc=3.0, scale=0.5)
    ref = reference_batch_norm(x, training=True)
    y, mean, invstd = bnfast.batch_norm(_in(x, layout), None, None, training=True,
                                        return_stats=True)
    assert_close(y, ref.out, np.float32, TOL)
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(invstd, ref.invstd, rtol=1e-12)
