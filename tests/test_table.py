"""The per-channel set-up of both directions (``src/bnfast_table.h``) in C.

``tests/c/table.c`` runs every leaf this CPU has (portable, AVX2, AVX-512, and
the picked one: the forward's in place, mean and var given as the coefficient
rows they become) on inputs with NaN, infinities, -0.0, zero and negative
variances and zero residuals: the forward's for every choice of weight / bias /
residual, the backward's in training and evaluation, with and without weight
and gradients, for both compute types; two tile repeats each.  Each output is
held to a NumPy float64 computation of the same formulas (``_affine.pxd``'s top
describes the forward's table), bit for bit: IEEE sqrt, division, products and
conversions are correctly rounded, so a leaf may not differ in any bit.  A
scalar build (``-DBNFAST_NO_SIMD``) and a ``-march=native`` one must give the
same bits.
"""
import itertools

import numpy as np
import pytest

from conftest import run_c_driver

C, EPS, SETS = 37, 1e-5, 5
# Value sets whose coefficients (weight, bias and residual present) fit the float rows.
FITTING_SETS = (0, 4)
REPEATS = (1, 3)
LEAVES = ("portable", "avx2", "avx512", "picked in place")
# The backward's: 1/n in training, 0 in evaluation; float32 and float64 compute types.
GRAD_LEAVES = ("portable", "avx2", "avx512", "picked")
INV_N = (1.0 / 7.0, 0.0)
COMPUTE_TYPES = (np.float32, np.float64)
DBL_MAX = np.finfo(np.float64).max
FLT_MAX = float(np.finfo(np.float32).max)


def _table_len(W):
    return 6 * (W + 16) + 1


def _parse(out):
    """(CPU has AVX2, AVX-512), the inputs, {forward key: (coef, table)}, {backward key:
    (scale/slope/offset rows, grad_weight and grad_bias, table)}."""
    has = np.frombuffer(out[:8], np.int32).astype(bool)
    inputs = np.frombuffer(out[8:8 + SETS * 5 * C * 8], np.float64).reshape(SETS, 5, C)
    at, results, grads = 8 + inputs.nbytes, {}, {}

    def take(n, dtype):
        nonlocal at
        block = np.frombuffer(out[at:at + n * np.dtype(dtype).itemsize], dtype)
        at += block.nbytes
        return block

    for v in range(SETS):
        for case in range(8):
            for repeat in REPEATS:
                for leaf in LEAVES:
                    results[v, case, repeat, leaf] = (take(4 * C, np.float64),
                                                      take(_table_len(repeat * C), np.float64))
    for key in itertools.product(range(SETS), range(4), INV_N, COMPUTE_TYPES, REPEATS,
                                 GRAD_LEAVES):
        T, repeat = key[3], key[4]
        grads[key] = (take(3 * C, np.float64), take(2 * C, T), take(4 * (repeat * C + 8), T))
    assert at == len(out)
    return has, inputs, results, grads


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    out = run_c_driver(tmp, "table.c")
    return out, _parse(out), tmp


def _expected(inputs, case, repeat):
    """coef rows and the zero-padded table, from NumPy's float64 arithmetic."""
    mean, var, weight, bias, residual = inputs
    with np.errstate(all="ignore"):
        invstd = 1.0 / np.sqrt(var + EPS)
        a = invstd * weight if case & 1 else invstd
        shift = bias.copy() if case & 2 else np.zeros(C)
        b = shift.copy()
        if case & 4:
            b = np.where(residual != 0.0, shift - residual * a, shift)
        fm, fa = mean.astype(np.float32), a.astype(np.float32)
        # What rounding the mean lost, folded into b; an infinite (or NaN) mean loses
        # nothing (its difference is NaN: inf - inf).
        lost = mean - fm.astype(np.float64)
        fb = np.where((lost != 0.0) & ~np.isnan(lost), b - lost * a, b).astype(np.float32)
        # The half rows: the map about its zero z (where z and what rounding it
        # moved are floats of reach; else the float rows).
        z = mean - b / a
        hz = z.astype(np.float32)
        hb = (b - (mean - hz.astype(np.float64)) * a).astype(np.float32)
        about_zero = ((np.abs(z) <= 2.0**100) & (np.abs(fa) >= 2.0**-126)
                      & (np.abs(fa) <= FLT_MAX) & (np.abs(hb) <= FLT_MAX))
        hz, hb = np.where(about_zero, hz, fm), np.where(about_zero, hb, fb)
        unfit = (((np.abs(fm) > 2.0**100) & (np.abs(mean) <= DBL_MAX))
                 | ((np.abs(fa) > FLT_MAX) & (np.abs(a) <= DBL_MAX))
                 | ((np.abs(fb) > FLT_MAX) & (np.abs(b) <= DBL_MAX))).any()
    coef = np.concatenate([mean, invstd, a, shift])
    W = repeat * C
    R = W + 16
    table = np.zeros(_table_len(W))
    floats = table[3 * R:-1].view(np.float32)
    for row, (d, f, h) in enumerate([(mean, fm, hz), (a, fa, fa), (b, fb, hb)]):
        # Each row repeats its C values over the whole R = W + 16: the 16 past W
        # let a 16-value step from any tile position load its coefficients.
        table[row * R:(row + 1) * R] = np.resize(d, R)
        floats[row * R:(row + 1) * R] = np.resize(f, R)
        floats[(row + 3) * R:(row + 4) * R] = np.resize(h, R)
    table[-1] = 0.0 if unfit else 1.0
    return coef, table, not unfit, about_zero


