"""Input checks shared by the functional layer and the modules.

Every check raises TypeError (wrong kind of thing) or ValueError (right kind,
wrong shape or value) and names the argument and the shape it got.
"""
import numbers

import numpy as np

from ._dtypes import NUMPY_FLOATS, SUPPORTED_TEXT, is_bfloat16
from ._layout import overflow_limits, overlaps
from ._threads import resolve_threads


def as_float_array(value, name):
    """``np.asarray(value)``, required to be float32, float64, float16 or bfloat16 (never cast)."""
    if type(value) is np.ndarray:
        arr = value
    elif isinstance(value, np.ma.MaskedArray):  # np.asarray would drop the mask
        raise TypeError(f"{name} is a masked array, whose mask bnfast would ignore: pass "
                        f"a plain ndarray (e.g. {name}.filled(value))")
    else:
        arr = np.asarray(value)
    # A byte-swapped float32 compares unequal to the native one: rejected, not misread.
    # The kernels take any type number they do not know for bfloat16: exactly these pass.
    if arr.dtype not in NUMPY_FLOATS and not is_bfloat16(arr.dtype):
        hint = " (cast it explicitly, e.g. .astype(np.float32))" if arr.dtype.kind in "biuf" else ""
        raise TypeError(f"{name} must be a {SUPPORTED_TEXT} array, got dtype {arr.dtype}{hint}")
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
    if (type(value) is np.ndarray and value.dtype in NUMPY_FLOATS
            and value.shape == (num_channels,)):
        return value  # the common case, without a function call: this runs per call
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


# Real scalar types taken without the (slow) numbers.Real ABC check: Python and
# NumPy floats and ints cost the same per call.
_REAL_SCALARS = frozenset([float, int, np.float64, np.float32, np.float16, np.int64, np.int32,
                           np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8])


def _real(value, name):
    """``float(value)`` for a real scalar (not a bool), else TypeError."""
    if type(value) in _REAL_SCALARS:
        return float(value)
    if isinstance(value, np.generic) and is_bfloat16(value.dtype):  # not a numbers.Real
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_flag(value, name):
    """A bool or NumPy bool as a bool, else TypeError (as torch's ``training``): the
    string "False" would be true."""
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_eps(eps, batch_stats=False):
    """eps as a float, by torch's rules: non-negative, and positive where the
    batch's statistics normalise (``batch_stats``: torch's training flag; a
    batch's variance may be 0).  NaN is rejected too (torch returns NaNs)."""
    eps = _real(eps, "eps")
    if batch_stats and not eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return eps


def check_momentum(momentum):
    """momentum as a float."""
    return _real(momentum, "momentum")


def check_running_stats(running_mean, running_var, num_channels, batch_stats):
    """Both None or both (C,) float arrays; with ``batch_stats`` they are updated in
    place (writable ndarrays), without it they are required."""
    if running_mean is None and running_var is None:
        if not batch_stats:
            raise ValueError("running_mean must be defined in evaluation mode "
                             "(pass training=True to normalise with batch statistics)")
        return None, None
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    mean = check_channel_vector(running_mean, "running_mean", num_channels)
    var = check_channel_vector(running_var, "running_var", num_channels)
    if batch_stats and not (mean is running_mean and var is running_var
                            and mean.flags.writeable and var.flags.writeable):
        _check_writable(running_mean, "running_mean")
        _check_writable(running_var, "running_var")
    return mean, var


def check_running_update(updated, running_mean, running_var):
    """Raise OverflowError if a running buffer narrower than float64 cannot hold its update.

    ``updated`` is the float64 (mean, var) computed for the buffers.  A float16
    running_var above 65504 would become inf, after which torch's evaluation
    returns all zeros without a word; here the call raises before anything is
    written back.  The rule is the core kernel's (bnfast._forward.forward's
    ``limits``): a finite value of at least the buffer dtype's
    :func:`bnfast._layout.overflow_limits`.
    """
    limits = overflow_limits(running_mean, running_var)
    if limits is None:
        return
    for value, buffer, name, limit in ((updated[0], running_mean, "running_mean", limits[0]),
                                       (updated[1], running_var, "running_var", limits[1])):
        lost = np.isfinite(value) & (np.abs(value) >= limit)
        if lost.any():
            c = int(np.argmax(lost))
            raise running_overflow(name, buffer.dtype, c, float(value[c]))


def running_overflow(name, dtype, channel, value):
    """The OverflowError of a running buffer that cannot hold its update."""
    wider = "float64" if dtype == np.float32 else "float32"
    return OverflowError(
        f"{name} of dtype {dtype} cannot hold its update: channel {channel} would be "
        f"{value:.6g}, which rounds to inf; keep the running statistics in {wider} "
        f"(e.g. {name}.astype(np.{wider})" + (", or a module's default param_dtype)"
                                              if wider == "float32" else ")"))


