"""bnfast.torch's operators and functional layer against torch's own batch_norm."""
import copy
import io
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402
from bnfast.torch import functional as btf  # noqa: E402
from bnfast.torch._tensors import as_numpy, kernel_layout  # noqa: E402

F = torch.nn.functional
DTYPES = (torch.float32, torch.float64)
# bnfast vs torch at the same dtype (outputs and gradients of values ~1-10).
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
SHAPES = [(6, 5), (4, 3, 7), (4, 3, 5, 6), (2, 3, 3, 4, 5)]
FORMATS = ("contiguous", "channels_last", "strided")
# A 2-D tensor has no channels-last form besides its transpose.
CASES = [(s, f) for s in SHAPES for f in FORMATS if not (len(s) == 2 and f == "channels_last")]


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


@pytest.fixture(params=["eager", "dispatched"])
def path(request):
    """Plain eager calls take the kernels' direct road; under a dispatch mode (here torch's
    FLOP counter) the functional layer goes through the ``torch.ops.bnfast`` operators."""
    if request.param == "eager":
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        yield


def _tensor(shape, dtype, fmt="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 \
        + torch.linspace(-1, 1, C, dtype=torch.float64).reshape(bshape)
    x = x.to(dtype)
    if fmt == "channels_last":
        order = (0,) + tuple(range(2, len(shape))) + (1,)
        inverse = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
        x = x.permute(order).contiguous().permute(inverse)
    elif fmt == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


def _vectors(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    rm = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return w, b, rm, rv


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# -- forward and backward vs torch ---------------------------------------------------------
@pytest.mark.parametrize("shape, fmt", CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_torch(shape, fmt, training, dtype, path):
    x = _tensor(shape, dtype, fmt)
    w, b, rm, rv = _vectors(shape[1], dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for t in xs:
        t.retain_grad()
    ps = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for _ in range(2)]
    y = bt.batch_norm(xs[0], rm, rv, *ps[0], training, 0.1, 1e-5)
    expected = F.batch_norm(xs[1], rm2, rv2, *ps[1], training, 0.1, 1e-5)
    _close(y, expected, dtype)
    _close(rm, rm2, dtype)
    _close(rv, rv2, dtype)
    g = _tensor(shape, dtype, seed=7)
    y.backward(g)
    expected.backward(g)
    _close(xs[0].grad, xs[1].grad, dtype)
    _close(ps[0][0].grad, ps[1][0].grad, dtype)
    _close(ps[0][1].grad, ps[1][1].grad, dtype)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 1, 1), (3, 64, 80, 80)], ids=str)
def test_output_keeps_memory_format(shape, fmt, dtype, path):
    # (3, 64, 80, 80): outputs of 4 MiB and more are allocated by NumPy, same strides.
    x = _tensor(shape, dtype, fmt).requires_grad_()
    a = _tensor(shape, dtype, fmt, seed=2)
    y = bt.batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x.detach(), None, None, training=True)
    assert y.stride() == expected.stride() == x.stride()
    _close(y, expected, dtype)
    y.backward(a)
    assert x.grad.stride() == x.stride()
    z = bt.fused_batch_norm(x, None, None, addend=a, training=True)
    assert z.stride() == x.stride()
    # Outputs are tensors of their own (not views): in-place ops on them take part in autograd.
    x.grad = None
    x2 = x.detach().clone().requires_grad_()
    torch.relu_(bt.batch_norm(x, None, None, training=True)).backward(a)
    torch.relu_(F.batch_norm(x2, None, None, training=True)).backward(a)
    _close(x.grad, x2.grad, dtype)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "channels_last_3d"])
def test_tensors_are_viewed_not_copied(fmt, dtype):
    shape = (2, 3, 4, 5, 6) if fmt == "channels_last_3d" else (2, 3, 4, 5)
    memory = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
              "channels_last_3d": torch.channels_last_3d}[fmt]
    x = torch.randn(shape, dtype=dtype).to(memory_format=memory)
    view = as_numpy(x)
    assert np.shares_memory(view, x.numpy())
    assert view.strides == tuple(s * x.element_size() for s in x.stride())
    # and the core processes it in its own layout (no copy into another)
    from bnfast import _layout
    assert _layout.layout_of(view) == kernel_layout(x)


