"""Backward BatchNorm: bnfast, PyTorch and the np.copyto roofline side by side.

One pytest-benchmark group per (mode, dtype, shape):

* ``train``: ``batch_norm_backward`` after a training forward (batch
  statistics: two passes) vs ``aten.native_batch_norm_backward``.
* ``eval``: the same after an evaluation forward (running statistics: dx is
  one pass; the parameter gradients still need the reduction).
* ``fused_train``: ``fused_batch_norm_backward`` of ``relu(bn(x) + addend)``
  (grad_input, grad_weight, grad_bias and grad_addend) vs PyTorch's
  ``threshold_backward`` followed by ``native_batch_norm_backward``.

``bnfast`` and ``torch`` write into preallocated outputs (bnfast ``out=``,
torch's ``.out`` overloads where it has them), so the kernels are timed and
not the page faults of a fresh buffer; ``bnfast-alloc`` is the plain call that
allocates grad_input, as user code usually writes it.  ``copy`` is
``np.copyto`` of the input (see ``bnfast.bench.impl_copy``).  Every
implementation's result is checked against a float64 reference before it is
timed.

    pytest benchmarks/bench_backward.py --benchmark-only --bench-shapes 32x64x112x112,256x1024
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import bnfast  # noqa: E402
from bnfast.bench.data import channel_axes, channel_view  # noqa: E402
from bnfast.bench.reference import compare  # noqa: E402
from bnfast.bench.suite import Case, format_shape  # noqa: E402

MODES = ("train", "eval", "fused_train")
IMPLS = ("bnfast", "bnfast-alloc", "torch", "copy")
KEYS = ("grad_input", "grad_weight", "grad_bias", "grad_addend")
# Arrays of the input's size each call must read or write at the least.
TRAFFIC = {"train": 5, "eval": 4, "fused_train": 6}


def _stats(inputs, mode):
    """(save_mean, save_invstd) in float64: batch statistics, or the running ones in eval."""
    if mode == "eval":
        rv = inputs.running_var.astype(np.float64)
        return inputs.running_mean.astype(np.float64), 1.0 / np.sqrt(rv + inputs.eps)
    return inputs.save_mean, inputs.save_invstd


def _forward_output(inputs):
    """``relu(bn(x) + addend)`` of a training forward (the fused backward's mask source)."""
    y = bnfast.fused_batch_norm(inputs.x, None, None, inputs.weight, inputs.bias, inputs.addend,
                                True, inputs.momentum, inputs.eps)
    y.flags.writeable = False
    return y


def _reference(mode, inputs, y=None):
    """float64 gradients: torch's formulas (threshold_backward first for fused_train)."""
    x = inputs.x.astype(np.float64)
    nd, axes = x.ndim, channel_axes(x.ndim)
    dy = inputs.grad_output.astype(np.float64)
    if mode == "fused_train":
        dy = np.where(y <= 0, 0.0, dy)
    mean, invstd = _stats(inputs, mode)
    n = x.size // x.shape[1]
    xhat = (x - channel_view(mean, nd)) * channel_view(invstd, nd)
    gb = dy.sum(axis=axes)
    gw = (dy * xhat).sum(axis=axes)
    a = channel_view(inputs.weight.astype(np.float64) * invstd, nd)
    if mode == "eval":
        gx = dy * a
    else:
        gx = a * (dy - channel_view(gb / n, nd) - xhat * channel_view(gw / n, nd))
    ref = {"grad_input": gx, "grad_weight": gw, "grad_bias": gb}
    if mode == "fused_train":
        ref["grad_addend"] = dy
    return ref


def _bnfast(mode, inputs, n_threads, allocate, y):
    x, w, eps, dy = inputs.x, inputs.weight, inputs.eps, inputs.grad_output
    mean, invstd = _stats(inputs, mode)
    training = mode != "eval"
    out = None if allocate else np.empty_like(x)
    if mode == "fused_train":
        mask = bnfast.relu_mask(y, n_threads=n_threads)  # what a fused module keeps
        addend_out = None if allocate else np.empty_like(x)

        def run():
            return bnfast.fused_batch_norm_backward(dy, x, mask, w, mean, invstd, True, eps,
                                                    out=out, addend_out=addend_out,
                                                    n_threads=n_threads)
    else:
        def run():
            return bnfast.batch_norm_backward(dy, x, w, mean, invstd, training, eps, out=out,
                                              n_threads=n_threads)
    return run


def _torch(mode, inputs, allocate, y):
    torch = pytest.importorskip("torch")
    aten = torch.ops.aten
    t = torch.from_numpy
    with np.errstate(all="ignore"):
        x, w, dy = (t(np.array(a)) for a in (inputs.x, inputs.weight, inputs.grad_output))
    eps, mask = inputs.eps, [True, True, True]
    gi, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
    if mode == "eval":
        rm, rv = t(np.array(inputs.running_mean)), t(np.array(inputs.running_var))
        args = (None, None, False)
        stats = (rm, rv)
    else:
        sm = t(inputs.save_mean.astype(inputs.dtype))
        si = t(inputs.save_invstd.astype(inputs.dtype))
        args = (sm, si, True)
        stats = (None, None)

    def bn_backward(grad):
        if allocate:
            return aten.native_batch_norm_backward(grad, x, w, *stats, *args, eps, mask)
        return aten.native_batch_norm_backward.out(grad, x, w, *stats, *args, eps, mask,
                                                   out0=gi, out1=gw, out2=gb)

    if mode != "fused_train":
        return lambda: bn_backward(dy)
    ty = t(np.array(y))
    g = torch.empty_like(x)

    def run():
        if allocate:
            masked = aten.threshold_backward(dy, ty, 0)
        else:
            masked = aten.threshold_backward.grad_input(dy, ty, 0, grad_input=g)
        return tuple(bn_backward(masked)) + (masked,)
    return run


def _as_dict(grads):
    """Gradients (ndarrays or torch tensors) by name, as float64 NumPy arrays."""
    return {k: (g.numpy() if hasattr(g, "numpy") else g).astype(np.float64)
            for k, g in zip(KEYS, grads) if g is not None}


PAIRS = [(m, i) for m in MODES for i in IMPLS]


@pytest.mark.parametrize("mode, impl", PAIRS, ids=[f"{m}-{i}" for m, i in PAIRS])
def test_backward(benchmark, implementation, bench_inputs, bench_shape, bench_dtype, mode, impl):
    case = Case("backward", bench_dtype, tuple(bench_shape))
    if case.skip_reason():
        pytest.skip(case.skip_reason())
    y = _forward_output(bench_inputs) if mode == "fused_train" else None
    if impl == "copy":
        adapter = implementation("copy")
        run = adapter.prepare(case, bench_inputs).run
        threads = adapter.effective_threads
    elif impl == "torch":
        run = _torch(mode, bench_inputs, False, y)
        threads = pytest.importorskip("torch").get_num_threads()
        checked = compare(_as_dict(run()), _reference(mode, bench_inputs, y), bench_dtype)
        assert checked["correct"], checked
    else:
        threads = implementation("bnfast").effective_threads
        run = _bnfast(mode, bench_inputs, threads, impl == "bnfast-alloc", y)
        checked = compare(_as_dict(run()), _reference(mode, bench_inputs, y), bench_dtype)
        assert checked["correct"], checked
    benchmark.group = f"backward {mode} {bench_dtype} {format_shape(bench_shape)}"
    benchmark.extra_info.update(mode=mode, dtype=bench_dtype, shape=list(bench_shape),
                                bytes_moved=(2 if impl == "copy" else TRAFFIC[mode]) * case.nbytes,
                                threads=threads)
    benchmark(run)
