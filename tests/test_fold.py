"""bnfast.fold, affine_coefficients: folded layers against the unfolded layer + BatchNorm."""
import ml_dtypes
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import bnfast
from bnfast import fold
from bnfast._dtypes import resolve_dtype
from bnfast.testing import reference_batch_norm
from conftest import DTYPES, assert_close, make_input, make_params, make_running

# Weight dtypes: folding rounds once to each.
WEIGHT_DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)


# -- the unfolded layers, in float64 -------------------------------------------------
def np_conv(x, w, b, groups):
    """Conv1d/2d/3d (stride 1, no padding) in NumPy: the reference without torch."""
    N, cin = x.shape[:2]
    cout, cg = w.shape[:2]
    k = w.shape[2:]
    win = sliding_window_view(x, k, axis=tuple(range(2, x.ndim)))  # (N, Cin, *O, *K)
    out_sp = win.shape[2:2 + len(k)]
    X = win.reshape(N, groups, cg, int(np.prod(out_sp)), int(np.prod(k)))
    W = w.reshape(groups, cout // groups, cg, int(np.prod(k)))
    y = np.einsum("ngcpk,gock->ngop", X, W).reshape((N, cout) + out_sp)
    return y if b is None else y + b.reshape((1, -1) + (1,) * len(k))


def np_conv_transpose(x, w, b, groups):
    """ConvTranspose (stride 1, no padding) as the convolution of the padded input
    with the flipped kernel, in/out swapped within each group."""
    cin, og = w.shape[:2]
    cg = cin // groups
    k = w.shape[2:]
    wt = w.reshape((groups, cg, og) + k).swapaxes(1, 2).reshape((groups * og, cg) + k)
    wt = np.flip(wt, axis=tuple(range(2, w.ndim)))
    pad = [(0, 0), (0, 0)] + [(n - 1, n - 1) for n in k]
    return np_conv(np.pad(x, pad), wt, b, groups)


def torch_conv(x, w, b, groups, transposed):
    import torch
    f = getattr(torch.nn.functional,
                f"conv{'_transpose' if transposed else ''}{x.ndim - 2}d")
    t = torch.from_numpy
    with torch.no_grad():
        return f(t(x), t(w), None if b is None else t(b), groups=groups).numpy()


def conv64(x, w, b, groups, transposed):
    """The convolution in float64: torch's where installed, else the NumPy one."""
    w = np.asarray(w, np.float64)
    b = None if b is None else np.asarray(b, np.float64)
    try:
        import torch  # noqa: F401
    except ImportError:
        return (np_conv_transpose if transposed else np_conv)(x, w, b, groups)
    return torch_conv(x, w, b, groups, transposed)


def _bn(rng, C, dtype, affine=True, bias=True, cls=bnfast.BatchNorm2d):
    bn = cls(C, affine=affine, bias=bias, dtype=dtype, eps=1e-3)
    bn.running_mean[:], bn.running_var[:] = make_running(rng, C, dtype)
    bn.running_var[0] = 0.0  # eps matters
    if affine:
        w, b = make_params(rng, C, dtype)
        bn.weight[:] = w
        bn.weight[1] = -bn.weight[1]
        if bias:
            bn.bias[:] = b
    return bn.eval()


def _bn_eval64(y, bn):
    return reference_batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                eps=bn.eps).out


def _bn_dtype(weight_dtype):
    return np.float64 if weight_dtype == np.float64 else np.float32


