"""Backward BatchNorm: bnfast, PyTorch, NumPy and the np.copyto roofline side by side.

Modes (see :data:`bnfast.bench.suite.MODES`): ``backward`` (after a training
forward: batch statistics, two passes), ``backward_eval`` (after an
evaluation forward: dx is one pass; the parameter gradients still need the
reduction) and ``fused_backward`` (of ``relu(bn(x) + addend)``, from the packed
ReLU mask: grad_input, grad_weight, grad_bias and grad_addend; torch runs
``threshold_backward`` then ``native_batch_norm_backward``).

``bnfast`` and ``torch`` write into preallocated outputs, so the kernels are
timed and not the page faults of a fresh buffer; ``bnfast-alloc`` allocates
grad_input, as user code usually does.  The implementations are those of
``bnfast bench`` (:mod:`bnfast.bench.peers`); each result is checked against
:mod:`bnfast.testing` before it is timed.

    pytest benchmarks/bench_backward.py --benchmark-only --bench-shapes 32x64x112x112,256x1024
"""
import pytest

pytest.importorskip("pytest_benchmark")

PAIRS = [(mode, impl) for mode in ("backward", "backward_eval", "fused_backward")
         for impl in ("bnfast", "bnfast-alloc", "numpy", "torch", "copy")]


@pytest.mark.parametrize("mode, impl", PAIRS, ids=[f"{m}-{i}" for m, i in PAIRS])
def test_backward(bench_case, mode, impl):
    bench_case(mode, impl)
