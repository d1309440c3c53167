"""bnfast.torch's eager road: each private torch entry it uses hidden in turn (as on a torch
without it), the public road taken instead, torch's results all the same."""
import copy

import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402
from bnfast.torch import _eager  # noqa: E402

nn = torch.nn
# What each hidden entry must turn the road into (checked on the rebound module).
HIDDEN = {
    "_len_torch_dispatch_stack": "custom_ops",
    "_is_torch_function_mode_enabled": "custom_ops",
    "peek_interpreter_stack": "custom_ops",
    "apply": "public_apply",  # torch._C._FunctionBase.apply
    "unwrap_if_dead": "public_apply",
    "_increment_version": "public_increment_version",
    "_is_profiler_enabled": "profiler_call",
    "_get_user_fn": "torch_node_apply",
}
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.fixture
def hide(monkeypatch):
    """``hide(name)``: rebind the eager road as on a torch without ``name``; torch's
    entries rebound after the test."""
    found = _eager._private

    def hide_(name):
        monkeypatch.setattr(_eager, "_private",
                            lambda owner, attr: None if attr == name else found(owner, attr))
        _eager.bind()
    yield hide_
    monkeypatch.undo()
    _eager.bind()


def _road():
    """What the eager road currently is, in HIDDEN's words (a set)."""
    node = _eager._BatchNormFunction._backward_cls
    return {name for name, taken in (
        ("custom_ops", not _eager._modes_visible),
        ("public_apply", _eager._apply == _eager._BatchNormFunction.apply),
        ("public_increment_version",
         _eager._increment_version is _eager._public_increment_version),
        ("profiler_call", _eager._profiling is torch.autograd._profiler_enabled),
        ("torch_node_apply", "apply" not in vars(node))) if taken}


def _step(module, x, addend, grad):
    x = x.clone().requires_grad_()
    args = (x,) if addend is None else (x, addend.clone().requires_grad_())
    y = module(*args)
    y.backward(grad)
    return y, [a.grad for a in args], [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", sorted(HIDDEN))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype", bt.DTYPES, ids=str)
def test_hidden_private_entry_takes_the_public_road(name, fused, dtype, hide):
    assert _road() == set()  # this torch has every entry
    hide(name)
    assert _road() == {HIDDEN[name]}
    low = dtype in (torch.float16, torch.bfloat16)
    vec = torch.float32 if low else dtype
    stock = nn.BatchNorm2d(4, dtype=vec)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.uniform_(-0.5, 0.5)
    ours = bt.convert(stock)
    if fused:
        ours.__class__ = bt.FusedBatchNorm2d
    g = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(3, 4, 5, 6, generator=g).to(dtype) for _ in range(2))
    addend = None
    if fused:  # bn(x) + addend at least 0.25 from the ReLU's kink: no half-rounding flips
        with torch.no_grad():
            bn = torch.nn.functional.batch_norm(x.double(), None, None, stock.weight.double(),
                                                stock.bias.double(), True)
            away = (torch.rand(x.shape, generator=g, dtype=torch.float64) + 0.25) * torch.where(
                torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
            addend = (away - bn).to(dtype)
    for _ in range(2):  # the second step from the first's running statistics
        reference = nn.BatchNorm2d(4, dtype=vec)  # torch's, in the same state
        reference.load_state_dict(ours.state_dict())
        ours.zero_grad()
        y, gi, gp = _step(ours, x, addend, grad)
        y_t, gi_t, gp_t = _step(_Reference(reference, fused), x, addend, grad)
        torch.testing.assert_close(y, y_t, **TOL[dtype])
        for mine, their in zip(gi + gp, gi_t + gp_t):
            torch.testing.assert_close(mine, their, **TOL[dtype])
        torch.testing.assert_close(ours.running_mean, reference.running_mean, **TOL[vec])
        torch.testing.assert_close(ours.running_var, reference.running_var, **TOL[vec])


@pytest.mark.parametrize("private", [True, False], ids=["private-check", "public-check"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_batched_gradients_take_torchs_ops(private, training, fused, hide):
    # is_grads_batched and jacobian(vectorize=True) hand the backward a batched grad
    # without memory: torch's differentiable ops compute it (the kernels cannot).
    if not private:
        hide("is_legacy_batchedtensor")
    stock = nn.BatchNorm1d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
        stock.running_var.fill_(2.0)
    ours = bt.convert(stock)
    reference = copy.deepcopy(stock)
    if fused:
        ours.__class__ = bt.FusedBatchNorm1d
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    addend = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grads = torch.randn((6,) + x.shape, generator=g, dtype=torch.float64)
    results = []
    for module in (ours, _Reference(reference, fused)):
        xs = x.clone().requires_grad_()
        y = module(xs, addend) if fused else module(xs)
        gx, gw = torch.autograd.grad(y, (xs, module.weight if module is ours else reference.weight),
                                     grads, is_grads_batched=True)
        small = addend[:2, :, :2]
        jacobian = torch.autograd.functional.jacobian(
            lambda t, m=module, a=small: m(t, a) if fused else m(t), x[:2, :, :2].clone(),
            vectorize=True)
        results.append((gx, gw, jacobian))
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, **TOL[torch.float64])


class _Reference(nn.Module):
    """Torch's BatchNorm (``relu(bn(x) + addend)`` when ``fused``), with its parameters."""

    def __init__(self, bn, fused):
        super().__init__()
        self.bn, self.fused = bn, fused

    def forward(self, x, addend=None):
        out = self.bn(x)
        return torch.relu(out + addend) if self.fused else out
