"""The normalise pass's per-channel set-up (``src/bnfast_table.h``) in C.

``tests/c/table.c`` runs every leaf this CPU has (portable, AVX2, AVX-512, and
the picked one in place, mean and var given as the coefficient rows they
become) on inputs with NaN, infinities, zero and negative variances and zero
residuals, for every choice of weight / bias / residual and two tile repeats.
Each output is held to a NumPy float64 computation of the same formulas
(``_affine.pxd``'s top describes the table), bit for bit: IEEE sqrt, division,
products and conversions are correctly rounded, so a leaf may not differ in any
bit.  A scalar build (``-DBNFAST_NO_SIMD``) and a ``-march=native`` one must
give the same bytes.
"""
import numpy as np
import pytest

from conftest import run_c_driver

C, EPS, SETS = 37, 1e-5, 5
# Value sets whose coefficients (weight, bias and residual present) fit the float rows.
FITTING_SETS = (0, 4)
REPEATS = (1, 3)
LEAVES = ("portable", "avx2", "avx512", "picked in place")
DBL_MAX = np.finfo(np.float64).max
FLT_MAX = float(np.finfo(np.float32).max)


def _table_len(W):
    R = W + 16
    return 3 * R + (3 * R + 1) // 2 + 1


def _parse(out):
    has = np.frombuffer(out[:8], np.int32).astype(bool)
    inputs = np.frombuffer(out[8:8 + SETS * 5 * C * 8], np.float64).reshape(SETS, 5, C)
    at, results = 8 + inputs.nbytes, {}
    for v in range(SETS):
        for case in range(8):
            for repeat in REPEATS:
                for leaf in LEAVES:
                    n = 4 * C + _table_len(repeat * C)
                    block = np.frombuffer(out[at:at + 8 * n], np.float64)
                    results[v, case, repeat, leaf] = block[:4 * C], block[4 * C:]
                    at += 8 * n
    assert at == len(out)
    return has, inputs, results


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
        fb = (b - (mean - fm.astype(np.float64)) * a).astype(np.float32)
        unfit = (((np.abs(fm) > 2.0**100) & (np.abs(mean) <= DBL_MAX))
                 | ((np.abs(fa) > FLT_MAX) & (np.abs(a) <= DBL_MAX))
                 | ((np.abs(fb) > FLT_MAX) & (np.abs(b) <= DBL_MAX))).any()
    coef = np.concatenate([mean, invstd, a, shift])
    W = repeat * C
    R = W + 16
    table = np.zeros(_table_len(W))
    floats = table[3 * R:-1].view(np.float32)
    for row, (d, f) in enumerate([(mean, fm), (a, fa), (b, fb)]):
        table[row * R:row * R + W] = np.tile(d, repeat)
        floats[row * R:row * R + W] = np.tile(f, repeat)
    table[-1] = 0.0 if unfit else 1.0
    return coef, table, not unfit


def _same_bits(actual, expected):
    np.testing.assert_array_equal(actual.view(np.uint64), expected.view(np.uint64))


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("case", range(8), ids=lambda k: "weight%d-bias%d-residual%d" % (
    k & 1, k >> 1 & 1, k >> 2 & 1))
@pytest.mark.parametrize("value_set", range(SETS), ids=[
    "fits-float", "mean-beyond", "scale-beyond", "shift-beyond", "all-just-within"])
@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_gives_the_float64_formulas_bits(driver, leaf, value_set, case, repeat):
    _, (has, inputs, results), _ = driver
    if (leaf == "avx2" and not has[0]) or (leaf == "avx512" and not has[1]):
        pytest.skip(f"this CPU has no {leaf}")
    coef, table = results[value_set, case, repeat, leaf]
    want_coef, want_table, fits = _expected(inputs[value_set], case, repeat)
    _same_bits(coef, want_coef)
    _same_bits(table, want_table)
    # Each limit is in play; non-finite channels alone never clear the flag.
    if case == 7:
        assert fits == (value_set in FITTING_SETS)
    assert np.isnan(coef).any() and np.isinf(coef).any()


@pytest.mark.parametrize("flags", [("-DBNFAST_NO_SIMD",), ("-march=native",)], ids=" ".join)
def test_other_builds_give_the_same_bits(driver, flags):
    """Their portable and picked leaves (a native build picks its portable one,
    compiled for this CPU), against this build's."""
    _, (_, inputs, results), tmp = driver
    _, other_inputs, other = _parse(run_c_driver(tmp, "table.c", *flags))
    _same_bits(other_inputs, inputs)
    for key in results:
        if key[-1] in ("portable", "picked in place"):
            for got, want in zip(other[key], results[key]):
                _same_bits(got, want)