@pytest.mark.parametrize("shape, fmt", CASES + [((4, 3), "fortran"), ((4, 3, 1, 1), "strided"),
                                                 ((0, 3, 2), "contiguous")], ids=str)
def test_kernel_layout_agrees_with_core(shape, fmt):
    from bnfast import _layout
    if fmt == "fortran":
        x = torch.randn(shape[::-1], dtype=torch.float64).t()
    else:
        x = _tensor(shape, torch.float64, fmt)
    assert kernel_layout(x) == _layout.kernel_layout(x.numpy())


def test_running_buffers_written_in_place(dtype, path):
    x = _tensor((4, 3, 5), dtype)
    w, b, rm, rv = _vectors(3, dtype)
    ptr, version = rm.data_ptr(), rm._version
    bt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    assert rm.data_ptr() == ptr and rm._version > version


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("addend", [True, False], ids=["addend", "no_addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_matches_torch(shape, addend, training, dtype, path):
    x = _tensor(shape, dtype)
    a = _tensor(shape, dtype, seed=3) if addend else None
    w, b, rm, rv = _vectors(shape[1], dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    leaves = [[t.clone().requires_grad_() if t is not None else None for t in (x, a, w, b)]
              for _ in range(2)]
    x0, a0, w0, b0 = leaves[0]
    x1, a1, w1, b1 = leaves[1]
    y = bt.fused_batch_norm(x0, rm, rv, w0, b0, a0, training, 0.1, 1e-5)
    expected = F.batch_norm(x1, rm2, rv2, w1, b1, training, 0.1, 1e-5)
    expected = torch.relu(expected if a1 is None else expected + a1)
    _close(y, expected, dtype)
    _close(rm, rm2, dtype)
    _close(rv, rv2, dtype)
    g = _tensor(shape, dtype, seed=7)
    y.backward(g)
    expected.backward(g)
    for ours, theirs in zip(leaves[0], leaves[1]):
        if ours is not None:
            _close(ours.grad, theirs.grad, dtype)


def test_fused_channels_last_backward(dtype, path):
    # The mask is packed in the input's memory order; backward reads it in that order.
    x = _tensor((3, 4, 5, 6), dtype, "channels_last").requires_grad_()
    a = _tensor((3, 4, 5, 6), dtype, "contiguous", seed=2).requires_grad_()
    y = bt.fused_batch_norm(x, None, None, addend=a, training=True)
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    expected = torch.relu(F.batch_norm(x2, None, None, training=True) + a2)
    g = _tensor((3, 4, 5, 6), dtype, seed=9)
    y.backward(g)
    expected.backward(g)
    _close(x.grad, x2.grad, dtype)
    _close(a.grad, a2.grad, dtype)


# -- gradcheck -----------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_batch_norm(training):
    x = _tensor((3, 2, 4), torch.float64).requires_grad_()
    w, b, rm, rv = _vectors(2, torch.float64)
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, w, b):
        return torch.ops.bnfast.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)[0]
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fused_batch_norm(training):
    x = _tensor((3, 2, 4), torch.float64).requires_grad_()
    a = (_tensor((3, 2, 4), torch.float64, seed=5) * 0.5).requires_grad_()
    w, b, rm, rv = _vectors(2, torch.float64)
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, a, w, b):
        return torch.ops.bnfast.fused_batch_norm(x, a, w, b, rm, rv, training, 0.1, 1e-5)[0]
    assert torch.autograd.gradcheck(fn, (x, a, w, b))


