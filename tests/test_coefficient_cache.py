"""A module's evaluation coefficients are cached, and every edit invalidates them.

An eval-mode module keeps the per-channel coefficients it computed from
``running_mean``, ``running_var``, ``weight``, ``bias`` and ``eps`` and reuses
them while those are bitwise unchanged (``bnfast._forward.CoefficientCache``).
These tests hold it to two promises: it is reused when nothing changed, and
no edit of any kind (in place, by reassignment, of eps, of a dtype, of one
ulp) is ever missed: every output equals the float64 reference and a
cache-free computation (``bnfast.batch_norm``) for the values the module holds
*now*, and a backward after an edit uses what its forward normalised with.
"""
import copy
import pickle

import numpy as np
import pytest

import bnfast
from bnfast._forward import CoefficientCache
from conftest import (
    TORCH_TOL,
    assert_close,
    assert_same,
    make_input,
    make_params,
    make_running,
    other_float,
    reference_batch_norm,
)

SHAPE = (2, 4, 5, 5)
MODULES = {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d}
FUSED = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d, 4: bnfast.FusedBatchNorm2d}


def _eval_module(rng, shape, dtype, fused=False):
    """An eval-mode module with parameters and buffers that are not the defaults."""
    C = shape[1]
    m = (FUSED if fused else MODULES)[len(shape)](C, dtype=dtype)
    m.weight[...], m.bias[...] = make_params(rng, C, dtype)
    m.running_mean[...], m.running_var[...] = make_running(rng, C, dtype)
    return m.eval()


def _uncached(m, x, relu=False):
    """What the module should give for its current values: the functional call (no cache)."""
    return bnfast.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False,
                             eps=m.eps, relu=relu)


def _reference(m, x, relu=False):
    return reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                eps=float(m.eps), relu=relu).out


def _assert_current(m, x, y, dtype, relu=False):
    assert_same(y, _uncached(m, x, relu))
    assert_close(y, _reference(m, x, relu), dtype)


# -- reuse -------------------------------------------------------------------------
def test_unchanged_values_reuse_coefficients(dtype, rng):
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    y0 = m(x)
    table = m._coef_cache.current.table
    assert table is not None
    assert_same(m(x), y0)
    # The same bytes written in place or as new arrays, and an equal eps: still a hit
    # (compared by value, not by identity).
    m.weight[...] = m.weight.copy()
    m.running_var[...] = m.running_var[::-1][::-1]
    m.running_mean = m.running_mean.copy()
    m.bias = np.array(m.bias)
    m.eps = float(str(m.eps))
    with bnfast.no_grad():
        assert_same(m(x), y0)
    assert m._coef_cache.current.table is table
    _assert_current(m, x, y0, dtype)


def test_training_and_no_running_stats_bypass_the_cache(dtype, rng):
    # Batch statistics are never cached: each batch is normalised with its own.
    m = bnfast.BatchNorm2d(4, track_running_stats=False, dtype=dtype).eval()
    w, b = make_params(rng, 4, dtype)
    m.weight[...], m.bias[...] = w, b
    for loc in (0.5, -3.0, 0.5):
        x = make_input(rng, SHAPE, dtype, loc=loc)
        assert_close(m(x), reference_batch_norm(x, None, None, w, b, training=True).out, dtype)
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    m(x)  # cache filled in eval
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    m.train()
    x2 = make_input(rng, SHAPE, dtype, loc=2.0)
    assert_close(m(x2), reference_batch_norm(x2, rm, rv, m.weight, m.bias, training=True).out,
                 dtype)
    m.eval()  # the running stats moved: the eval output follows them
    _assert_current(m, x, m(x), dtype)


# -- every kind of edit is seen ------------------------------------------------------
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


def _edit_bias_one_ulp(m):
    m.bias[3] = np.nextafter(m.bias[3], m.bias.dtype.type(np.inf))


def _edit_running_mean_one_ulp(m):
    m.running_mean[2] = np.nextafter(m.running_mean[2], m.running_mean.dtype.type(np.inf))


def _edit_running_var_one_ulp(m):
    m.running_var[3] = np.nextafter(m.running_var[3], m.running_var.dtype.type(0))


def _edit_eps(m):
    m.eps = 1e-2


def _edit_eps_numpy_float32(m):
    m.eps = np.float32(0.25)


def _edit_eps_int(m):
    m.eps = 1


def _new_weight_array(m):
    m.weight = (m.weight * 1.5).astype(m.dtype)


def _new_running_mean_array(m):
    m.running_mean = (m.running_mean - 0.5).astype(m.dtype)


def _weight_other_dtype(m):
    # Same values, other dtype (exact both ways only from float32): then edited.
    m.weight = m.weight.astype(other_float(m.dtype))
    m.weight[1] *= 3


