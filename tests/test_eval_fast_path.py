"""The evaluation fast path: ``bnfast._inference.normalize_with_running_stats``
and the modules' eval forward through it (``_forward_plain``).

Held bit for bit to the general path (``bnfast.functional._batch_norm``: the
same kernels reached through validation and memoryviews), to the float64
reference, and to torch; checked to step aside (returning None, so that the
general path validates, raises or copies) for every argument that is not
plain; and checked to see every change of the buffers, parameters and eps
behind its coefficient cache.
"""
import contextlib
import copy
import pickle
import sys
import threading
import time

import numpy as np
import pytest

import bnfast
from bnfast import functional as F
from bnfast._inference import CoefficientCache, normalize_with_running_stats
from conftest import (
    NonPlainArray,
    assert_same,
    other_float,
    read_only_copy,
    TORCH_TOL,
    assert_close,
    channels_last,
    is_channels_last,
    make_input,
    make_params,
    make_running,
    reference_batch_norm,
    strided,
)

# Shapes the fast path serves: ResNet's last block, C < the channels-last tile
# width (64) with S > 1, (N, C) rows, S == 1 in 3-D, 5-D volumes, rows with
# C >= 64 (the cache's untiled table is used as is), and (N, C, L).
SHAPES = [(1, 512, 7, 7), (2, 3, 5, 5), (4, 16), (3, 8, 1), (2, 4, 3, 3, 3), (5, 80),
          (3, 6, 7)]
PLAIN = {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d,
         5: bnfast.BatchNorm3d}
FUSED = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d, 4: bnfast.FusedBatchNorm2d,
         5: bnfast.FusedBatchNorm3d}
# A parameter gradient (a sum over N * S products, rounded once) vs the float64 formula.
SUM_TOL = {
    np.float32: dict(rtol=1e-5, atol=1e-5),
    np.float64: dict(rtol=1e-11, atol=1e-11),
}
# (affine, bias): bias only means something with affine.
AFFINE = [(True, True), (True, False), (False, True)]
AFFINE_IDS = ["affine", "affine-nobias", "noaffine"]


def _grad_context(grad):
    """Grad enabled (the default), or bnfast.no_grad()."""
    return contextlib.nullcontext() if grad else bnfast.no_grad()


def _eval_module(rng, shape, dtype, *, fused=False, affine=True, bias=True, eps=1e-5):
    """An eval-mode module of ``shape``'s kind with non-default parameters and buffers."""
    C = shape[1]
    m = (FUSED if fused else PLAIN)[len(shape)](C, eps=eps, affine=affine, bias=bias,
                                                dtype=dtype)
    if affine:
        w, b = make_params(rng, C, dtype)
        m.weight[...] = w
        if m.bias is not None:
            m.bias[...] = b
    rm, rv = make_running(rng, C, dtype)
    m.running_mean[...] = rm
    m.running_var[...] = rv
    return m.eval()


def _general(m, x, addend=None, relu=False, eps=None):
    """The general path's output for m's current buffers and parameters."""
    eps = m.eps if eps is None else eps
    if relu:
        return bnfast.fused_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                       addend, training=False, eps=eps)
    return bnfast.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                             training=False, eps=eps, addend=addend)


def _reference(m, x, addend=None, relu=False, eps=None):
    eps = m.eps if eps is None else eps
    return reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                training=False, eps=float(eps), addend=addend, relu=relu).out


def _overlapping(shape, dtype, shift):
    """Two C-contiguous arrays of ``shape`` in one buffer, ``shift`` elements apart."""
    n = int(np.prod(shape))
    buf = np.zeros(n + shift, dtype)
    return buf[:n].reshape(shape), buf[shift:shift + n].reshape(shape)


# -- 1. the fast path is the general path, bit for bit --------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine,bias", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_module_fast_path_equals_general_path(dtype, rng, general_path, shape, affine, bias,
                                              grad):
    m = _eval_module(rng, shape, dtype, affine=affine, bias=bias)
    x = make_input(rng, shape, dtype)
    expected = _general(m, x)
    ref = _reference(m, x)
    assert m._coef_cache.table is None

    general_path.calls = 0
    with _grad_context(grad):
        y = m(x)
        y_again = m(x)  # the cached coefficients give the same bits
    assert general_path.calls == 0, "the plain eval call did not take the fast path"
    assert m._coef_cache.table is not None
    assert y is not x and y.flags.c_contiguous
    assert_same(y, expected)
    assert_same(y_again, expected)
    assert_close(y, ref, dtype)
    assert (m._saved is not None) is grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no_addend"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_fused_module_fast_path_equals_general_path(dtype, rng, general_path, shape,
                                                    with_addend, grad):
    m = _eval_module(rng, shape, dtype, fused=True)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if with_addend else None
    expected = _general(m, x, addend, relu=True)
    ref = _reference(m, x, addend, relu=True)

    general_path.calls = 0
    with _grad_context(grad):
        y = m(x, addend)
    assert general_path.calls == 0
    assert_same(y, expected)
    assert_close(y, ref, dtype)
    assert (y == 0).any() and (y > 0).any()  # the relu did something, not everything
    if grad:  # the ReLU mask packed in the fast pass is where the output is positive
        np.testing.assert_array_equal(m._saved.relu_mask.to_array(), expected > 0)
    else:
        assert m._saved is None


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (4, 16), (3, 8, 1), (2, 4, 3, 3, 3)], ids=str)
def test_module_fast_path_matches_torch(dtype, rng, torch, shape):
    m = _eval_module(rng, shape, dtype, eps=1e-3)
    x = make_input(rng, shape, dtype)
    tm = getattr(torch.nn, type(m).__name__)(shape[1], eps=1e-3,
                                             dtype=getattr(torch, np.dtype(dtype).name))
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in m.state_dict().items()})
    tm.eval()
    with torch.no_grad():
        yt = tm(torch.from_numpy(x)).numpy()
    assert_close(m(x), yt, dtype, TORCH_TOL)


