"""The vector roundings of float32 to bfloat16 in ``src/bnfast_half.h``, over
every float32 bit pattern.

``tests/c/bf16_rounding.c`` takes each rounding this CPU runs on its own
(portable vector, AVX2, AVX-512 on 8, 16 and 32 values, the even/odd form of the
flat walk with and without a NaN beside) over all 2^32 patterns against the
scalar ``bnfast_float_to_bf16``, and writes that scalar rounding of every
4099th pattern, which must match ml_dtypes: round to nearest even, NaN kept a
NaN.  The leaves' own tests (``test_half_leaves.py``) go through arithmetic
that seldom lands on a tie; here every tie, every NaN payload and the edge to
infinity meet every variant.
"""
import ml_dtypes
import numpy as np
import pytest

from conftest import run_c_driver

SAMPLE = 4099
VARIANTS = ["portable vector (8 values, a quarter of the patterns)", "AVX2 (8 values)",
            "AVX-512 ymm (8 values)", "AVX-512 zmm (16 values)",
            "AVX-512 two zmm (values 0-15, 16-31)", "AVX-512 even/odd (the flat walk)",
            "AVX-512 even/odd beside a NaN"]
# The patterns each variant is given (the NaN's own lane is left out of the last).
EXPECTED_CHECKED = [2**30] + [2**32] * 5 + [2**32 - 2**32 // 32]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = run_c_driver(tmp_path_factory.mktemp("bf16_rounding"), "bf16_rounding.c", "-fopenmp")
    counts = np.frombuffer(out[-16 * len(VARIANTS):], dtype=np.uint64).reshape(-1, 2)
    sample = np.frombuffer(out[:-16 * len(VARIANTS)], dtype=np.uint16)
    return counts, sample


def test_the_scalar_rounding_is_ml_dtypes(sweep):
    _, got = sweep
    patterns = np.arange(0, 2**32, SAMPLE, dtype=np.uint64).astype(np.uint32)
    assert got.shape == patterns.shape
    with np.errstate(invalid="ignore"):  # NaN patterns
        want = patterns.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    got_nan = np.isnan(got.view(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(got_nan, np.isnan(patterns.view(np.float32)))
    # NaN payloads are ours to choose (quiet, top bits kept); everything else bit for bit.
    np.testing.assert_array_equal(got[~got_nan], want[~got_nan])
    assert np.all(got[got_nan] & 0x0040), "a NaN left signalling"


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=VARIANTS)
def test_every_pattern_rounds_as_the_scalar_code(sweep, variant):
    (checked, mismatched) = sweep[0][variant]
    if checked == 0:
        pytest.skip(f"this CPU does not run the {VARIANTS[variant]} rounding")
    assert checked == EXPECTED_CHECKED[variant]
    assert mismatched == 0, f"{mismatched} of {checked} patterns differ"