def _running_var_other_dtype(m):
    m.running_var = (m.running_var * 2).astype(other_float(m.dtype))


def _strided_weight(m):
    # A non-contiguous (C,) view: every other element of a longer array.
    base = np.repeat(m.weight * 2, 2)
    m.weight = base[::2]


def _strided_running_var(m):
    m.running_var = np.repeat(m.running_var[::-1], 2)[::2]


def _load_state_dict(m):
    C = m.num_features
    rng = np.random.default_rng(7)
    w, b = make_params(rng, C, m.dtype)
    rm, rv = make_running(rng, C, m.dtype)
    m.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                       "num_batches_tracked": np.array(3)})


def _load_state_dict_running_var_only(m):
    m.load_state_dict({"running_var": m.running_var * 2}, strict=False)


def _reset_parameters(m):
    m.reset_parameters()


def _drop_bias(m):
    m.bias = None


def _drop_weight(m):
    m.weight = None


EDITS = {f.__name__.lstrip("_"): f for f in (
    _edit_running_mean, _edit_running_var, _edit_weight, _edit_bias, _edit_weight_one_ulp,
    _edit_bias_one_ulp, _edit_running_mean_one_ulp, _edit_running_var_one_ulp, _edit_eps,
    _edit_eps_numpy_float32, _edit_eps_int, _new_weight_array, _new_running_mean_array,
    _weight_other_dtype, _running_var_other_dtype, _strided_weight, _strided_running_var,
    _load_state_dict, _load_state_dict_running_var_only, _reset_parameters, _drop_bias,
    _drop_weight)}
# Edits too small to be sure to change a rounded output: the coefficients must change.
ULP_EDITS = {"edit_weight_one_ulp", "edit_bias_one_ulp", "edit_running_mean_one_ulp",
             "edit_running_var_one_ulp"}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_every_edit_is_seen(dtype, rng, edit, fused):
    m = _eval_module(rng, SHAPE, dtype, fused=fused)
    x = make_input(rng, SHAPE, dtype)
    before = m(x)
    _assert_current(m, x, before, dtype, relu=fused)
    table = m._coef_cache.current.table

    EDITS[edit](m)
    after = m(x)
    _assert_current(m, x, after, dtype, relu=fused)
    assert m._coef_cache.current.table is not table, "the edit was not seen"
    if edit not in ULP_EDITS:
        assert not np.array_equal(after, before), "the edit should change the output"
    # Held again: the second call after the edit is a hit with the same bits.
    table = m._coef_cache.current.table
    assert_same(m(x), after)
    assert m._coef_cache.current.table is table or edit.startswith("strided")


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (6, 4), (6, 70), (3, 6, 7)], ids=str)
def test_edit_and_revert_sequence(dtype, rng, shape):
    # Edit one value, call, put it back, call ...: each output is the one for the values now.
    m = _eval_module(rng, shape, dtype)
    x = make_input(rng, shape, dtype)
    original = {k: v.copy() for k, v in m.state_dict().items()}
    y0 = m(x)
    _assert_current(m, x, y0, dtype)
    for name in ("running_mean", "running_var", "weight", "bias"):
        arr = getattr(m, name)
        arr[-1] = arr[-1] * 2 + 1
        y1 = m(x)
        _assert_current(m, x, y1, dtype)
        assert not np.array_equal(y1, y0), name
        arr[...] = original[name]
        assert_same(m(x), y0)
    for eps in (1e-3, np.float64(1e-5), 1e-5):
        m.eps = eps
        _assert_current(m, x, m(x), dtype)
    assert_same(m(x), y0)


def test_presence_and_dtype_sequence(rng):
    # One module through weight/bias dropped, restored as zeros, of the other dtype, and
    # back: never a stale hit (a missing weight is not a weight of ones in the key).
    dtype = np.float32
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    w, b = m.weight.copy(), m.bias.copy()
    steps = [
        dict(weight=None), dict(weight=np.ones(4, dtype)), dict(bias=None),
        dict(bias=np.zeros(4, dtype)), dict(weight=None, bias=None),
        dict(weight=w.astype(np.float64), bias=b.astype(np.float64)),
        dict(weight=w, bias=b),
    ]
    outputs = []
    for step in steps:
        for name, value in step.items():
            setattr(m, name, value)
        y = m(x)
        _assert_current(m, x, y, dtype)
        outputs.append(y)
    assert_same(outputs[0], outputs[1])  # no weight == weight of ones, by value
    assert_same(outputs[5], outputs[6])  # float32 values held as float64: exact


