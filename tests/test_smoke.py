import numpy as np
import pytest

import bnfast


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_output_matches_float64_formula(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 5)) * 2 + 1).astype(dtype)
    y = bnfast.BatchNorm2d(3, dtype=dtype)(x)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    ref = (x64 - mean) / np.sqrt(var + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, atol=tol, rtol=0)
    assert y.dtype == dtype
