"""bnfast.testing: the float64 reference against torch (float64) in every mode.

Everything else is checked against this reference, so it is checked against
torch here, tightly enough that the usual slips (a biased running variance,
eps outside the square root, a missing term of the gradient) fail: see
``test_a_wrong_formula_fails``.
"""
import numpy as np
import pytest

from bnfast.testing import reference_batch_norm, reference_batch_norm_backward
from conftest import make_input, make_params, make_running, with_layout

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(7, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)]
TOL = dict(rtol=1e-12, atol=1e-12)  # float64 against float64: a few ulps


def t(a, grad=False):
    return None if a is None else torch.tensor(np.array(a, dtype=np.float64), requires_grad=grad)


def case(shape, affine=True, seed=0):
    rng = np.random.default_rng(seed)
    x = make_input(rng, shape, np.float64)
    w, b = make_params(rng, shape[1], np.float64) if affine else (None, None)
    rm, rv = make_running(rng, shape[1], np.float64)
    addend = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    return x, w, b, rm, rv, addend, dy


def torch_forward(x, rm, rv, w, b, training, momentum, eps, addend, relu):
    """torch's output, running stats after the step, and the leaf tensors (for backward)."""
    leaves = [t(x, True), t(w, w is not None), t(b, b is not None), t(addend, addend is not None)]
    trm, trv = t(rm), t(rv)
    y = F.batch_norm(leaves[0], trm, trv, leaves[1], leaves[2], training, momentum, eps)
    if addend is not None:
        y = y + leaves[3]
    if relu:
        y = torch.relu(y)
    return y, trm, trv, leaves


