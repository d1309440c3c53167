"""The half-precision leaves in C: the normalise (every variant, every 16-bit
pattern) and the backward's pass-1 sums (every variant, finite values).

``tests/c/half_leaves.c`` drives the in-register leaves of
``src/bnfast_half_leaves.h`` (portable, F16C/AVX2, AVX512-BF16 and float16 on
AVX512F, as this CPU has them, and the vector ones' streaming twins) over all
65536 patterns of each half type with several coefficient sets, as the scalar,
tiled and runs leaves (runs in place too).  It is compiled twice, with SIMD and
with ``-DBNFAST_NO_SIMD``, and every output must equal NumPy's float32
arithmetic on the widened values rounded to the half type by NumPy (float16)
and ml_dtypes (bfloat16): the leaves' contract ("the float32 leaf's result,
rounded once"), identical bits in every build.

``tests/c/backward_half_leaves.c`` runs the backward's column sums and run sums
on half data (portable and picked variants) beside the float32 leaf on the same
values: the masked sums must be float32's bit for bit, in both builds; the
unmasked ones sum in float (``src/bnfast_float_sums.h``, and eight rows at a
time for the columns): they lie within 20 float32 ulps of the magnitude of
their terms of a float64 reference (bfloat16's whole range included: sums
float cannot hold go through double), in both builds alike.
"""
import platform

import ml_dtypes
import numpy as np
import pytest

from conftest import run_c_driver

N, W = 65536, 72
COEFS = np.array([[0.0, 1.0, 0.0], [0.5, 3.0, -0.25], [1.0, 1e-6, 0.0], [-2.0, 1e30, 1.0],
                  [1e-39, 1e-3, 1e-40], [0.3, 1.7, 0.1]], dtype=np.float32)
# Blocks written per (type, variant): coefficient sets x relu x (scalar, tiled, runs,
# runs in place).
BLOCKS = len(COEFS) * 2 * 4
# The driver's variants: float16 portable + F16C; bfloat16 portable + AVX2 + AVX512-BF16;
# then the streaming twins: float16 F16C; bfloat16 AVX2 + AVX512-BF16; then float16
# AVX512F, cached and streamed; then bfloat16 AVX512F (no AVX512-BF16), the same;
# then the flat runs (src/bnfast_flat_runs.h), float16 and bfloat16, the same.
VARIANTS = ([np.float16] * 2 + [ml_dtypes.bfloat16] * 3
            + [np.float16] + [ml_dtypes.bfloat16] * 2 + [np.float16] * 2
            + [ml_dtypes.bfloat16] * 2 + [np.float16] * 2 + [ml_dtypes.bfloat16] * 2)
# The runs' length per variant (the driver's S_CACHED, S_NT): the run-by-run
# streaming ones need pieces that start 16-byte aligned; the flat ones do not.
RUN_LENGTHS = [49] * 5 + [120] * 3 + [49, 120] * 2 + [49] * 4


def _run_driver(tmp_path, *flags):
    out = run_c_driver(tmp_path, "half_leaves.c", *flags)
    return np.frombuffer(out, dtype=np.uint16).reshape(len(VARIANTS), BLOCKS, N)


def _expected(dtype, run_length):
    """NumPy float32 arithmetic, in the leaves' order, rounded once to ``dtype``."""
    bits = np.arange(N, dtype=np.uint16)
    x = bits.view(dtype).astype(np.float32)
    add = (bits.astype(np.uint32) * 40503 % N).astype(np.uint16).view(dtype).astype(np.float32)
    j = np.arange(N) % W
    run = np.arange(N) // run_length  # the runs' channel is run % 3 (the rest: the next run's)
    blocks = []
    with np.errstate(all="ignore"):
        for m, a, b in COEFS:
            tm = (m * (1 + j % 3).astype(np.float32)).astype(np.float32)
            rm = (m * (1 + run % 3).astype(np.float32)).astype(np.float32)
            for relu in (False, True):
                runs = ((x - rm) * a + b) + add
                for v in (((x - m) * a + b) + add, (x - tm) * a + b, runs, runs):
                    if relu:
                        v = np.where(v < 0, np.float32(0), v)
                    blocks.append(v.astype(dtype).view(np.uint16))
    return np.stack(blocks)


def _assert_same_values(got, want, dtype):
    got_nan = np.isnan(got.view(dtype).astype(np.float32))
    want_nan = np.isnan(want.view(dtype).astype(np.float32))
    np.testing.assert_array_equal(got_nan, want_nan)
    # NaN payloads are not specified; everything else bit for bit (signed zeros too).
    np.testing.assert_array_equal(np.where(got_nan, 0, got), np.where(want_nan, 0, want))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("half_leaves")
    return _run_driver(tmp), _run_driver(tmp, "-DBNFAST_NO_SIMD")


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_every_variant_matches_float32_arithmetic_rounded_once(outputs, variant):
    simd, _ = outputs
    dtype = VARIANTS[variant]
    want = _expected(dtype, RUN_LENGTHS[variant])
    for block in range(BLOCKS):
        _assert_same_values(simd[variant, block], want[block], dtype)


def test_no_simd_build_gives_identical_bits(outputs):
    simd, no_simd = outputs
    np.testing.assert_array_equal(simd, no_simd)


def test_native_build_gives_identical_bits(outputs, tmp_path):
    # BNFAST_NATIVE=1 (-march=native): the base leaves compiled for this CPU's own
    # instructions, the addend's addition pinned there (bnfast_half_leaves.h).
    simd, _ = outputs
    np.testing.assert_array_equal(_run_driver(tmp_path, "-march=native"), simd)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "i686"),
                    reason="the picked variants are x86's")
