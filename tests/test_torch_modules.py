"""bnfast.torch's modules, convert and revert: torch's module surface kept, torch's results."""
import copy

import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402

nn = torch.nn
PAIRS = [(nn.BatchNorm1d, bt.BatchNorm1d, (6, 4, 5)), (nn.BatchNorm1d, bt.BatchNorm1d, (6, 4)),
         (nn.BatchNorm2d, bt.BatchNorm2d, (3, 4, 5, 6)),
         (nn.BatchNorm3d, bt.BatchNorm3d, (2, 4, 3, 4, 5))]
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
IDS = [f"{p[0].__name__}-{len(p[2])}D" for p in PAIRS]


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


def _randomise(module):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (module.weight, module.bias, module.running_mean):
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) - 0.5)
        if module.running_var is not None:
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g,
                                                dtype=module.running_var.dtype) + 0.5)
    return module


@pytest.mark.parametrize("theirs, ours, shape", PAIRS, ids=IDS)
@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False), dict(bias=False)],
                         ids=["default", "cumulative", "no_affine", "untracked", "no_bias"])
def test_module_matches_torch(theirs, ours, shape, kwargs, dtype):
    if "bias" in kwargs and "bias" not in theirs.__init__.__code__.co_varnames:
        kwargs = {}  # this torch's BatchNorm has no bias switch
    stock = _randomise(theirs(shape[1], dtype=dtype, **kwargs))
    mine = ours(shape[1], dtype=dtype, **kwargs)
    mine.load_state_dict(stock.state_dict())
    assert isinstance(mine, theirs)
    for step in range(3):
        for m in (stock, mine):
            m.train(step < 2)
        x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = stock(x1), mine(x2)
        torch.testing.assert_close(y2, y1, **TOL[dtype])
        (y1 * x).sum().backward()
        (y2 * x).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, **TOL[dtype])
        for (name, a), b in zip(mine.named_parameters(), stock.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=name)
        for key, value in stock.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[key], value, **TOL[dtype], msg=key)


def test_module_surface():
    m = bt.BatchNorm2d(4)
    assert list(m.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert repr(m) == repr(nn.BatchNorm2d(4))
    m.to(torch.float64)
    assert m.weight.dtype == torch.float64
    calls = []
    m.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 4, 3, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert calls == [torch.Size([2, 4, 3, 3])]
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4))


def test_convert_keeps_objects_and_revert_round_trips():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4)))
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    bn = model[1]
    converted = bt.convert(model, inplace=True)
    assert converted is model and model[1] is bn
    assert type(model[1]) is bt.BatchNorm2d and type(model[3][1]) is bt.BatchNorm1d
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    reverted = bt.revert(model, inplace=True)
    assert type(reverted[1]) is nn.BatchNorm2d and type(reverted[3][1]) is nn.BatchNorm1d
    assert [id(p) for p in reverted.parameters()] == params


def test_convert_copies_by_default():
    model = nn.Sequential(nn.BatchNorm1d(3))
    converted = bt.convert(model)
    assert type(model[0]) is nn.BatchNorm1d and type(converted[0]) is bt.BatchNorm1d
    assert converted[0].weight is not model[0].weight
    torch.testing.assert_close(converted[0].weight, model[0].weight)


def test_convert_exact_types_only():
    class MyBN(nn.BatchNorm2d):
        pass
    model = nn.Sequential(MyBN(3), nn.SyncBatchNorm(3), nn.LazyBatchNorm2d())
    converted = bt.convert(model, inplace=True)  # a lazy module cannot be deep-copied
    assert [type(m) for m in converted] == [MyBN, nn.SyncBatchNorm, nn.LazyBatchNorm2d]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.convert([nn.BatchNorm1d(3)])


@pytest.mark.parametrize("theirs, ours, shape", PAIRS, ids=IDS)
def test_state_dict_loads_both_ways(theirs, ours, shape, dtype):
    stock = _randomise(theirs(shape[1], dtype=dtype))
    stock.num_batches_tracked.fill_(7)
    mine = ours(shape[1], dtype=dtype)
    assert mine.load_state_dict(stock.state_dict()) == stock.load_state_dict(stock.state_dict())
    back = theirs(shape[1], dtype=dtype)
    back.load_state_dict(mine.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


FUSED = [(bt.FusedBatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
         (bt.FusedBatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6)),
         (bt.FusedBatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 5))]


