"""Module call latency in evaluation: small inputs, where per-call overhead, not memory, decides.

What a CPU-inference user times: ``bn(x)`` on one image at the end of a
network, e.g. ResNet's last block (1, 512, 7, 7), ~100 KB that sit in L2.
Compared side by side (one group per shape and dtype):

* ``bnfast-module``          ``bnfast.BatchNorm2d(...).eval()(x)`` (grad on: saves for backward)
* ``bnfast-module-no_grad``  the same under ``bnfast.no_grad()`` (pure inference)
* ``bnfast-module-channels_last``  the module on a channels-last view of the same values
* ``bnfast-module-numpy_eps``      the module with ``m.eps`` a NumPy float64 scalar
* ``bnfast-functional``      ``bnfast.batch_norm(x, ...)``, allocating
* ``torch-module``           ``torch.nn.BatchNorm2d(...).eval()(x)`` (weights require grad)
* ``torch-module-no_grad``   the same under ``torch.inference_mode()``
* ``onnxruntime``            a one-node graph, ``InferenceSession.run`` (allocating)
* ``copy``                   ``np.copyto`` of the same array: the floor for one read + one write

Every result is checked against the float64 reference (:mod:`bnfast.testing`) before it is timed.
"""
import contextlib

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import bnfast  # noqa: E402
from bnfast.bench.check import compare, expected  # noqa: E402
from bnfast.bench.data import Inputs  # noqa: E402
from bnfast.bench.suite import format_shape  # noqa: E402

SHAPES = [(1, 512, 7, 7), (1, 64, 56, 56), (1, 2048, 1, 1)]
IMPLS = ["bnfast-module", "bnfast-module-no_grad", "bnfast-module-channels_last",
         "bnfast-module-numpy_eps", "bnfast-functional", "torch-module", "torch-module-no_grad",
         "onnxruntime", "copy"]
# Training forward of one module: Python floats, and NumPy scalars / ints for eps and
# momentum (they must cost the same).
TRAIN_IMPLS = ["bnfast-module", "bnfast-module-numpy_scalars", "bnfast-module-channels_last",
               "torch-module"]


def _bnfast_module(inputs):
    m = bnfast.BatchNorm2d(inputs.shape[1], eps=inputs.eps, dtype=inputs.dtype).eval()
    m.load_state_dict({"weight": inputs.weight, "bias": inputs.bias,
                       "running_mean": inputs.running_mean, "running_var": inputs.running_var})
    return m


def _torch_module(inputs):
    torch = pytest.importorskip("torch")
    m = torch.nn.BatchNorm2d(inputs.shape[1], eps=inputs.eps,
                             dtype=getattr(torch, inputs.dtype.name)).eval()
    m.load_state_dict({"weight": torch.from_numpy(inputs.weight.copy()),
                       "bias": torch.from_numpy(inputs.bias.copy()),
                       "running_mean": torch.from_numpy(inputs.running_mean.copy()),
                       "running_var": torch.from_numpy(inputs.running_var.copy()),
                       "num_batches_tracked": torch.tensor(0)})
    return m, torch.from_numpy(inputs.x.copy())


def _prepare(impl, inputs, stack):
    """(call, result-of-one-call as ndarray) for one implementation."""
    x = inputs.x
    if impl.startswith("bnfast-module"):
        m = _bnfast_module(inputs)
        if impl.endswith("no_grad"):
            stack.enter_context(bnfast.no_grad())
        if impl.endswith("channels_last"):
            x = _channels_last(x)
        if impl.endswith("numpy_eps"):
            m.eps = np.float64(m.eps)
        return lambda: m(x), lambda: m(x)
    if impl == "bnfast-functional":
        rm, rv, w, b = inputs.running_mean, inputs.running_var, inputs.weight, inputs.bias

        def call():
            return bnfast.batch_norm(x, rm, rv, w, b, False, inputs.momentum, inputs.eps)
        return call, call
    if impl.startswith("torch-module"):
        m, tx = _torch_module(inputs)
        if impl.endswith("no_grad"):
            import torch
            stack.enter_context(torch.inference_mode())
        return lambda: m(tx), lambda: m(tx).detach().numpy()
    if impl == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
        from bnfast.bench.impl_onnxruntime import batch_norm_model
        model = batch_norm_model(inputs.shape, inputs.dtype, inputs.weight, inputs.bias,
                                 inputs.running_mean, inputs.running_var, inputs.eps)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        def call():
            return sess.run(None, {"X": x})[0]
        return call, call
    out = np.empty_like(x)

    def copy():
        np.copyto(out, x)
        return out
    return copy, None


def _channels_last(x):
    """The same values, channels varying fastest in memory."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[format_shape(s) for s in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_module_latency(benchmark, shape, dtype, impl):
    inputs = Inputs(shape, dtype)
    with contextlib.ExitStack() as stack:
        call, result = _prepare(impl, inputs, stack)
        if result is not None:  # never time a wrong answer
            checked = compare({"y": np.asarray(result())}, expected("eval", inputs), dtype)
            assert checked["correct"], checked
        benchmark.group = f"module eval latency {dtype} {format_shape(shape)}"
        benchmark.extra_info.update(shape=list(shape), dtype=dtype, impl=impl)
        benchmark(call)


def _prepare_train(impl, inputs):
    """(call, first output as ndarray) for a module's training forward."""
    x = inputs.x
    if impl.startswith("bnfast-module"):
        m = _bnfast_module(inputs).train()
        if impl.endswith("numpy_scalars"):
            m.eps, m.momentum = np.float64(m.eps), np.float32(m.momentum)
        if impl.endswith("channels_last"):
            x = _channels_last(x)
        return lambda: m(x), np.asarray(m(x))
    m, tx = _torch_module(inputs)
    m.train()
    return lambda: m(tx), m(tx).detach().numpy()


@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("shape", SHAPES[:1], ids=[format_shape(s) for s in SHAPES[:1]])
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_module_train_latency(benchmark, shape, dtype, impl):
    inputs = Inputs(shape, dtype)
    call, first = _prepare_train(impl, inputs)
    checked = compare({"y": first}, {"y": expected("train", inputs)["y"]}, dtype)
    assert checked["correct"], checked
    benchmark.group = f"module train latency {dtype} {format_shape(shape)}"
    benchmark.extra_info.update(shape=list(shape), dtype=dtype, impl=impl)
    benchmark(call)