def check_training_size(x):
    """PyTorch's rule: batch statistics need more than one value per channel."""
    if x.size == x.shape[1] and x.size:  # N * prod(spatial) == 1
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def check_forward(x, running_mean, running_var, weight, bias, batch_stats, eps, addend, out,
                  n_threads):
    """The checks every forward makes, functional or module, on a checked input ``x``.

    Returns ``(running_mean, running_var, weight, bias, eps, addend, out, n_threads)``
    as the layout step takes them: (C,) arrays or None, eps a float (positive
    with ``batch_stats``),
    ``n_threads`` resolved.  ``batch_stats``: the batch's statistics normalise
    (more than one value per channel needed; running buffers updated in place).
    """
    C = x.shape[1]
    running_mean, running_var = check_running_stats(running_mean, running_var, C, batch_stats)
    weight = check_channel_vector(weight, "weight", C)
    bias = check_channel_vector(bias, "bias", C)
    eps = check_eps(eps, batch_stats)
    if addend is not None:
        addend = check_same_shape(addend, "addend", x)
    if out is not None:
        out = check_out(out, x)
    n_threads = resolve_threads(n_threads)
    if batch_stats:
        check_training_size(x)
    return running_mean, running_var, weight, bias, eps, addend, out, n_threads


def _check_writable(buffer, name):
    if buffer is not None and (not isinstance(buffer, np.ndarray) or not buffer.flags.writeable):
        raise ValueError(f"{name} must be a writable numpy array: it is updated in place "
                         "during training")


def check_out(out, x, name="out"):
    """A caller's output array: an ndarray of x's shape and dtype, writable."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    check_same_shape(out, name, x)  # out itself is returned (a subclass stays itself)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


# -- backward ------------------------------------------------------------------
def check_saved_stat(value, name, num_channels):
    """save_mean/save_invstd: required, a float array of shape (C,)."""
    if value is None:
        raise ValueError(f"{name} is required: pass what batch_norm(..., return_stats=True) "
                         "returned (the running statistics' in evaluation)")
    return check_channel_vector(value, name, num_channels)


def check_output_mask(output_mask, n):
    """A sequence of ``n`` bools (Python or NumPy), as a tuple of Python bools."""
    if type(output_mask) is tuple and len(output_mask) == n:
        for m in output_mask:
            if type(m) is not bool:
                break
        else:  # the common case, without building a new tuple: this runs per call
            return output_mask
    try:
        mask = tuple(output_mask)
    except TypeError:
        raise TypeError(f"output_mask must be a sequence of {n} bools, "
                        f"got {type(output_mask).__name__}") from None
    if len(mask) != n or not all(type(m) is bool or type(m) is np.bool_ for m in mask):
        raise ValueError(f"output_mask must be a sequence of {n} bools, got {output_mask!r}")
    return tuple(bool(m) for m in mask)


def check_relu_mask(relu, x):
    """A ReluMask for ``x``: x's shape, 1-D uint8 bits covering x, a known layout."""
    from ._layout import Layout
    if relu.shape != x.shape:
        raise ValueError(f"output (a ReluMask) must have the input's shape {x.shape}, "
                         f"got shape {relu.shape}")
    bits = relu.bits
    if (not isinstance(bits, np.ndarray) or bits.dtype != np.uint8 or bits.ndim != 1
            or bits.size < (x.size + 7) // 8 or relu.layout not in tuple(Layout)):
        raise ValueError("output (a ReluMask) is malformed: bits must be a 1-D uint8 array "
                         f"of at least {(x.size + 7) // 8} bytes and layout "
                         f"'{Layout.CHANNELS_FIRST}' or '{Layout.CHANNELS_LAST}'")


def check_distinct_outputs(out, addend_out):
    """out and addend_out (validated, or None) must not share memory."""
    if out is not None and addend_out is not None and overlaps(out, addend_out):
        raise ValueError("out and addend_out must not share memory: they receive different "
                         "gradients")


def check_backward(grad_output, input, weight, save_mean, save_invstd, training, eps,
                   output_mask, n_mask):
    """What both backwards share: ``(x, dy, weight, mean, invstd, training, output_mask)``.

    The common case (ndarrays of the input's shape and dtype, a float eps, a
    tuple of bools) is recognised inline: this runs per call.
    """
    x = check_input(input)
    training = check_flag(training, "training")
    if type(grad_output) is np.ndarray and grad_output.shape == x.shape \
            and grad_output.dtype == x.dtype:
        dy = grad_output
    else:
        dy = check_same_shape(grad_output, "grad_output", x)
    C = x.shape[1]
    weight = check_channel_vector(weight, "weight", C)
    mean = check_saved_stat(save_mean, "save_mean", C)
    invstd = check_saved_stat(save_invstd, "save_invstd", C)
    if type(eps) is not float or not eps > 0.0:
        check_eps(eps, training)
    return x, dy, weight, mean, invstd, training, check_output_mask(output_mask, n_mask)
