"""The data types bnfast computes with: float32, float64, float16 and bfloat16.

bfloat16 is ``ml_dtypes.bfloat16`` (the NumPy dtype of JAX, ONNX and
safetensors).  ``ml_dtypes`` is optional: an array is recognised as bfloat16
by its dtype (:func:`is_bfloat16`) without importing it; only the string
``"bfloat16"`` needs it (:func:`resolve_dtype`).

The compiled kernels tell the four apart by NumPy type number and take any
type number other than float32/float64/float16 for bfloat16, so everything
that reaches them passes :func:`is_supported` first.
"""
import numpy as np

__all__ = ["NUMPY_FLOATS", "SUPPORTED_TEXT", "HALF_NAMES", "bfloat16_dtype", "is_bfloat16",
           "is_half", "is_supported", "resolve_dtype", "resolve_param_dtype"]

#: The dtypes known without ml_dtypes, the common ones first: ``dtype in
#: NUMPY_FLOATS`` (identity first, then ``==``) costs float32 nothing extra.
NUMPY_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_FLOAT16 = np.dtype(np.float16)

#: How error messages list the supported dtypes.
SUPPORTED_TEXT = "float16, bfloat16, float32 or float64"
HALF_NAMES = ("float16", "bfloat16")

_EXTRA_HINT = 'bfloat16 needs ml_dtypes: pip install "bnfast[bfloat16]"'


def is_bfloat16(dtype):
    """True for ``ml_dtypes.bfloat16`` in native byte order (recognised without importing it).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._dtypes import is_bfloat16
    >>> is_bfloat16(np.dtype(np.float16)), is_bfloat16(np.dtype("V2"))
    (False, False)
    """
    if dtype is _seen_bfloat16[0]:  # ml_dtypes' dtype is one object: ~30 ns per call
        return True
    # dtype.name costs ~0.5 us for a user dtype: checked last, once.
    if (dtype.itemsize == 2 and dtype.kind == "V" and dtype.isnative
            and getattr(dtype.type, "__module__", None) == "ml_dtypes"
            and dtype.name == "bfloat16"):
        _seen_bfloat16[0] = dtype
        return True
    return False


#: The bfloat16 dtype once :func:`is_bfloat16` has recognised it.
_seen_bfloat16 = [None]


def is_supported(dtype):
    """True for a native float32, float64, float16 or bfloat16 dtype."""
    return dtype in NUMPY_FLOATS or is_bfloat16(dtype)


def is_half(dtype):
    """True for float16 and bfloat16 (2-byte floats)."""
    return dtype == _FLOAT16 or is_bfloat16(dtype)


def bfloat16_dtype():
    """``np.dtype(ml_dtypes.bfloat16)``; ImportError naming the extra when missing."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(_EXTRA_HINT) from exc
    return np.dtype(ml_dtypes.bfloat16)


def resolve_dtype(dtype, name="dtype"):
    """A supported dtype from a NumPy dtype, a scalar type or a name.

    Names: ``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"`` (and
    anything else ``np.dtype`` reads as one of them, e.g. ``"f4"``).

    Raises
    ------
    TypeError
        Not a supported dtype (None included), naming ``name``.
    ImportError
        ``"bfloat16"`` without ml_dtypes installed.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._dtypes import resolve_dtype
    >>> resolve_dtype("float16"), resolve_dtype(np.float32)
    (dtype('float16'), dtype('float32'))
    >>> resolve_dtype("bfloat16")
    dtype(bfloat16)
    >>> resolve_dtype("int8")
    Traceback (most recent call last):
    ...
    TypeError: dtype must be float16, bfloat16, float32 or float64, got int8
    """
    if isinstance(dtype, str) and dtype.strip().lower() == "bfloat16":
        return bfloat16_dtype()
    if dtype is None:  # np.dtype(None) is float64: never a silent default
        raise TypeError(f"{name} must be {SUPPORTED_TEXT}, got None")
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be {SUPPORTED_TEXT}, got {dtype!r}") from None
    if not is_supported(resolved):
        order = " (in native byte order)" if not resolved.isnative else ""
        raise TypeError(f"{name} must be {SUPPORTED_TEXT}{order}, got {resolved}")
    return resolved


def resolve_param_dtype(param_dtype, dtype):
    """The parameters' and running statistics' dtype for data of the resolved ``dtype``:
    ``param_dtype`` resolved, or by default PyTorch's CPU rule (float32 for half data,
    else ``dtype``): a float16 running_var above 65504 would be inf.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._dtypes import resolve_param_dtype
    >>> resolve_param_dtype(None, np.dtype(np.float16)), resolve_param_dtype("float64", None)
    (dtype('float32'), dtype('float64'))
    """
    if param_dtype is None:
        return np.dtype(np.float32) if is_half(dtype) else dtype
    return resolve_dtype(param_dtype, "param_dtype")
