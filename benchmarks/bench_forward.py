"""Forward BatchNorm: bnfast, NumPy, PyTorch, ONNX Runtime and the np.copyto roofline side by side.

One pytest-benchmark group per (mode, dtype, shape), so the table compares the
implementations of one case, and ids stay stable for ``--benchmark-compare``.
The implementations are those of ``bnfast bench`` (:mod:`bnfast.bench.peers`);
each result is checked against :mod:`bnfast.testing` before it is timed.
"""
import pytest

pytest.importorskip("pytest_benchmark")

PAIRS = [(mode, impl) for mode in ("eval", "train", "fused_eval")
         for impl in ("bnfast", "bnfast-alloc", "numpy", "torch", "onnxruntime", "copy")]


@pytest.mark.parametrize("mode, impl", PAIRS, ids=[f"{m}-{i}" for m, i in PAIRS])
def test_forward(bench_case, mode, impl):
    bench_case(mode, impl)
