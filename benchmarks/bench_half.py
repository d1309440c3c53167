"""Half precision: float16 and bfloat16 against float32 of the same shape, and against torch.

Arrays over 8 MB in float32 (memory-bound: half the bytes should be close to
half the time).  For each (shape, mode, half dtype) one test checks every
call against :mod:`bnfast.testing`, then times, **interleaved in one run**
(min of repeats): bnfast in the half dtype, bnfast in float32, torch in the
half dtype (half data with float32 parameters: PyTorch's CPU rule).  The
ratios ``half / float32`` and ``torch / bnfast`` go into the benchmark's
``extra_info`` and a table at the end of the session; pytest-benchmark times
the bnfast half call itself.

    pytest benchmarks/bench_half.py --benchmark-only
    OMP_NUM_THREADS=2 pytest benchmarks/bench_half.py --benchmark-only --half-shapes 32x256x56x56

Targets (issue 10, 2 threads): eval <= 0.6x float32, train <= 0.65x, backward
<= 0.65x, and faster than torch on the same half-precision call.
"""
import time

import pytest

pytest.importorskip("pytest_benchmark")

from bnfast.bench.check import compare, expected  # noqa: E402
from bnfast.bench.data import Inputs  # noqa: E402
from bnfast.bench.suite import Case, format_shape  # noqa: E402

MODES = ["eval", "train", "backward"]
HALF_DTYPES = ["float16", "bfloat16"]
#: Interleaved rounds for the ratios (each times every call once).
ROUNDS = 15


def _checked(impl, case, inputs):
    """``impl`` prepared for ``case``, its result checked against the reference first."""
    prepared = impl.prepare(case, inputs)
    checked = compare(prepared.check(), expected(case.mode, inputs), case.dtype)
    assert checked["correct"], (impl.name, case.label, checked)
    return prepared.run


def _interleaved_min(calls, rounds=ROUNDS):
    """Min over ``rounds`` of each call's time, the calls alternating within a round."""
    best = [float("inf")] * len(calls)
    for fn in calls:  # warm up: page faults, thread pools
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_half_vs_float32_and_torch(benchmark, implementation, half_shape, half_ratios, mode,
                                   dtype):
    shape = tuple(half_shape)
    half_inputs, f32_inputs = Inputs(shape, dtype), Inputs(shape, "float32")
    ours = implementation("bnfast")
    calls = {"half": _checked(ours, Case(mode, dtype, shape), half_inputs),
             "float32": _checked(ours, Case(mode, "float32", shape), f32_inputs)}
    try:
        torch_impl = implementation("torch")
    except pytest.skip.Exception:  # torch not installed: the float32 ratio only
        torch_impl = None
    if torch_impl is not None:
        calls["torch"] = _checked(torch_impl, Case(mode, dtype, shape), half_inputs)
    times = dict(zip(calls, _interleaved_min(list(calls.values()))))
    row = {"mode": mode, "dtype": dtype, "shape": format_shape(shape),
           "float32_MB": round(f32_inputs.x.nbytes / 1e6, 1),
           "half_s": times["half"], "float32_s": times["float32"],
           "half_over_float32": times["half"] / times["float32"],
           "torch_over_bnfast": times["torch"] / times["half"] if "torch" in times else None}
    half_ratios.append(row)
    benchmark.group = f"half {mode} {format_shape(shape)}"
    benchmark.extra_info.update(row)
    benchmark(calls["half"])