def test_read_only_input_takes_fast_path(dtype, rng, general_path):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    expected = _general(m, x)
    x.flags.writeable = False
    general_path.calls = 0
    y = m(x)
    assert general_path.calls == 0
    assert_same(y, expected)


# -- 2. everything that is not plain goes the general way ------------------------------
FALLBACKS = {
    # name: (shape, how to make the module / input / kwargs non-plain)
    "fortran-2d": ((6, 4), dict(x=np.asfortranarray)),
    "fortran-4d": ((2, 4, 3, 3), dict(x=np.asfortranarray)),
    "strided": ((2, 4, 3, 3), dict(x=strided)),
    "strided-2d": ((6, 4), dict(x=strided)),
    "channels_last": ((2, 4, 3, 3), dict(x=channels_last)),
    "subclass": ((2, 4, 3, 3), dict(x=lambda x: x.view(NonPlainArray))),
    "n_threads=-1": ((2, 4, 3, 3), dict(module=lambda m: setattr(m, "n_threads", -1))),
    "n_threads=np.int64": ((2, 4, 3, 3),
                           dict(module=lambda m: setattr(m, "n_threads", np.int64(1)))),
    "eps-np.float64": ((2, 4, 3, 3), dict(module=lambda m: setattr(m, "eps", np.float64(1e-3)))),
    "eps-np.float32": ((2, 4, 3, 3), dict(module=lambda m: setattr(m, "eps", np.float32(1e-2)))),
    "eps-int": ((2, 4, 3, 3), dict(module=lambda m: setattr(m, "eps", 1))),
    "running-buffers-other-dtype": ((2, 4, 3, 3), dict(module=lambda m: (
        setattr(m, "running_mean", m.running_mean.astype(other_float(m.dtype))),
        setattr(m, "running_var", m.running_var.astype(other_float(m.dtype)))))),
    "weight-strided": ((2, 4, 3, 3), dict(module=lambda m: setattr(
        m, "weight", np.repeat(m.weight, 2)[::2]))),
    "bias-list": ((2, 4, 3, 3), dict(module=lambda m: setattr(m, "bias", m.bias.tolist()))),
    "empty-batch": ((0, 4, 3, 3), {}),
    "empty-spatial": ((2, 4, 0), {}),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_non_plain_falls_back_to_general_path(dtype, rng, general_path, case):
    shape, how = FALLBACKS[case]
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    how.get("module", lambda m: None)(m)
    xin = how.get("x", lambda x: x)(x)
    ref = _reference(m, x)

    general_path.calls = 0
    y = m(xin)
    assert general_path.calls == 1, "a non-plain call must take the general path"
    assert type(y) is np.ndarray and y.dtype == dtype and y.shape == shape
    assert_close(y, ref, dtype)
    if case == "channels_last":
        assert is_channels_last(y)
    if case == "empty-batch" or case == "empty-spatial":
        assert y.size == 0
    else:
        # The fast path still works on the next plain call with the module as it is now.
        general_path.calls = 0
        y_plain = m(x)
        assert general_path.calls == (1 if "module" in how else 0)
        assert_close(y_plain, ref, dtype)


def test_track_running_stats_false_uses_batch_stats_in_eval(dtype, rng):
    # No running statistics: eval normalises with the batch's, never the cache's.
    m = bnfast.BatchNorm2d(4, track_running_stats=False, dtype=dtype).eval()
    w, b = make_params(rng, 4, dtype)
    m.weight[...], m.bias[...] = w, b
    for loc in (0.5, -3.0):  # two batches: the second is not normalised with the first's
        x = make_input(rng, (3, 4, 2, 2), dtype, loc=loc)
        y = m(x)
        assert_same(y, bnfast.batch_norm(x, None, None, w, b, training=True))
        assert_close(y, reference_batch_norm(x, None, None, w, b, training=True).out, dtype)
    assert m._coef_cache.table is None


@pytest.mark.parametrize("case", ["fresh", "channels_last", "strided", "overlap", "addend"])
def test_fused_non_plain_addend_or_out_falls_back(dtype, rng, general_path, case):
    shape = (2, 4, 3, 3)
    m = _eval_module(rng, shape, dtype, fused=True)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    expected = _general(m, x, addend, relu=True)
    out = None
    if case == "channels_last":
        addend = channels_last(addend)
    elif case == "strided":
        out = strided(np.zeros(shape, dtype))
    elif case == "overlap":  # out shares memory with addend, shifted by one element
        values = addend
        addend, out = _overlapping(shape, dtype, 1)
        addend[...] = values
    elif case == "addend":  # addend of the wrong dtype: the general path's TypeError
        general_path.calls = 0
        with pytest.raises(TypeError, match="addend must have the input's dtype"):
            m(x, addend.astype(np.float64 if dtype == np.float32 else np.float32))
        assert general_path.calls == 1
        return
    general_path.calls = 0
    y = m(x, addend, out=out)
    assert general_path.calls == (0 if case == "fresh" else 1)
    if out is not None:
        assert y is out
    assert_same(np.ascontiguousarray(y), expected)


def test_wrong_dtype_raises_type_error(dtype, rng):
    other = np.float64 if dtype == np.float32 else np.float32
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), other)
    with pytest.raises(TypeError, match="does not match the module's dtype"):
        m(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        m(x.astype(np.float16))


def test_byteswapped_input_raises_type_error(dtype, rng):
    # Not plain for the fast path, and rejected (never misread) by the general one.
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        m(x.astype(x.dtype.newbyteorder()))


def test_wrong_channel_count_raises_value_error(dtype, rng):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    with pytest.raises(ValueError, match=r"expected input with 4 channels.*\(2, 5, 3, 3\)"):
        m(make_input(rng, (2, 5, 3, 3), dtype))
    # Also once the cache holds 4 channels' coefficients.
    m(make_input(rng, (2, 4, 3, 3), dtype))
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        m(make_input(rng, (2, 3, 3, 3), dtype))


@pytest.mark.parametrize("shape,cls,message", [
    ((2, 4, 3), bnfast.BatchNorm2d, "expected 4D input"),
    ((2, 4, 3, 3), bnfast.BatchNorm1d, "expected 2D or 3D input"),
    ((2, 4, 3, 3), bnfast.BatchNorm3d, "expected 5D input"),
    ((4,), bnfast.BatchNorm1d, "expected 2D or 3D input"),
], ids=["3D-into-2d", "4D-into-1d", "4D-into-3d", "1D-into-1d"])
def test_wrong_ndim_raises_value_error(dtype, rng, shape, cls, message):
    m = cls(4, dtype=dtype).eval()
    with pytest.raises(ValueError, match=message):
        m(rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("eps", [-1e-5, 0.0, float("nan")], ids=["negative", "zero", "nan"])
def test_bad_module_eps_raises_value_error(dtype, rng, eps):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    m(x)  # a cache entry for the valid eps
    m.eps = eps
    with pytest.raises(ValueError, match="eps must be positive"):
        m(x)


def test_n_threads_zero_raises_value_error(dtype, rng):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    m.n_threads = 0
    with pytest.raises(ValueError, match="n_threads=0"):
        m(make_input(rng, (2, 4, 3, 3), dtype))


def test_out_partially_overlapping_input_is_correct(dtype, rng, general_path):
    shape = (2, 4, 3, 3)
    m = _eval_module(rng, shape, dtype)
    values = make_input(rng, shape, dtype)
    expected = _general(m, values)
    for shift in (1, 7, values.size - 1):
        x, out = _overlapping(shape, dtype, shift)
        x[...] = values
        general_path.calls = 0
        y = m(x, out=out)
        assert general_path.calls == 1
        assert y is out
        assert_same(y, expected)


def test_out_read_only_raises(dtype, rng):
    shape = (2, 4, 3, 3)
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    out = np.zeros(shape, dtype)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        m(x, out=out)
    np.testing.assert_array_equal(out, 0)
    # out=x with x read-only: not written either.
    x.flags.writeable = False
    before = x.copy()
    with pytest.raises(ValueError, match="out is read-only"):
        m(x, out=x)
    assert_same(x, before)


def test_out_wrong_dtype_or_shape_raises(dtype, rng):
    shape = (2, 4, 3, 3)
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        m(x, out=np.zeros(shape, other))
    with pytest.raises(ValueError, match="out must have the input's shape"):
        m(x, out=np.zeros((2, 4, 3, 4), dtype))


# -- 3. the coefficient cache sees every change ----------------------------------------
def _edit_running_mean(m):
    m.running_mean[1] += 0.25


def _edit_running_var(m):
    m.running_var[...] *= 1.5


def _edit_weight(m):
    m.weight[2] = -m.weight[2]


def _edit_bias(m):
    m.bias[0] += 1.0


def _edit_weight_one_ulp(m):
    m.weight[0] = np.nextafter(m.weight[0], m.weight.dtype.type(np.inf))


def _edit_running_var_one_ulp(m):
    m.running_var[3] = np.nextafter(m.running_var[3], m.running_var.dtype.type(0))


def _edit_eps(m):
    m.eps = 1e-2


def _new_weight_array(m):
    m.weight = (m.weight * 1.5).astype(m.dtype)


def _new_running_mean_array(m):
    m.running_mean = (m.running_mean - 0.5).astype(m.dtype)


def _load_state_dict(m):
    C = m.num_features
    rng = np.random.default_rng(7)
    w, b = make_params(rng, C, m.dtype)
    rm, rv = make_running(rng, C, m.dtype)
    m.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                       "num_batches_tracked": np.array(3)})


