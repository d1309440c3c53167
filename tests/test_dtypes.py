"""bnfast._dtypes: the four dtypes, their names, and bfloat16 without importing ml_dtypes."""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import bnfast
from bnfast._dtypes import is_bfloat16, is_half, is_supported, resolve_dtype

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("given, expected", [
    ("float16", np.float16), ("float32", np.float32), ("float64", np.float64),
    (" BFloat16 ", BF16), ("bfloat16", BF16), ("f2", np.float16), ("<f4", np.float32),
    (np.float16, np.float16), (np.dtype(np.float64), np.float64), (ml_dtypes.bfloat16, BF16),
    (BF16, BF16), (float, np.float64),
])
def test_resolve_dtype_accepts_the_four(given, expected):
    assert resolve_dtype(given) == np.dtype(expected)


@pytest.mark.parametrize("bad", [None, "int8", np.int64, "complex64", "half-precision",
                                 ml_dtypes.float8_e4m3fn, np.dtype(">f4"), BF16.newbyteorder(),
                                 object])
def test_resolve_dtype_rejects_the_rest(bad):
    with pytest.raises(TypeError, match="^param_dtype must be float16, bfloat16, float32 or "
                                        "float64"):
        resolve_dtype(bad, "param_dtype")


def test_byte_swapped_dtype_says_native_order():
    with pytest.raises(TypeError, match="in native byte order"):
        resolve_dtype(np.dtype(">f2"))


def test_is_bfloat16_by_dtype():
    assert is_bfloat16(BF16)
    assert not is_bfloat16(BF16.newbyteorder())  # the kernels would misread it
    assert not is_bfloat16(np.dtype(np.float16))
    assert not is_bfloat16(np.dtype("V2"))
    # A structured dtype that merely looks like it: not ml_dtypes' type.
    assert not is_bfloat16(np.dtype([("bfloat16", np.int16)]))
    assert is_half(BF16) and is_half(np.dtype(np.float16)) and not is_half(np.dtype(np.float32))
    assert all(is_supported(np.dtype(d)) for d in (np.float16, np.float32, np.float64, BF16))
    assert not is_supported(np.dtype(np.int16))


def test_bfloat16_name_without_ml_dtypes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes -> ImportError
    with pytest.raises(ImportError, match=r'pip install "bnfast\[bfloat16\]"'):
        resolve_dtype("bfloat16")
    with pytest.raises(ImportError, match="bfloat16 needs ml_dtypes"):
        bnfast.BatchNorm2d(3, dtype="bfloat16")
    assert resolve_dtype("float16") == np.float16  # the other names need nothing


def test_import_bnfast_does_not_import_ml_dtypes():
    code = ("import sys, bnfast, numpy as np; "
            "bnfast.batch_norm(np.ones((2, 3), np.float16), None, None, training=True); "
            "bnfast.BatchNorm1d(3, dtype='float16'); "
            "print('ml_dtypes' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("call, expected", [
    ("bnfast.BatchNorm2d(2, dtype='bfloat16', param_dtype='float16').param_dtype", "float16"),
    ("bnfast.FusedBatchNorm2d(2, dtype='bfloat16').dtype", "bfloat16"),
    ("bnfast.FrozenBatchNorm2d(2, dtype='bfloat16').dtype", "bfloat16"),
    ("bnfast.BatchNorm2d(2).affine_coefficients('bfloat16')[0].dtype", "bfloat16"),
    ("bnfast.FrozenBatchNorm2d(2).affine_coefficients('bfloat16')[1].dtype", "bfloat16"),
])
def test_dtype_arguments_take_the_names_in_a_fresh_process(call, expected):
    # np.dtype("bfloat16") works only once ml_dtypes is imported (it registers the name),
    # so a place that calls np.dtype instead of resolve_dtype fails only in a process
    # that has not imported ml_dtypes yet: a new one for each call.
    code = f"import sys, bnfast; assert 'ml_dtypes' not in sys.modules; print({call})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
