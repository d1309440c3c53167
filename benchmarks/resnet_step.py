"""The ResNet-18 training step that both drop-in benchmarks time.

Used by bench_torch.py (pytest-benchmark) and torch_compare.py (interleaved
ratios): batch 16 of 3x112x112 float32; the model is the tests' ResNet-18,
stock, converted (``bnfast.torch.convert``) or converted and fused.
"""
import pathlib
import sys

import torch

import bnfast.torch as bt

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
from test_torch_resnet import ResNet18  # noqa: E402


def build_resnet(variant, layout):
    torch.manual_seed(0)
    model = ResNet18(num_classes=1000)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if variant != "stock":
        model = bt.convert(model)
    if variant == "fused":
        model = bt.fuse(model)
    return model


def resnet_batch(layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 112, 112, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (16,), generator=g)


def train_step(model, x, target, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return step