def _load_state_dict_running_var_only(m):
    m.load_state_dict({"running_var": m.running_var * 2}, strict=False)


def _drop_bias(m):
    m.bias = None


def _drop_weight(m):
    m.weight = None


EDITS = {f.__name__.lstrip("_"): f for f in (
    _edit_running_mean, _edit_running_var, _edit_weight, _edit_bias, _edit_weight_one_ulp,
    _edit_running_var_one_ulp, _edit_eps, _new_weight_array,
    _new_running_mean_array, _load_state_dict, _load_state_dict_running_var_only, _drop_bias,
    _drop_weight)}


# Edits too small to be sure to change the output: the cache must still hold the new values.
ULP_EDITS = {"edit_weight_one_ulp", "edit_running_var_one_ulp"}


def _assert_cache_holds(m):
    """The module's cache holds its current values, and coefficients computed from them."""
    cache = m._coef_cache
    for row, name in enumerate(("running_mean", "running_var", "weight", "bias")):
        value = getattr(m, name)
        if value is not None:
            np.testing.assert_array_equal(cache.key[row], value, err_msg=name)
    np.testing.assert_array_equal(cache.mean, m.running_mean.astype(np.float64))
    np.testing.assert_array_equal(cache.invstd,
                                  1.0 / np.sqrt(m.running_var.astype(np.float64) + m.eps))


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_cache_sees_every_change(dtype, rng, general_path, edit, fused):
    shape = (2, 4, 5, 5)
    m = _eval_module(rng, shape, dtype, fused=fused)
    x = make_input(rng, shape, dtype)
    before = m(x)
    assert_same(before, _general(m, x, relu=fused))

    EDITS[edit](m)
    general_path.calls = 0
    after = m(x)
    assert general_path.calls == 0  # still the fast path
    expected = _general(m, x, relu=fused)
    assert_same(after, expected)
    assert_close(after, _reference(m, x, relu=fused), dtype)
    _assert_cache_holds(m)
    if edit not in ULP_EDITS:  # a one-ulp edit need not change a rounded output
        assert not np.array_equal(after, before), "the edit should change the output"


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (6, 4), (6, 70)], ids=str)
def test_cache_edit_and_revert_sequence(dtype, rng, shape):
    # Edit, call, edit back, call ...: every output is the one for the values now.
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    original = {k: v.copy() for k, v in m.state_dict().items()}
    y0 = m(x)
    for name in ("running_mean", "running_var", "weight", "bias"):
        arr = getattr(m, name)
        arr[-1] = arr[-1] * 2 + 1
        y1 = m(x)
        assert_same(y1, _general(m, x))
        assert not np.array_equal(y1, y0)
        arr[...] = original[name]
        assert_same(m(x), y0)


