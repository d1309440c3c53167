"""bnfast.torch inside torch models: module vs module, 2 threads (``torch.set_num_threads(2)``).

* ``test_layer``: one BatchNorm layer, forward + backward through autograd,
  ``torch.nn.BatchNorm*`` vs ``bnfast.torch.convert`` of it, on the
  ``--bench-shapes`` (4-D shapes also channels_last).
* ``test_call_overhead``: (1, 512, 7, 7) eval forward and training forward +
  backward: torch's module, bnfast's module (eager road) and the dispatched
  ``torch.ops.bnfast`` operators (the road compile/export take).
* ``test_resnet18``: a training step (forward, backward, SGD update) and an
  eval forward of ResNet-18, batch 16, 3x112x112, float32, NCHW and
  channels_last: stock vs converted vs converted + fused.
* ``test_resnet18_bn_share``: BatchNorm's share of a training step's CPU
  time, from the torch profiler (``extra_info["bn_share"]``), stock and converted.

Every bnfast result is checked against torch's before it is timed::

    pytest benchmarks/bench_torch.py --benchmark-only --benchmark-columns=min,median
"""
import copy
import sys

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402
from bnfast.bench.suite import format_shape  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from resnet_step import build_resnet, resnet_batch, train_step  # noqa: E402

THREADS = 2
nn = torch.nn


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _bn(shape, dtype):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    return cls(shape[1], dtype=dtype)


def _fwd_bwd(module, x, g):
    def step():
        module(x).backward(g)
    return step


LAYOUTS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["torch", "bnfast"])
def test_layer(benchmark, bench_shape, bench_dtype, layout, impl):
    shape = tuple(bench_shape)
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is a 4-D memory format")
    dtype = getattr(torch, str(bench_dtype))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(shape, generator=g, dtype=dtype)
    stock = _bn(shape, dtype)
    module = bt.convert(stock) if impl == "bnfast" else stock
    if impl == "bnfast":  # checked against torch before it is timed
        expected = copy.deepcopy(stock)(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    benchmark.group = f"layer fwd+bwd {bench_dtype} {format_shape(shape)} {layout}"
    benchmark.extra_info.update(shape=list(shape), dtype=str(bench_dtype), layout=layout,
                                threads=THREADS)
    benchmark(_fwd_bwd(module, x, grad))


@pytest.mark.parametrize("mode", ["eval", "train_fwd_bwd"])
@pytest.mark.parametrize("impl", ["torch", "bnfast", "bnfast-op"])
def test_call_overhead(benchmark, mode, impl):
    shape = (1, 512, 7, 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    g = torch.ones(shape)
    stock = nn.BatchNorm2d(512).train(mode != "eval")
    module = stock if impl == "torch" else bt.convert(stock)
    benchmark.group = f"call overhead {mode} float32 1x512x7x7"
    if impl == "bnfast-op":
        w, b, rm, rv = module.weight, module.bias, module.running_mean, module.running_var

        def call():  # what a traced graph runs: the dispatched operators
            out = torch.ops.bnfast.batch_norm(x, w, b, rm, rv, mode != "eval", 0.1, 1e-5)
            if mode != "eval":
                out[0].backward(g)
        benchmark(call)
    elif mode == "eval":
        with torch.no_grad():
            benchmark(module, x)
    else:
        benchmark(_fwd_bwd(module, x, g))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["stock", "converted", "fused"])
@pytest.mark.parametrize("mode", ["train_step", "eval"])
def test_resnet18(benchmark, mode, variant, layout):
    model = build_resnet(variant, layout)
    x, target = resnet_batch(layout)
    if variant != "stock":  # one step checked against the stock model's
        stock = build_resnet("stock", layout)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), stock.eval()(x), rtol=1e-3, atol=1e-3)
    benchmark.group = f"resnet18 {mode} float32 16x3x112x112 {layout}"
    benchmark.extra_info.update(threads=THREADS)
    if mode == "eval":
        model.eval()
        with torch.no_grad():
            benchmark.pedantic(model, (x,), rounds=5, warmup_rounds=1)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        benchmark.pedantic(train_step(model, x, target, opt), rounds=5, warmup_rounds=1)


# Self CPU time of aten::native_batch_norm(_backward) & co. and of the bnfast::* labels
# (what they allocate through torch is counted apart, on both sides).
_BN_KEYS = ("batch_norm", "batchnorm")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["stock", "converted", "fused"])
def test_resnet18_bn_share(benchmark, variant, layout):
    """BatchNorm's share of the self CPU time of 3 profiled training steps."""
    from torch.profiler import ProfilerActivity, profile, record_function
    model = build_resnet(variant, layout).train()
    x, target = resnet_batch(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = train_step(model, x, target, opt)
    step()
    def profiled():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("step"):
                for _ in range(3):
                    step()
        return prof
    prof = benchmark.pedantic(profiled, rounds=1, iterations=1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(e.self_cpu_time_total for e in events
             if any(k in e.key.lower() for k in _BN_KEYS))
    benchmark.group = f"resnet18 bn share {layout}"
    benchmark.extra_info.update(bn_share=bn / total, bn_self_cpu_us=bn, total_self_cpu_us=total)
    print(f"\n{variant} {layout}: BatchNorm {bn / total:.1%} of {total / 3e3:.0f} ms CPU per step")
