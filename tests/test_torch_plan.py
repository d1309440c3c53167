"""bnfast.torch's plans: the direct road (addresses into the bound kernels) and the NumPy
road (inputs in no kernel layout, buffers the kernels cannot update in place), each
against torch's own batch norm, with the tensors it meets in real models: addends and
gradients of other strides, expanded gradients, large outputs from the pool."""
import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402
from bnfast.torch import _plan  # noqa: E402
from bnfast.torch import functional as btf  # noqa: E402

nn = torch.nn
F = torch.nn.functional
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


def _pair(C, dtype, fused):
    g = torch.Generator().manual_seed(3)
    stock = nn.BatchNorm2d(C, dtype=dtype if dtype in (torch.float32, torch.float64)
                           else torch.float32)
    with torch.no_grad():
        stock.weight.copy_(torch.rand(C, generator=g) + 0.5)
        stock.bias.copy_(torch.rand(C, generator=g) - 0.5)
    ours = bt.convert(stock)  # a copy
    if fused:
        ours.__class__ = bt.FusedBatchNorm2d
    return stock, ours


def _leaf(t):
    """A leaf that requires grad, with ``t``'s values and strides (clone() makes
    non-dense strides contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _run(module, x, addend, grad, fused, ours):
    xi = _leaf(x)
    ai = None if addend is None else _leaf(addend)
    if ours:
        y = module(xi, ai) if fused else module(xi)
    else:
        y = module(xi)
        if fused:
            y = torch.relu(y + ai) if ai is not None else torch.relu(y)
    if grad is None:  # an expanded gradient (stride 0), as from y.sum()
        y.float().sum().backward()
    else:
        y.backward(grad)
    return [y, xi.grad, None if ai is None else ai.grad, module.weight.grad, module.bias.grad,
            module.running_mean, module.running_var]


def _away_from_the_kink(x, stock, memory, seed):
    """An addend that keeps ``bn(x) + addend`` at least 0.25 from 0, so that no
    half-precision rounding of torch's three ops flips the ReLU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn = F.batch_norm(x.double(), None, None, stock.weight.double(), stock.bias.double(),
                          True)
        away = (torch.rand(x.shape, generator=g, dtype=torch.float64) + 0.25) * torch.where(
            torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
    return (away - bn).to(x.dtype).contiguous(memory_format=memory)


def _check(x, addend_memory, grad, fused, dtype, road):
    stock, ours = _pair(x.shape[1], dtype, fused)
    addend = None
    if addend_memory is not None:
        addend = _away_from_the_kink(x, stock, addend_memory, 5)
    expected = _run(stock, x, addend, grad, fused, False)
    got = _run(ours, x, addend, grad, fused, True)
    assert ours.__dict__[_plan.ATTRIBUTE].direct is (road == "direct")
    for theirs, mine in zip(expected, got):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, **TOL[dtype])


def _data(shape, dtype, seed, memory=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=memory)