def test_backward_ops_against_aten(dtype):
    x = _tensor((4, 3, 5), dtype)
    g = _tensor((4, 3, 5), dtype, seed=4)
    w, _, _, _ = _vectors(3, dtype)
    _, mean, invstd, _, _ = torch.ops.bnfast.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    gx, gw, gb = torch.ops.bnfast.batch_norm_backward(g, x, w, mean, invstd, True, 1e-5,
                                                      [True, True, True])
    _, m2, s2 = torch.ops.aten.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    ex, ew, eb = torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, m2, s2, True,
                                                           1e-5, [True, True, True])
    _close(gx, ex, dtype)
    _close(gw, ew, dtype)
    _close(gb, eb, dtype)
    _, gw, gb = torch.ops.bnfast.batch_norm_backward(g, x, w, mean, invstd, True, 1e-5,
                                                     [False, True, False])
    assert gw.shape == (3,) and gb.numel() == 0


# -- checks and fallback -------------------------------------------------------------------
def test_torch_errors_kept():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="eps must be positive"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0)
    with pytest.raises(RuntimeError):  # torch's own shape error, from the fallback
        bt.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bt.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1e-5)


def test_eval_with_eps_zero_as_torch():
    # torch allows eps = 0 in evaluation; bnfast's kernels run it (no fallback, no
    # warning) since session 21.
    x, rm, rv = torch.randn(6, 3, 5), torch.randn(3), torch.rand(3) + 0.5
    stock = torch.nn.BatchNorm1d(3, eps=0.0).eval()
    stock.running_mean.copy_(rm)
    stock.running_var.copy_(rv)
    expected = stock(x)
    ours = bt.convert(stock)
    assert type(ours) is bt.BatchNorm1d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ours(x), expected)
        torch.testing.assert_close(bt.batch_norm(x, rm, rv, eps=0.0), expected)


@pytest.mark.parametrize("args, kwargs", [
    ((torch.randn(4, 3), torch.zeros(3), None), dict(training=False)),
    ((torch.randn(4, 3), None, torch.ones(3)), dict(training=False)),
    ((torch.randn(4, 3), None, None), dict(training=False)),
    ((torch.randn(4, 3), None, None), dict(training=True, eps=0.0)),
    ((torch.randn(4, 3), torch.zeros(3), torch.ones(3)), dict(training=False, eps=-1.0)),
    ((torch.randn(1, 3, 1), None, None), dict(training=True)),
    ((torch.randn(4, 3), torch.zeros(3), None), dict(training=True)),
    ((torch.randn(4, 3), None, torch.ones(3)), dict(training=True)),
], ids=["eval-no-var", "eval-no-mean", "eval-no-buffers", "eps0", "eps-negative", "one-value",
        "train-no-var", "train-no-mean"])
def test_invalid_calls_raise_as_torch(args, kwargs):
    # The exception type too: code that catches torch's RuntimeError catches ours.
    with pytest.raises(Exception) as theirs:
        F.batch_norm(*args, **kwargs)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        bt.batch_norm(*args, **kwargs)


@pytest.mark.parametrize("args", [
    (np.ones((4, 3)), None, None, None),
    (torch.ones(4, 3), [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], None),
    (torch.ones(4, 3), None, None, np.ones(3)),
    ([[1.0, 2.0], [3.0, 4.0]], None, None, None),
], ids=["numpy-input", "list-buffers", "numpy-weight", "list-input"])
def test_non_tensor_arguments_raise_as_torch(args):
    # torch's own exception (type and message), not an AttributeError from our checks.
    with pytest.raises(Exception) as theirs:
        F.batch_norm(*args, training=args[1] is None)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        bt.batch_norm(*args, training=args[1] is None)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fx_traced_fused_functional_keeps_addend_and_relu(training):
    # An fx Proxy is no tensor: the call records torch's ops, the add and ReLU included.
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(4)
            self.register_buffer("rm", torch.randn(3, generator=g, dtype=torch.float64))
            self.register_buffer("rv", torch.rand(3, generator=g, dtype=torch.float64) + 0.5)

        def forward(self, x, y):
            return bt.fused_batch_norm(x, self.rm, self.rv, addend=y, training=training)

    block = Block()
    traced = torch.fx.symbolic_trace(copy.deepcopy(block))
    x, y = _tensor((4, 3, 5), torch.float64), _tensor((4, 3, 5), torch.float64, seed=9)
    _close(traced(x, y), block(x, y), torch.float64)