def close(actual, expected):
    np.testing.assert_allclose(actual, expected.detach().numpy(), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", ["plain", "addend", "relu", "addend+relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_forward_and_backward_match_torch(shape, training, fused, affine):
    x, w, b, rm, rv, addend, dy = case(shape, affine)
    addend = addend if "addend" in fused else None
    relu = "relu" in fused
    momentum, eps = 0.3, 1e-3
    rm0, rv0 = rm.copy(), rv.copy()
    ref = reference_batch_norm(x, rm, rv, w, b, training, momentum, eps, addend=addend, relu=relu)
    y, trm, trv, leaves = torch_forward(x, rm, rv, w, b, training, momentum, eps, addend, relu)
    close(ref.out, y)
    close(ref.running_mean, trm)  # updated in training, unchanged in evaluation
    close(ref.running_var, trv)
    np.testing.assert_array_equal(rm, rm0)  # pure: the inputs are not touched
    np.testing.assert_array_equal(rv, rv0)

    y.backward(t(dy))
    grads = reference_batch_norm_backward(dy, x, w, ref.mean, ref.invstd, training,
                                          output=ref.out if relu else None)
    close(grads.grad_input, leaves[0].grad)
    if affine:
        close(grads.grad_weight, leaves[1].grad)
        close(grads.grad_bias, leaves[2].grad)
    if addend is not None:
        close(grads.grad_addend, leaves[3].grad)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_saved_statistics_and_parameter_gradients_match_native_batch_norm(shape):
    """mean/invstd are torch's save_mean/save_invstd; grad_weight without a weight too."""
    x, w, b, rm, rv, _, dy = case(shape)
    ref = reference_batch_norm(x, rm, rv, w, b, training=True)
    _, save_mean, save_invstd = torch.native_batch_norm(t(x), t(w), t(b), t(rm), t(rv), True,
                                                        0.1, 1e-5)
    close(ref.mean, save_mean)
    close(ref.invstd, save_invstd)
    for weight in (w, None):
        got = reference_batch_norm_backward(dy, x, weight, ref.mean, ref.invstd, True)
        want = torch.ops.aten.native_batch_norm_backward(
            t(dy), t(x), t(weight), None, None, save_mean, save_invstd, True, 1e-5,
            [True, True, True])
        for g, e in zip(got[:3], want):
            close(g, e)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_any_layout_and_float32_values(layout):
    x, w, b, rm, rv, addend, dy = case((3, 4, 5, 2))
    x32 = x.astype(np.float32)
    laid = with_layout(x32, layout)
    for training in (True, False):
        ref = reference_batch_norm(laid, rm, rv, w, b, training, addend=addend, relu=True)
        y, _, trv, _ = torch_forward(x32, rm, rv, w, b, training, 0.1, 1e-5, addend, True)
        close(ref.out, y)
        close(ref.running_var, trv)
        g = reference_batch_norm_backward(with_layout(dy, layout), laid, w, ref.mean,
                                          ref.invstd, training, output=ref.out)
        np.testing.assert_array_equal(g.grad_addend, np.where(ref.out <= 0, 0.0, dy))


@pytest.mark.parametrize("half", [np.float16, "bfloat16"])
def test_half_precision_values_are_upcast_to_float64(half):
    # The reference computes from the values as float64 whatever their dtype:
    # never a sum in half precision (NumPy's bfloat16 mean of 10,000 U(0, 1)
    # values is 0.0256).  Same values as float64 -> the same results, exactly.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(half)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (10000, 2)).astype(dtype)
    x64 = x.astype(np.float64)
    w, rm, rv = (v.astype(dtype) for v in (np.full(2, 1.5), np.zeros(2), np.ones(2)))
    dy = rng.standard_normal(x.shape).astype(dtype)
    ref = reference_batch_norm(x, rm, rv, w, training=True)
    ref64 = reference_batch_norm(x64, rm.astype(np.float64), rv.astype(np.float64),
                                 w.astype(np.float64), training=True)
    for got, want in zip(ref, ref64):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(ref.mean, x64.mean(axis=0), rtol=1e-14)
    grads = reference_batch_norm_backward(dy, x, w, ref.mean, ref.invstd)
    grads64 = reference_batch_norm_backward(dy.astype(np.float64), x64, w.astype(np.float64),
                                            ref.mean, ref.invstd)
    for got, want in zip(grads, grads64):
        np.testing.assert_array_equal(got, want)


def test_nan_stays_in_its_channel():
    x, w, b, rm, rv, _, _ = case((4, 3, 5))
    x[1, 1, 2] = np.nan
    ref = reference_batch_norm(x, rm, rv, w, b, training=True)
    y, _, trv, _ = torch_forward(x, rm, rv, w, b, True, 0.1, 1e-5, None, False)
    assert np.isnan(ref.out[:, 1]).all() and not np.isnan(ref.out[:, [0, 2]]).any()
    np.testing.assert_allclose(ref.out, y.detach().numpy(), equal_nan=True, **TOL)
    np.testing.assert_allclose(ref.running_var, trv.numpy(), equal_nan=True, **TOL)


def test_evaluation_needs_running_statistics():
    with pytest.raises(ValueError, match="running_mean"):
        reference_batch_norm(np.ones((2, 3)), training=False)


def _forward_with(mistake, x, rm, rv, w, b, eps, momentum):
    """The training forward written with one classic mistake."""
    ref = reference_batch_norm(x, rm, rv, w, b, True, momentum, eps)
    n = x.shape[0]
    var = (1 / ref.invstd ** 2 - eps)
    if mistake == "biased running_var":
        return ref.out, (1 - momentum) * rv + momentum * var
    if mistake == "momentum reversed":
        return ref.out, momentum * rv + (1 - momentum) * var * n / (n - 1)
    if mistake == "eps outside sqrt":
        xhat = (x - ref.mean) / (np.sqrt(var) + eps)
        return xhat * w + b, ref.running_var
    raise ValueError(mistake)


@pytest.mark.parametrize("mistake", ["biased running_var", "momentum reversed",
                                     "eps outside sqrt", "no mean term in grad_input",
                                     "eval grad_input with batch terms"])
def test_a_wrong_formula_fails(mistake):
    """The comparison above is tight enough to notice each of these slips."""
    x, w, b, rm, rv, _, dy = case((16, 3), seed=1)
    eps, momentum = 1e-2, 0.3
    if "grad_input" in mistake:
        training = mistake.startswith("no")
        ref = reference_batch_norm(x, rm, rv, w, b, training, momentum, eps)
        y, _, _, leaves = torch_forward(x, rm, rv, w, b, training, momentum, eps, None, False)
        y.backward(t(dy))
        g = reference_batch_norm_backward(dy, x, w, ref.mean, ref.invstd, training)
        close(g.grad_input, leaves[0].grad)  # the right formula passes
        if training:  # drop the sum(dy) / n term
            wrong = g.grad_input + (g.grad_bias / len(x)) * w * ref.invstd
        else:  # use the training formula in evaluation
            wrong = reference_batch_norm_backward(dy, x, w, ref.mean, ref.invstd, True).grad_input
        with pytest.raises(AssertionError):
            close(wrong, leaves[0].grad)
        return
    y, _, trv, _ = torch_forward(x, rm, rv, w, b, True, momentum, eps, None, False)
    out, running_var = _forward_with(mistake, x, rm, rv, w, b, eps, momentum)
    with pytest.raises(AssertionError):
        close(out, y)
        close(running_var, trv)


def test_float32_momentum_is_read_as_torch_reads_it():
    # 1 - np.float32(0.1) stays a float32 (2.5e-8 off torch's double arithmetic).
    x, w, b, rm, rv, _, _ = case((6, 3, 4))
    ref = reference_batch_norm(x, rm, rv, w, b, training=True, momentum=np.float32(0.1))
    _, trm, trv, _ = torch_forward(x, rm, rv, w, b, True, float(np.float32(0.1)), 1e-5, None,
                                   False)
    close(ref.running_mean, trm)
    close(ref.running_var, trv)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_vectors_of_another_shape_raise_as_torch(name):
    x, w, b, rm, rv, _, dy = case((6, 3, 4))
    args = dict(running_mean=rm, running_var=rv, weight=w, bias=b)
    args[name] = np.ones(1)
    with pytest.raises(RuntimeError):
        F.batch_norm(t(x), *(t(args[k]) for k in ("running_mean", "running_var", "weight",
                                                 "bias")))
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\), got shape \(1,\)"):
        reference_batch_norm(x, **args)
    with pytest.raises(ValueError, match=r"save_mean must have shape \(3,\)"):
        reference_batch_norm_backward(dy, x, w, np.ones(1), np.ones(3))


def test_data_far_from_zero_normalise_to_the_exact_result():
    # mean 1e10, std ~1: the float64 mean errs by ~1e-6; its residual is taken out too.
    from fractions import Fraction
    rng = np.random.default_rng(3)
    x = (1e10 + rng.standard_normal((64, 2))).astype(np.float64)
    ref = reference_batch_norm(x, training=True, eps=0.0)
    for c in range(2):
        values = [Fraction(v) for v in x[:, c]]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        exact = np.array([float((v - mean) / Fraction(np.sqrt(float(var)))) for v in values])
        np.testing.assert_allclose(ref.out[:, c], exact, rtol=0, atol=1e-12)
