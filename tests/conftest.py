"""Shared test machinery: tolerances, layouts, data, fixtures.

The float64 reference the kernels are held to is :mod:`bnfast.testing`
(re-exported here as ``reference_batch_norm``).  Test modules import the
helpers directly (``from conftest import ...``); pytest puts this directory
on ``sys.path``.
"""
import shlex
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest

from bnfast.testing import reference_batch_norm  # noqa: F401 (re-exported for the tests)

DTYPES = (np.float32, np.float64)

# Output vs the float64 reference.  bnfast computes statistics and per-channel
# coefficients in double and applies ``(x - m) * a + b`` in the storage type,
# so float32 outputs of magnitude ~5 are a few float32 ulps (6e-8 relative) off.
TOL = {
    np.float32: dict(rtol=2e-6, atol=2e-6),
    np.float64: dict(rtol=1e-12, atol=1e-12),
}
# Running buffers vs the reference: computed in double and rounded once.
STAT_TOL = {
    np.float32: dict(rtol=4e-7, atol=1e-7),
    np.float64: dict(rtol=1e-13, atol=1e-14),
}
# bnfast vs PyTorch at the same dtype (torch's float32 path is less exact than ours).
TORCH_TOL = {
    np.float32: dict(rtol=2e-5, atol=2e-5),
    np.float64: dict(rtol=1e-10, atol=1e-10),
}
# Channels-last vs contiguous: the two statistics kernels sum in different
# orders; both are within a few ulps of exact.  float32 outputs round the same
# double coefficients, float64 outputs show the summation order.  In units of
# ``np.spacing(max(|y|, 1))`` (ulps of the output's scale).
LAYOUT_ULPS = {np.float32: 1, np.float64: 64}

LAYOUTS = ("contiguous", "channels_last", "strided")

# -- layouts -------------------------------------------------------------------------
def channels_last(x):
    """Same values as ``x``, memory channels-last (``nhwc.transpose(0, 3, 1, 2)``)."""
    cl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    assert np.moveaxis(cl, 1, -1).flags.c_contiguous
    return cl


def strided(x):
    """Same values as ``x`` in a view that is neither contiguous nor channels-last."""
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    view = big[..., ::2]
    view[...] = x
    return view


def with_layout(x, layout):
    """``x``'s values in ``layout``: 'contiguous', 'channels_last', 'strided', 'fortran'."""
    if layout == "contiguous":
        return np.ascontiguousarray(x)
    if layout == "channels_last":
        return channels_last(x)
    if layout == "strided":
        return strided(x)
    if layout == "fortran":
        return np.asfortranarray(x)
    raise ValueError(layout)


def is_channels_last(y):
    return np.moveaxis(y, 1, -1).flags.c_contiguous


# -- data ----------------------------------------------------------------------------
def make_input(rng, shape, dtype, loc=0.5, scale=2.0):
    """Random data with a different mean and spread per channel."""
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    locs = loc + rng.uniform(-1, 1, C).reshape(bshape)
    scales = scale * rng.uniform(0.5, 1.5, C).reshape(bshape)
    return (rng.standard_normal(shape) * scales + locs).astype(dtype)


def make_params(rng, C, dtype):
    """(weight, bias) that are not the identity."""
    return (rng.uniform(0.5, 2.0, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype))


def make_running(rng, C, dtype):
    """(running_mean, running_var) that are not the defaults."""
    return (rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype))


# -- assertions ----------------------------------------------------------------------
def assert_close(actual, expected, dtype, table=TOL):
    """``actual`` within ``table[dtype]`` of ``expected`` (NaN == NaN)."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64),
                               equal_nan=True, **table[dtype])


def assert_within_ulps(actual, expected, ulps):
    """|actual - expected| <= ulps * spacing(max(|expected|, 1)) in expected's dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.spacing(np.maximum(np.abs(expected), 1).astype(expected.dtype))
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    worst = float((diff / scale).max(initial=0.0))
    assert worst <= ulps, f"differ by {worst} ulps of the output scale (allowed {ulps})"


# -- C drivers -----------------------------------------------------------------------
SRC = Path(__file__).resolve().parents[1] / "src"


def run_racing(target, args_list):
    """Run ``target(*args)`` for each args in threads that switch as often as Python
    lets them (a race shows up within a few hundred calls), join them, and raise the
    first exception a thread raised (a thread's own would only be a warning)."""
    errors = []

    def run(*args):
        try:
            target(*args)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=args) for args in args_list]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


def run_c_driver(tmp_path, source, *flags, stdin=b""):
    """Compile ``tests/c/<source>`` with the build's floating-point and vector
    flags (no contraction into FMAs, ``omp simd`` loops, as setup.py), run it
    on ``stdin`` (bytes): its stdout (bytes)."""
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    exe = tmp_path / (source.removesuffix(".c") + "".join(f.strip("-") for f in flags))
    subprocess.run([*compiler, "-O2", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd",
                    *flags, f"-I{SRC}",
                    str(Path(__file__).parent / "c" / source), "-o", str(exe)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, input=stdin).stdout


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(20240531)


@pytest.fixture
def torch():
    """PyTorch, or skip the test when it is not installed."""
    # No torch.set_num_threads here: torch may share the OpenMP runtime (libgomp)
    # with bnfast, and omp_set_num_threads would then limit bnfast for the session.
    return pytest.importorskip("torch")


def assert_same(actual, expected, msg=""):
    """Bit for bit (NaN where NaN), same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    if not np.array_equal(actual, expected):  # a quick pass first: big arrays are compared often
        np.testing.assert_array_equal(actual, expected, err_msg=msg)


def misaligned_empty(shape, dtype, offset):
    """An uninitialised array of ``shape`` whose data starts ``offset`` bytes past a
    64-byte boundary: off its itemsize too where ``offset`` is not a multiple of it
    (NumPy allows such views; their ``flags.aligned`` is False)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    a = raw[start:start + nbytes].view(dtype).reshape(shape)
    assert a.flags.aligned == (offset % dtype.itemsize == 0)
    return a


def other_float(dtype):
    """The other supported float dtype."""
    return np.float64 if np.dtype(dtype) == np.float32 else np.float32


def read_only_copy(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# A batch split over ranks or chunks vs the whole batch (the issue 13 contract):
# float32 within 1 ulp of the output scale; float64 within 1e-12 relative (merged
# statistics lose the batch mean's float64 residual, ~|mean| * 1e-16 / std).
def assert_split_equal(actual, expected, dtype):
    if np.dtype(dtype) == np.float32:
        assert_within_ulps(actual, expected, 1)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