@pytest.mark.parametrize("eps", [torch.tensor(1e-3, requires_grad=True), "1e-3"],
                         ids=["tensor-requiring-grad", "str"])
def test_eps_torch_rejects_raises_its_type_error(eps):
    x = _tensor((4, 3, 5), torch.float64)
    with pytest.raises(TypeError):
        F.batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises(TypeError, match="argument 'eps' must be float"):
        bt.batch_norm(x, None, None, training=True, eps=eps)


@pytest.mark.parametrize("addend", [3, -0.5], ids=["int", "float"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_with_a_number_addend(addend, training):
    x = _tensor((4, 3, 5), torch.float64)
    w, b, rm, rv = _vectors(3, torch.float64)
    rm_t, rv_t = rm.clone(), rv.clone()
    got = bt.fused_batch_norm(x, rm, rv, w, b, addend=addend, training=training)
    expected = torch.relu(F.batch_norm(x, rm_t, rv_t, w, b, training) + addend)
    _close(got, expected, torch.float64)
    _close(rm, rm_t, torch.float64)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
@pytest.mark.parametrize("function", ["batch_norm", "fused_batch_norm"])
def test_empty_input_with_one_buffer_passes_as_in_torch(training, missing, function):
    # torch returns an empty batch before its buffer checks; the core takes both or neither.
    x = torch.randn(0, 3, 5)
    buffers = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    buffers[missing] = None
    expected = F.batch_norm(x, buffers["running_mean"], buffers["running_var"],
                            training=training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing fell back: nothing to warn about
        got = getattr(bt, function)(x, buffers["running_mean"], buffers["running_var"],
                                    training=training)
    assert got.shape == expected.shape == x.shape and got.dtype == x.dtype


@pytest.mark.parametrize("momentum, eps", [(torch.tensor(0.2), 1e-5), (0.1, torch.tensor(1e-3)),
                                          (True, 1e-5), (0.1, True), (torch.tensor(0.3), 2),
                                          (1, torch.tensor(0.5, dtype=torch.float64))],
                         ids=["momentum-tensor", "eps-tensor", "momentum-bool", "eps-bool",
                              "tensor-int", "int-double-tensor"])
@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
def test_numbers_torch_takes_for_momentum_and_eps(momentum, eps, module):
    # torch reads them as doubles: bools and one-element tensors are numbers too.
    x = _tensor((4, 3, 5), torch.float64)
    results = []
    for mine in (False, True):
        if module:
            bn = (bt.BatchNorm1d if mine else torch.nn.BatchNorm1d)(
                3, eps=eps, momentum=momentum, dtype=torch.float64)
            results.append((bn(x), bn.running_mean, bn.running_var))
        else:
            rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            y = (bt.batch_norm if mine else F.batch_norm)(x, rm, rv, training=True,
                                                          momentum=momentum, eps=eps)
            results.append((y, rm, rv))
    for mine, theirs in zip(results[1], results[0]):
        _close(mine, theirs, torch.float64)


@pytest.mark.parametrize("momentum", [torch.tensor([0.1]), torch.tensor([0.1, 0.2]), "0.1"],
                         ids=["1-d", "2-elements", "str"])
def test_momentum_torch_rejects_raises_its_error(momentum):
    x = _tensor((4, 3, 5), torch.float64)
    with pytest.raises(Exception) as theirs:
        F.batch_norm(x, None, None, training=True, momentum=momentum)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value).split(" (position")[0])):
        bt.batch_norm(x, None, None, training=True, momentum=momentum)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(btf, "_warned", set())


