"""bnfast.torch.fuse: which patterns it folds, and that the result computes the same."""
import copy

import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402

nn = torch.nn
F = torch.nn.functional


class Net(nn.Module):
    """One BatchNorm followed by ``tail(bn_output, x)``."""

    def __init__(self, tail, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.bn(self.conv(x)), x)


def _iadd_relu(m, y, x):
    y += x
    return m.relu(y)


def _residual_zeroed_between(m, y, x):
    # The fused module runs where the ReLU is: after the mul_, not before it.
    r = x * 1.0
    out = y + r
    r.mul_(0.0)
    return m.relu(out)


def _weight_read_between(m, y, x):
    # A parameter read between the BatchNorm and its ReLU (fx records it as get_attr;
    # buffers it bakes in as constants at trace time, fused or not).
    scale = m.bn.weight.sum()
    return torch.relu(y) * scale


def _residual_function_in_place_between(m, y, x):
    z = x - 0.5
    out = y + z
    torch.relu_(z)  # an in-place function (fx cannot trace z[i] = v at all)
    return torch.relu(out)


FUSED_TAILS = {
    "relu_module": lambda m, y, x: m.relu(y),
    "F.relu": lambda m, y, x: F.relu(y),
    "torch.relu": lambda m, y, x: torch.relu(y),
    "relu_method": lambda m, y, x: y.relu(),
    "add_relu": lambda m, y, x: m.relu(y + x),
    "radd_relu": lambda m, y, x: torch.relu(x + y),
    "iadd_relu": _iadd_relu,
    "torch.add_relu": lambda m, y, x: F.relu(torch.add(y, x)),
    "add_method_relu": lambda m, y, x: y.add(x).relu(),
    # fx cannot tell this int from a tensor: fused, and added unfused at run time
    "add_int_relu": lambda m, y, x: torch.relu(y + x.shape[0]),
}
KEPT_TAILS = {
    "no_relu": lambda m, y, x: y + x,
    "two_users": lambda m, y, x: torch.relu(y) + y,
    "add_alpha": lambda m, y, x: torch.relu(torch.add(y, x, alpha=2.0)),
    "add_two_users": lambda m, y, x: torch.relu(y + x) * (y + x),
    "sigmoid": lambda m, y, x: torch.sigmoid(y),
    "residual_written": lambda m, y, x: torch.relu(x.clone().add_(y)),
    "residual_zeroed_between": _residual_zeroed_between,
    "weight_read_between": _weight_read_between,
    "in_place_function_between": _residual_function_in_place_between,
}


def _x(c=3):
    return torch.randn(4, c, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _check_same(model, fused):
    x1, x2 = _x().requires_grad_(), _x().requires_grad_()
    y1, y2 = model(x1), fused(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    for (name, p1), p2 in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("tail", list(FUSED_TAILS))
@pytest.mark.parametrize("convert", [False, True], ids=["torch_bn", "bnfast_bn"])
def test_fused_patterns(tail, convert):
    torch.manual_seed(0)
    model = Net(FUSED_TAILS[tail]).double()
    reference = copy.deepcopy(model)
    fused = bt.fuse(bt.convert(model) if convert else model)
    assert type(fused.bn) is bt.FusedBatchNorm2d
    _check_same(reference, fused)


@pytest.mark.parametrize("tail", list(KEPT_TAILS))
def test_other_patterns_are_kept(tail):
    torch.manual_seed(0)
    model = Net(KEPT_TAILS[tail]).double()
    reference = copy.deepcopy(model)
    fused = bt.fuse(model)
    assert type(fused.bn) is nn.BatchNorm2d
    _check_same(reference, fused)


def test_fuse_shares_parameters_and_leaves_model_alone():
    model = Net(FUSED_TAILS["relu_module"]).double()
    fused = bt.fuse(model)
    assert type(model.bn) is nn.BatchNorm2d  # the model itself is not changed
    assert fused.bn.weight is model.bn.weight and fused.bn.running_var is model.bn.running_var
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.eval()
    assert not fused.bn.training


@pytest.mark.parametrize("which", ["fused", "model"])
def test_to_of_either_model_converts_both(which):
    # .to() puts new buffer tensors into a module's registry: the fused module shares
    # the registry, not only its tensors (the model raised 'expected scalar type
    # Double but found Float' after fused.double()).
    torch.manual_seed(0)
    model = Net(FUSED_TAILS["add_relu"])
    fused = bt.fuse(model)
    (fused if which == "fused" else model).double()
    for m in (model, fused):
        assert m.bn.running_mean.dtype == m.bn.weight.dtype == torch.float64
    assert fused.bn.running_var is model.bn.running_var
    _check_same(copy.deepcopy(model), fused)
    fused(_x())  # a training step updates the buffers both hold
    assert fused.bn.running_mean is model.bn.running_mean
    assert int(model.bn.num_batches_tracked) == 2


def test_module_called_twice_is_not_fused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(x)) + self.bn(x * 2)
    model = Twice().double()
    fused = bt.fuse(model)
    assert type(fused.bn) is nn.BatchNorm2d
    _check_same(copy.deepcopy(model), fused)


def test_untraceable_model_is_returned_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return torch.relu(self.bn(x))
            return x
    model = Branchy()
    with pytest.warns(UserWarning, match="could not be traced"):
        assert bt.fuse(model) is model
    assert type(model.bn) is nn.BatchNorm2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.fuse("model")


@pytest.mark.parametrize("where", ["bn_forward", "bn_pre", "bn_backward", "bn_state_dict",
                                   "relu_forward"])
def test_modules_with_hooks_are_not_fused(where):
    # A fused module would not run them: kept, with a warning naming the BatchNorm.
    model = Net(FUSED_TAILS["relu_module"]).double()
    calls = []
    bn, relu = model.bn, model.relu
    relu.inplace = False  # torch forbids an in-place op on a backward hook's output
    if where == "bn_forward":
        bn.register_forward_hook(lambda *args: calls.append(where))
    elif where == "bn_pre":
        bn.register_forward_pre_hook(lambda *args: calls.append(where))
    elif where == "bn_backward":
        bn.register_full_backward_hook(lambda *args: calls.append(where))
    elif where == "bn_state_dict":
        bn._register_state_dict_hook(lambda *args: calls.append(where))
    else:
        relu.register_forward_hook(lambda *args: calls.append(where))
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="'bn' not fused: the BatchNorm or its ReLU has hooks"):
        fused = bt.fuse(model)
    assert type(fused.bn) is nn.BatchNorm2d
    _check_same(reference, fused)
    if where == "bn_state_dict":
        fused.state_dict()
    assert calls and set(calls) == {where}