CONVS = [  # (transposed, weight shape, groups, input spatial)
    (False, (6, 3, 3), 1, (7,)),
    (False, (6, 2, 3, 2), 2, (5, 6)),
    (False, (4, 1, 2, 2, 2), 4, (4, 3, 5)),  # depthwise
    (True, (6, 2, 3), 3, (5,)),
    (True, (4, 3, 2, 3), 2, (4, 5)),
    (True, (6, 2, 2, 1, 2), 2, (3, 4, 3)),
    (True, (3, 5, 2, 2), 1, (4, 4)),
]


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("transposed, shape, groups, spatial", CONVS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_folded_conv_matches_conv_then_batch_norm(rng, wdtype, transposed, shape, groups,
                                                  spatial, with_bias, affine):
    cin = shape[0] if transposed else shape[1] * groups
    cout = shape[1] * groups if transposed else shape[0]
    w = rng.standard_normal(shape).astype(wdtype)
    b = rng.standard_normal(cout).astype(wdtype) if with_bias else None
    bn = _bn(rng, cout, _bn_dtype(wdtype), affine=affine)
    wf, bf = fold.conv(w, b, bn, transposed=transposed, groups=groups)
    assert wf.dtype == np.dtype(wdtype) and wf.shape == w.shape
    assert bf.dtype == np.dtype(wdtype) and bf.shape == (cout,)

    x = make_input(rng, (2, cin) + spatial, np.float64)
    unfolded = _bn_eval64(conv64(x, w, b, groups, transposed), bn)
    folded = conv64(x, wf, bf, groups, transposed)
    # Each folded value is rounded once: the output is off by at most half an
    # ulp of every product's weight, summed, plus half an ulp of the bias.
    eps = float(ml_dtypes.finfo(wdtype).eps)
    bound = conv64(np.abs(x), np.abs(wf.astype(np.float64)), np.abs(bf.astype(np.float64)),
                   groups, transposed)
    assert np.all(np.abs(folded - unfolded) <= eps * bound + 1e-12)


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("transposed, shape, groups, spatial", CONVS)
def test_folded_values_are_the_exact_ones_rounded_once(rng, wdtype, transposed, shape, groups,
                                                       spatial):
    cout = shape[1] * groups if transposed else shape[0]
    w = rng.standard_normal(shape).astype(wdtype)
    b = rng.standard_normal(cout).astype(wdtype)
    bn = _bn(rng, cout, _bn_dtype(wdtype))
    wf, bf = fold.conv(w, b, bn, transposed=transposed, groups=groups)
    # Written out channel by channel from the definition, in float64.
    rv, rm = bn.running_var.astype(np.float64), bn.running_mean.astype(np.float64)
    scale = 1.0 / np.sqrt(rv + bn.eps) * bn.weight.astype(np.float64)
    shift = bn.bias.astype(np.float64) - rm * scale
    expected = w.astype(np.float64)
    for o in range(cout):
        if transposed:
            g, j = divmod(o, shape[1])
            cg = shape[0] // groups
            expected[g * cg:(g + 1) * cg, j] *= scale[o]
        else:
            expected[o] *= scale[o]
    np.testing.assert_array_equal(wf, expected.astype(wdtype))
    np.testing.assert_array_equal(bf, (b.astype(np.float64) * scale + shift).astype(wdtype))


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_folded_linear_matches_linear_then_batch_norm(rng, wdtype, affine, with_bias):
    w = rng.standard_normal((5, 7)).astype(wdtype)
    b = rng.standard_normal(5).astype(wdtype) if with_bias else None
    bn = _bn(rng, 5, _bn_dtype(wdtype), affine=affine, cls=bnfast.BatchNorm1d)
    wf, bf = fold.linear(w, b, bn)
    assert wf.dtype == bf.dtype == np.dtype(wdtype)
    x = rng.standard_normal((4, 7))

    def linear64(w, b):
        w = np.asarray(w, np.float64)
        try:
            import torch
        except ImportError:
            y = x @ w.T
            return y if b is None else y + np.asarray(b, np.float64)
        t = torch.from_numpy
        bb = None if b is None else t(np.asarray(b, np.float64))
        return torch.nn.functional.linear(t(x), t(w), bb).numpy()

    unfolded = _bn_eval64(linear64(w, b), bn)
    folded = linear64(wf, bf)
    eps = float(ml_dtypes.finfo(wdtype).eps)
    bound = np.abs(x) @ np.abs(wf.astype(np.float64)).T + np.abs(bf.astype(np.float64))
    assert np.all(np.abs(folded - unfolded) <= eps * bound + 1e-12)


@pytest.mark.parametrize("transposed, shape, groups, spatial", CONVS)
def test_numpy_conv_reference_matches_torch(rng, torch, transposed, shape, groups, spatial):
    cin = shape[0] if transposed else shape[1] * groups
    cout = shape[1] * groups if transposed else shape[0]
    x = rng.standard_normal((2, cin) + spatial)
    w, b = rng.standard_normal(shape), rng.standard_normal(cout)
    ours = (np_conv_transpose if transposed else np_conv)(x, w, b, groups)
    np.testing.assert_allclose(ours, torch_conv(x, w, b, groups, transposed), rtol=1e-12,
                               atol=1e-12)


def test_folded_conv_matches_torch_fuse_where_torch_folds(rng, torch):
    """torch folds plain convolutions: same weights, up to torch's float32 arithmetic."""
    from torch.nn.utils import fuse_conv_bn_weights
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    bn = _bn(rng, 6, np.float32)
    t = torch.from_numpy
    tw, tb = fuse_conv_bn_weights(t(w), t(b), t(bn.running_mean), t(bn.running_var), bn.eps,
                                  t(bn.weight), t(bn.bias))
    wf, bf = fold.conv(w, b, bn, groups=3)
    assert_close(wf, tw.detach().numpy(), np.float32)
    assert_close(bf, tb.detach().numpy(), np.float32)


# -- affine_coefficients ----------------------------------------------------------------
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_affine_coefficients_give_the_eval_output(rng, dtype, affine, bias):
    bn = _bn(rng, 4, dtype, affine=affine, bias=bias)
    scale, shift = bn.affine_coefficients()
    assert scale.dtype == shift.dtype == np.dtype(dtype) and scale.shape == (4,)
    x = make_input(rng, (3, 4, 2, 5), dtype)
    sh = (1, 4, 1, 1)
    # x * scale + shift, in float64, is the float64 reference up to the rounding
    # of scale and shift to dtype (and, for float64, of this sum and the reference).
    expected = _bn_eval64(x, bn)
    got = x.astype(np.float64) * scale.reshape(sh) + shift.reshape(sh)
    eps = np.finfo(dtype).eps * (4 if dtype == np.float64 else 1)
    bound = np.abs(x) * np.abs(scale.reshape(sh)) + np.abs(shift.reshape(sh))
    assert np.all(np.abs(got - expected) <= eps * bound)
    # and the module's own eval output is the same map
    assert_close(bn(x), expected, dtype)
    s64, t64 = bn.affine_coefficients(np.float64)
    assert s64.dtype == np.float64
    np.testing.assert_array_equal(s64.astype(dtype), scale)
    np.testing.assert_array_equal(t64.astype(dtype), shift)


def test_affine_coefficients_take_dtype_names_and_only_the_four(rng):
    bn = _bn(rng, 4, np.float64)
    s64, t64 = bn.affine_coefficients()
    for name in ("float16", "bfloat16", "float32"):
        scale, shift = bn.affine_coefficients(name)
        assert scale.dtype == shift.dtype == resolve_dtype(name)
        np.testing.assert_array_equal(scale, s64.astype(scale.dtype))
        np.testing.assert_array_equal(shift, t64.astype(shift.dtype))
    for bad in (np.int64, "int8", np.longdouble):
        with pytest.raises(TypeError, match="^dtype must be float16, bfloat16, float32"):
            bn.affine_coefficients(bad)


def test_errors(rng):
    bn = _bn(rng, 4, np.float32)
    with pytest.raises(ValueError, match="4 channels but the convolution has 6"):
        fold.conv(np.ones((6, 2, 3, 3), np.float32), None, bn)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        fold.conv(np.ones((4, 2, 3, 3), np.float32), None, bn, groups=3)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        fold.conv(np.ones((4, 2, 3, 3), np.float32), None, bn, groups=0)
    with pytest.raises(ValueError, match=r"3 or 4 or 5 dimensions, got shape \(4, 2\)"):
        fold.conv(np.ones((4, 2), np.float32), None, bn)
    with pytest.raises(ValueError, match=r"2 dimensions, got shape \(4, 2, 1\)"):
        fold.linear(np.ones((4, 2, 1), np.float32), None, bn)
    with pytest.raises(TypeError, match="floating array, got dtype int64"):
        fold.linear(np.ones((4, 2), np.int64), None, bn)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        fold.linear(np.ones((4, 2), np.float32), np.ones(3), bn)
    with pytest.raises(ValueError, match="no fixed affine map"):
        fold.linear(np.ones((4, 2), np.float32), None,
                    bnfast.BatchNorm1d(4, track_running_stats=False))


@pytest.mark.parametrize("dtype_", DTYPES, ids=lambda d: np.dtype(d).name)
def test_inputs_unchanged(rng, dtype_):
    w = rng.standard_normal((4, 3, 2)).astype(dtype_)
    b = rng.standard_normal(4).astype(dtype_)
    w0, b0 = w.copy(), b.copy()
    fold.conv(w, b, _bn(rng, 4, dtype_))
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)