def test_fallback_other_device_warns_once(fresh_warnings):
    x = torch.empty(4, 3, 5, device="meta")
    with pytest.warns(UserWarning, match="tensors on meta"):
        y = bt.batch_norm(x, None, None, training=True)
    assert y.device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_run_on_the_kernels(half, fresh_warnings):
    # The core takes both half dtypes (float32 parameters, torch's CPU rule): no
    # fallback, no warning, torch's result within the half dtype's rounding.
    assert half in bt.DTYPES
    x = _tensor((4, 3, 5), torch.float32).to(half)
    w, b, rm, rv = _vectors(3, torch.float32)
    rm_t, rv_t = rm.clone(), rv.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = bt.batch_norm(x, rm, rv, w, b, True)
    expected = F.batch_norm(x, rm_t, rv_t, w, b, True)
    assert y.dtype == half
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


def test_fallback_mixed_parameters(fresh_warnings):
    x = _tensor((4, 3, 5), torch.float32)
    with pytest.warns(UserWarning, match="parameters or buffers"):
        with pytest.raises(RuntimeError, match="mixed dtype"):  # torch's answer
            bt.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), None, True)


def test_fallback_sparse_layout_and_eval_eps_zero(fresh_warnings):
    x = _tensor((4, 3, 5), torch.float64)
    w, b, rm, rv = _vectors(3, torch.float64)
    with warnings.catch_warnings():  # eps == 0 in evaluation: our kernels, no fallback
        warnings.simplefilter("error")
        y = bt.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0)
    _close(y, F.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0), torch.float64)
    with pytest.warns(UserWarning, match="layout torch.sparse_coo"):
        with pytest.raises((RuntimeError, NotImplementedError)):
            bt.batch_norm(x.to_sparse(), rm, rv, w, b, False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_forward_mode_ad_falls_back_to_torch(training, fused, fresh_warnings):
    # The kernels have no forward-mode formula and a custom operator cannot register
    # one: torch would give zero tangents (torch.func.jvp) or none (dual tensors)
    # without an error.  Forward-mode AD runs torch's op, which has one.
    x = _tensor((6, 3, 4, 5), torch.float64)
    tangent = _tensor(x.shape, torch.float64, seed=7)
    addend = _tensor(x.shape, torch.float64, seed=8)
    stock = torch.nn.BatchNorm2d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        stock.running_var.fill_(4.0)
    ours = bt.convert(stock)
    if fused:
        ours.__class__ = bt.FusedBatchNorm2d

    def run(module, mine):
        def f(x):
            if mine:
                return module(x, addend) if fused else module(x)
            return torch.relu(module(x) + addend) if fused else module(x)
        return f

    if not training:  # torch.func forbids a module's in-place buffer updates
        with pytest.warns(UserWarning, match="forward-mode AD"):
            got = torch.func.jvp(run(ours, True), (x,), (tangent,))
        expected = torch.func.jvp(run(stock, False), (x,), (tangent,))
        for mine, theirs in zip(got, expected):
            _close(mine, theirs, torch.float64)
    fwd = torch.autograd.forward_ad
    results = []
    for module, mine in ((stock, False), (ours, True)):
        module.requires_grad_(False)
        with fwd.dual_level():
            y = run(module, mine)(fwd.make_dual(x, tangent))
            results.append(fwd.unpack_dual(y))
    for mine, theirs in zip(results[1], results[0]):  # (primal, tangent)
        assert mine is not None
        _close(mine, theirs, torch.float64)
    _close(ours.running_mean, stock.running_mean, torch.float64)
    _close(ours.running_var, stock.running_var, torch.float64)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_func_transforms_fall_back_to_torch(transform, training, fused, fresh_warnings):
    # torch.func's reverse transforms and vmap: a custom operator's autograd has no
    # setup_context for them and no batching rule; torch's op has every rule.
    x = _tensor((4, 3, 2, 3), torch.float64)
    addend = _tensor(x.shape, torch.float64, seed=8)
    # torch.func forbids in-place buffer updates inside a transform: untracked in training.
    stock = torch.nn.BatchNorm2d(3, dtype=torch.float64,
                                 track_running_stats=not training).train(training)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.uniform_(-0.5, 0.5)
    ours = bt.convert(stock)
    if fused:
        ours.__class__ = bt.FusedBatchNorm2d

    def run(module, mine):
        def f(params, x):
            if mine:
                y = torch.func.functional_call(module, params, (x, addend) if fused else (x,))
            else:
                y = torch.func.functional_call(module, params, (x,))
                y = torch.relu(y + addend) if fused else y
            return y
        return f

    params = {k: v.detach() for k, v in stock.named_parameters()}

    def apply(f):
        if transform == "grad":
            return torch.func.grad(lambda p, x: f(p, x).pow(2).sum(), argnums=(0, 1))(params, x)
        if transform == "vjp":
            out, pull = torch.func.vjp(f, params, x)
            return out, pull(torch.ones_like(out))
        if transform == "jacrev":
            return torch.func.jacrev(f, argnums=1)(params, x)
        # vmap over a batch of three inputs
        return torch.func.vmap(f, in_dims=(None, 0))(params, torch.stack([x, 2 * x, x - 1]))

    with pytest.warns(UserWarning, match="torch.func transforms"):
        got = apply(run(ours, True))
    expected = apply(run(stock, False))
    for mine, theirs in zip(torch.utils._pytree.tree_leaves(got),
                            torch.utils._pytree.tree_leaves(expected)):
        _close(mine, theirs, torch.float64)


@pytest.mark.parametrize("addend_dtype", [torch.float64, torch.float16])
def test_fused_fallback_for_an_addend_of_another_dtype_names_the_addend(addend_dtype,
                                                                      fresh_warnings):
    x = _tensor((4, 3, 5), torch.float32)
    addend = _tensor(x.shape, torch.float32, seed=3).to(addend_dtype)
    with pytest.warns(UserWarning, match="an addend of another shape or dtype") as record:
        y = bt.fused_batch_norm(x, None, None, addend=addend, training=True)
    assert not any("parameters or buffers" in str(w.message) for w in record)
    expected = torch.relu(F.batch_norm(x, None, None, training=True) + addend)
    assert y.dtype == expected.dtype
    _close(y.to(torch.float64), expected.to(torch.float64), torch.float32)


def test_fused_fallback(fresh_warnings):
    x = torch.randn(4, 3, 5, device="meta")
    with pytest.warns(UserWarning, match="meta"):
        y = bt.fused_batch_norm(x, None, None, addend=x, training=True)
    assert y.shape == x.shape


def test_import_error_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import bnfast.torch\nexcept ImportError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert 'pip install "bnfast[torch]"' in result.stdout


def test_import_bnfast_does_not_import_torch():
    code = "import sys, bnfast; print('torch' in sys.modules, 'bnfast.torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_torch_threads(fmt, dtype):
    # The kernels run on torch.get_num_threads() threads; their partition is the shape's.
    x = _tensor((8, 16, 9, 9), dtype, fmt)
    g = _tensor((8, 16, 9, 9), dtype, fmt, seed=5)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaf = x.clone().requires_grad_()
            rm, rv = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
            y = bt.batch_norm(leaf, rm, rv, training=True)
            y.backward(g)
            results.append((y.detach(), leaf.grad, rm, rv))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


class _ConvBnBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()

    def forward(self, x, residual):
        return self.relu(self.bn(self.conv(x)) + residual)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("fused", [False, True], ids=["converted", "fused"])
def test_jit_trace_records_torchs_op(fresh_warnings, grad, fused):
    # TorchScript's tracer sees aten ops only: the kernels' writes were missing from its
    # graph (a no_grad trace returned uninitialised memory, 7e30 off).  Traced, the
    # modules run torch's op (one warning), so the trace is stock torch's.
    torch.manual_seed(0)
    stock = _ConvBnBlock().eval()
    stock.bn.running_mean.uniform_(-1, 1)
    stock.bn.running_var.uniform_(0.5, 2)
    model = bt.fuse(stock) if fused else bt.convert(stock)
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match="torch.jit.trace"):
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, (x, r))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x5, r5 = torch.randn(5, 3, 8, 8), torch.randn(5, 4, 8, 8)  # another batch size
    with torch.no_grad():
        expected = stock(x5, r5)
        for run in (traced, loaded):
            torch.testing.assert_close(run(x5, r5), expected)
