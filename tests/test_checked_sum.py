"""The checked addend sum of half data (``src/bnfast_half_leaves.h``'s end), in C.

Half data with an addend normalises in float, ``t = (x - hz) * fa + hb`` and
``v = t + add``, and where ``|v| < 2**-9 |t|`` (the addend cancels the
normalised value) takes ``v`` again in double from the table's double rows.
``tests/c/checked_sum.c`` runs the scalar and tiled leaves in every variant
(portable, AVX-512 cached and streamed), built with and without
``-DBNFAST_NO_SIMD``, on values of every kind (cancelling addends, NaN, inf,
subnormals); each must give the bits of NumPy's transcription of that rule
(float32 and float64 arithmetic, one rounding to the half type).
"""
import ml_dtypes
import numpy as np
import pytest

from conftest import run_c_driver

N, W = 8192, 48
ROW = W + 16
HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _inputs(rng, dtype):
    """x, addend (dtype), the tile's float rows hz, fa, hb and double rows m, a, b:
    a quarter of the addends cancel the float normalised value to its rounding."""
    bits = rng.integers(0, 1 << 16, N, dtype=np.uint16)
    x = bits.view(dtype).copy()
    x[::3] = rng.standard_normal(N)[::3].astype(dtype)  # mostly ordinary values
    base = rng.standard_normal(W).astype(np.float32)
    hz, hb = base, (base * np.float32(1e-3)).astype(np.float32)
    fa = rng.uniform(0.3, 3.0, W).astype(np.float32)
    fa[7], hz[9] = np.float32(1e-30), np.float32(np.nan)
    rows = [np.resize(r, ROW) for r in (hz, fa, hb)]
    m, a, b = (r.astype(np.float64) for r in rows)
    m, b = m + 2.0 ** -30, b - 2.0 ** -31  # the double rows: a nearby map
    # The tiled leaf's coefficients per value (even values), the scalar leaf's
    # tile position 0 (odd values).
    j = np.where(np.arange(N) % 2 == 0, np.arange(N) % W, 0)
    with np.errstate(all="ignore"):
        t = ((x.astype(np.float32) - rows[0][j]) * rows[1][j] + rows[2][j]).astype(np.float32)
        add = rng.standard_normal(N).astype(dtype)
        cancel = rng.random(N) < 0.5
        add[cancel] = (-t[cancel]).astype(dtype)  # (beyond the half range: inf)
    add[::97] = np.array(np.inf, dtype)
    return x, add, rows, (m, a, b)


def _expected(x, add, rows, drows, relu, per_value):
    """The rule in NumPy: float32, checked, float64 where it cancels; j the
    coefficients' index per value."""
    j = np.arange(N) % W if per_value else np.zeros(N, np.intp)
    hz, fa, hb = (r[j] for r in rows)
    m, a, b = (r[j] for r in drows)
    xf, af = x.astype(np.float32), add.astype(np.float32)
    with np.errstate(all="ignore"):
        t = (xf - hz) * fa + hb
        v = t + af
        redo = np.abs(v) < np.float32(2.0 ** -9) * np.abs(t)
        d = (((xf.astype(np.float64) - m) * a + b) + af.astype(np.float64)).astype(np.float32)
        v = np.where(redo, d, v)
        if relu:
            v = np.where(v < 0, np.float32(0.0), v)
        return v.astype(x.dtype), redo


@pytest.fixture(scope="module", params=[(), ("-DBNFAST_NO_SIMD",)], ids=["simd", "portable"])
def driver(request, tmp_path_factory):
    rng = np.random.default_rng(7)
    data = [_inputs(rng, dtype) for dtype in HALF]
    stdin = b"".join(
        x.tobytes() + add.tobytes() + b"".join(r.tobytes() for r in rows)
        + b"".join(r.tobytes() for r in drows) for x, add, rows, drows in data)
    out = run_c_driver(tmp_path_factory.mktemp("checked"), "checked_sum.c", *request.param,
                       stdin=stdin)
    has = int(np.frombuffer(out[:4], np.int32)[0])
    blocks = np.frombuffer(out[4:], np.uint16).reshape(len(HALF), 2, 2, 3, N)
    return has, data, blocks


@pytest.mark.parametrize("relu", [0, 1], ids=["plain", "relu"])
@pytest.mark.parametrize("leaf", [0, 1], ids=["scalar", "tiled"])
@pytest.mark.parametrize("type_index", [0, 1], ids=["float16", "bfloat16"])
def test_every_variant_gives_the_rules_bits(driver, type_index, leaf, relu):
    _, data, blocks = driver
    x, add, rows, drows = data[type_index]
    expected, redo = _expected(x, add, rows, drows, relu, per_value=leaf == 1)
    want = expected.view(np.uint16)
    nan = np.isnan(expected.astype(np.float32))
    for variant in range(3):
        got = blocks[type_index, relu, leaf, variant]
        assert np.array_equal(np.isnan(got.view(x.dtype).astype(np.float32)), nan)
        np.testing.assert_array_equal(got[~nan], want[~nan], err_msg=f"variant {variant}")
    # The double pass ran, and changed results: the check is not idle.
    assert redo.sum() > 200
    if not relu:
        j = np.arange(N) % W if leaf == 1 else np.zeros(N, np.intp)
        with np.errstate(all="ignore"):
            float_only = ((x.astype(np.float32) - rows[0][j]) * rows[1][j] + rows[2][j]
                          + add.astype(np.float32)).astype(x.dtype)
        assert (float_only.view(np.uint16) != want)[redo & ~nan].sum() > 20


def test_simd_build_runs_the_vector_variants(driver):
    has, _, _ = driver
    # (Where the CPU lacks AVX-512 every block is the portable leaf's.)
    assert has >= 0