@pytest.mark.parametrize("flags", [(), ("-march=native",), ("-mavx2", "-mf16c")],
                         ids=["default", "native", "avx2"])
def test_every_x86_build_keeps_the_picked_variants(tmp_path, flags):
    # A build whose own target had AVX2 once compiled no picked variants and ran
    # its portable base leaves: float16 15-50x slower under BNFAST_NATIVE=1.
    assert run_c_driver(tmp_path, "dispatch.c", "-O2", *flags).strip() == b"1"
    assert run_c_driver(tmp_path, "dispatch.c", "-DBNFAST_NO_SIMD").strip() == b"0"


# tests/c/backward_half_leaves.c: (count, width, kind) per case, as in its table;
# each case writes 3 blocks (the float32 leaf, then two half leaves: see the
# driver) of sy and sxy, `count` runs or `width` columns long.
# Kinds: 0 column sums, 1 runs, 2 and 3 the same with the fused ReLU's mask.
SUM_CASES = [(count, width, kind + masked)
             for masked in (0, 2)
             for count, width, kind in [(37, 72, 0), (30, 200, 0), (9, 1024, 0), (101, 13, 0),
                                        (6, 4096, 0), (500, 49, 1), (7, 3136, 1), (333, 3, 1),
                                        (41, 300, 1), (1, 8, 1), (60, 23, 1), (30, 129, 1)]]


def _sum_blocks(raw):
    """The driver's doubles as {(type, case): [3 arrays of 2 * length]} (as uint64 bits)."""
    bits = np.frombuffer(raw, dtype=np.uint64)
    blocks, at = {}, 0
    for half in ("float16", "bfloat16"):
        for case in SUM_CASES:
            length = 2 * (case[0] if case[2] % 2 else case[1])
            blocks[half, case] = [bits[at + i * length: at + (i + 1) * length] for i in range(3)]
            at += 3 * length
    assert at == bits.size
    return blocks


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backward_half_leaves")
    return (run_c_driver(tmp, "backward_half_leaves.c"),
            run_c_driver(tmp, "backward_half_leaves.c", "-DBNFAST_NO_SIMD"))


def _driver_values(half):
    """The driver's FILL: x and y half patterns, every finite one, shuffled."""
    exp_mask = 0x7C00 if half == "float16" else 0x7F80
    k = np.arange(200000, dtype=np.uint64)
    bx = (k * 40503) & 0xFFFF
    by = (k * 9973 + 17) & 0xFFFF
    keep = ((bx & exp_mask) != exp_mask) & ((by & exp_mask) != exp_mask)
    dtype = np.float16 if half == "float16" else ml_dtypes.bfloat16
    x = bx[keep][:40000].astype(np.uint16).view(dtype).astype(np.float64)
    y = by[keep][:40000].astype(np.uint16).view(dtype).astype(np.float64)
    return x, y


# The driver's row strides of its column-sum cases (its `strides`).
COL_STRIDES = {(37, 72): 200, (30, 200): 1024, (9, 1024): 1024, (101, 13): 24, (6, 4096): 4100}


def _column_reference(half, rows, width):
    """float64 sy, sxy of the driver's column sums and their terms' magnitudes."""
    x, y = _driver_values(half)
    at = np.arange(rows)[:, None] * COL_STRIDES[rows, width] + np.arange(width)
    xr, yr = x[at], y[at]
    shift = 0.375 * (np.arange(width) % 5) - 0.5 + 0.1 * (np.arange(width) % 3)
    terms = (xr - shift) * yr
    return (np.concatenate([yr.sum(0), terms.sum(0)]),
            np.concatenate([np.abs(yr).sum(0), np.abs(terms).sum(0)]))


def _run_reference(half, count, n):
    """float64 sy, sxy of the driver's runs and the sums of their terms' magnitudes."""
    x, y = _driver_values(half)
    xr, yr = x[: count * n].reshape(count, n), y[: count * n].reshape(count, n)
    shift = 0.375 * (np.arange(count) % 5) - 0.5 + 0.1 * (np.arange(count) % 3)
    terms = (xr - shift[:, None]) * yr
    return (np.concatenate([yr.sum(1), terms.sum(1)]),
            np.concatenate([np.abs(yr).sum(1), np.abs(terms).sum(1)]))


HALF_ULPS = 20


@pytest.mark.parametrize("build", [0, 1], ids=["simd", "no_simd"])
def test_pass1_half_sums_are_float32_sums_of_the_same_values(sums, build):
    blocks = _sum_blocks(sums[build])
    for (half, case), (f32, portable, picked) in blocks.items():
        assert np.any(f32 != 0), (half, case)  # the driver summed something
        if case[2] in (0, 1):  # float sums (see the module's doc)
            reference = _column_reference if case[2] == 0 else _run_reference
            want, scale = reference(half, case[0], case[1])
            np.testing.assert_allclose(f32.view(np.float64), want, rtol=1e-12,
                                       atol=1e-12 * scale.max())
            for got in (portable, picked):
                err = np.abs(got.view(np.float64) - want)
                assert np.all(err <= HALF_ULPS * 2.0**-24 * scale), (case, err.max())
            continue
        np.testing.assert_array_equal(portable, f32, err_msg=f"{half} {case} first")
        np.testing.assert_array_equal(picked, f32, err_msg=f"{half} {case} second")


def test_pass1_no_simd_build_gives_identical_bits(sums):
    np.testing.assert_array_equal(np.frombuffer(sums[0], np.uint64),
                                  np.frombuffer(sums[1], np.uint64))
