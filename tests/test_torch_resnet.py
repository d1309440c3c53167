"""ResNet-18 converted to bnfast vs stock torch: training steps, eval, channels_last, fused.

torchvision's ResNet-18 when importable, else the same architecture defined
here.  Small input (batch 4, 3x32x32) keeps it fast.  Every training step
starts both models from the same state (the stock model's), so that each
step is compared on its own: the backward's cancellation and SGD amplify
last-bit differences from one step to the next.
"""
import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402

nn = torch.nn
F = torch.nn.functional
STEPS = 3
LR = 0.1
# Relative to each tensor's largest magnitude.
TOL = {torch.float64: 1e-9, torch.float32: 1e-3}  # worst seen: 4e-13, 1.4e-4 (gradients)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 (BasicBlock, [2, 2, 2, 2])."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride),
                                        BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(dtype, channels_last=False):
    torch.manual_seed(0)
    try:
        import torchvision
        model = torchvision.models.resnet18(num_classes=10)
    except ImportError:
        model = ResNet18()
    with torch.no_grad():  # BN parameters that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batch(dtype, step, channels_last=False):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (4,), generator=g)


def _step(model, x, target):
    """One SGD step; returns (loss, {name: grad}, state_dict after the step)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().item() if expected.is_floating_point() else 0
    tol = TOL[dtype] * max(scale, 1e-30)
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=tol, msg=what)


def _compare_steps(stock, other, dtype, channels_last=False):
    for step in range(STEPS):
        other.load_state_dict(stock.state_dict())
        x, target = _batch(dtype, step, channels_last)
        loss, grads, state = _step(stock, x, target)
        loss2, grads2, state2 = _step(other, x, target)
        _assert_close(loss2, loss, dtype, f"loss, step {step}")
        for name, g in grads.items():
            _assert_close(grads2[name], g, dtype, f"grad of {name}, step {step}")
        for key, value in state.items():
            if "running" in key or "num_batches" in key:
                _assert_close(state2[key], value, dtype, f"{key}, step {step}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_training_steps_match_stock(dtype, channels_last):
    stock = resnet18(dtype, channels_last)
    converted = bt.convert(stock)
    assert sum(type(m) is bt.BatchNorm2d for m in converted.modules()) == 20
    _compare_steps(stock, converted, dtype, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_training_steps_match_stock(dtype):
    stock = resnet18(dtype)
    fused = bt.fuse(bt.convert(stock))
    kinds = [type(m) for m in fused.modules()]
    # Every BN but the downsample ones (3) is followed by a ReLU, directly or after the add.
    assert kinds.count(bt.FusedBatchNorm2d) == 17 and kinds.count(bt.BatchNorm2d) == 3
    _compare_steps(stock, fused, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_eval_outputs_match_stock(dtype, channels_last):
    stock = resnet18(dtype, channels_last)
    for step in range(2):  # running statistics that are not the initial ones
        _step(stock, *_batch(dtype, step, channels_last))
    converted = bt.convert(stock).eval()
    fused = bt.fuse(converted).eval()
    stock.eval()
    x, _ = _batch(dtype, 9, channels_last)
    with torch.no_grad():
        expected = stock(x)
        _assert_close(converted(x), expected, dtype, "converted eval output")
        _assert_close(fused(x), expected, dtype, "fused eval output")


def test_fused_equals_unfused_float64():
    stock = resnet18(torch.float64)
    converted = bt.convert(stock)
    fused = bt.fuse(bt.convert(stock))
    x, target = _batch(torch.float64, 0)
    loss, grads, state = _step(converted, x, target)
    loss2, grads2, state2 = _step(fused, x, target)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, rtol=1e-12, atol=1e-14, msg=name)