def test_fused_modules_do_not_fold(rng):
    # relu(bn(x) + addend) is no affine map: folded, the ReLU would be lost.
    fused = bnfast.FusedBatchNorm2d(4)
    with pytest.raises(TypeError, match="FusedBatchNorm2d's ReLU and addend are no affine map"):
        fold.conv(np.ones((4, 2, 3, 3), np.float32), None, fused)
    with pytest.raises(TypeError, match="no affine map"):
        fold.linear(np.ones((4, 2), np.float32), None, bnfast.FusedBatchNorm1d(4))


def test_complex_bias_is_a_type_error(rng):
    bn = _bn(rng, 4, np.float32)
    with pytest.raises(TypeError, match="bias must be an array of real numbers, got dtype "
                                        "complex128"):
        fold.linear(np.ones((4, 2), np.float32), np.ones(4, complex), bn)


def test_linear_takes_a_one_feature_batch_norm_as_torch(rng, torch):
    # torch's fuse_linear_bn_eval: a BatchNorm1d(1) after Linear(3, 4) (its (N, 1, 4)
    # output) scales every output alike.
    from torch.nn.utils import fuse_linear_bn_eval
    lin = torch.nn.Linear(3, 4).double().eval()
    tbn = torch.nn.BatchNorm1d(1).double().eval()
    bn = bnfast.BatchNorm1d(1, dtype=np.float64)
    bn.running_mean[:], bn.running_var[:] = 0.7, 2.5
    bn.weight[:], bn.bias[:] = -1.5, 0.25
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    fused = fuse_linear_bn_eval(lin, tbn)
    w, b = fold.linear(lin.weight.detach().numpy(), lin.bias.detach().numpy(), bn)
    np.testing.assert_allclose(w, fused.weight.detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(b, fused.bias.detach().numpy(), rtol=1e-15, atol=1e-15)
    x = rng.standard_normal((5, 3))
    expected = tbn(lin(torch.from_numpy(x)).unsqueeze(1)).squeeze(1).detach().numpy()
    np.testing.assert_allclose(x @ w.T + b, expected, rtol=1e-12, atol=1e-12)


def test_values_beyond_the_weights_dtype_raise(rng):
    # A scale of 1e5 (running_var 1e-10) folds float16 weights past 65504: inf with a
    # RuntimeWarning before, an OverflowError naming the value now.
    bn = bnfast.BatchNorm2d(2, dtype=np.float64, eps=0.0)
    bn.running_var[:] = [1.0, 1e-10]
    w = np.ones((2, 3, 1, 1), np.float16)
    with pytest.raises(OverflowError, match=r"folded weight 100000 \(index \(1, 0, 0, 0\)\) "
                                            r"rounds to inf in float16"):
        fold.conv(w, None, bn)
    with pytest.raises(OverflowError, match=r"folded weight 100000 \(index \(1, 0\)\)"):
        fold.linear(np.ones((2, 3), np.float16), None, bn)
    with pytest.raises(OverflowError, match=r"scale 100000 \(index 1\) rounds to inf in float16"):
        bn.affine_coefficients("float16")
    bn.running_var[:] = 1.0
    bn.running_mean[:] = [0.0, -1e5]
    with pytest.raises(OverflowError, match=r"folded bias 100000 \(index 1\)"):
        fold.linear(np.ones((2, 3), np.float16), np.zeros(2, np.float16), bn)
    w32, b32 = fold.linear(np.ones((2, 3), np.float32), None, bn)  # float32 holds them
    assert b32[1] == 1e5
