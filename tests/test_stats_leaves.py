"""The training statistics' leaves (``src/bnfast_stats.h``), every variant and storage type.

``tests/c/stats_leaves.c`` runs the shifted sums of runs (channels-first) and
the shifted column sums (channels-last) in each variant this CPU has
(portable, AVX2 / F16C) over the same values stored as float32, float64 and
the half type they came from.  The contract checked here: the sums equal a
float64 reference (to rounding); every storage type gives the same bits (half
data has the statistics of the same values stored as float32 or float64), and
every variant gives the bits of the scalar build (``-DBNFAST_NO_SIMD``), on any
machine.
"""
import shlex
import subprocess
import sysconfig
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N, RUNS = 65536, 12
RUN_LENGTHS = [1, 7, 8, 9, 49, 784, 4096]
COL_CASES = [(13, 72, 72), (10, 131, 131), (9, 200, 200), (6, 300, 512), (5, 3, 3),
             (17, 64, 1024)]
# Per value set: (float32, float64, the half type) x (portable, SIMD) blocks.
BLOCKS = 6


def _block_len():
    runs = sum(3 * min(RUNS, N // n) for n in RUN_LENGTHS)
    return runs + sum(2 * w for _, w, _ in COL_CASES)


def _run_driver(tmp_path, *flags):
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    exe = tmp_path / ("driver" + "".join(f.strip("-") for f in flags))
    subprocess.run([*compiler, "-O2", "-ffp-contract=off", *flags, f"-I{ROOT / 'src'}",
                    str(ROOT / "tests" / "c" / "stats_leaves.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype=np.float64).reshape(2, BLOCKS, _block_len())


def _values(half):
    """The driver's values: its LCG's 16-bit patterns as ``half``, widened to float64."""
    state, bits = 12345, np.empty(N, dtype=np.uint16)
    mod = 0x4800 if half is np.float16 else 0x4380
    for i in range(N):
        state = (state * 1664525 + 1013904223) % 2**32
        bits[i] = (state >> 16) % mod | ((state >> 8) & 0x8000)
    return bits.view(half).astype(np.float64)


def _reference(x):
    """float64 sums in the driver's order of outputs (shifts exact, sums to rounding)."""
    parts = []
    for n in RUN_LENGTHS:
        runs = x[: min(RUNS, N // n) * n].reshape(-1, n)
        shift = runs[:, 0]
        e = runs - shift[:, None]
        parts += [shift, e.sum(1), (e * e).sum(1)]
    for rows, w, stride in COL_CASES:
        block = np.stack([x[r * stride: r * stride + w] for r in range(rows)])
        e = block - x[rows * stride: rows * stride + w]
        parts += [e.sum(0), (e * e).sum(0)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats_leaves")
    return _run_driver(tmp), _run_driver(tmp, "-DBNFAST_NO_SIMD")


@pytest.mark.parametrize("value_set, half", [(0, np.float16), (1, ml_dtypes.bfloat16)])
def test_sums_match_float64_reference(outputs, value_set, half):
    simd, _ = outputs
    want = _reference(_values(half))
    scale = np.maximum(np.abs(want), 1.0)
    for block in simd[value_set]:
        assert np.all(np.abs(block - want) <= 1e-12 * scale)


def test_every_storage_type_and_variant_gives_the_same_bits(outputs):
    simd, _ = outputs
    for value_set in simd:
        for block in value_set[1:]:
            np.testing.assert_array_equal(block, value_set[0])


def test_no_simd_build_gives_identical_bits(outputs):
    simd, no_simd = outputs
    np.testing.assert_array_equal(simd, no_simd)
