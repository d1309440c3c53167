"""The streamed flat channels-last leaves (``src/bnfast_flat_tiles.h``), the
normalise and the backward's dx in training and in evaluation, against the
portable tiled leaves.

``tests/c/flat_tiles.c`` runs 20,000 random cases of float32, float16 and
bfloat16: tile lengths from 16 to 300 (vectors that cross a tile's end at every
offset), blocks of any length, outputs starting at every element offset of a
64-byte line, addend, ReLU, in place, NaN and infinite coefficients.  The flat
leaf must give the portable leaf's bits (training's dx: any NaN where both of
its sums' terms are NaN) and leave the bytes around the span alone.  (The full
API's layouts, streamed sizes included: ``tests/test_layouts.py``,
``tests/test_functional.py`` and ``tests/test_backward.py``.)
"""
import pytest

from conftest import run_c_driver


def _cases_and_mismatches(tmp_path, *flags):
    cases, mismatches = run_c_driver(tmp_path, "flat_tiles.c", *flags).split()
    return int(cases), int(mismatches)


#: The walk up, and (-DBNFAST_WALK_DOWN_ALWAYS) every case walked down its span
#: as bnfast_walk_down picks for outputs just past an input modulo 4 KiB: the
#: steps from the top, then the tail.
WALKS = {"up": (), "down": ("-DBNFAST_WALK_DOWN_ALWAYS",)}


@pytest.mark.parametrize("walk", WALKS)
def test_flat_tiles_give_the_portable_leaves_bits(tmp_path, walk):
    cases, mismatches = _cases_and_mismatches(tmp_path, *WALKS[walk])
    if cases == 0:
        pytest.skip("this CPU has no AVX-512 (F, VL, BW): the flat leaves are not taken")
    assert (cases, mismatches) == (20000, 0)


def test_portable_build_has_no_flat_tiles(tmp_path):
    assert _cases_and_mismatches(tmp_path, "-DBNFAST_NO_SIMD") == (0, 0)
