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
import ml_dtypes  # noqa: F401 (the "bfloat16" dtype name)
import numpy as np
import pytest

import bnfast
from bnfast.testing import reference_batch_norm
from conftest import assert_same, make_input, make_params, make_running, run_c_driver, with_layout


def _cases_and_mismatches(tmp_path, *flags):
    cases, mismatches = run_c_driver(tmp_path, "flat_runs.c", *flags).split()
    return int(cases), int(mismatches)


#: The walk up, and (-DBNFAST_WALK_DOWN_ALWAYS) every case walked down its span
#: as bnfast_walk_down picks for outputs just past an input modulo 4 KiB: the
#: steps from the top, then the tail.
WALKS = {"up": (), "down": ("-DBNFAST_WALK_DOWN_ALWAYS",)}


@pytest.mark.parametrize("walk", WALKS)
def test_flat_runs_give_the_portable_leaves_bits(tmp_path, walk):
    cases, mismatches = _cases_and_mismatches(tmp_path, *WALKS[walk])
    if cases == 0:
        pytest.skip("this CPU has no AVX-512 (F, VL, BW): the flat leaves are not taken")
    assert (cases, mismatches) == (30000, 0)


def test_portable_build_has_no_flat_leaves(tmp_path):
    assert _cases_and_mismatches(tmp_path, "-DBNFAST_NO_SIMD") == (0, 0)


def _near(base, rel):
    """An uninitialised array like ``base`` whose data starts ``rel`` bytes past
    ``base``'s modulo 4 KiB: ahead of it (rel 32: the down walk), or far from it."""
    raw = np.empty(base.nbytes + 8192, np.uint8)
    start = (base.ctypes.data + rel - raw.ctypes.data) % 4096
    return raw[start:start + base.nbytes].view(base.dtype).reshape(base.shape)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 40, 40), (8, 64, 64, 64)], ids=["cached", "streamed"])
def test_outputs_just_past_an_input_give_the_same_bits(dtype, layout, shape):
    """Outputs 32 bytes past x (or dy) modulo 4 KiB, or just behind it, against
    outputs 2 KiB away, through the public calls (normalise, fused, training,
    backward): the walk's direction (bnfast_walk_down) never changes a bit, NaN
    payloads included (NaN data, a NaN bias); and the values are the float64
    reference's."""
    rng = np.random.default_rng(5)
    x = make_input(rng, shape, np.float32)
    channel = x[:, 3]  # NaN data where the bias is NaN too: whose payload
    channel[np.unravel_index(np.arange(0, channel.size, 7), channel.shape)] = np.nan
    x = with_layout(x, layout).astype(dtype)
    addend = with_layout(rng.standard_normal(shape, dtype=np.float32), layout).astype(dtype)
    dy = with_layout(rng.standard_normal(shape, dtype=np.float32), layout).astype(dtype)
    C = shape[1]
    weight, bias = make_params(rng, C, np.float32)
    bias[3] = np.frombuffer(np.uint32(0x7FC50000).tobytes(), np.float32)[0]
    running = make_running(rng, C, np.float32)
    wide = x.astype(np.float64)
    mean, var = np.nanmean(wide, axis=(0, 2, 3)), np.nanvar(wide, axis=(0, 2, 3))
    invstd = 1.0 / np.sqrt(var + 1e-5)
    calls = {
        "eval": (x, lambda out: bnfast.batch_norm(x, *running, weight, bias, out=out)),
        "fused": (x, lambda out: bnfast.fused_batch_norm(x, *running, weight, bias, addend,
                                                         out=out)),
        "train": (x, lambda out: bnfast.batch_norm(x, *(r.copy() for r in running), weight,
                                                   bias, training=True, out=out)),
        "backward": (dy, lambda out: bnfast.batch_norm_backward(
            dy, x, weight, mean, invstd, out=out)[0]),
    }
    for name, (source, call) in calls.items():
        far = call(_near(source, 2048))
        for rel in (32, 4096 - 32):
            assert_same(call(_near(source, rel)), far, f"{name} rel {rel}")
        if name == "eval":
            # NaN data gives its own NaN (the first operand's), not the bias's.
            nan_x = np.isnan(wide)
            bits = np.uint32 if far.dtype == np.float32 else np.uint16
            np.testing.assert_array_equal(far[nan_x].view(bits), x[nan_x].view(bits))
            ref = reference_batch_norm(wide, *running, weight, bias).out
            np.testing.assert_allclose(far.astype(np.float64), ref, rtol=2 ** -7, atol=2 ** -7)
