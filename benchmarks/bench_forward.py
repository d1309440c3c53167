"""Forward BatchNorm: bnfast, NumPy, PyTorch, ONNX Runtime and the np.copyto roofline side by side.

One pytest-benchmark group per (mode, dtype, shape), so the table compares the
implementations of one case, and ids stay stable for ``--benchmark-compare``.
"""
import pytest

pytest.importorskip("pytest_benchmark")

from bnfast.bench.reference import compare, reference  # noqa: E402
from bnfast.bench.suite import Case, format_shape  # noqa: E402

# (mode, implementation): ONNX Runtime runs inference graphs only.
PAIRS = [(mode, impl)
         for mode in ("eval", "train", "fused_eval")
         for impl in ("bnfast", "numpy", "torch", "onnxruntime", "copy")
         if not (impl == "onnxruntime" and mode == "train")]


@pytest.mark.parametrize("mode, impl", PAIRS, ids=[f"{m}-{i}" for m, i in PAIRS])
def test_forward(benchmark, implementation, bench_inputs, bench_shape, bench_dtype, mode, impl):
    case = Case(mode, bench_dtype, tuple(bench_shape))
    if case.skip_reason():
        pytest.skip(case.skip_reason())
    adapter = implementation(impl)
    prepared = adapter.prepare(case, bench_inputs)
    if prepared.check is not None:  # never time a wrong answer
        checked = compare(prepared.check(), reference(mode, bench_inputs), bench_dtype)
        assert checked["correct"], checked
    benchmark.group = f"{mode} {bench_dtype} {format_shape(bench_shape)}"
    benchmark.extra_info.update(mode=mode, dtype=bench_dtype, shape=list(bench_shape),
                                bytes_moved=(adapter.bytes_moved(case) if impl == "copy"
                                             else case.bytes_moved),
                                threads=adapter.effective_threads)
    benchmark(prepared.run)
