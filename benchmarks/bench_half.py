"""Half precision: float16 and bfloat16 against float32 of the same shape, and against torch.

Arrays over 8 MB in float32 (memory-bound: half the bytes should be close to
half the time).  For each (shape, mode, half dtype) one test checks every
call against :mod:`bnfast.testing`, then times, **interleaved in one run**:
bnfast in the half dtype, bnfast in float32, torch in the half dtype (half
data with float32 parameters: PyTorch's CPU rule), one call each a round,
the rounds going through every order of the calls.  The ratios ``half /
float32`` and ``torch / bnfast`` go into the benchmark's ``extra_info`` and a
table at the end of the session, twice: of the minima (each call's least disturbed round)
and paired (the median of the rounds' own ratios: both calls of a round share
the machine's load of that moment; on a shared VM the minima's ratio of one
shape moved by 0.15 between runs); pytest-benchmark times the bnfast half
call itself.

    pytest benchmarks/bench_half.py --benchmark-only
    OMP_NUM_THREADS=2 pytest benchmarks/bench_half.py --benchmark-only --half-shapes 32x256x56x56

Targets (issue 10, 2 threads): eval <= 0.6x float32, train <= 0.65x, backward
<= 0.65x, and faster than torch on the same half-precision call.
"""
import pytest

pytest.importorskip("pytest_benchmark")

from bnfast.bench.check import compare, expected  # noqa: E402
from bnfast.bench.data import Inputs  # noqa: E402
from bnfast.bench.suite import Case, format_shape  # noqa: E402
from interleave import interleaved, ratios  # noqa: E402

MODES = ["eval", "train", "backward"]
HALF_DTYPES = ["float16", "bfloat16"]


def _checked(impl, case, inputs):
    """``impl`` prepared for ``case``, its result checked against the reference first."""
    prepared = impl.prepare(case, inputs)
    checked = compare(prepared.check(), expected(case.mode, inputs), case.dtype)
    assert checked["correct"], (impl.name, case.label, checked)
    return prepared.run


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_half_vs_float32_and_torch(benchmark, implementation, half_shape, half_ratios, mode,
                                   dtype):
    shape = tuple(half_shape)
    half_inputs, f32_inputs = Inputs(shape, dtype), Inputs(shape, "float32")
    ours = implementation("bnfast")
    calls = {"half": _checked(ours, Case(mode, dtype, shape), half_inputs),
             "float32": _checked(ours, Case(mode, "float32", shape), f32_inputs)}
    torch_impl = implementation("torch", required=False)  # None: the float32 ratio only
    if torch_impl is not None:
        calls["torch"] = _checked(torch_impl, Case(mode, dtype, shape), half_inputs)
    times = interleaved(calls)
    row = {"mode": mode, "dtype": dtype, "shape": format_shape(shape),
           "float32_MB": round(f32_inputs.x.nbytes / 1e6, 1),
           "half_s": min(times["half"]), "float32_s": min(times["float32"])}
    row["half_over_float32"], row["half_over_float32_paired"] = ratios(times, "half", "float32")
    row["torch_over_bnfast"], row["torch_over_bnfast_paired"] = ratios(times, "torch", "half")
    half_ratios.append(row)
    benchmark.group = f"half {mode} {format_shape(shape)}"
    benchmark.extra_info.update(row)
    benchmark(calls["half"])