@pytest.mark.parametrize("cls, theirs, shape", FUSED, ids=[c.__name__ for c, _, _ in FUSED])
@pytest.mark.parametrize("addend", [True, False], ids=["addend", "no_addend"])
def test_fused_module_matches_torch(cls, theirs, shape, addend, dtype):
    fused = cls(shape[1], dtype=dtype)
    stock = _randomise(theirs(shape[1], dtype=dtype))
    assert isinstance(fused, theirs)
    fused.load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, dtype=dtype, generator=g)
    a = torch.randn(shape, dtype=dtype, generator=g) if addend else None
    leaves = [[t.clone().requires_grad_() if t is not None else None for t in (x, a)]
              for _ in range(2)]
    y1 = fused(*leaves[0])
    y2 = stock(leaves[1][0])
    y2 = torch.relu(y2 if a is None else y2 + leaves[1][1])
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    (y1 * x).sum().backward()
    (y2 * x).sum().backward()
    for ours, theirs in zip(leaves[0], leaves[1]):
        if ours is not None:
            torch.testing.assert_close(ours.grad, theirs.grad, **TOL[dtype])
    for a_, b_ in zip(fused.parameters(), stock.parameters()):
        torch.testing.assert_close(a_.grad, b_.grad, **TOL[dtype])
    torch.testing.assert_close(fused.running_var, stock.running_var, **TOL[dtype])


def test_deepcopy_and_pickle_of_converted():
    import io
    m = bt.convert(nn.Sequential(nn.BatchNorm1d(3)))
    c = copy.deepcopy(m)
    assert type(c[0]) is bt.BatchNorm1d
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)[0]) is bt.BatchNorm1d


# -- a module's configuration changing between calls (its plan must follow) ----------------
def _pair(dtype=torch.float64, C=4):
    stock = _randomise(nn.BatchNorm2d(C, dtype=dtype))
    return stock, bt.convert(stock)  # a deep copy: the same values, tensors of its own


def _same_step(stock, mine, x, training=True):
    for m in (stock, mine):
        m.train(training)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = stock(x1), mine(x2)
    tol = TOL[x.dtype]
    torch.testing.assert_close(y2, y1, **tol)
    y1.backward(x)
    y2.backward(x)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    for (name, a), b in zip(mine.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
        a.grad = b.grad = None
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, **tol, msg=key)


def _scaled(t, by=2.0):
    return t.detach() * by


