"""Channels-last against channels-first: bnfast on the same values in both layouts,
torch on the channels-last tensors, and the ``np.copyto`` roofline.

For each (shape, mode, dtype) one test checks every call against
:mod:`bnfast.testing`, then times, **interleaved in one run** (as
``bench_half.py``: one call each a round, the rounds going through every order
of the calls): bnfast on channels-last data, bnfast on the same values
channels-first, torch on the channels-last data (``torch.channels_last``
strides, as a channels_last model hands them over), and ``np.copyto`` of the
array.  A table at the end of the session gives, of the minima and paired (the
median of the rounds' own ratios), channels-last over channels-first (the
layouts should cost the same: every byte is read and written as often), each
layout's time over the copy's, and torch over bnfast on channels-last data::

    OMP_NUM_THREADS=2 pytest benchmarks/bench_layouts.py --benchmark-only
    pytest benchmarks/bench_layouts.py --benchmark-only --layout-shapes 32x64x56x56 \\
        --bench-dtypes float32,bfloat16
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from bnfast.bench.check import compare, expected  # noqa: E402
from bnfast.bench.data import Inputs  # noqa: E402
from bnfast.bench.suite import Case, format_shape  # noqa: E402
from interleave import interleaved, ratios  # noqa: E402

MODES = ["eval", "train", "backward", "backward_eval"]


class ChannelsLast:
    """``inputs`` with its data arrays (x, the gradient, the addend, the ReLU output)
    copied into channels-last memory: the same values, the channels innermost."""

    _DATA = ("x", "grad_output", "addend", "relu_output")

    def __init__(self, inputs):
        self._inputs = inputs
        self._arrays = {}

    def __getattr__(self, name):
        value = getattr(self._inputs, name)
        if name not in self._DATA:
            return value
        if name not in self._arrays:
            last = np.ascontiguousarray(np.moveaxis(value, 1, -1))
            last.flags.writeable = False
            self._arrays[name] = np.moveaxis(last, -1, 1)
        return self._arrays[name]


def _checked(impl, case, inputs, reference):
    """``impl`` prepared for ``case`` on ``inputs``, checked against the reference of
    ``reference`` (the same values) first."""
    prepared = impl.prepare(case, inputs)
    if prepared.check is not None:
        checked = compare(prepared.check(), expected(case.mode, reference), case.dtype)
        assert checked["correct"], (impl.name, case.label, checked)
    return prepared.run


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_vs_channels_first(benchmark, implementation, layout_shape,
                                         bench_dtype, layout_ratios, mode):
    shape = tuple(layout_shape)
    first = Inputs(shape, bench_dtype)
    last = ChannelsLast(first)
    assert last.x.strides[1] == last.x.itemsize  # the channels innermost
    case = Case(mode, bench_dtype, shape)
    ours = implementation("bnfast")
    calls = {"last": _checked(ours, case, last, first),
             "first": _checked(ours, case, first, first),
             "copy": _checked(implementation("copy"), case, last, first)}
    torch_impl = implementation("torch", required=False)  # None: the layouts' ratios only
    if torch_impl is not None:
        calls["torch"] = _checked(torch_impl, case, last, first)
    times = interleaved(calls)
    row = {"mode": mode, "dtype": bench_dtype, "shape": format_shape(shape),
           "MB": round(first.x.nbytes / 1e6, 1),
           "last_s": min(times["last"]), "first_s": min(times["first"]),
           "last_over_copy": min(times["last"]) / min(times["copy"]),
           "first_over_copy": min(times["first"]) / min(times["copy"])}
    row["last_over_first"], row["last_over_first_paired"] = ratios(times, "last", "first")
    row["torch_over_last"], row["torch_over_last_paired"] = ratios(times, "torch", "last")
    layout_ratios.append(row)
    benchmark.group = f"layouts {mode} {bench_dtype} {format_shape(shape)}"
    benchmark.extra_info.update(row)
    benchmark(calls["last"])