def test_wrong_channel_count_and_bad_eps_raise_after_the_cache_is_filled(dtype, rng):
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    y0 = m(x)
    with pytest.raises(ValueError, match=r"expected input with 4 channels.*\(2, 3, 5, 5\)"):
        m(make_input(rng, (2, 3, 5, 5), dtype))
    m.running_mean = np.zeros(5, dtype)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        m(x)
    m.running_mean = np.zeros(4, dtype)
    _assert_current(m, x, m(x), dtype)
    for eps in (-1e-5, float("nan")):
        m.eps = eps
        with pytest.raises(ValueError, match="eps must be non-negative"):
            m(x)
    m.eps = 0.0  # torch's rule in evaluation: allowed, and seen
    _assert_current(m, x, m(x), dtype)
    m.eps = 1e-5
    m.running_mean[...] = 0
    _assert_current(m, x, m(x), dtype)
    assert not np.array_equal(m(x), y0)


# -- backward after an edit: the forward's snapshot ------------------------------------
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
    return xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy(), (None if at is None
                                                               else at.grad.numpy())


def _edit_everything(m):
    m.weight[...] *= -3
    m.bias[...] -= 2
    m.running_mean[...] += 1
    m.running_var[...] *= 4
    m.eps = 0.5


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (3, 8, 1)], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("cached", [False, True], ids=["first_call", "cache_hit"])
def test_backward_after_in_place_edits_uses_the_forward_values(dtype, rng, torch, shape, fused,
                                                               cached):
    m = _eval_module(rng, shape, dtype, fused=fused)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if fused else None
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0, rm0, rv0 = (a.copy() for a in (m.weight, m.bias, m.running_mean, m.running_var))
    eps0 = m.eps
    args = (x, addend) if fused else (x,)
    if cached:
        with bnfast.no_grad():
            m(*args)
    y = m(*args)
    _edit_everything(m)
    gx, ga = m.backward(g) if fused else (m.backward(g), None)

    # The float64 formula for the forward-time values (eval: an affine map, masked).
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    axes = (0,) + tuple(range(2, len(shape)))
    ref = reference_batch_norm(x, rm0, rv0, w0, b0, eps=eps0, addend=addend, relu=fused)
    assert_close(y, ref.out, dtype)
    g64 = g.astype(np.float64) * (ref.out > 0 if fused else 1.0)
    inv64 = 1.0 / np.sqrt(rv0.astype(np.float64) + eps0)
    xhat = (x.astype(np.float64) - rm0.reshape(bshape)) * inv64.reshape(bshape)
    sum_tol = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
    assert_close(gx, g64 * (w0.astype(np.float64) * inv64).reshape(bshape), dtype)
    assert_close(m.weight_grad, (g64 * xhat).sum(axis=axes), dtype, sum_tol)
    assert_close(m.bias_grad, g64.sum(axis=axes), dtype, sum_tol)
    if shape != (2, 4, 3, 3):
        return  # torch is slow to call: once per kind is enough
    tgx, tgw, tgb, tga = _torch_eval_grads(torch, x, g, w0, b0, rm0, rv0, eps0, addend, fused)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
    assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)
    if fused:
        assert_close(ga, tga, dtype, TORCH_TOL)


# -- the cache's own contract ---------------------------------------------------------
def test_saved_state_survives_a_cache_miss(dtype, rng):
    # The cache replaces its arrays on a miss, never rewrites them: the views a
    # pending backward holds keep the forward's values.
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    m(x)
    saved = m._saved
    kept = {k: np.array(getattr(saved, k)) for k in ("weight", "mean", "invstd")}
    _edit_everything(m)
    with bnfast.no_grad():
        m(x)  # a miss: new coefficients
    for k, v in kept.items():
        assert_same(getattr(saved, k), v, k)


def test_cache_arrays_are_read_only(dtype, rng):
    m = _eval_module(rng, SHAPE, dtype)
    x = make_input(rng, SHAPE, dtype)
    y0 = m(x)
    cache = m._coef_cache
    entry = cache.current
    arrays = [entry.table, entry.storage_table, entry.mean, entry.invstd, entry.weight]
    arrays += [a for a in entry.key if a is not None]
    for arr in arrays:
        with pytest.raises(ValueError, match="read-only"):
            arr[(0,) * arr.ndim] = 123
    with pytest.raises(AttributeError):
        cache.current = None
    with pytest.raises(AttributeError):
        entry.table = np.zeros((4, 4))
    assert_same(m(x), y0)


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_copies_of_a_cache_are_empty(rng, how):
    m = _eval_module(rng, SHAPE, np.float32)
    m(make_input(rng, SHAPE, np.float32))
    c = {"pickle": lambda c: pickle.loads(pickle.dumps(c)), "copy": copy.copy,
         "deepcopy": copy.deepcopy}[how](m._coef_cache)
    assert type(c) is CoefficientCache
    assert c.current is None