def test_bitwise_equal_rewrites_reuse_coefficients(dtype, rng):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    y0 = m(x)
    table = m._coef_cache.table
    # Same bytes, written in place and as new arrays, and an equal eps object.
    m.weight[...] = m.weight.copy()
    m.running_var[...] = m.running_var[::-1][::-1]
    m.running_mean = m.running_mean.copy()
    m.bias = np.array(m.bias)
    m.eps = float(str(m.eps))
    y1 = m(x)
    assert_same(y1, y0)
    assert m._coef_cache.table is table  # compared by value, not by identity


def test_cache_shared_across_dtype_channels_eps_and_presence(rng):
    # One cache serving calls that differ in one respect each: never a stale hit.
    cache = CoefficientCache()
    x32 = make_input(rng, (2, 4, 3), np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    w, b = make_params(rng, 4, np.float32)
    x64, rm64, rv64, w64, b64 = (a.astype(np.float64) for a in (x32, rm, rv, w, b))
    x5 = make_input(rng, (2, 5, 3), np.float32)
    rm5, rv5 = make_running(rng, 5, np.float32)
    w5, b5 = make_params(rng, 5, np.float32)
    calls = [
        (x32, rm, rv, w, b, 1e-5),
        (x64, rm64, rv64, w64, b64, 1e-5),   # dtype
        (x32, rm, rv, w, b, 1e-5),
        (x5, rm5, rv5, w5, b5, 1e-5),        # C
        (x32, rm, rv, w, b, 1e-3),           # eps
        (x32, rm, rv, None, b, 1e-3),        # weight absent
        (x32, rm, rv, np.zeros(4, np.float32), b, 1e-3),  # weight present (zeros)
        (x32, rm, rv, None, None, 1e-3),     # bias absent too
        (x32, rm, rv, None, np.zeros(4, np.float32), 1e-3),
        (x32, rm, rv, w, b, 1e-5),
    ]
    for i, (x, m_, v, w_, b_, eps) in enumerate(calls):
        with_cache = normalize_with_running_stats(x, m_, v, w_, b_, eps, None, False, None,
                                                  None, None, None, cache)
        without = normalize_with_running_stats(x, m_, v, w_, b_, eps, None, False, None,
                                               None, None, None, None)
        assert_same(with_cache, without)
        ref = reference_batch_norm(x, m_, v, w_, b_, eps=eps).out
        assert_close(with_cache, ref, x.dtype.type)
        assert cache.key.dtype == x.dtype and cache.table.shape == (4, x.shape[1]), i


# -- 4. backward after a fast forward: the forward's own snapshot ----------------------
def _torch_eval_grads(torch, x, g, w, b, rm, rv, eps, addend=None, relu=False):
    """torch's (grad_input, grad_weight, grad_bias, grad_addend) of an eval batch norm."""
    xt = torch.from_numpy(x.copy()).requires_grad_()
    wt = torch.from_numpy(w.copy()).requires_grad_()
    bt = torch.from_numpy(b.copy()).requires_grad_()
    at = None if addend is None else torch.from_numpy(addend.copy()).requires_grad_()
    y = torch.nn.functional.batch_norm(xt, torch.from_numpy(rm.copy()),
                                       torch.from_numpy(rv.copy()), wt, bt, training=False,
                                       eps=eps)
    if at is not None:
        y = y + at
    if relu:
        y = torch.relu(y)
    y.backward(torch.from_numpy(g))
    ga = None if at is None else at.grad.numpy()
    return xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy(), ga


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (3, 8, 1)], ids=str)
def test_backward_uses_forward_time_values(dtype, rng, torch, general_path, shape):
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0, rm0, rv0 = (a.copy() for a in (m.weight, m.bias, m.running_mean, m.running_var))
    _, mean0, invstd0 = bnfast.batch_norm(x, rm0, rv0, w0, b0, training=False, eps=m.eps,
                                          return_stats=True)
    general_path.calls = 0
    m(x)
    assert general_path.calls == 0
    # Edit everything in place between forward and backward.
    m.weight[...] *= 3
    m.running_mean[...] += 1
    m.running_var[...] *= 4
    m.bias[...] -= 2
    gx = m.backward(g)

    gx_ref, gw_ref, gb_ref = bnfast.batch_norm_backward(g, x, w0, mean0, invstd0,
                                                        training=False, eps=m.eps)
    assert_same(gx, gx_ref)
    assert_same(m.weight_grad, gw_ref)
    assert_same(m.bias_grad, gb_ref)
    # And against the float64 formula, and torch, for the forward-time values.
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    axes = (0,) + tuple(range(2, len(shape)))
    inv64 = 1.0 / np.sqrt(rv0.astype(np.float64) + m.eps)
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    assert_close(gx, g64 * (w0.astype(np.float64) * inv64).reshape(bshape), dtype)
    assert_close(m.weight_grad, (g64 * (x64 - rm0.reshape(bshape)) * inv64.reshape(bshape))
                 .sum(axis=axes), dtype, SUM_TOL)
    tgx, tgw, tgb, _ = _torch_eval_grads(torch, x, g, w0, b0, rm0, rv0, m.eps)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
    assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (5, 6)], ids=str)
