"""Input checks shared by the functional layer and the modules.

Every check raises TypeError (wrong kind of thing) or ValueError (right kind,
wrong shape or value) and names the argument and the shape it got.
"""
import math
import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# dtype.char of the native-order float32/float64 (a byte-swapped array has the
# same char but fails isnative; it is rejected rather than silently misread).
_FLOAT_CHARS = ("f", "d")


def as_float_array(value, name):
    """``np.asarray(value)``, required to be float32 or float64 (never cast)."""
    arr = value if type(value) is np.ndarray else np.asarray(value)
    dtype = arr.dtype
    if dtype.char in _FLOAT_CHARS and dtype.isnative:  # fast path: this runs per call
        return arr
    if dtype not in SUPPORTED_DTYPES:
        hint = " (cast it explicitly, e.g. .astype(np.float32))" if arr.dtype.kind in "biuf" else ""
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}{hint}")
    return arr


def check_input(x, name="input"):
    """A float array of shape (N, C, *spatial): 2 or more dimensions."""
    x = as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C, *spatial) with at least 2 dimensions, "
                         f"got shape {x.shape}")
    return x


def check_channel_vector(value, name, num_channels):
    """None, or a float array of shape (C,)."""
    if value is None:
        return None
    arr = as_float_array(value, name)
    if arr.shape != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},) to match the input's "
                         f"{num_channels} channels, got shape {arr.shape}")
    return arr


def check_same_shape(value, name, x):
    """A float array of exactly x's shape and dtype (addend, out)."""
    arr = as_float_array(value, name)
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have the input's shape {x.shape}, got shape {arr.shape}")
    if arr.dtype != x.dtype:
        raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {arr.dtype}")
    return arr


def check_eps(eps):
    if type(eps) is float and eps > 0.0:  # fast path
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not eps > 0.0:  # also rejects NaN
        raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    return eps


def check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {type(momentum).__name__}")
    return float(momentum)


def check_training_size(x):
    """PyTorch's rule: batch statistics need more than one value per channel."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def check_out(out, x, name="out"):
    """A caller's output array: an ndarray of x's shape and dtype, writable."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    out = check_same_shape(out, name, x)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out
