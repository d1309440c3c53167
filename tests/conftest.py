"""Shared test machinery: a float64 NumPy reference, tolerances, layouts, fixtures.

``reference_batch_norm`` is the specification the compiled kernels are held
to: PyTorch's ``batch_norm`` written out in float64 NumPy (two-pass variance),
including the running-statistics update and the fused ``+ addend``, ``relu``
epilogue.  Test modules import the helpers directly (``from conftest import
...``); pytest puts this directory on ``sys.path``.
"""
import collections

import numpy as np
import pytest

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

Reference = collections.namedtuple(
    "Reference", ["out", "running_mean", "running_var", "mean", "invstd"])


def reference_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5, addend=None, relu=False):
    """PyTorch's ``batch_norm`` (+ ``addend``, ``relu``) in float64 NumPy.

    Pure: the running buffers are not modified; their updated values are returned.

    Returns
    -------
    Reference
        ``out`` (float64, x's shape); ``running_mean``, ``running_var`` after the
        step (float64, or None when not given); ``mean``, ``invstd``: the
        statistics used to normalise (batch ones in training, running ones in
        evaluation).
    """
    with np.errstate(invalid="ignore"):  # NaN/Inf inputs give NaN where torch does
        return _reference(x, running_mean, running_var, weight, bias, training, momentum,
                          eps, addend, relu)


def _reference(x, running_mean, running_var, weight, bias, training, momentum, eps,
               addend, relu):
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, C) + (1,) * (x.ndim - 2)
    count = x.size // C if C else 0
    rm = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.array(running_var, dtype=np.float64)
    if training:
        if count == 0:
            mean, var = np.zeros(C), np.zeros(C)
        else:
            # Shifted by one finite sample of each channel, then two-pass: exact to
            # about an ulp of the mean even for data far from zero (mean 1e12, std 1).
            first = x[(0, slice(None)) + (0,) * (x.ndim - 2)]
            shift = np.where(np.isfinite(first), first, 0.0).reshape(bshape)
            mean = (x - shift).mean(axis=axes) + shift.ravel()
            var = ((x - mean.reshape(bshape)) ** 2).mean(axis=axes)  # biased
            if rm is not None:
                unbiased = var * count / (count - 1) if count > 1 else np.full(C, np.nan)
                rm = (1.0 - momentum) * rm + momentum * mean
                rv = (1.0 - momentum) * rv + momentum * unbiased
    else:
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(bshape)) * invstd.reshape(bshape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(bshape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(bshape)
    if addend is not None:
        y = y + np.asarray(addend, dtype=np.float64)
    if relu:
        y = np.maximum(y, 0.0)  # NaN propagates, as torch.relu
    return Reference(y, rm, rv, mean, invstd)


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


def other_float(dtype):
    """The other supported float dtype."""
    return np.float64 if np.dtype(dtype) == np.float32 else np.float32


def read_only_copy(a):
    a = a.copy()
    a.flags.writeable = False
    return a