@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("other", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_addend_and_grad_of_other_strides(memory, other, dtype):
    # The direct road copies an addend or gradient whose strides are not the input's.
    shape = (3, 4, 5, 6)
    x = _data(shape, dtype, 0, memory)
    _check(x, other, _data(shape, dtype, 2, other), True, dtype, "direct")
    _check(x, None, _data(shape, dtype, 2, other), False, dtype, "direct")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_expanded_gradient(fused, dtype):
    x = _data((4, 3, 5, 5), dtype, 0, torch.channels_last)
    _check(x, torch.contiguous_format if fused else None, None, fused, dtype, "direct")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_input_in_no_kernel_layout_takes_the_numpy_road(fused, dtype):
    big = _data((4, 3, 5, 12), dtype, 0)
    x = big[..., ::2]  # neither contiguous nor channels_last
    _check(x, torch.contiguous_format if fused else None, _data(x.shape, dtype, 2), fused, dtype,
           "numpy")


def test_buffers_not_updatable_in_place_take_the_numpy_road():
    # Strided running buffers: the core updates copies and writes them back.
    C = 4
    x = _data((6, C, 3, 3), torch.float32, 0)
    store = torch.zeros(2, 2 * C)
    store[1].fill_(1.0)
    mean, var = store[0, ::2], store[1, ::2]
    ref_mean, ref_var = torch.zeros(C), torch.ones(C)
    ours = bt.batch_norm(x, mean, var, training=True, momentum=0.3)
    theirs = F.batch_norm(x, ref_mean, ref_var, training=True, momentum=0.3)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
    torch.testing.assert_close(mean, ref_mean, **TOL[torch.float32])
    torch.testing.assert_close(var, ref_var, **TOL[torch.float32])
    assert store[0, 1::2].eq(0).all() and store[1, 1::2].eq(1).all()  # untouched
    plan = _plan.Plan(_plan.key(x, mean, var, None, None, True, 1e-5, False), x, mean, var,
                      None, None, True, 1e-5, False, False)
    assert not plan.direct


@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_pooled_outputs_of_the_direct_road(memory):
    # 4 MiB and more: outputs from the pool, with the input's strides, writable in place
    # under autograd (not views), and their memory not reused while a tensor holds it.
    shape = (8, 32, 64, 64)  # 4 MiB of float32
    x = _data(shape, torch.float32, 0, memory)
    grad = _data(shape, torch.float32, 1, memory)
    stock, ours = _pair(32, torch.float32, False)
    outputs = []
    for module in (stock, ours):
        xi = x.clone().requires_grad_()
        y = module(xi)
        z = y.mul_(2.0)  # in place on the forward's output
        z.backward(grad)
        outputs.append((y, xi.grad))
    for theirs, mine in zip(*outputs):
        assert mine.stride() == theirs.stride()
        torch.testing.assert_close(mine, theirs, **TOL[torch.float32])
    y_first = outputs[1][0]
    with torch.no_grad():
        y_second = ours(x)
    assert y_second.data_ptr() != y_first.data_ptr()  # the first is still held
    torch.testing.assert_close(y_first, outputs[0][0], **TOL[torch.float32])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_saved_input_given_back_in_other_strides(fused, dtype):
    # A saved-tensor hook may give the input back in other strides (save_on_cpu packs
    # into a contiguous tensor): the kernels read it in the plan's.
    x = _data((3, 4, 5, 5), dtype, 0, torch.channels_last)
    grad = _data(x.shape, dtype, 2, torch.channels_last)
    stock, ours = _pair(4, dtype, fused)
    addend = _away_from_the_kink(x, stock, torch.channels_last, 5) if fused else None
    results = []
    for module, mine in ((stock, False), (ours, True)):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
            results.append(_run(module, x, addend, grad, fused, mine))
    for theirs, mine in zip(*results):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, **TOL[dtype])


@pytest.mark.skipif(not hasattr(torch, "_neg_view"), reason="torch without _neg_view")
@pytest.mark.parametrize("what", ["input", "grad"])
def test_negative_views(what, dtype):
    # A negative view's memory holds the values' negation: the kernels get a copy.
    stock, ours = _pair(4, dtype, False)
    x = _data((3, 4, 5, 5), dtype, 0)
    grad = _data(x.shape, dtype, 2)
    results = []
    for module in (stock, ours):
        module(x.clone().requires_grad_()).backward(grad)  # a plan for plain tensors first
        xi = x.neg().requires_grad_()
        y = module(torch._neg_view(xi) if what == "input" else xi)
        y.backward(torch._neg_view(grad) if what == "grad" else grad)
        results.append((y, xi.grad, module.weight.grad, module.running_mean))
    for theirs, mine in zip(*results):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])


@pytest.mark.skipif(not hasattr(torch, "_efficientzerotensor"), reason="torch without it")
def test_zero_tensor_gradient(dtype):
    # A zero tensor has no memory (data_ptr() is 0): the kernels get zeros.
    stock, ours = _pair(4, dtype, False)
    x = _data((3, 4, 5, 5), dtype, 0)
    results = []
    for module in (stock, ours):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(torch._efficientzerotensor(y.shape, dtype=dtype))
        results.append((xi.grad, module.weight.grad, module.bias.grad))
    for theirs, mine in zip(*results):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("grad_leaf", [True, False], ids=["grad_leaf", "grad_constant"])
