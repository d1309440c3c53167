"""The half-precision normalise leaves, every variant, every 16-bit pattern.

``tests/c/half_leaves.c`` drives the in-register leaves of
``src/bnfast_half_leaves.h`` (portable, F16C/AVX2 and AVX512-BF16, as this CPU
has them) over all 65536 patterns of each half type with several coefficient
sets.  It is compiled twice, with SIMD and with ``-DBNFAST_NO_SIMD``, and every
output must equal NumPy's float32 arithmetic on the widened values rounded to
the half type by NumPy (float16) and ml_dtypes (bfloat16): the leaves' contract
("the float32 leaf's result, rounded once"), identical bits in every build.
"""
import shlex
import subprocess
import sysconfig
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N, W = 65536, 72
COEFS = np.array([[0.0, 1.0, 0.0], [0.5, 3.0, -0.25], [1.0, 1e-6, 0.0], [-2.0, 1e30, 1.0],
                  [1e-39, 1e-3, 1e-40], [0.3, 1.7, 0.1]], dtype=np.float32)
# Blocks written per (type, variant): coefficient sets x relu x (scalar, tiled).
BLOCKS = len(COEFS) * 2 * 2
# The driver's variants: float16 portable + F16C; bfloat16 portable + AVX2 + AVX512-BF16.
VARIANTS = [np.float16] * 2 + [ml_dtypes.bfloat16] * 3


def _run_driver(tmp_path, *flags):
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    exe = tmp_path / ("driver" + "".join(f.strip("-") for f in flags))
    # The build's floating-point flags (setup.py): no contraction into FMAs.
    subprocess.run([*compiler, "-O2", "-ffp-contract=off", *flags, f"-I{ROOT / 'src'}",
                    str(ROOT / "tests" / "c" / "half_leaves.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype=np.uint16).reshape(len(VARIANTS), BLOCKS, N)


def _expected(dtype):
    """NumPy float32 arithmetic, in the leaves' order, rounded once to ``dtype``."""
    bits = np.arange(N, dtype=np.uint16)
    x = bits.view(dtype).astype(np.float32)
    add = (bits.astype(np.uint32) * 40503 % N).astype(np.uint16).view(dtype).astype(np.float32)
    j = np.arange(N) % W
    blocks = []
    with np.errstate(all="ignore"):
        for m, a, b in COEFS:
            tm = (m * (1 + j % 3).astype(np.float32)).astype(np.float32)
            for relu in (False, True):
                for v in (((x - m) * a + b) + add, (x - tm) * a + b):
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
    want = _expected(dtype)
    for block in range(BLOCKS):
        _assert_same_values(simd[variant, block], want[block], dtype)


def test_no_simd_build_gives_identical_bits(outputs):
    simd, no_simd = outputs
    np.testing.assert_array_equal(simd, no_simd)