def test_fused_backward_uses_forward_time_values(dtype, rng, torch, general_path, shape):
    m = _eval_module(rng, shape, dtype, fused=True)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0, rm0, rv0 = (a.copy() for a in (m.weight, m.bias, m.running_mean, m.running_var))
    y0, mean0, invstd0 = bnfast.fused_batch_norm(x, rm0, rv0, w0, b0, addend, training=False,
                                                 eps=m.eps, return_stats=True)
    general_path.calls = 0
    m(x, addend)
    assert general_path.calls == 0
    m.weight[...] = -m.weight
    m.running_mean[...] -= 1
    m.running_var[...] += 2
    gx, ga = m.backward(g)

    gx_ref, gw_ref, gb_ref, ga_ref = bnfast.fused_batch_norm_backward(
        g, x, y0, w0, mean0, invstd0, training=False, eps=m.eps)
    assert_same(gx, gx_ref)
    assert_same(ga, ga_ref)
    assert_same(m.weight_grad, gw_ref)
    assert_same(m.bias_grad, gb_ref)
    tgx, tgw, tgb, tga = _torch_eval_grads(torch, x, g, w0, b0, rm0, rv0, m.eps, addend,
                                           relu=True)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    assert_close(ga, tga, dtype, TORCH_TOL)
    assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
    assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)


def test_saved_views_survive_a_cache_miss(dtype, rng):
    # The cache replaces its arrays on a miss; views a backward holds keep their values.
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    m(x)
    saved = m._saved
    kept = {k: getattr(saved, k).copy() for k in ("weight", "mean", "invstd")}
    m.weight[...] += 1
    m.running_mean[...] += 1
    m.running_var[...] += 1
    with bnfast.no_grad():
        m(x)  # a miss: new coefficients
    for k, v in kept.items():
        assert_same(getattr(saved, k), v)
    np.testing.assert_array_equal(m._coef_cache.weight, m.weight)


def test_cache_arrays_are_read_only(dtype, rng):
    m = _eval_module(rng, (2, 4, 3, 3), dtype)
    x = make_input(rng, (2, 4, 3, 3), dtype)
    y0 = m(x)
    cache = m._coef_cache
    arrays = {name: getattr(cache, name)
              for name in ("key", "table", "storage_table", "mean", "invstd", "weight")}
    arrays.update(saved_mean=m._saved.mean, saved_invstd=m._saved.invstd,
                  saved_weight=m._saved.weight)
    for name, arr in arrays.items():
        assert isinstance(arr, np.ndarray), name
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            arr[(0,) * arr.ndim] = 123
    assert cache.key.dtype == dtype and cache.key.shape == (4, 4)
    assert cache.table.dtype == np.float64 and cache.table.shape == (4, 4)
    # The apply table: [m | a | b] in double and in float32, and a flag (_affine.table_len).
    assert cache.storage_table.dtype == np.float64 and cache.storage_table.shape == (3 * 4 + 6 + 1,)
    assert_same(m(x), y0)
    with pytest.raises(AttributeError):
        cache.table = np.zeros((4, 4))


