"""Half precision (float16, ``ml_dtypes.bfloat16``) through every public API.

Each output is a float32 computation rounded once to the half dtype.  The
normalise (``relu?((x - m) * a + b)``, evaluation and training) and the
backward's dx (``(dy - d) * a + (x - m) * b``) are held to **1 ulp of the half
dtype** of the float64 reference (:mod:`bnfast.testing`) rounded to it, the
true ulp, also where their terms cancel to ~0: each term is taken about its
zero (``bnfast_table.h``), so float arithmetic errs by ~2^-24 of the result.
The addend's sum is float's where that
cannot cancel and double's where it does (``bnfast_half_leaves.h``): the true
ulp in evaluation; in training the statistics' float sums (the variance to
~2^-24) show where it cancels, so there the ulp is measured at no less than
SUM_FLOOR.  Statistics are summed in float and folded
into double, as exact as from the same values stored as float32 (their 2^-24
errors average out over a channel; sums that cancel to ~2^-13 of their terms
would show in the outputs); in PyTorch's "mixed" mode
(half data, float32 parameters and running statistics) outputs are within 1 half ulp of
``torch.nn.functional.batch_norm`` and the running buffers are the reference
rounded once to float32, as close to torch's as in float32 (torch's own are a
few float32 ulps off the exact value: it computes them in float32).
"""
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import bnfast
import bnfast.io
from bnfast.testing import reference_batch_norm, reference_batch_norm_backward
from conftest import (
    STAT_TOL,
    TORCH_TOL,
    assert_close,
    assert_same,
    is_channels_last,
    make_input,
    make_params,
    make_running,
    with_layout,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [F16, BF16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPES = [(8, 6, 5, 7), (64, 5), (4, 3, 33)]  # 4-d, (N, C) rows, 3-d
#: Parameter and running-statistic dtypes: torch's mixed rule, all in the data's
#: dtype, and float64 (read as doubles all the same).
PARAMS = ["float32", "half", "float64"]

#: Where terms of O(1) (here) are added in float and may cancel (the addend's
#: sum, the backward's, torch's and float32 data's outputs), an output's ulp is
#: measured at no less than this: float32 rounds to ~2**-24 of the terms, far
#: below half an ulp of the half dtype at 2**-6, not of a value that cancels to
#: ~1e-6.
SUM_FLOOR = 2.0 ** -6
MANTISSA_BITS = {F16: 10, BF16: 7}
#: The smallest normal value: the ulp below it is the subnormals' (2**-24, 2**-133).
SMALLEST_NORMAL = {F16: 2.0 ** -14, BF16: 2.0 ** -126}


@pytest.fixture(params=HALF, ids=lambda d: d.name)
def half(request):
    return request.param


def param_dtype(kind, half):
    return {"float32": np.dtype(np.float32), "half": half, "float64": np.dtype(np.float64)}[kind]


def assert_half_ulps(got, ref64, dtype, ulps=1, floor=0.0):
    """``got`` (of ``dtype``) within ``ulps`` ulps of ``dtype`` of the float64 ``ref64``
    rounded to it (ulps measured at ``max(|ref|, floor)``: 0, the true ulp, or
    SUM_FLOOR); NaN where NaN, inf where inf."""
    assert got.dtype == dtype and got.shape == ref64.shape
    g = got.astype(np.float64)
    with np.errstate(over="ignore"):  # beyond the largest half: inf, as the kernels round
        r = ref64.astype(dtype).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
    finite = np.isfinite(r)
    np.testing.assert_array_equal(g[~finite & ~np.isnan(r)], r[~finite & ~np.isnan(r)])
    # ulp(v) = 2**(exponent - mantissa bits), also at the largest finite value.
    exponent = np.frexp(np.maximum(np.abs(r[finite]), max(floor, SMALLEST_NORMAL[dtype])))[1]
    scale = np.ldexp(1.0, exponent - 1 - MANTISSA_BITS[dtype])
    worst = float((np.abs(g[finite] - r[finite]) / scale).max(initial=0.0))
    assert worst <= ulps, f"{worst} ulps of {dtype} from the reference (allowed {ulps})"


def assert_stats_close(got, ref64, dtype):
    """A running buffer of ``dtype`` against its float64 reference: half data's
    statistics are summed in float (see STATS_ULPS), so float32's tolerance holds
    them in float64 buffers too."""
    if dtype in HALF:
        assert_half_ulps(got, ref64, dtype)
    else:
        assert_close(got, ref64, np.float32, STAT_TOL)


def half_input(rng, shape, dtype, layout="contiguous", **kw):
    return with_layout(make_input(rng, shape, np.float32, **kw).astype(dtype), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_addend_cancelling_the_normalised_value(half, rng, layout, relu):
    """An addend that is -BN(x) rounded to the half type (a residual block whose
    branches nearly agree): what is left is that rounding, 2^-9 or less of the
    terms, where float's sum errs by 2^-24 of them (many ulps of what is left).
    The checked sum takes those values in double: within the true ulp."""
    shape = (8, 5, 12, 12)
    x = half_input(rng, shape, half, layout)
    w, b = make_params(rng, 5, np.float32)
    rm, rv = make_running(rng, 5, np.float32)
    bn = reference_batch_norm(x, rm, rv, w, b).out
    addend = with_layout((-bn).astype(half), layout)
    ref = reference_batch_norm(x, rm, rv, w, b, addend=addend, relu=relu)
    y = bnfast.batch_norm(x, rm, rv, w, b, addend=addend, relu=relu)
    assert_half_ulps(y, ref.out, half)
    assert (np.abs(ref.out) <= np.abs(bn) * 2.0 ** -8).mean() > 0.9  # the data cancel


# -- torch ------------------------------------------------------------------------------
def to_torch(torch, a):
    """A tensor of ``a``'s values (bfloat16 through int16: torch.from_numpy lacks it)."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(torch, t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


# -- forward: every mode, layout and parameter dtype against the reference ---------------
FORWARD_MODES = {
    # name: (training, addend, relu)
    "train": (True, False, False),
    "eval": (False, False, False),
    "train-fused": (True, True, True),
    "eval-fused": (False, True, True),
    "train-addend": (True, True, False),
    "eval-relu": (False, False, True),
}


@pytest.mark.parametrize("mode", FORWARD_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_against_reference(half, rng, mode, layout, params, shape):
    training, with_addend, relu = FORWARD_MODES[mode]
    C, p = shape[1], param_dtype(params, half)
    x = half_input(rng, shape, half, layout)
    addend = half_input(rng, shape, half, layout, loc=0.0, scale=1.0) if with_addend else None
    w, b = make_params(rng, C, p)
    rm, rv = make_running(rng, C, p)
    ref = reference_batch_norm(x, rm, rv, w, b, training, 0.2, 1e-5, addend=addend, relu=relu)

    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-5, addend=addend,
                                        relu=relu, return_stats=True)

    # With an addend, training's statistics (summed in float: var to ~2^-24) err
    # on the terms' scale where the addend cancels; evaluation's sum is checked.
    assert_half_ulps(y, ref.out, half, floor=SUM_FLOOR if with_addend and training else 0.0)
    assert is_channels_last(y) == (layout == "channels_last" and len(shape) > 2
                                   or len(shape) == 2)
    assert rm.dtype == rv.dtype == p
    assert_stats_close(rm, ref.running_mean, p)
    assert_stats_close(rv, ref.running_var, p)
    assert_stats_as_exact_as_float32(x, mean, invstd, ref)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(40, 3, 4), (24, 5, 3, 3)], ids=str)
def test_outputs_that_cancel_to_near_zero_within_an_ulp(half, rng, shape, layout, relu):
    # Each channel's values lie on the half grid around 2, where its bias puts the
    # output's zero: (x - m) * a and b, both O(1), cancel to |y| as small as
    # ~1e-7.  Computed as (x - m) * a + b in float, that errs by 2**-24 of the
    # terms, several ulps of such a y (tens in bfloat16).  (Evaluation: in
    # training the batch statistics, summed in float, err on the terms' scale.)
    C, p, training = shape[1], np.float32, False
    near = (2.0 + rng.integers(-60, 61, shape) * 2.0 ** -12).astype(half)
    x = np.where(rng.random(shape) < 0.1, rng.uniform(-3, 3, shape).astype(half), near)
    x = with_layout(x, layout)
    w = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(p)
    rm, rv = make_running(rng, C, p)
    mean, invstd = rm.astype(np.float64), 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
    b = (-(2.0 - mean) * invstd * w).astype(p)
    ref = reference_batch_norm(x, rm, rv, w, b, training, relu=relu)

    y = bnfast.batch_norm(x, rm, rv, w, b, training, relu=relu)

    assert_half_ulps(y, ref.out, half)
    terms = np.abs(b).min()
    assert np.sum((ref.out != 0) & (np.abs(ref.out) < 2.0 ** -16 * terms)) >= C


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_outputs_near_a_large_mean_within_an_ulp(half, rng, scale):
    # The zero z = m - b / a loses b / a to m's rounding in double when |m a| 2^-53
    # nears |b|: the half rows must not carry that into the output (bfloat16 at mean
    # 4.7e7 was 44 ulps off; a constant channel at 1e17 gave 0 for a bias of 0.1).
    big = {F16: [3e3, 6e4], BF16: [4.74e7, 1.5 * 2.0 ** 35, 1e17, 1e30]}[half]
    for mean in big:
        rm = np.full(3, mean, np.float32)
        rv = np.array([0.0062, 1e-3, 2.0], np.float32)
        w = np.array([957.0, -3.5, 0.25], np.float32) * scale
        b = np.array([2.29e-4, 0.1, -7.0], np.float32)
        near = np.asarray(np.float32(mean), np.float32).astype(half).astype(np.float32)
        steps = rng.integers(-4, 5, (16, 3, 2)).astype(np.float32)
        x = (near * (1.0 + steps * 2.0 ** -(MANTISSA_BITS[half] + 1))).astype(half)
        ref = reference_batch_norm(x, rm, rv, w, b)
        assert_half_ulps(bnfast.batch_norm(x, rm, rv, w, b), ref.out, half)
        # A constant channel in training: exactly the bias, rounded to the half dtype.
        c = np.broadcast_to(x[:1, :, :1], x.shape).copy()
        y = bnfast.batch_norm(c, None, None, w, b, training=True)
        np.testing.assert_array_equal(y.astype(np.float32),
                                      np.broadcast_to(b.astype(half).astype(np.float32)
                                                      .reshape(1, 3, 1), y.shape))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
def test_no_affine_no_running_stats(half, rng, fused, layout):
    x = half_input(rng, (6, 4, 5, 5), half, layout)
    ref = reference_batch_norm(x, training=True, relu=fused)
    y = (bnfast.fused_batch_norm if fused else bnfast.batch_norm)(x, None, None, training=True)
    assert_half_ulps(y, ref.out, half)


@pytest.mark.parametrize("target", ["out", "input", "addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_and_in_place(half, rng, target, training, layout):
    # out= a fresh array, the input itself or the addend itself: the same bits as
    # the out-of-place call, written where asked.
    shape = (5, 4, 6, 3)
    x = half_input(rng, shape, half, layout)
    a = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    w, b = make_params(rng, 4, np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    expected = bnfast.batch_norm(x, rm.copy(), rv.copy(), w, b, training, addend=a, relu=True)
    out = {"out": np.empty_like(x), "input": x, "addend": a}[target]
    y = bnfast.batch_norm(x, rm, rv, w, b, training, addend=a, relu=True, out=out)
    assert y is out
    assert_same(y, expected)


def test_read_only_and_fortran_input(half, rng):
    x = half_input(rng, (9, 4), half, "fortran")
    x.flags.writeable = False
    w, b = make_params(rng, 4, np.float32)
    ref = reference_batch_norm(x, None, None, w, b, training=True)
    assert_half_ulps(bnfast.batch_norm(x, None, None, w, b, training=True), ref.out, half)


def test_half_precision_scalar_hyperparameters(half, rng):
    # eps and momentum given as NumPy half scalars (a bfloat16 scalar is not a
    # numbers.Real) equal the Python floats of their values.
    x = half_input(rng, (6, 3, 4), half)
    eps, momentum = half.type(1e-3), half.type(0.25)
    rm1, rv1 = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm2, rv2 = rm1.copy(), rv1.copy()
    y1 = bnfast.batch_norm(x, rm1, rv1, training=True, eps=eps, momentum=momentum)
    y2 = bnfast.batch_norm(x, rm2, rv2, training=True, eps=float(eps), momentum=float(momentum))
    for u, v in ((y1, y2), (rm1, rm2), (rv1, rv2)):
        assert_same(u, v)


# -- statistics: as exact as from float32 data --------------------------------------------
# Half data's sums run in float, at most 16 terms a float sum, folded into double
# (src/bnfast_stats.h): each sum within STATS_ULPS float32 ulps of the sum of the
# magnitudes of its terms x - shift, the shift a value of the data (tests/
# test_stats_leaves.py holds the leaves to that over every variant).  |x - shift|
# <= 2 * the channel's largest deviation, so the mean is within STATS_ULPS * 2 *
# dev of float64's and the variance within 3 * STATS_ULPS * 4 * dev**2.
STATS_ULPS = 20
F32_EPS = 2.0**-24


def assert_stats_as_exact_as_float32(x, mean, invstd, ref, eps=1e-5):
    """The batch ``mean``/``invstd`` of half ``x`` within the float-sum bound of
    ``ref``'s (float64 of the same values); returns (mean_tol, var_tol)."""
    C = mean.shape[0]
    axes = (0,) + tuple(range(2, x.ndim))
    dev = np.abs(x.astype(np.float64) - ref.mean.reshape((1, C) + (1,) * (x.ndim - 2)))
    dev = dev.max(axis=axes)
    var = 1.0 / ref.invstd**2 - eps
    mean_tol = STATS_ULPS * F32_EPS * 2 * dev
    var_tol = 3 * STATS_ULPS * F32_EPS * 4 * dev**2
    assert np.all(np.abs(mean - ref.mean) <= mean_tol), np.abs(mean - ref.mean).max()
    invstd_tol = 0.5 * var_tol / (var + eps) * ref.invstd
    assert np.all(np.abs(invstd - ref.invstd) <= invstd_tol), np.abs(invstd - ref.invstd).max()
    return mean_tol, var_tol


@pytest.mark.parametrize("layout", LAYOUTS)
# (131, 46, 7, 7): channels-first short runs summed by columns, 2 x 3 tasks, the
# last sample block and channel tile shorter.
@pytest.mark.parametrize("shape", SHAPES + [(3, 70, 33, 33), (20000, 3), (131, 46, 7, 7)],
                         ids=str)
def test_statistics_are_as_exact_as_from_float32_data(half, rng, layout, shape):
    x = half_input(rng, shape, half, layout)
    x32 = with_layout(x.astype(np.float32), layout)
    C = shape[1]
    w, b = make_params(rng, C, np.float32)
    rm, rv = make_running(rng, C, np.float32)
    rm32, rv32 = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, True, return_stats=True)
    y32, mean32, invstd32 = bnfast.batch_norm(x32, rm32, rv32, w, b, True, return_stats=True)
    mean_tol, var_tol = assert_stats_as_exact_as_float32(x, mean, invstd, ref)
    f32_round = F32_EPS * np.abs(ref.mean)
    n = x.size // C
    assert np.all(np.abs(rm - ref.running_mean) <= 0.1 * (mean_tol + f32_round)
                  + F32_EPS * np.abs(ref.running_mean))
    assert np.all(np.abs(rv - ref.running_var) <= 0.1 * var_tol * n / (n - 1)
                  + F32_EPS * np.abs(ref.running_var))
    # float32 data of the same values: as close to the reference (it sums in double).
    assert np.all(np.abs(mean32 - ref.mean) <= f32_round)
    # The output: within 1 ulp of the half dtype, and of float32 data's result
    # (which errs by 2**-24 of its terms: SUM_FLOOR).
    assert_half_ulps(y, ref.out, half)
    assert_half_ulps(y, y32.astype(np.float64), half, floor=SUM_FLOOR)


def test_bfloat16_mean_accumulates_in_double_not_bfloat16(rng):
    # NumPy sums bfloat16 in bfloat16: the mean of 10,000 U(0, 1) values is
    # 0.0256.  Neither bnfast nor its reference may.
    x = rng.uniform(0, 1, (10000, 1)).astype(BF16)
    exact = x.astype(np.float64).mean()
    assert abs(float(x.mean()) - 0.0256) < 1e-3  # the trap this test guards against
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    _, mean, _ = bnfast.batch_norm(x, rm, rv, training=True, momentum=1.0, return_stats=True)
    np.testing.assert_allclose(mean, [exact], rtol=1e-12)
    np.testing.assert_allclose(rm, [exact], rtol=1e-7)
    np.testing.assert_allclose(reference_batch_norm(x, training=True).mean, [exact], rtol=1e-12)


# -- torch: mixed (half data, float32 parameters) and all-half ---------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES + [(16, 32, 9, 9)], ids=str)
def test_mixed_matches_torch(half, rng, torch, training, layout, shape):
    C = shape[1]
    x = half_input(rng, shape, half, layout)
    w, b = make_params(rng, C, np.float32)
    rm, rv = make_running(rng, C, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    expected = torch.nn.functional.batch_norm(
        to_torch(torch, x), trm, trv, torch.from_numpy(w), torch.from_numpy(b),
        training=training, momentum=0.1, eps=1e-5)
    y = bnfast.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    # torch computes x * alpha + beta in float: its error is on the terms' scale.
    assert_half_ulps(y, from_torch(torch, expected).astype(np.float64), half, floor=SUM_FLOOR)
    assert_close(rm, trm.numpy(), np.float32, TORCH_TOL)
    assert_close(rv, trv.numpy(), np.float32, TORCH_TOL)
    ref = reference_batch_norm(x, rm0, rv0, w, b, training, 0.1, 1e-5)
    assert_close(rm, ref.running_mean, np.float32, STAT_TOL)
    assert_close(rv, ref.running_var, np.float32, STAT_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_all_half_matches_torch(half, rng, torch, training):
    shape = (8, 5, 6, 6)
    x = half_input(rng, shape, half)
    w, b = (v.astype(half) for v in make_params(rng, 5, np.float32))
    rm, rv = (v.astype(half) for v in make_running(rng, 5, np.float32))
    t = [to_torch(torch, v.copy()) for v in (rm, rv, w, b)]
    expected = torch.nn.functional.batch_norm(to_torch(torch, x), *t, training=training)
    ref = reference_batch_norm(x, rm, rv, w, b, training)
    y = bnfast.batch_norm(x, rm, rv, w, b, training=training)
    # torch rounds its statistics and coefficients to the half dtype first: its
    # outputs are up to ~1 ulp (at 1) further off the exact result than ours.
    tol = {F16: 2.0 ** -9, BF16: 2.0 ** -6}[half]
    for ours, theirs in ((y, expected), (rm, t[0]), (rv, t[1])):
        np.testing.assert_allclose(ours.astype(np.float64),
                                   from_torch(torch, theirs).astype(np.float64),
                                   rtol=tol, atol=tol)
    assert_half_ulps(y, ref.out, half)
    assert_half_ulps(rm, ref.running_mean, half)


def test_mixed_running_buffers_follow_torch_over_steps(half, rng, torch):
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    for step in range(8):
        x = half_input(rng, (3 + step, 4, 5), half)
        bnfast.batch_norm(x, rm, rv, training=True, momentum=0.25)
        torch.nn.functional.batch_norm(to_torch(torch, x), trm, trv, training=True,
                                       momentum=0.25)
    assert_close(rm, trm.numpy(), np.float32, TORCH_TOL)
    assert_close(rv, trv.numpy(), np.float32, TORCH_TOL)


# -- range: values near the largest half, NaN/Inf ----------------------------------------
def test_float16_values_near_65504(rng):
    # Statistics in double: a variance of ~1e9 (far above 65504) normalises
    # fine, and the float32 running buffers hold it.
    x = np.concatenate([rng.uniform(60000, 65504, (32, 3, 4)),
                        rng.uniform(-65504, -60000, (32, 3, 4))]).astype(F16)
    w, b = np.full(3, 64.0, np.float32), make_params(rng, 3, np.float32)[1]
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ref = reference_batch_norm(x, rm, rv, w, b, training=True)
    y = bnfast.batch_norm(x, rm, rv, w, b, training=True)
    assert_half_ulps(y, ref.out, F16)
    assert_stats_close(rv, ref.running_var, np.dtype(np.float32))
    assert rv.min() > 1e8
    # Evaluation near the top of the range, with the addend pushing past it: the
    # exact result rounded to float16 is inf there (|y| >= 65520), and only there.
    ev = reference_batch_norm(x, rm, rv, w, b, addend=x)
    got = bnfast.batch_norm(x, rm, rv, w, b, addend=x)
    assert_half_ulps(got, ev.out, F16)
    assert np.isinf(got).sum() == (np.abs(ev.out) >= 65520).sum() > 0


def test_bfloat16_values_near_3e38(rng):
    x = (rng.choice([-1.0, 1.0], (16, 2, 8)) * rng.uniform(2.5e38, 3.3e38, (16, 2, 8))
         ).astype(BF16)
    ref = reference_batch_norm(x, training=True)
    assert_half_ulps(bnfast.batch_norm(x, None, None, training=True), ref.out, BF16)
    # Evaluation with float64 statistics that float32 could not hold.
    rm, rv = np.zeros(2), np.full(2, 1e76)
    ev = reference_batch_norm(x, rm, rv, addend=x)
    assert_half_ulps(bnfast.batch_norm(x, rm, rv, addend=x), ev.out, BF16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_stay_in_their_channel(half, rng, layout, training):
    x = make_input(rng, (6, 4, 3, 3), np.float32).astype(half)
    x[2, 0, 1, 1] = np.nan
    x[4, 1, 0, 2] = np.inf
    x = with_layout(x, layout)
    w, b = make_params(rng, 4, np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    ref = reference_batch_norm(x, rm, rv, w, b, training)
    y = bnfast.batch_norm(x, rm, rv, w, b, training)
    assert_half_ulps(y, ref.out, half)  # NaN exactly where the reference has it
    assert np.isfinite(y[:, 2:].astype(np.float32)).all()
    if training:
        assert not np.isfinite(rm[:2]).any() and np.isfinite(rm[2:]).all()
        assert_stats_close(rm, ref.running_mean, np.dtype(np.float32))
        assert_stats_close(rv, ref.running_var, np.dtype(np.float32))


# -- half running buffers: overflow raises and changes nothing ----------------------------
def test_float16_running_var_overflow_raises_and_changes_nothing(rng):
    x = make_input(rng, (16, 3, 8), np.float32, scale=3000.0).astype(F16)  # var ~1e7
    rm, rv = np.zeros(3, F16), np.ones(3, F16)
    out = np.full_like(x, 7)
    x_before = x.copy()
    for kwargs in ({}, {"out": out}, {"out": x}):
        with pytest.raises(OverflowError, match=r"running_var .*float16.* rounds to inf.*float32"):
            bnfast.batch_norm(x, rm, rv, training=True, **kwargs)
        assert_same(rm, np.zeros(3, F16))
        assert_same(rv, np.ones(3, F16))
        assert_same(out, np.full_like(x, 7))
        assert_same(x, x_before)
    # The same step with float32 buffers (a module's default) is fine.
    rm32, rv32 = np.zeros(3, np.float32), np.ones(3, np.float32)
    ref = reference_batch_norm(x, rm32, rv32, training=True)
    bnfast.batch_norm(x, rm32, rv32, training=True)
    assert_stats_close(rv32, ref.running_var, np.dtype(np.float32))
    assert rv32.max() > 65504


@pytest.mark.parametrize("dtype, largest", [(F16, 65504.0), (BF16, float.fromhex("0x1.fep127"))],
                         ids=["float16", "bfloat16"])
def test_running_update_overflows_exactly_where_it_rounds_to_inf(rng, dtype, largest):
    # Momentum 1: the running mean becomes the batch mean.  Half an ulp past the
    # largest value rounds to inf (the tie goes to the even inf); just below it, to
    # the largest value.  The kernel checks before it writes the output too.
    ulp = {F16: 32.0, BF16: 2.0 ** 120}[dtype]  # at the largest value
    for mean, raises in ((largest + ulp / 2, True), (largest + ulp / 2 * (1 - 2 ** -20), False)):
        x = np.array([mean, mean]).reshape(2, 1)  # float64 data: the mean exactly
        rm, rv = np.zeros(1, dtype), np.ones(1, dtype)
        out = np.full_like(x, 7.0)
        if raises:
            with pytest.raises(OverflowError, match="running_mean .* rounds to inf"):
                bnfast.batch_norm(x, rm, rv, training=True, momentum=1.0, out=out)
            assert_same(out, np.full_like(x, 7.0))
            assert_same(rm, np.zeros(1, dtype))
        else:
            bnfast.batch_norm(x, rm, rv, training=True, momentum=1.0, out=out)
            assert float(rm[0]) == largest


def test_float32_running_buffers_of_float64_data_do_not_overflow_silently(rng):
    # torch refuses the mix; bnfast reads it, and a variance of 1e39 would be inf in
    # float32 (then an all-zero evaluation).  As for half buffers: raise, change nothing.
    x = np.array([[1e20, 0.0], [-1e20, 1.0], [3e19, 2.0]])
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(OverflowError, match=r"running_var of dtype float32 cannot hold its "
                                            r"update: channel 0 would be 1\.03e\+39.*float64"):
        bnfast.batch_norm(x, rm, rv, training=True, out=out)
    assert_same(rm, np.zeros(2, np.float32))
    assert_same(rv, np.ones(2, np.float32))
    assert_same(out, np.full_like(x, 7.0))
    m = bnfast.BatchNorm1d(2, dtype=np.float64, param_dtype=np.float32)
    with pytest.raises(OverflowError, match="running_var of dtype float32"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    # What fits is the float64 update rounded once (momentum 1: the batch's statistics).
    y = x[:, 1:].copy()
    rm1, rv1 = np.zeros(1, np.float32), np.ones(1, np.float32)
    bnfast.batch_norm(y, rm1, rv1, training=True, momentum=1.0)
    assert rm1[0] == np.float32(1.0) and rv1[0] == np.float32(1.0)


def test_default_float32_buffers_of_bfloat16_data_do_not_overflow_silently():
    # bfloat16 reaches 3e38: a batch of +-1e20 has a variance of 1.3e40, beyond the
    # module's default float32 running_var (torch writes inf, then evaluates to zeros).
    x = np.array([[1e20], [-1e20], [1e20], [-1e20]], np.float32).astype(BF16)
    m = bnfast.BatchNorm1d(1, dtype="bfloat16")
    with pytest.raises(OverflowError, match="running_var of dtype float32 cannot hold"):
        m(x)
    assert int(m.num_batches_tracked) == 0 and m.running_var[0] == 1.0
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    with pytest.raises(OverflowError, match="running_var of dtype float32"):
        bnfast.batch_norm(x, rm, rv, training=True)
    # The paths that update from statistics records (SyncBatchNorm, dask, population
    # statistics) check the same way.
    with pytest.raises(OverflowError, match="running_var of dtype float32"):
        bnfast.SyncBatchNorm(1, dtype="bfloat16")(x)
    assert rv[0] == 1.0


def test_half_running_buffers_with_out_take_no_temporary(rng):
    # The kernel checks the update before it writes anything: out is written directly.
    x = make_input(rng, (64, 8, 32, 32), np.float32)
    rm, rv = np.zeros(8, F16), np.ones(8, F16)
    tracemalloc.start()
    bnfast.batch_norm(x, rm, rv, training=True, out=x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes // 8, peak


def test_half_running_buffers_without_overflow_are_rounded_once(half, rng):
    x = half_input(rng, (16, 3, 8), half)
    rm, rv = (v.astype(half) for v in make_running(rng, 3, np.float32))
    ref = reference_batch_norm(x, rm, rv, training=True, momentum=0.3)
    bnfast.batch_norm(x, rm, rv, training=True, momentum=0.3)
    assert_same(rm, ref.running_mean.astype(half))
    assert_same(rv, ref.running_var.astype(half))


def test_module_with_float16_buffers_raises_and_changes_nothing(rng):
    m = bnfast.BatchNorm1d(3, dtype="float16", param_dtype="float16")
    x = make_input(rng, (16, 3, 8), np.float32, scale=3000.0).astype(F16)
    with pytest.raises(OverflowError, match="running_var"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    assert_same(m.running_var, np.ones(3, F16))
    # The default module keeps float32 statistics: the same batch works.
    m32 = bnfast.BatchNorm1d(3, dtype="float16")
    m32(x)
    assert m32.running_var.dtype == np.float32 and m32.running_var.max() > 65504


# -- threads ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, layout", [((64, 3, 32, 32), "contiguous"),
                                           ((64, 3, 32, 32), "channels_last"),
                                           ((20000, 16), "contiguous"),
                                           ((3, 70, 33, 33), "channels_last"),
                                           ((131, 46, 7, 7), "contiguous")], ids=str)
def test_one_and_many_threads_bit_identical(half, rng, shape, layout):
    x = half_input(rng, shape, half, layout)
    a = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    w, b = make_params(rng, shape[1], np.float32)

    def run(n):
        rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
        y, mean, invstd = bnfast.batch_norm(x, rm, rv, w, b, True, return_stats=True,
                                            n_threads=n)
        fused = bnfast.batch_norm(x, rm, rv, w, b, False, addend=a, relu=True, n_threads=n)
        return y, mean, invstd, rm, rv, fused

    for one, many in zip(run(1), run(4)):
        assert_same(one, many)


# -- backward ----------------------------------------------------------------------------
def _grad_ulps(got, ref64, dtype):
    """Gradients of ``x``'s shape: rounded once from float32's sum of two terms
    about their zeros (bnfast_table.h): the true ulp."""
    assert_half_ulps(got, ref64, dtype)


def _param_grad_close(got, ref64, terms=None):
    """grad_weight/grad_bias, rounded once to their dtype, of sums that may run in
    float (half data): within STATS_ULPS float32 ulps of the sum of the magnitudes
    of their ``terms`` (x's shape; None: sums in double)."""
    dt = got.dtype
    if dt in HALF:
        assert_half_ulps(got, ref64, dt)
        return
    if terms is None:
        assert_close(got, ref64, dt.type, STAT_TOL)
        return
    axes = (0,) + tuple(range(2, terms.ndim))
    scale = STATS_ULPS * F32_EPS * np.abs(terms).sum(axis=axes)
    err = np.abs(got.astype(np.float64) - ref64)
    assert np.all(err <= scale + F32_EPS * np.abs(ref64) + 1e-30), err.max()


def _xhat(x, mean, invstd):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x.astype(np.float64) - mean.reshape(shape)) * invstd.reshape(shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_against_reference(half, rng, training, layout, params, shape):
    C, p = shape[1], param_dtype(params, half)
    x = half_input(rng, shape, half, layout)
    dy = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    w, b = make_params(rng, C, p)
    rm, rv = make_running(rng, C, p)
    _, mean, invstd = bnfast.batch_norm(x, rm.copy(), rv.copy(), w, b, training,
                                        return_stats=True)
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, training)
    gx, gw, gb = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
    _grad_ulps(gx, ref.grad_input, half)
    assert is_channels_last(gx) == is_channels_last(x)
    g = dy.astype(np.float64)
    _param_grad_close(gw, ref.grad_weight, _xhat(x, mean, invstd) * g)
    _param_grad_close(gb, ref.grad_bias, g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_loc, dy_loc", [(0.0, 1.0), (3.0, 2.0), (-40.0, 0.5)], ids=str)
def test_backward_where_dy_cancels_against_its_mean(half, rng, layout, x_loc, dy_loc):
    """dx ~ 0 where dy lies near its mean, a mean far from 0: dx = (dy - d) * a +
    (x - m) * b takes dy - d exactly there (bnfast_table.h), so dx is within an ulp
    of the half type at its own magnitude, the true ulp, not at dy * a's (the form
    dy * a + ... + offset missed by 3 ulps of float16 on these data)."""
    shape = (16, 8, 30, 30)
    x = half_input(rng, shape, half, layout, loc=x_loc)
    dy = half_input(rng, shape, half, layout, loc=dy_loc, scale=1.0)
    w, _ = make_params(rng, 8, np.float32)
    _, mean, invstd = bnfast.batch_norm(x, None, None, w, None, True, return_stats=True)
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, True)
    gx, _, _ = bnfast.batch_norm_backward(dy, x, w, mean, invstd, True)
    assert_half_ulps(gx, ref.grad_input, half)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("from_mask", [False, True], ids=["output", "relu_mask"])
def test_fused_backward_against_reference(half, rng, training, layout, from_mask):
    shape = (6, 4, 5, 5)
    x = half_input(rng, shape, half, layout)
    a = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    dy = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    w, b = make_params(rng, 4, np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    y, mean, invstd = bnfast.fused_batch_norm(x, rm, rv, w, b, a, training, return_stats=True)
    ref = reference_batch_norm_backward(dy, x, w, mean, invstd, training, output=y)
    gate = bnfast.relu_mask(y) if from_mask else y
    gx, gw, gb, ga = bnfast.fused_batch_norm_backward(dy, x, gate, w, mean, invstd, training)
    _grad_ulps(gx, ref.grad_input, half)
    assert_same(ga, ref.grad_addend.astype(half))  # grad_output where the ReLU passed, exact
    _param_grad_close(gw, ref.grad_weight)
    _param_grad_close(gb, ref.grad_bias)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_in_place_and_out(half, rng, training):
    shape = (5, 3, 4, 4)
    x = half_input(rng, shape, half)
    dy = half_input(rng, shape, half, loc=0.0, scale=1.0)
    w, _ = make_params(rng, 3, np.float32)
    _, mean, invstd = bnfast.batch_norm(x, None, None, w, None, True, return_stats=True)
    expected = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)[0]
    out = np.empty_like(x)
    assert bnfast.batch_norm_backward(dy, x, w, mean, invstd, training, out=out)[0] is out
    assert_same(out, expected)
    got = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training, out=dy)[0]
    assert got is dy
    assert_same(dy, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_backward_matches_torch(half, rng, torch, training, layout):
    shape = (8, 5, 6, 6)
    x = half_input(rng, shape, half, layout)
    dy = half_input(rng, shape, half, layout, loc=0.0, scale=1.0)
    w, b = make_params(rng, 5, np.float32)
    rm, rv = make_running(rng, 5, np.float32)
    tx, tdy, tw = to_torch(torch, x), to_torch(torch, dy), torch.from_numpy(w)
    _, tmean, tinvstd = torch.ops.aten.native_batch_norm(
        tx, tw, torch.from_numpy(b), torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()),
        training, 0.1, 1e-5)
    stats = ((None, None, tmean, tinvstd) if training
             else (torch.from_numpy(rm), torch.from_numpy(rv), None, None))
    tgx, tgw, tgb = torch.ops.aten.native_batch_norm_backward(
        tdy, tx, tw, *stats, training, 1e-5, [True, True, True])
    _, mean, invstd = bnfast.batch_norm(x, rm.copy(), rv.copy(), w, b, training,
                                        return_stats=True)
    gx, gw, gb = bnfast.batch_norm_backward(dy, x, w, mean, invstd, training)
    assert_half_ulps(gx, from_torch(torch, tgx).astype(np.float64), half, ulps=2,
                     floor=SUM_FLOOR)
    # torch returns the parameters' gradients in their dtype (float32 here).
    assert gw.dtype == gb.dtype == np.float32
    # Sums in double here, in float32 there: as close as float32's own tolerance.
    assert_close(gw, tgw.numpy(), np.float32, TORCH_TOL)
    assert_close(gb, tgb.numpy(), np.float32, TORCH_TOL)


def test_backward_one_and_many_threads_bit_identical(half, rng):
    shape = (64, 3, 32, 32)
    x = half_input(rng, shape, half, "channels_last")
    dy = half_input(rng, shape, half, "channels_last", loc=0.0, scale=1.0)
    w, _ = make_params(rng, 3, np.float32)
    _, mean, invstd = bnfast.batch_norm(x, None, None, w, None, True, return_stats=True)
    one = bnfast.batch_norm_backward(dy, x, w, mean, invstd, n_threads=1)
    many = bnfast.batch_norm_backward(dy, x, w, mean, invstd, n_threads=4)
    for u, v in zip(one, many):
        assert_same(u, v)


# -- modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("param_kind", [None, "half", "float64"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_module_forward_backward(half, rng, param_kind, fused):
    kwargs = {} if param_kind is None else {"param_dtype": param_dtype(param_kind, half)}
    cls = bnfast.FusedBatchNorm2d if fused else bnfast.BatchNorm2d
    m = cls(4, dtype=half.name, **kwargs)
    p = np.dtype(np.float32) if param_kind is None else param_dtype(param_kind, half)
    assert m.dtype == half and m.param_dtype == p
    assert m.weight.dtype == m.bias.dtype == m.running_mean.dtype == m.running_var.dtype == p
    w, b = make_params(rng, 4, p)
    m.weight[...], m.bias[...] = w, b
    x = half_input(rng, (6, 4, 5, 5), half, "channels_last")
    extra = (half_input(rng, x.shape, half, loc=0.0, scale=1.0),) if fused else ()
    y = m(x, *extra)
    ref = reference_batch_norm(x, np.zeros(4), np.ones(4), w, b, True,
                               addend=extra[0] if fused else None, relu=fused)
    floor = SUM_FLOOR if fused else 0.0  # the addend's sum on training's float-summed var
    assert_half_ulps(y, ref.out, half, floor=floor)
    assert_stats_close(m.running_mean, ref.running_mean, p)
    assert_stats_close(m.running_var, ref.running_var, p)
    dy = half_input(rng, x.shape, half, loc=0.0, scale=1.0)
    grads = m.backward(dy)
    gx = grads[0] if fused else grads
    gref = reference_batch_norm_backward(dy, x, w, ref.mean, ref.invstd, True,
                                         output=y if fused else None)
    _grad_ulps(gx, gref.grad_input, half)
    assert m.weight_grad.dtype == m.bias_grad.dtype == p  # as torch's .grad
    m.eval()
    ev = reference_batch_norm(x, m.running_mean, m.running_var, w, b,
                              addend=extra[0] if fused else None, relu=fused)
    assert_half_ulps(m(x, *extra), ev.out, half, floor=floor)


def test_module_rejects_other_input_dtype(half):
    m = bnfast.BatchNorm1d(3, dtype=half)
    with pytest.raises(TypeError, match=rf"input dtype float32 does not match the module's "
                                        rf"dtype {half.name}"):
        m(np.ones((4, 3), np.float32))


@pytest.mark.parametrize("param_kind", ["float32", "half"])
def test_state_dict_round_trip_with_half_params(half, rng, param_kind):
    p = param_dtype(param_kind, half)
    a = bnfast.BatchNorm2d(3, dtype=half, param_dtype=p)
    a(half_input(rng, (4, 3, 5, 5), half))
    a.weight[...] = make_params(rng, 3, np.float32)[0]
    b = bnfast.BatchNorm2d(3, dtype=half, param_dtype=p)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        assert_same(b.state_dict()[key], value)


def test_load_state_dict_casts_between_dtypes(rng):
    # As torch's load_state_dict copies: into the module's dtypes, with a cast.
    bf = bnfast.BatchNorm1d(3, dtype="bfloat16", param_dtype="bfloat16")
    f32 = {"weight": np.array([1.0, 1.00390625, 3.14159], np.float32)}
    bf.load_state_dict(f32, strict=False)
    assert_same(bf.weight, f32["weight"].astype(BF16))
    half16 = bnfast.BatchNorm1d(3, dtype="float16", param_dtype="float16")
    half16.load_state_dict({"weight": bf.weight}, strict=False)  # bfloat16 -> float16
    assert_same(half16.weight, bf.weight.astype(np.float32).astype(F16))
    plain = bnfast.BatchNorm1d(3)
    plain.load_state_dict(bf.state_dict())  # exact widening
    assert_same(plain.weight, bf.weight.astype(np.float32))


def test_load_state_dict_overflow_is_an_error_and_loads_nothing():
    m = bnfast.BatchNorm1d(3, dtype="float16", param_dtype="float16")
    state = {"weight": np.full(3, 2.0), "running_var": np.full(3, 1e5)}
    with pytest.raises(RuntimeError, match="value out of range for running_var"):
        m.load_state_dict(state, strict=False)
    assert_same(m.weight, np.ones(3, F16))


def test_torch_bfloat16_state_dict_loads(rng, torch):
    t = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    t(to_torch(torch, half_input(rng, (4, 3, 5, 5), BF16)))
    m = bnfast.BatchNorm2d(3, dtype="bfloat16", param_dtype="bfloat16")
    m.load_state_dict(t.state_dict())
    assert_same(m.running_var, from_torch(torch, t.running_var))
    assert int(m.num_batches_tracked) == 1


def test_bfloat16_safetensors_file_loads_into_a_module(rng, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = {"weight": rng.uniform(0.5, 2, 4).astype(BF16),
             "bias": rng.uniform(-1, 1, 4).astype(BF16),
             "running_mean": rng.uniform(-1, 1, 4).astype(BF16),
             "running_var": rng.uniform(0.5, 2, 4).astype(BF16),
             "num_batches_tracked": np.array(7, np.int64)}
    path = tmp_path / "bn.safetensors"
    safetensors_numpy.save_file(state, str(path))
    loaded = safetensors_numpy.load_file(str(path))
    assert loaded["weight"].dtype == BF16
    for kwargs in ({"param_dtype": "bfloat16"}, {}):  # bfloat16, or float32 parameters
        m = bnfast.BatchNorm2d(4, dtype="bfloat16", **kwargs)
        m.load_state_dict(loaded)
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert_same(getattr(m, key), state[key].astype(m.param_dtype))
        assert int(m.num_batches_tracked) == 7
        x = half_input(rng, (2, 4, 3, 3), BF16)
        ref = reference_batch_norm(x, state["running_mean"], state["running_var"],
                                   state["weight"], state["bias"])
        assert_half_ulps(m.eval()(x), ref.out, BF16)
    # Through bnfast.io: a module of the file's dtype, float32 parameters (exact).
    built = bnfast.BatchNorm2d.from_state_dict(bnfast.io.load_state_dict(path))
    assert built.dtype == BF16 and built.param_dtype == np.float32
    assert_same(built.running_var, state["running_var"].astype(np.float32))
