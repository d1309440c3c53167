"""The flat channels-first leaves (``src/bnfast_flat_runs.h``), the normalise
and the backward's dx (training and evaluation, with the fused ReLU's mask
too), against the leaves run by run.

``tests/c/flat_runs.c`` runs 30,000 random cases of float32, float16 and
bfloat16, cached and streamed, normalise, dx and masked dx in training and in
evaluation (with and without the addend's gradient g, in place over dy): run
lengths from 32 to 231 (a step meets a run's end at every offset), first
channels that wrap, spans starting at every offset of a 64-byte line (and off
their itemsize, cached), masks from every bit offset, addend, ReLU, in place,
NaN and infinite coefficients.  The flat leaf must give the run-by-run leaf's
bits (training's dx: any NaN where both of its sums' terms are NaN; g of half
data: any NaN for a NaN) and leave the bytes around the span alone.  (The
exhaustive 16-bit patterns against NumPy are in ``tests/test_half_leaves.py``;
the full API's layouts in ``tests/test_layouts.py``.)
"""
import pytest

from conftest import run_c_driver


def _cases_and_mismatches(tmp_path, *flags):
    cases, mismatches = run_c_driver(tmp_path, "flat_runs.c", *flags).split()
    return int(cases), int(mismatches)


def test_flat_runs_give_the_portable_leaves_bits(tmp_path):
    cases, mismatches = _cases_and_mismatches(tmp_path)
    if cases == 0:
        pytest.skip("this CPU has no AVX-512 (F, VL, BW): the flat leaves are not taken")
    assert (cases, mismatches) == (30000, 0)


def test_portable_build_has_no_flat_leaves(tmp_path):
    assert _cases_and_mismatches(tmp_path, "-DBNFAST_NO_SIMD") == (0, 0)