# -- 5. out= on the fast path ----------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (4, 16)], ids=str)
@pytest.mark.parametrize("target", ["fresh", "input"])
def test_out_on_fast_path(dtype, rng, general_path, shape, target):
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    expected = _general(m, x)
    out = np.full(shape, np.nan, dtype) if target == "fresh" else x
    general_path.calls = 0
    y = m(x, out=out)
    assert general_path.calls == 0
    assert y is out
    assert_same(y, expected)
    if target == "input":
        with pytest.raises(RuntimeError, match="wrote its output over"):
            m.backward(np.ones_like(x))
    else:
        assert_same(m.backward(np.ones_like(x)),
                     bnfast.batch_norm_backward(np.ones_like(x), x, m.weight,
                                                *bnfast.batch_norm(
                                                    x, m.running_mean, m.running_var,
                                                    m.weight, m.bias, training=False,
                                                    return_stats=True)[1:],
                                                training=False)[0])


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (4, 16)], ids=str)
@pytest.mark.parametrize("target", ["fresh", "input", "addend"])
def test_fused_out_on_fast_path(dtype, rng, general_path, shape, target):
    m = _eval_module(rng, shape, dtype, fused=True)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    x0, addend0 = x.copy(), addend.copy()
    expected = _general(m, x, addend, relu=True)
    out = {"fresh": np.full(shape, np.nan, dtype), "input": x, "addend": addend}[target]
    general_path.calls = 0
    y = m(x, addend, out=out)
    assert general_path.calls == 0
    assert y is out
    assert_same(y, expected)
    if target != "input":
        assert_same(x, x0)
    if target != "addend":
        assert_same(addend, addend0)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    if target == "input":
        with pytest.raises(RuntimeError, match="wrote its output over"):
            m.backward(g)
        return
    _, mean, invstd = bnfast.batch_norm(x0, m.running_mean, m.running_var, training=False,
                                        return_stats=True)
    gx_ref, _, _, ga_ref = bnfast.fused_batch_norm_backward(g, x0, expected, m.weight, mean,
                                                            invstd, training=False)
    gx, ga = m.backward(g)
    assert_same(gx, gx_ref)
    assert_same(ga, ga_ref)


# -- 6. copies and pickles -------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_round_trip(dtype, rng, fused, how):
    shape = (2, 4, 3, 3)
    m = _eval_module(rng, shape, dtype, fused=fused)
    x = make_input(rng, shape, dtype)
    args = (x, make_input(rng, shape, dtype, 0.0, 1.0)) if fused else (x,)
    y = m(*args)  # the cache is filled, and the forward saved state for backward
    assert m._coef_cache.table is not None
    m2 = copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))
    assert type(m2) is type(m) and m2.training is False
    assert m2._coef_cache is not m._coef_cache
    assert m2._coef_cache.table is None  # a copy starts with an empty cache
    assert_same(m2(*args), y)
    assert m2._coef_cache.table is not None
    # Independent: editing the original changes neither the copy's buffers nor its output.
    m.weight[...] *= 2
    m.running_mean[...] += 1
    assert_same(m2(*args), y)
    assert not np.array_equal(m(*args), y)
    # And the copy's cache follows its own edits.
    m2.bias[...] += 1
    assert_same(m2(*args), _general(m2, x, args[1] if fused else None, relu=fused))


def test_pickle_of_cache_alone_is_empty(rng):
    m = _eval_module(rng, (2, 4, 3, 3), np.float32)
    m(make_input(rng, (2, 4, 3, 3), np.float32))
    for c in (pickle.loads(pickle.dumps(m._coef_cache)), copy.copy(m._coef_cache),
              copy.deepcopy(m._coef_cache)):
        assert type(c) is CoefficientCache
        assert c.key is None and c.table is None and c.storage_table is None


# -- 7. threads ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 16, 4, 4), (8, 16)], ids=str)
def test_concurrent_calls_while_weight_is_rewritten(dtype, rng, shape):
    # Two threads call one module while a third swaps its weight between two value
    # sets in place: every output is one of the two valid outputs, never a mix.
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    wa = m.weight.copy()
    wb = (wa * -1.5 + 0.25).astype(dtype)
    valid = []
    for w in (wa, wb):
        m.weight[...] = w
        valid.append(_general(m, x))
    m.weight[...] = wa
    stop = threading.Event()
    seen = [0, 0]
    bad = []

    def call(grad):
        with _grad_context(grad):
            for _ in range(1500):
                y = m(x)
                for i, v in enumerate(valid):
                    if np.array_equal(y, v):
                        seen[i] += 1
                        break
                else:
                    bad.append(y)

    def swap():
        while not stop.is_set():
            for w in (wb, wa):
                np.copyto(m.weight, w)  # C values: numpy holds the GIL for the copy
                time.sleep(0)  # let the callers run with this value

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        writer = threading.Thread(target=swap)
        callers = [threading.Thread(target=call, args=(grad,)) for grad in (True, False)]
        writer.start()
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        stop.set()
        writer.join()
    finally:
        sys.setswitchinterval(interval)
    assert not bad, f"{len(bad)} outputs matched neither weight"
    assert seen[0] > 0 and seen[1] > 0, seen  # the swaps were seen mid-run


