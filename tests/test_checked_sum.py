"""The checked addend sum of half data (``src/bnfast_half_leaves.h``'s end), in C.

Half data with an addend normalises in float, ``t = (x - hz) * fa + hb`` and
``v = t + add``, and where ``|v| < 2**-9 |t|`` (the addend cancels the
normalised value) takes ``v`` again in double from the table's double rows.
``tests/c/checked_sum.c`` runs the scalar and tiled leaves in every variant
(portable, AVX-512 and AVX2 cached and streamed), built at -O3 as the extension is, with
and without ``-DBNFAST_NO_SIMD``, on values of every kind (cancelling addends,
NaN, inf, subnormals, -0 coefficients) and tile widths below, across and above
a 16-value step: each gives the bits of NumPy's transcription of that rule
(float32 and float64 arithmetic, one rounding to the half type), and the
variants the same bits as the portable leaf, NaN payloads included.
"""
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import run_c_driver

N = 8192
#: The driver's variants: portable; the CPU's best cached, streamed; AVX2 cached, streamed.
VARIANTS = 5
HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
#: (type index, tile width W): widths below, across and above a 16-value step.
CASES = [(t, W) for t in (0, 1) for W in (5, 17, 48)]


def _inputs(rng, dtype, W):
    """x, addend (dtype), the tile's float rows hz, fa, hb and double rows m, a, b
    (W + 16 values each): half the addends cancel the float normalised value."""
    ROW = W + 16
    bits = rng.integers(0, 1 << 16, N, dtype=np.uint16)
    x = bits.view(dtype).copy()
    x[::3] = rng.standard_normal(N)[::3].astype(dtype)  # mostly ordinary values
    base = rng.standard_normal(W).astype(np.float32)
    hz, hb = base, (base * np.float32(1e-3)).astype(np.float32)
    fa = rng.uniform(0.3, 3.0, W).astype(np.float32)
    fa[W // 2], hz[W - 1] = np.float32(1e-30), np.float32(np.nan)
    fa[1 % W], hb[1 % W], hz[2 % W], hb[0] = 0.0, -0.0, -0.0, -0.0  # signed zeros
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
    # At the tile position where fa = 0 and hb = -0: t = -0 where x < hz, so an
    # addend of -0 leaves -0 (the tiled leaf's signed-zero case).
    add[1 % W::W] = np.array(-0.0, dtype)
    return x, add, rows, (m, a, b)


def _expected(x, add, rows, drows, relu, per_value, W):
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


def _stdin(data):
    return np.int32(len(CASES)).tobytes() + b"".join(
        np.int32(t).tobytes() + np.int32(W).tobytes() + x.tobytes() + add.tobytes()
        + b"".join(r.tobytes() for r in rows) + b"".join(r.tobytes() for r in drows)
        for (t, W), (x, add, rows, drows) in zip(CASES, data))


@pytest.fixture(scope="module", params=[("-O3",), ("-O3", "-DBNFAST_NO_SIMD")],
                ids=["simd", "portable"])
def driver(request, tmp_path_factory):
    rng = np.random.default_rng(7)
    data = [_inputs(rng, HALF[t], W) for t, W in CASES]
    out = run_c_driver(tmp_path_factory.mktemp("checked"), "checked_sum.c", *request.param,
                       stdin=_stdin(data))
    has = int(np.frombuffer(out[:4], np.int32)[0])
    blocks = np.frombuffer(out[4:], np.uint16).reshape(len(CASES), 2, 2, VARIANTS, N)
    return request.param, has, data, blocks


@pytest.mark.parametrize("relu", [0, 1], ids=["plain", "relu"])
@pytest.mark.parametrize("leaf", [0, 1], ids=["scalar", "tiled"])
@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{HALF[t].name}-W{W}" for t, W in CASES])
def test_every_variant_gives_the_rules_bits(driver, case, leaf, relu):
    _, _, data, blocks = driver
    W = CASES[case][1]
    x, add, rows, drows = data[case]
    expected, redo = _expected(x, add, rows, drows, relu, leaf == 1, W)
    want = expected.view(np.uint16)
    nan = np.isnan(expected.astype(np.float32))
    portable = blocks[case, relu, leaf, 0]
    np.testing.assert_array_equal(np.isnan(portable.view(x.dtype).astype(np.float32)), nan)
    np.testing.assert_array_equal(portable[~nan], want[~nan])
    assert nan.sum() > 10  # payloads in play
    if leaf == 1:
        assert (want[~nan] == 0x8000).any()  # and -0
    for variant in range(1, VARIANTS):  # every bit the portable leaf's, NaN payloads included
        np.testing.assert_array_equal(blocks[case, relu, leaf, variant], portable,
                                      err_msg=f"variant {variant}")
    # The double pass ran, and changed results: the check is not idle.
    assert redo.sum() > 200
    if not relu:
        j = np.arange(N) % W if leaf == 1 else np.zeros(N, np.intp)
        with np.errstate(all="ignore"):
            float_only = ((x.astype(np.float32) - rows[0][j]) * rows[1][j] + rows[2][j]
                          + add.astype(np.float32)).astype(x.dtype)
        assert (float_only.view(np.uint16) != want)[redo & ~nan].sum() > 5


def test_the_cpus_vector_variants_ran(driver):
    """The SIMD build runs the AVX-512 and AVX2 leaves where the CPU has them
    (else the blocks above are the portable leaf's over again); the portable
    build none."""
    flags, has, _, _ = driver
    cpuinfo = Path("/proc/cpuinfo")
    if "-DBNFAST_NO_SIMD" in flags:
        assert has == 0
    elif cpuinfo.exists():
        cpu_flags = set(re.findall(r"\w+", cpuinfo.read_text()))
        if {"f16c", "avx2"} <= cpu_flags:
            assert has & 0b11000 == 0b11000
        if {"avx512f", "avx512vl", "avx512bw", "f16c", "avx2"} <= cpu_flags:
            assert has & 0b11 == 0b11
        elif not {"f16c", "avx2"} <= cpu_flags:
            pytest.skip("this CPU has no AVX2: the portable leaves only")
    else:
        pytest.skip("no /proc/cpuinfo to tell what this CPU has")


def test_streamed_variants_stream_whole_aligned_lines(tmp_path):
    """The streamed variants' non-temporal stores (logged: the driver built with
    -DLOG_STORES) are aligned, cover whole 64-byte lines no plain store touches,
    and happen (spans of 1100 and 7055 values); the cached variants stream
    nothing."""
    rng = np.random.default_rng(7)
    data = [_inputs(rng, HALF[t], W) for t, W in CASES]
    out = run_c_driver(tmp_path, "checked_sum.c", "-O3", "-DLOG_STORES", stdin=_stdin(data))
    has = int(np.frombuffer(out[:4], np.int32)[0])
    misaligned, mixed, streamed_nt, streamed_cached = np.frombuffer(out[-32:], np.int64)
    assert (misaligned, mixed, streamed_cached) == (0, 0, 0)
    if has & 0b11000 == 0b11000:  # AVX2 at least: every type has a streamed variant
        assert streamed_nt > 1000
    else:
        pytest.skip("this CPU runs the portable leaves only")