CHANGES = {
    "parameter_replaced": lambda m: setattr(m, "weight", nn.Parameter(_scaled(m.weight))),
    "data_assigned": lambda m: setattr(m.weight, "data", _scaled(m.weight)),
    "buffer_replaced": lambda m: setattr(m, "running_var", _scaled(m.running_var, 3.0)),
    "buffer_data_assigned": lambda m: setattr(m.running_mean, "data", _scaled(m.running_mean)),
    "in_place": lambda m: m.bias.detach().mul_(-3.0),
    "buffer_in_place": lambda m: m.running_var.mul_(0.5),
    "eps": lambda m: setattr(m, "eps", 0.25),
    "momentum": lambda m: setattr(m, "momentum", 0.5),
    "cumulative": lambda m: setattr(m, "momentum", None),
    "untracked": lambda m: setattr(m, "track_running_stats", False),
    "buffers_removed": lambda m: (setattr(m, "running_mean", None),
                                  setattr(m, "running_var", None)),
    "affine_removed": lambda m: (setattr(m, "weight", None), setattr(m, "bias", None)),
    "float32": lambda m: m.float(),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_follows_changes_between_calls(change, training):
    stock, mine = _pair()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _same_step(stock, mine, x, training)
    for m in (stock, mine):
        CHANGES[change](m)
    if change == "float32":
        x = x.float()
    _same_step(stock, mine, x, training)
    _same_step(stock, mine, x, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_follows_input_changes_between_calls(training):
    stock, mine = _pair()
    g = torch.Generator().manual_seed(0)
    for shape, fmt in [((3, 4, 5, 6), torch.contiguous_format), ((2, 4, 5, 6), None),
                       ((2, 4, 5, 6), torch.channels_last), ((2, 4, 3, 1), None),
                       ((3, 4, 5, 6), torch.contiguous_format)]:
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        if fmt is None:  # strided: copied by the core
            x = torch.randn(shape[:3] + (2 * shape[3],), dtype=torch.float64, generator=g)
            x = x[..., ::2]
        else:
            x = x.contiguous(memory_format=fmt)
        _same_step(stock, mine, x, training)


def test_module_parameters_of_another_size_raise_as_torch():
    # Same memory, fewer channels: the module must not keep using the old views.
    stock, mine = _pair()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    _same_step(stock, mine, x)
    for m in (stock, mine):
        m.running_mean.data = m.running_mean.data[:2]
    for m in (stock, mine):
        with pytest.raises(RuntimeError, match="running_mean"):
            m(x)


def test_copies_of_a_called_module_are_independent():
    import io
    stock, mine = _pair()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    _same_step(stock, mine, x)
    buf = io.BytesIO()
    torch.save(mine, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(mine), torch.load(buf, weights_only=False)):
        reference = copy.deepcopy(stock)
        for m in (copied, reference):
            with torch.no_grad():
                m.weight.mul_(2.0)
                m.running_var.mul_(3.0)
        _same_step(reference, copied, x)
        _same_step(reference, copied, x, training=False)
    _same_step(stock, mine, x)


def test_reverted_module_pickles_without_bnfast():
    import pickle
    mine = bt.convert(nn.BatchNorm2d(4))
    mine(torch.randn(2, 4, 3, 3))
    mine.eval()(torch.randn(2, 4, 3, 3))
    for inplace in (False, True):
        assert b"bnfast" not in pickle.dumps(bt.revert(mine, inplace=inplace))


@pytest.mark.parametrize("memory, shape", [(torch.channels_last, (3, 4, 5, 6)),
                                           (torch.channels_last_3d, (2, 4, 3, 4, 5)),
                                           (torch.contiguous_format, (3, 4, 5, 6))],
                         ids=["channels_last", "channels_last_3d", "contiguous"])
@pytest.mark.parametrize("grad_memory", ["same", "contiguous"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_outputs_and_gradients_keep_torchs_memory_format(memory, shape, grad_memory, fused,
                                                         dtype):
    # A channels_last model's convolutions take what BatchNorm hands them without a
    # reorder only if its output and grad_input have the strides torch's BatchNorm gives.
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm3d
    stock = cls(4, dtype=dtype)
    ours = bt.convert(stock)
    if fused:
        ours.__class__ = bt.FusedBatchNorm2d if len(shape) == 4 else bt.FusedBatchNorm3d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=dtype, generator=g).contiguous(memory_format=memory)
    a = torch.randn(shape, dtype=dtype, generator=g).contiguous(memory_format=memory)
    grad = torch.randn(shape, dtype=dtype, generator=g)
    if grad_memory == "same":
        grad = grad.contiguous(memory_format=memory)
    results = []
    for module in (stock, ours):
        xi, ai = x.clone().requires_grad_(), a.clone().requires_grad_()
        if module is ours:
            y = ours(xi, ai) if fused else ours(xi)
        else:
            y = torch.relu(stock(xi) + ai) if fused else stock(xi)
        y.backward(grad)
        results.append((y, xi.grad, ai.grad if fused else None))
    for theirs, mine in zip(*results):
        if theirs is not None:
            assert mine.stride() == theirs.stride()
            torch.testing.assert_close(mine, theirs, **TOL[dtype])


# Dense strides that are neither contiguous nor channels_last, and non-dense ones: torch's
# BatchNorm gives output and grad_input its suggested memory format (contiguous unless
# channels_last), not the input's strides (a kernel layout bnfast reads in place): so
# that what follows (y.view(N, -1) after an (N, L, C) -> (N, C, L) transpose) works alike.
ODD_LAYOUTS = {
    "NLC->NCL": lambda g, dtype: torch.randn(4, 7, 3, generator=g, dtype=dtype).transpose(1, 2),
    "(C, N).t()": lambda g, dtype: torch.randn(3, 8, generator=g, dtype=dtype).t(),
    "N<->C": lambda g, dtype: torch.randn(3, 4, 5, 6, generator=g, dtype=dtype).transpose(0, 1),
    "H<->W": lambda g, dtype: torch.randn(4, 3, 5, 6, generator=g, dtype=dtype).transpose(2, 3),
    "channels_last sliced": lambda g, dtype: torch.randn(
        4, 3, 5, 12, generator=g, dtype=dtype).contiguous(
            memory_format=torch.channels_last)[..., ::2],
    "contiguous sliced": lambda g, dtype: torch.randn(4, 3, 5, 12, generator=g,
                                                      dtype=dtype)[..., ::2],
}


@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_outputs_of_other_strides_take_torchs_memory_format(layout, training, dtype):
    g = torch.Generator().manual_seed(0)
    x = ODD_LAYOUTS[layout](g, dtype)
    grad = torch.randn(x.shape, generator=g, dtype=dtype)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[x.dim()]
    stock = cls(x.shape[1], dtype=dtype).train(training)
    ours = bt.convert(stock)
    results = []
    for module in (stock, ours):
        xi = x.detach().requires_grad_()  # its own strides (a leaf's .grad would be restrided)
        y = module(xi)
        (gx,) = torch.autograd.grad(y, xi, grad)
        results.append((y, gx))
    for theirs, mine in zip(*results):
        assert mine.stride() == theirs.stride(), (layout, mine.stride(), theirs.stride())
        torch.testing.assert_close(mine, theirs, **TOL[dtype])


@pytest.mark.parametrize("layout", [name for name in ODD_LAYOUTS if "sliced" not in name]
                         + ["contiguous", "channels_last", "channels_last_3d"])
def test_own_memory_format_rule_matches_torchs_on_dense_strides(layout):
    # bnfast.torch._tensors' rule where torch has no Python suggest_memory_format: exact
    # channels-last strides only, which is torch's rule on dense tensors (a non-dense
    # channels-last-like slice gets a contiguous output there).
    from torch._prims_common import suggest_memory_format

    from bnfast.torch._tensors import _suggest_memory_format
    g = torch.Generator().manual_seed(0)
    x = {"contiguous": lambda: torch.randn(2, 3, 4, 5, generator=g),
         "channels_last": lambda: torch.randn(2, 3, 4, 5, generator=g).contiguous(
             memory_format=torch.channels_last),
         "channels_last_3d": lambda: torch.randn(2, 3, 4, 5, 6, generator=g).contiguous(
             memory_format=torch.channels_last_3d)}.get(
        layout, lambda: ODD_LAYOUTS[layout](g, torch.float32))()
    assert _suggest_memory_format(x) == suggest_memory_format(x)


def test_backward_twice_with_retain_graph(dtype):
    # The second backward views the saved input again (the first dropped its view).
    stock = _randomise(nn.BatchNorm2d(3, dtype=dtype))
    mine = bt.convert(stock)
    x = torch.randn(2, 3, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = []
    for module in (copy.deepcopy(stock), mine):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad, retain_graph=True)
        first = xi.grad.clone()
        y.backward(grad)
        grads.append((first, xi.grad, module.weight.grad))
    for theirs, ours in zip(*grads):
        torch.testing.assert_close(ours, theirs, **TOL[dtype])


class _Block(nn.Module):
    """conv -> bn -> relu, and a second bn whose output is added back before a ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv(x)))
        return torch.relu(self.bn2(y) + y)


@pytest.mark.parametrize("variant", ["converted", "fused"])
def test_fx_traces_bnfast_modules_as_leaves(variant):
    # torch.fx keeps torch's BatchNorm as a call_module (a leaf by its torch.nn module
    # path); ours must trace the same, so fx-based tools (symbolic_trace, fx passes)
    # keep the module, its train/eval switch and its counter.
    stock = _Block()
    for bn in (stock.bn1, stock.bn2):
        _randomise(bn)
    model = bt.convert(stock)
    if variant == "fused":
        model = bt.fuse(model)
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    called = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    bns = [name for name in called if isinstance(modules[name], nn.BatchNorm2d)]
    assert bns and all(type(modules[name]).__module__.startswith("bnfast.torch") for name in bns)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 5, 5, generator=g)
    for training in (True, False):
        reference, traced_copy = copy.deepcopy(stock), copy.deepcopy(traced)
        reference.train(training)
        traced_copy.train(training)
        torch.testing.assert_close(traced_copy(x), reference(x), **TOL[torch.float32])
        assert sorted(bns) == ["bn1", "bn2"]
        for name in bns:  # the modules themselves ran: counted and updated as torch's
            ours_bn, theirs = getattr(traced_copy, name), getattr(reference, name)
            assert int(ours_bn.num_batches_tracked) == int(theirs.num_batches_tracked)
            torch.testing.assert_close(ours_bn.running_mean, theirs.running_mean,
                                       **TOL[torch.float32])


@pytest.mark.parametrize("cls", [bt.BatchNorm2d, bt.FusedBatchNorm2d])
def test_fx_trace_of_a_bnfast_module_as_root_raises_as_torchs(cls):
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nn.BatchNorm2d(3))
    with pytest.raises(torch.fx.proxy.TraceError, match="as the root module"):
        torch.fx.symbolic_trace(cls(3))