# -- 8. normalize_with_running_stats itself -------------------------------------------
def _direct_args(rng, dtype, shape=(2, 4, 3, 3)):
    """Plain arguments of the fused kind (addend, relu, out, coef, mask and a cache)."""
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    return dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, eps=1e-5,
                addend=make_input(rng, shape, dtype, loc=0.0, scale=1.0), relu=True,
                out=np.full(shape, 7, dtype), n_threads=None, coef=np.full((4, C), 7.0),
                mask=np.zeros((x.size + 7) // 8, np.uint8), cache=CoefficientCache())


def _overlapping_x_out(a):
    x, out = _overlapping(a["x"].shape, a["x"].dtype, 5)
    x[...] = a["x"]
    return dict(x=x, out=out)


def _overlapping_x_addend(a):
    x, addend = _overlapping(a["x"].shape, a["x"].dtype, 3)
    x[...] = a["x"]
    return dict(x=x, addend=addend)


def _overlapping_addend_out(a):
    addend, out = _overlapping(a["x"].shape, a["x"].dtype, 2)
    return dict(addend=addend, out=out)


NOT_PLAIN = {
    "x-list": lambda a: dict(x=a["x"].tolist()),
    "x-float16": lambda a: dict(x=a["x"].astype(np.float16)),
    "x-int": lambda a: dict(x=a["x"].astype(np.int32)),
    "x-other-dtype": lambda a: dict(x=a["x"].astype(other_float(a["x"].dtype))),
    "x-1d": lambda a: dict(x=a["x"].reshape(-1)),
    "x-0d": lambda a: dict(x=a["x"].reshape(-1)[0]),
    "x-empty": lambda a: dict(x=a["x"][:0], out=None, addend=None, mask=None),
    "x-fortran": lambda a: dict(x=np.asfortranarray(a["x"])),
    "x-channels-last": lambda a: dict(x=channels_last(a["x"])),
    "x-strided": lambda a: dict(x=strided(a["x"])),
    "x-subclass": lambda a: dict(x=a["x"].view(NonPlainArray)),
    "x-byteswapped": lambda a: dict(x=a["x"].astype(a["x"].dtype.newbyteorder())),
    "running_mean-other-dtype": lambda a: dict(
        running_mean=a["running_mean"].astype(other_float(a["x"].dtype))),
    "running_mean-None": lambda a: dict(running_mean=None),
    "running_var-too-long": lambda a: dict(running_var=np.append(a["running_var"], 1)),
    "running_var-2d": lambda a: dict(running_var=a["running_var"][None]),
    "weight-strided": lambda a: dict(weight=np.repeat(a["weight"], 2)[::2]),
    "weight-list": lambda a: dict(weight=a["weight"].tolist()),
    "bias-other-dtype": lambda a: dict(bias=a["bias"].astype(other_float(a["x"].dtype))),
    "bias-subclass": lambda a: dict(bias=a["bias"].view(NonPlainArray)),
    "eps-int": lambda a: dict(eps=1),
    "eps-np.float64": lambda a: dict(eps=np.float64(1e-5)),
    "eps-zero": lambda a: dict(eps=0.0),
    "eps-negative": lambda a: dict(eps=-1e-5),
    "eps-nan": lambda a: dict(eps=float("nan")),
    "n_threads-zero": lambda a: dict(n_threads=0),
    "n_threads-negative": lambda a: dict(n_threads=-1),
    "n_threads-bool": lambda a: dict(n_threads=True),
    "n_threads-float": lambda a: dict(n_threads=2.0),
    "n_threads-np.int64": lambda a: dict(n_threads=np.int64(2)),
    "n_threads-huge": lambda a: dict(n_threads=(1 << 16) + 1),
    "addend-wrong-shape": lambda a: dict(addend=a["addend"][:1]),
    "addend-other-dtype": lambda a: dict(addend=a["addend"].astype(other_float(a["x"].dtype))),
    "addend-fortran": lambda a: dict(addend=np.asfortranarray(a["addend"])),
    "addend-overlaps-x": _overlapping_x_addend,
    "out-read-only": lambda a: dict(out=read_only_copy(a["out"])),
    "out-overlaps-x": _overlapping_x_out,
    "out-overlaps-addend": _overlapping_addend_out,
    "out-other-dtype": lambda a: dict(out=a["out"].astype(other_float(a["x"].dtype))),
    "out-wrong-shape": lambda a: dict(out=a["out"].reshape(a["x"].shape[0], -1)),
    "out-strided": lambda a: dict(out=strided(a["out"])),
    "out-list": lambda a: dict(out=a["out"].tolist()),
    "coef-float32": lambda a: dict(coef=a["coef"].astype(np.float32)),
    "coef-wrong-shape": lambda a: dict(coef=a["coef"][:3]),
    "coef-read-only": lambda a: dict(coef=read_only_copy(a["coef"])),
    "coef-fortran": lambda a: dict(coef=np.asfortranarray(a["coef"])),
    "mask-too-short": lambda a: dict(mask=a["mask"][:-1].copy()),
    "mask-bool": lambda a: dict(mask=a["mask"].astype(bool)),
    "mask-read-only": lambda a: dict(mask=read_only_copy(a["mask"])),
    "cache-wrong-type": lambda a: dict(cache=object()),
}


@pytest.mark.parametrize("case", list(NOT_PLAIN))
def test_direct_entry_returns_none_and_writes_nothing(dtype, rng, case):
    args = _direct_args(rng, dtype)
    args.update(NOT_PLAIN[case](args))
    snapshots = {k: args[k].copy() for k in ("out", "coef", "mask", "x", "addend")
                 if isinstance(args[k], np.ndarray)}
    assert normalize_with_running_stats(**args) is None
    for k, v in snapshots.items():
        np.testing.assert_array_equal(args[k], v, err_msg=k)
    cache = args["cache"]
    if type(cache) is CoefficientCache:
        assert cache.table is None  # nothing computed either


def test_direct_entry_plain_arguments_work(dtype, rng):
    # The baseline of the test above: its unmodified arguments are plain.
    args = _direct_args(rng, dtype)
    x, addend = args["x"], args["addend"]
    expected, mean, invstd, mask = F._batch_norm(
        x, args["running_mean"], args["running_var"], args["weight"], args["bias"], False, 0.1,
        args["eps"], addend=addend, relu=True, out=None, n_threads=None, want_mask=True)
    y = normalize_with_running_stats(**args)
    assert y is args["out"]
    assert_same(y, expected)
    np.testing.assert_array_equal(args["mask"], mask.bits)
    np.testing.assert_array_equal(args["coef"][0], mean)
    np.testing.assert_array_equal(args["coef"][1], invstd)
    np.testing.assert_array_equal(args["coef"], args["cache"].table)


@pytest.mark.parametrize("case", ["out-is-x", "out-is-x-view", "out-is-addend", "adjacent"])
def test_direct_entry_same_or_apart_memory_is_plain(dtype, rng, case):
    args = _direct_args(rng, dtype)
    shape = args["x"].shape
    expected = bnfast.fused_batch_norm(args["x"], args["running_mean"], args["running_var"],
                                       args["weight"], args["bias"], args["addend"],
                                       training=False)
    if case == "out-is-x":
        args["out"] = args["x"]
    elif case == "out-is-x-view":
        args["out"] = args["x"][...]
    elif case == "out-is-addend":
        args["out"] = args["addend"]
    else:  # x, addend and out back to back in one buffer: touching, not overlapping
        n = args["x"].size
        buf = np.empty(3 * n, dtype)
        x, addend, out = (buf[i * n:(i + 1) * n].reshape(shape) for i in range(3))
        x[...], addend[...] = args["x"], args["addend"]
        args.update(x=x, addend=addend, out=out)
    y = normalize_with_running_stats(**args)
    assert y is args["out"]
    assert_same(y, expected)


@pytest.mark.parametrize("present", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("with_cache", [False, True], ids=["no_cache", "cache"])
@pytest.mark.parametrize("shape", [(3, 6, 4), (5, 6)], ids=str)
def test_direct_entry_coef_rows(dtype, rng, present, with_cache, shape):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    rm, rv = make_running(rng, C, dtype)
    w, b = make_params(rng, C, dtype)
    w = w if "weight" in present else None
    b = b if "bias" in present else None
    eps = 1e-3
    coef = np.full((4, C), np.nan)
    cache = CoefficientCache() if with_cache else None
    for _ in range(2):  # the second call of the cached case is a hit
        coef[...] = np.nan
        y = normalize_with_running_stats(x, rm, rv, w, b, eps, None, False, None, 1, coef, None,
                                         cache)
        invstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
        np.testing.assert_array_equal(coef[0], rm.astype(np.float64))
        np.testing.assert_array_equal(coef[1], invstd)
        np.testing.assert_array_equal(
            coef[2], invstd if w is None else invstd * w.astype(np.float64))
        np.testing.assert_array_equal(coef[3], np.zeros(C) if b is None else b.astype(np.float64))
        assert_close(y, reference_batch_norm(x, rm, rv, w, b, eps=eps).out, dtype)
    if with_cache:
        np.testing.assert_array_equal(cache.table, coef)
        np.testing.assert_array_equal(cache.mean, coef[0])
        np.testing.assert_array_equal(cache.invstd, coef[1])
        assert (cache.weight is None) == (w is None)
        if w is not None:
            assert_same(cache.weight, w)


@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (4096, 24), (2048, 96, 1)], ids=str)
def test_direct_entry_thread_counts_bit_identical(dtype, rng, shape):
    # Large enough for several blocks; results never depend on the thread count.
    C = shape[1]
    x = make_input(rng, shape, dtype)
    rm, rv = make_running(rng, C, dtype)
    w, b = make_params(rng, C, dtype)
    expected = bnfast.batch_norm(x, rm, rv, w, b, training=False, relu=True, n_threads=1)
    for nt in (1, 2, 3, None):
        bits = np.zeros((x.size + 7) // 8, np.uint8)
        y = normalize_with_running_stats(x, rm, rv, w, b, 1e-5, None, True, None, nt, None,
                                         bits, CoefficientCache())
        assert_same(y, expected)
        np.testing.assert_array_equal(
            np.unpackbits(bits, count=x.size, bitorder="little").astype(bool),
            (expected > 0).reshape(-1))
