"""The training statistics' leaves (``src/bnfast_stats.h``), every variant and storage type.

``tests/c/stats_leaves.c`` runs the shifted sums of runs (channels-first) and
the shifted column sums (channels-last) in each variant this CPU has
(portable, AVX2 / F16C, AVX-512's column sums) over the same values stored as
float32, float64 and the half type they came from.  The contract checked here:

* float32 and float64 storage: the float64 reference to rounding, the same
  bits for both types;
* half storage (float arithmetic, at most 16 terms a float sum): within 20
  float32 ulps of the reference's sum of ``|x - shift|`` (and of s2), also
  for bfloat16 values that float arithmetic cannot hold (beyond 1e19, below
  1e-19: recounted in double);
* every variant gives the bits of the scalar build (``-DBNFAST_NO_SIMD``) and of
  a ``-march=native`` build, on any machine.
"""
import ml_dtypes
import numpy as np
import pytest

from conftest import run_c_driver

N, RUNS = 65536, 12
RUN_LENGTHS = [1, 7, 8, 9, 23, 24, 49, 128, 129, 784, 4096]
COL_CASES = [(13, 72, 72), (10, 131, 131), (9, 200, 200), (6, 300, 512), (5, 3, 3),
             (17, 64, 1024), (21, 77, 77), (16, 45, 96)]
# Per value set: (float32, float64, the half type) x (portable, AVX2 / F16C, picked).
BLOCKS = 9
# The driver's value sets: (half type, bit-pattern modulus: the magnitudes).
VALUE_SETS = [(np.float16, 0x4800), (ml_dtypes.bfloat16, 0x4380),
              (ml_dtypes.bfloat16, 0x7F80), (ml_dtypes.bfloat16, 0x1E00)]
VALUE_IDS = ["float16", "bfloat16", "bfloat16-whole-range", "bfloat16-tiny"]
# float32 rounding units a half leaf may be off, of sum |d| (s1) and of s2.
HALF_ULPS = 20


def _block_len():
    runs = sum(3 * min(RUNS, N // n) for n in RUN_LENGTHS)
    return runs + sum(2 * w for _, w, _ in COL_CASES)


def _run_driver(tmp_path, *flags):
    out = run_c_driver(tmp_path, "stats_leaves.c", *flags)
    return np.frombuffer(out, dtype=np.float64).reshape(len(VALUE_SETS), BLOCKS,
                                                          _block_len())


def _values(half, mod):
    """The driver's values: its LCG's 16-bit patterns as ``half``, widened to float64."""
    state, bits = 12345, np.empty(N, dtype=np.uint16)
    for i in range(N):
        state = (state * 1664525 + 1013904223) % 2**32
        bits[i] = (state >> 16) % mod | ((state >> 8) & 0x8000)
    return bits.view(half).astype(np.float64)


def _reference(x):
    """float64 sums in the driver's order of outputs (shifts exact, sums to rounding),
    and the scale of each: the shift itself, sum |x - shift| for s1, s2 for s2."""
    parts, scales = [], []
    for n in RUN_LENGTHS:
        runs = x[: min(RUNS, N // n) * n].reshape(-1, n)
        shift = runs[:, 0]
        e = runs - shift[:, None]
        s2 = (e * e).sum(1)
        parts += [shift, e.sum(1), s2]
        scales += [np.abs(shift), np.abs(e).sum(1), s2]
    for rows, w, stride in COL_CASES:
        block = np.stack([x[r * stride: r * stride + w] for r in range(rows)])
        e = block - x[rows * stride: rows * stride + w]
        s2 = (e * e).sum(0)
        parts += [e.sum(0), s2]
        scales += [np.abs(e).sum(0), s2]
    return np.concatenate(parts), np.concatenate(scales)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats_leaves")
    return _run_driver(tmp), _run_driver(tmp, "-DBNFAST_NO_SIMD")


def _assert_within(got, want, scale, rtol):
    bad = ~(np.abs(got - want) <= rtol * scale)
    assert not bad.any(), (np.flatnonzero(bad)[:5], got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("value_set", range(len(VALUE_SETS)), ids=VALUE_IDS)
def test_double_leaves_match_float64_reference(outputs, value_set):
    simd, _ = outputs
    want, scale = _reference(_values(*VALUE_SETS[value_set]))
    for block in simd[value_set][:6]:  # float32 and float64 storage
        _assert_within(block, want, scale, 1e-12)


@pytest.mark.parametrize("value_set", range(len(VALUE_SETS)), ids=VALUE_IDS)
def test_half_leaves_are_as_exact_as_float32(outputs, value_set):
    simd, _ = outputs
    want, scale = _reference(_values(*VALUE_SETS[value_set]))
    # Without the double recount the whole-range set would hold inf, and the
    # tiny set s2 = 0 or a few denormals: far outside this bound.
    for block in simd[value_set][6:]:
        _assert_within(block, want, scale, HALF_ULPS * 2.0**-24)


def test_half_leaves_use_float_arithmetic(outputs):
    # The half leaves are not the double leaves in disguise: on ordinary values
    # their float sums differ from the double sums in the last bits somewhere.
    simd, _ = outputs
    for value_set in simd[:2]:
        assert not np.array_equal(value_set[6], value_set[0])


def test_float32_and_float64_storage_give_the_same_bits(outputs):
    simd, _ = outputs
    for value_set in simd:
        for block in value_set[1:6]:
            np.testing.assert_array_equal(block, value_set[0])


def test_no_simd_build_gives_identical_bits(outputs):
    simd, no_simd = outputs
    np.testing.assert_array_equal(simd, no_simd)


def test_native_build_gives_identical_bits(outputs, tmp_path):
    # BNFAST_NATIVE=1 (-march=native): the base leaves compiled for this CPU's own
    # instructions, no run-time picks (its F16C/AVX2 loads had been left undefined).
    simd, _ = outputs
    np.testing.assert_array_equal(_run_driver(tmp_path, "-march=native"), simd)
