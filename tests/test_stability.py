"""Numerical stability: constant channels, large offsets, extreme magnitudes, NaN and Inf."""
import numpy as np
import pytest

import bnfast
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
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (4, 3, 5, 5), (2, 3, 3, 4, 5),
                                   (64, 3, 64, 64), (2, 3, 96, 100), (3, 70, 9, 9)], ids=str)
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
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ref = reference_batch_norm(x, rm, rv, training=True)
    with np.errstate(over="ignore"):  # running_var = 1e59 does not fit float32
        y = bnfast.batch_norm(_in(x, layout), rm, rv, training=True)
    assert np.isfinite(y).all()
    assert_close(y, ref.out, np.float32)
    assert np.isfinite(rm).all()
    np.testing.assert_allclose(rm, ref.running_mean, rtol=1e-6)
    assert np.all(np.isinf(rv))  # the float32 rounding of ~1e59, as torch's
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
@pytest.mark.parametrize("shape", [(6, 4), (4, 4, 5, 5), (16, 4, 64, 64), (2, 4, 3, 4, 5)],
                         ids=str)
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
@pytest.mark.parametrize("shape", [(6, 4), (4, 4, 5, 5), (16, 4, 64, 64)], ids=str)
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
