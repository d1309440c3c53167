"""The register-row leaves (``src/bnfast_rows.h``) in C: the channels-last float32
normalise and backward pass 2 with their coefficients in zmm registers.

``tests/c/rows.c`` runs every row width they take (C = 16 to 128 for the
normalise, 16 to 96 for the backward), cached and streamed, every epilogue (addend,
ReLU), beside the table leaves they replace (``bnfast_simd.h``,
``bnfast_backward_simd.h``) and the plain C expression, on values and
coefficients with NaN payloads and infinities.  All must give the same bits: the
leaf a kernel picks depends on C and the CPU, never the result.  (The float16
and bfloat16 rows are held to the channels-first leaves' bits, payloads too, in
``tests/test_layouts.py``.)
"""
import numpy as np
import pytest

from conftest import run_c_driver

ROWS = 7
FORWARD_K = range(1, 9)
BACKWARD_K = range(1, 7)
EPILOGUES = [(False, False), (True, False), (False, True), (True, True)]  # (addend, relu)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """(this CPU runs the AVX-512 leaves, {case: (rows cached, rows streamed, tiled,
    expression)}) as uint32 bits."""
    out = run_c_driver(tmp_path_factory.mktemp("rows"), "rows.c")
    has = bool(np.frombuffer(out[:4], np.int32)[0])
    bits = np.frombuffer(out[4:], np.uint32)
    cases, at = {}, 0
    for K in FORWARD_K:
        for epilogue in EPILOGUES:
            n = ROWS * 16 * K
            cases["forward", K, epilogue] = bits[at:at + 4 * n].reshape(4, n)
            at += 4 * n
    for K in BACKWARD_K:
        n = ROWS * 16 * K
        cases["backward", K, None] = bits[at:at + 4 * n].reshape(4, n)
        at += 4 * n
    assert at == bits.size
    return has, cases


CASES = ([("forward", K, e) for K in FORWARD_K for e in EPILOGUES]
         + [("backward", K, None) for K in BACKWARD_K])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_table_leaves_give_the_expression_bits(driver, case):
    _, cases = driver
    tiled, expression = cases[case][2:]
    np.testing.assert_array_equal(tiled, expression)
    assert np.isnan(expression.view(np.float32)).any()  # the payloads are in play


@pytest.mark.parametrize("case", CASES, ids=str)
def test_register_rows_give_the_table_bits(driver, case):
    has, cases = driver
    if not has:
        pytest.skip("this CPU has no AVX-512F: the kernels use the table leaves only")
    cached, streamed, tiled, _ = cases[case]
    np.testing.assert_array_equal(cached, tiled)
    np.testing.assert_array_equal(streamed, tiled)
