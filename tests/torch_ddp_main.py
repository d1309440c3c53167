"""``python tests/torch_ddp_main.py P DIR``: bnfast.torch modules under DistributedDataParallel.

Spawns P gloo ranks with ``torch.multiprocessing`` (a file store in DIR, no
port).  Each rank wraps the same small residual net in
``torch.nn.parallel.DistributedDataParallel`` three times: stock, converted
(``bnfast.torch.convert``) and converted + fused (``bnfast.torch.fuse``), and
trains each three SGD steps on batches of its own.  DDP averages the
gradients over the ranks (its hooks on the parameters' gradient accumulators)
and broadcasts rank 0's buffers before each forward.  Converted and fused
must match stock on every rank, step by step (each step from stock's state):
loss, every gradient, every parameter and buffer after the step.  Run by
tests/test_torch_ddp.py under a timeout.
"""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bnfast.torch  # noqa: E402
from ranks import spawn_gloo  # noqa: E402

nn = torch.nn
SIZES = (3, 5, 2, 4)  # rank r's batch: SIZES[r % 4] images (uneven, as a last batch)
VARIANTS = ("stock", "converted", "fused")
LR = 0.1
# Relative to each tensor's largest magnitude (as tests/test_torch_resnet.py).
TOL = {torch.float64: 1e-9, torch.float32: 1e-3}


class Block(nn.Module):
    """A ResNet basic block: bn -> relu and bn -> add -> relu, the patterns fuse rewrites."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)  # cumulative average too
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


def net(dtype, channels_last):
    torch.manual_seed(0)
    # No bias before a BatchNorm: its gradient is 0 but for rounding, which no relative
    # tolerance can compare.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(inplace=True), Block(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5, bias=False),
                          nn.BatchNorm1d(5)).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def variant(name, dtype, channels_last):
    model = net(dtype, channels_last)
    if name != "stock":
        model = bnfast.torch.convert(model)
        assert sum(type(m).__module__.startswith("bnfast") for m in model.modules()) == 4
    if name == "fused":
        model = bnfast.torch.fuse(model)
        assert sum(isinstance(m, bnfast.torch.FusedBatchNorm2d) for m in model.modules()) == 3
    return model


def batches(rank, dtype, channels_last):
    """Three (x, target) batches of this rank's own images."""
    out = []
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(SIZES[rank % 4], 3, 6, 6, generator=g, dtype=dtype) * 2 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randn(x.shape[0], 5, generator=g, dtype=dtype)))
    return out


def step(ddp, model, x, target):
    """One SGD step through ``ddp``; (loss, {name: grad}, state_dict after the step)."""
    model.zero_grad(set_to_none=True)
    loss = ((ddp(x) - target) ** 2).mean()
    loss.backward()  # DDP's hooks average the gradients over the ranks
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_close(actual, expected, dtype, what):
    """Within TOL[dtype] of the expected tensor's largest magnitude."""
    scale = expected.abs().max().item() if expected.is_floating_point() else 0
    tol = TOL[dtype] * max(scale, 1e-30)
    torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=tol,
                               msg=lambda detail: f"{what}: {detail}")


def compare(rank, dtype, channels_last):
    """Converted and fused against stock, each under DDP, step by step."""
    models = {name: variant(name, dtype, channels_last) for name in VARIANTS}
    ddps = {name: DistributedDataParallel(model) for name, model in models.items()}
    for n, (x, target) in enumerate(batches(rank, dtype, channels_last)):
        # Every step starts all three from the same state (stock's): the backward's
        # cancellation and SGD amplify last-bit differences from one step to the next.
        start = {k: v.clone() for k, v in models["stock"].state_dict().items()}
        results = {}
        for name, model in models.items():
            model.load_state_dict(start)
            results[name] = step(ddps[name], model, x, target)
        loss, grads, state = results["stock"]
        for name in VARIANTS[1:]:
            where = f"rank {rank}, {name}, {dtype}, channels_last={channels_last}, step {n}"
            loss2, grads2, state2 = results[name]
            assert_close(loss2, loss, dtype, f"{where}, loss")
            assert grads2.keys() == grads.keys() and state2.keys() == state.keys(), where
            for key, grad in grads.items():
                assert_close(grads2[key], grad, dtype, f"{where}, grad of {key}")
            for key, value in state.items():  # parameters after SGD, running buffers
                assert_close(state2[key], value, dtype, f"{where}, {key}")


def check(rank, size):
    for dtype in (torch.float64, torch.float32):
        for channels_last in (False, True):
            compare(rank, dtype, channels_last)


if __name__ == "__main__":
    spawn_gloo(check, sys.argv[1:])
