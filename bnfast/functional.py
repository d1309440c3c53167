"""Functional BatchNorm, mirroring ``torch.nn.functional.batch_norm``.

Validation happens here, once; the compiled kernels in ``bnfast._stats`` and
``bnfast._normalize`` assume what this module checked.
"""

import numpy as np

from . import _inference, _layout, _normalize, _stats
from .backward import ReluMask
from ._threads import resolve_threads
from ._validation import (
    check_channel_vector,
    check_eps,
    check_input,
    check_momentum,
    check_out,
    check_same_shape,
    check_training_size,
)

__all__ = ["batch_norm", "fused_batch_norm"]

# Specialised kernels looked up once: Cython's fused-type dispatch costs
# microseconds per call, a dict lookup tens of nanoseconds.
_CTYPE = {"f": "float", "d": "double"}
_STATS = {
    (layout, char): getattr(_stats, str(layout))[ctype]
    for layout in (_layout.FIRST, _layout.LAST) for char, ctype in _CTYPE.items()
}
_NORMALIZE = {
    (layout, char): getattr(_normalize, str(layout))[ctype]
    for layout in (_layout.FIRST, _layout.LAST) for char, ctype in _CTYPE.items()
}
_UPDATE_RUNNING = {char: _stats.update_running[ctype] for char, ctype in _CTYPE.items()}
_COEFFICIENTS = {
    (s, p): _normalize.coefficients[_CTYPE[s], _CTYPE[p]] for s in _CTYPE for p in _CTYPE
}


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, addend=None, relu=False, out=None,
               n_threads=None, return_stats=False):
    """Batch Normalization over the channel axis (axis 1), as ``torch.nn.functional.batch_norm``.

    Computes ``y = (x - mean) / sqrt(var + eps) * weight + bias``, then
    optionally ``y += addend`` and ``y = max(y, 0)`` in the same pass.

    Parameters
    ----------
    input : array_like, shape (N, C, *spatial)
        float32 or float64.  C-contiguous and channels-last memory
        (``nhwc.transpose(0, 3, 1, 2)``) are used in place; other strides are
        copied once.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics.  In training they are updated **in place**
        (running_var with the unbiased batch variance); in evaluation they
        normalise the input and are required.
    weight, bias : array_like of shape (C,) or None
        Affine parameters (gamma, beta); None means 1 and 0.
    training : bool
        Use batch statistics (and update the running ones) if True.
    momentum : float
        ``running = (1 - momentum) * running + momentum * batch``.
    eps : float
        Added to the variance; must be positive.
    addend : array_like of input's shape and dtype, optional
        Added after the affine map (a residual connection).
    relu : bool
        Apply ``max(y, 0)`` last (NaN stays NaN, as in ``torch.relu``).
    out : ndarray, optional
        Where to write the result; may be ``input`` or ``addend`` itself.
    n_threads : int, optional
        OpenMP threads; default: the OpenMP maximum (see ``OMP_NUM_THREADS``,
        ``threadpoolctl``).  Results do not depend on it.
    return_stats : bool
        Also return ``(save_mean, save_invstd)``, float64 arrays of shape (C,):
        the batch mean and ``1/sqrt(var + eps)`` in training, the running mean
        and ``1/sqrt(running_var + eps)`` in evaluation.  They are what
        ``batch_norm_backward`` takes.

    Returns
    -------
    out : ndarray
        Same shape and dtype as input, and the same memory layout
        (channels-last in, channels-last out).
    save_mean, save_invstd : ndarray
        Only with ``return_stats=True``.

    Raises
    ------
    TypeError
        A non-float array, mismatched dtypes between input, addend and out.
    ValueError
        Fewer than 2 dimensions, a (C,) vector of the wrong size, eps <= 0,
        a single value per channel in training, or missing running stats in
        evaluation.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> bnfast.batch_norm(x, rm, rv, training=True).round(3)
    array([[-1.342, -1.342],
           [-0.447, -0.447],
           [ 0.447,  0.447],
           [ 1.342,  1.342]], dtype=float32)
    >>> rm
    array([0.3, 0.4], dtype=float32)
    """
    if type(input) is np.ndarray and input.ndim >= 2:
        # Plain calls: one compiled call (see bnfast._inference); None otherwise.
        coef = np.empty((4, input.shape[1])) if return_stats else None
        if training:
            result = _inference.normalize_with_batch_stats(
                input, running_mean, running_var, weight, bias, eps, momentum, addend, relu,
                out, n_threads, coef, None)
        else:
            result = _inference.normalize_with_running_stats(
                input, running_mean, running_var, weight, bias, eps, addend, relu, out,
                n_threads, coef, None, None)
        if result is not None:
            return (result, coef[0], coef[1]) if return_stats else result
    result, save_mean, save_invstd, _ = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        addend=addend, relu=relu, out=out, n_threads=n_threads, want_mask=False)
    if return_stats:
        return result, save_mean, save_invstd
    return result


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
                addend, relu, out, n_threads, want_mask):
    """batch_norm's work; returns (out, save_mean, save_invstd, relu_mask or None).

    ``want_mask`` (with relu): also pack the ReLU mask for backward inside the
    normalise pass (a ``bnfast.ReluMask`` in the kernel's memory order), so a
    fused module's forward costs no extra pass over its output.
    """
    x = check_input(input)
    C = x.shape[1]
    eps = check_eps(eps)
    given_buffers = (running_mean, running_var)  # before np.asarray: updated in place
    running_mean = check_channel_vector(running_mean, "running_mean", C)
    running_var = check_channel_vector(running_var, "running_var", C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    weight = check_channel_vector(weight, "weight", C)
    bias = check_channel_vector(bias, "bias", C)
    if addend is not None:
        addend = check_same_shape(addend, "addend", x)
    if out is not None:
        out = check_out(out, x)
    nt = resolve_threads(n_threads)

    if training:
        momentum = check_momentum(momentum)
        check_training_size(x)
        if running_mean is not None:
            _check_writable_buffers(*given_buffers)
    elif running_mean is None:
        raise ValueError("running_mean must be defined in evaluation mode "
                         "(pass training=True to normalise with batch statistics)")

    x, layout = _layout.in_kernel_layout(x)
    xk = _layout.kernel_view(x, layout)
    char = x.dtype.char

    coef = np.empty((4, C), dtype=np.float64)
    w_arr, b_arr = _param_pair(weight, bias, C)
    empty = x.size == 0
    if training:
        mean, var, residual = np.zeros((3, C))
        if not empty:
            _STATS[layout, char](xk, mean, var, nt, residual)
            if running_mean is not None:
                _update_running(running_mean, running_var, mean, var,
                                x.size // max(C, 1), momentum)
        stat_char = "d"
    else:
        mean, var = _stat_pair(running_mean, running_var)
        residual = None  # a given mean is exact as it is
        stat_char = mean.dtype.char
    _COEFFICIENTS[stat_char, w_arr.dtype.char](mean, var, w_arr, b_arr, weight is not None,
                                               bias is not None, eps, coef)

    # out may be x or addend itself (elementwise), but no partial overlap of them.
    result, target = _layout.write_target(out, x, layout, same_ok=(x, addend))
    bits = np.zeros((x.size + 7) // 8, dtype=np.uint8) if want_mask and relu else None
    if not empty:
        add_k = None if addend is None else _layout.kernel_view(_layout.to_layout(addend, layout), layout)
        _NORMALIZE[layout, char](xk, coef, _layout.kernel_view(target, layout), add_k,
                                 bool(relu), nt, bits, residual)
    if target is not result:
        np.copyto(result, target)
    mask = None if bits is None else ReluMask(bits, x.shape, layout)
    return result, coef[0], coef[1], mask


def fused_batch_norm(input, running_mean, running_var, weight=None, bias=None, addend=None,
                     training=False, momentum=0.1, eps=1e-5, *, out=None, n_threads=None,
                     return_stats=False):
    """``relu(batch_norm(input) + addend)`` in one pass: OneFlow's fused BatchNorm.

    Same parameters as :func:`batch_norm`; ``addend`` (optional) is added
    before the ReLU.  Equivalent to
    ``batch_norm(..., addend=addend, relu=True)``.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1., -1.], [3., 1.]], dtype=np.float32)
    >>> bnfast.fused_batch_norm(x, None, None, training=True)
    array([[0.      , 0.      ],
           [0.999995, 0.999995]], dtype=float32)
    """
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      addend=addend, relu=True, out=out, n_threads=n_threads,
                      return_stats=return_stats)



def _check_writable_buffers(running_mean, running_var):
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(buf, np.ndarray) or not buf.flags.writeable:
            raise ValueError(f"{name} must be a writable numpy array: it is updated in place "
                             "during training")


def _param_pair(weight, bias, C):
    """weight and bias as two contiguous arrays of one dtype (dummies where None)."""
    if weight is None and bias is None:
        dummy = np.empty(C, dtype=np.float64)
        return dummy, dummy
    if weight is None or bias is None:
        given = _contiguous(weight if weight is not None else bias)
        return given, given
    return _stat_pair(weight, bias)


def _stat_pair(a, b):
    """Two (C,) arrays as contiguous arrays of one dtype (float64 if they differ: lossless)."""
    if a.dtype != b.dtype:
        a = a.astype(np.float64)
        b = b.astype(np.float64)
    return _contiguous(a), _contiguous(b)


def _contiguous(a):
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, computed in float64 and rounded once into the buffers.

    Buffers of another dtype or stride are updated through a contiguous float64
    copy (lossless for the arithmetic) and written back.
    """
    rm, rv = running_mean, running_var
    if not (rm.dtype == rv.dtype and rm.flags.c_contiguous and rv.flags.c_contiguous):
        rm, rv = rm.astype(np.float64), rv.astype(np.float64)
    _UPDATE_RUNNING[rm.dtype.char](rm, rv, mean, var, float(count), momentum)
    if rm is not running_mean:
        np.copyto(running_mean, rm, casting="unsafe")
        np.copyto(running_var, rv, casting="unsafe")