def _same(actual, expected):
    width = {4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    np.testing.assert_array_equal(actual.view(width), expected.view(width))


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("case", range(8), ids=lambda k: "weight%d-bias%d-residual%d" % (
    k & 1, k >> 1 & 1, k >> 2 & 1))
@pytest.mark.parametrize("value_set", range(SETS), ids=[
    "fits-float", "mean-beyond", "scale-beyond", "shift-beyond", "all-just-within"])
@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_gives_the_float64_formulas_bits(driver, leaf, value_set, case, repeat):
    _, (has, inputs, results, _), _ = driver
    if (leaf == "avx2" and not has[0]) or (leaf == "avx512" and not has[1]):
        pytest.skip(f"this CPU has no {leaf}")
    coef, table = results[value_set, case, repeat, leaf]
    want_coef, want_table, fits, about_zero = _expected(inputs[value_set], case, repeat)
    _same(coef, want_coef)
    _same(table, want_table)
    # Each limit is in play; non-finite channels alone never clear the flag.
    if case == 7:
        assert fits == (value_set in FITTING_SETS)
        # The half rows: about the zero, and the float rows' where it is out of reach.
        assert not about_zero[[19, 23]].any() and about_zero.sum() > C // 2
    assert np.isnan(coef).any() and np.isinf(coef).any()


def _expected_grads(inputs, case, inv_n, T, repeat):
    """The backward's rows, gradients and table from NumPy's float64 arithmetic:
    dx = (dy - d) * a + (x - m) * b, d and m dy's mean and the mean rounded to T,
    what one of them lost moved into the other (the larger term's)."""
    mean, invstd, weight, sum_dy, sum_xdy = inputs
    with np.errstate(all="ignore"):
        a = invstd * weight if case & 1 else invstd.copy()
        s = invstd * invstd * (sum_xdy * inv_n)
        slope, dy_mean = -(s * a), sum_dy * inv_n
        grads = np.zeros(2 * C, T)
        if case & 2:
            grads[:C], grads[C:] = (sum_xdy * invstd).astype(T), sum_dy.astype(T)
        d = dy_mean.astype(T)
        r = (dy_mean - d.astype(np.float64)) * a
        z = np.where(r != 0.0, mean + r / slope, mean)
        into_m = (np.abs(dy_mean * a) >= np.abs(mean * slope)) & (np.abs(z) <= 2.0 ** 100)
        m = np.where(into_m, z, mean).astype(T)
        lost = (mean - m.astype(np.float64)) * slope
        moved = np.where((lost != 0.0) & (lost == lost), dy_mean + lost / a, dy_mean)
        d = np.where(into_m, d, moved.astype(T))
        R = repeat * C + 8
        table = np.zeros(4 * R, T)
        for row, values in enumerate([m, a.astype(T), slope.astype(T), d]):
            table[row * R:row * R + repeat * C] = np.tile(values, repeat)
    return np.concatenate([a, slope, dy_mean]), grads, table


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("T", COMPUTE_TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("inv_n", INV_N, ids=["training", "evaluation"])
@pytest.mark.parametrize("case", range(4), ids=lambda k: "weight%d-grads%d" % (k & 1, k >> 1))
@pytest.mark.parametrize("value_set", range(SETS))
@pytest.mark.parametrize("leaf", GRAD_LEAVES)
def test_backward_leaf_gives_the_float64_formulas_bits(driver, leaf, value_set, case, inv_n,
                                                       T, repeat):
    _, (has, inputs, _, grads), _ = driver
    if (leaf == "avx2" and not has[0]) or (leaf == "avx512" and not has[1]):
        pytest.skip(f"this CPU has no {leaf}")
    got = grads[value_set, case, inv_n, T, repeat, leaf]
    want = _expected_grads(inputs[value_set], case, inv_n, T, repeat)
    for actual, expected in zip(got, want):
        _same(actual, expected)
    # NaN and inf in play (evaluation multiplies the sums by 0: inf only from the weight).
    assert np.isnan(got[0]).any()
    if inv_n or case & 1:
        assert np.isinf(got[0]).any()


@pytest.mark.parametrize("flags", [("-DBNFAST_NO_SIMD",), ("-march=native",)], ids=" ".join)
def test_other_builds_give_the_same(driver, flags):
    """Their portable and picked leaves (a native build picks its portable one,
    compiled for this CPU), against this build's."""
    _, (_, inputs, results, grads), tmp = driver
    _, other_inputs, other, other_grads = _parse(run_c_driver(tmp, "table.c", *flags))
    _same(other_inputs, inputs)
    for mine, theirs in ((results, other), (grads, other_grads)):
        for key in mine:
            if key[-1] in ("portable", "picked", "picked in place"):
                for got, want in zip(theirs[key], mine[key]):
                    _same(got, want)