def test_create_graph_gives_torchs_second_order(fused, training, layout, grad_leaf, dtype):
    # With create_graph=True the gradients are functions autograd differentiates again,
    # with torch's second-order terms: of grad_output, of the input and of the weight
    # (a gradient penalty differentiates the input's gradient by all three), in training
    # (the batch statistics are functions of the input) and in evaluation; also where
    # grad_output is a constant (once_differentiable saw only it, and returned the
    # input's gradient as a constant: no error, the second-order terms gone).
    x = _data((3, 4, 5, 5), dtype, 0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # no kernel layout: the NumPy road
        x = _data((3, 4, 5, 10), dtype, 0)[..., ::2]
    grad = _data(x.shape, dtype, 2)
    stock, ours = _pair(4, dtype, fused)
    stock.train(training)
    ours.train(training)
    addend = _away_from_the_kink(x, stock, torch.contiguous_format, 5) if fused else None
    results = []
    for module, mine in ((stock, False), (ours, True)):
        module.zero_grad()
        xi, gi = _leaf(x), _leaf(grad) if grad_leaf else grad
        if mine:
            y = module(xi, addend) if fused else module(xi)
        else:
            y = torch.relu(module(xi) + addend) if fused else module(xi)
        (gx, gw) = torch.autograd.grad(y, (xi, module.weight), gi, create_graph=True)
        (gx.double().pow(2).sum() + (gw.double() * gx.double().mean((0, 2, 3))).sum()).backward()
        results.append((gx, gw, xi.grad, gi.grad, module.weight.grad, module.bias.grad))
    for what, theirs, mine in zip(("grad_input", "grad_weight", "d/d input", "d/d grad_output",
                                   "d/d weight", "d/d bias"), *results):
        # None: no path to that tensor, which torch's fused composition has only through the
        # ReLU's mask (where its derivative is 0).
        theirs = torch.zeros_like(mine) if theirs is None and mine is not None else theirs
        mine = torch.zeros_like(theirs) if mine is None and theirs is not None else mine
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, **TOL[dtype],
                                       msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("road", ["direct", "numpy"])
def test_lazy_negations_in_and_out(training, road, dtype, monkeypatch):
    # A tensor with the negative bit set (torch._neg_view, the imaginary part of a
    # conjugate) holds the opposites of its values: input, addend and gradient are
    # read as values (Tensor.numpy() refuses them); a parameter that is one sends the
    # call to torch's op.
    x = _data((3, 4, 5, 5), dtype, 0)
    grad = _data(x.shape, dtype, 2)
    if road == "numpy":  # strides of no kernel layout
        x, grad = (_data((3, 4, 5, 10), dtype, s)[..., ::2] for s in (0, 2))
    for fused in (False, True):
        stock, ours = _pair(4, dtype, fused)
        stock.train(training)
        ours.train(training)
        addend = _data(x.shape, dtype, 4) if fused else None
        results = []
        for module, mine in ((stock, False), (ours, True)):
            xi = _leaf(x)
            neg_x = torch._neg_view(-xi)  # x's values; its memory holds -x
            assert neg_x.is_neg()
            neg_addend = None if addend is None else torch._neg_view(-addend)
            if mine:
                y = module(neg_x, neg_addend) if fused else module(neg_x)
            else:
                y = torch.relu(module(neg_x) + neg_addend) if fused else module(neg_x)
            y.backward(torch._neg_view(-grad))
            results.append((y, xi.grad, module.weight.grad, module.bias.grad,
                            module.running_mean, module.running_var))
        for theirs, mine in zip(*results):
            torch.testing.assert_close(mine, theirs, **TOL[dtype])
    stock, ours = _pair(4, dtype, False)
    with torch.no_grad():
        ours.weight = nn.Parameter(torch._neg_view(-stock.weight.detach()))
    assert ours.weight.is_neg()
    monkeypatch.setattr(btf, "_warned", set())  # warned once per process
    with pytest.warns(UserWarning, match="lazy negations"):
        torch.testing.assert_close(ours(x), stock(x), **TOL[dtype])


def test_a_parameter_of_other_strides_at_the_same_address_gets_a_new_plan():
    # A plan reads its vectors through the views it was built with: a weight swapped for a
    # view at the same address with other strides must not reuse the old plan's view.
    C = 4
    flat = torch.arange(1.0, 2 * C + 1)
    bn = bt.convert(torch.nn.BatchNorm1d(C))
    x = torch.randn(6, C, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for weight in (flat[:C], flat[::2]):  # one address, strides 1 and 2
            bn.weight = torch.nn.Parameter(weight, requires_grad=False)
            expected = torch.nn.functional.batch_norm(x, None, None, weight, bn.bias,
                                                      training=True)
            torch.testing.assert_close(bn(x), expected)
