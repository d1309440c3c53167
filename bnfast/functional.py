"""Functional BatchNorm, mirroring ``torch.nn.functional.batch_norm``.

Every forward, functional or module, takes one road: validate (here and in
``bnfast._validation``, once), lay out (:func:`normalize`: views, or one
documented copy), then one compiled call (``bnfast._forward.forward``).
"""

import numpy as np

from . import _forward, _layout
from ._validation import (
    check_flag,
    check_forward,
    check_input,
    check_momentum,
    running_overflow,
)
from .backward import ReluMask

__all__ = ["batch_norm", "fused_batch_norm"]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, addend=None, relu=False, out=None,
               n_threads=None, return_stats=False):
    """Batch Normalization over the channel axis (axis 1), as ``torch.nn.functional.batch_norm``.

    Computes ``y = (x - mean) / sqrt(var + eps) * weight + bias``, then
    optionally ``y += addend`` and ``y = max(y, 0)`` in the same pass.

    Parameters
    ----------
    input : array_like, shape (N, C, *spatial)
        float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``; half
        precision is computed in float32 with statistics in double, and each
        output rounded once).  C-contiguous and channels-last memory
        (``nhwc.transpose(0, 3, 1, 2)``) are used in place; other strides are
        copied once.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics, any of the four float dtypes.  In training they
        are updated **in place** (running_var with the unbiased batch
        variance); in evaluation they normalise the input and are required.
    weight, bias : array_like of shape (C,) or None
        Affine parameters (gamma, beta); None means 1 and 0.
    training : bool
        Use batch statistics (and update the running ones) if True.
    momentum : float
        ``running = (1 - momentum) * running + momentum * batch``.
    eps : float
        Added to the variance: non-negative, positive where batch statistics
        normalise (torch's rules).
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
    OverflowError
        A float16/bfloat16 running buffer whose update would round to inf
        (raised before anything is written).

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

    Half precision, with float32 parameters and statistics (PyTorch's rule):

    >>> h = bnfast.batch_norm(x.astype(np.float16), rm, rv, training=True)
    >>> h.dtype, h[:, 0]
    (dtype('float16'), array([-1.342 , -0.4473,  0.4473,  1.342 ], dtype=float16))
    """
    x = check_input(input)
    training = check_flag(training, "training")
    relu = check_flag(relu, "relu")
    return_stats = check_flag(return_stats, "return_stats")
    # Unused in evaluation, where nothing is updated.
    momentum = check_momentum(momentum) if training else 0.0
    running_mean, running_var, weight, bias, eps, addend, out, nt = check_forward(
        x, running_mean, running_var, weight, bias, training, eps, addend, out, n_threads)
    result, coef, _, _ = normalize(x, running_mean, running_var, weight, bias, training, momentum,
                                eps, addend, relu, out, nt, return_stats, False, None)
    if return_stats:
        return result, coef[0], coef[1]
    return result


def normalize(x, running_mean, running_var, weight, bias, batch_stats, momentum, eps, addend,
              relu, out, n_threads, want_stats, want_mask, cache):
    """Lay out validated arguments and make the one compiled call.

    Returns ``(out, coef or None, ReluMask or None, CoefficientTable or None)``:
    ``coef`` the (4, C) float64 table (mean, invstd, scale, shift) when
    ``want_stats``; the mask (packed in the normalise pass, for backward) when
    ``want_mask`` and ``relu``; the cache entry the call used, when ``cache``.
    Arguments are as :func:`batch_norm` has checked them: ``x`` an ndarray of
    shape (N, C, *spatial); (C,) vectors or None; ``momentum`` and ``eps``
    floats; ``n_threads`` resolved; ``cache`` a module's CoefficientCache or None.
    """
    x, layout = _layout.in_kernel_layout(x)
    # out may be x or addend itself (elementwise), but no partial overlap of them.
    result, target = _layout.write_target(out, x, layout, same_ok=(x, addend))
    if addend is not None:
        addend = _layout.to_layout(addend, layout)
    coef = np.empty((4, x.shape[1])) if want_stats else None
    bits = np.zeros((x.size + 7) // 8, np.uint8) if want_mask and relu else None
    if batch_stats and running_mean is not None:
        buffers = _layout.updatable_pair(running_mean, running_var, x.dtype)
        # Buffers narrower than double (float32 ones, or float64 copies of half ones):
        # the kernel checks that their update fits before it writes anything, out
        # (maybe x) included.  (A variance of 1e39 would be inf in float32: torch then
        # normalises to all zeros without a word.)
        limits = _layout.overflow_limits(running_mean, running_var)
        try:
            entry = _forward.forward(x, layout, buffers[0], buffers[1], weight, bias, True,
                                     momentum, eps, addend, relu, target, n_threads, coef, bits,
                                     None, limits)
        except _forward.RunningUpdateOverflow as exc:
            which, c, value = exc.args
            buffer = (running_mean, running_var)[which]
            raise running_overflow(("running_mean", "running_var")[which], buffer.dtype, c,
                                   value) from None
        _layout.write_back_pair(buffers, running_mean, running_var)
    else:
        entry = _forward.forward(x, layout, running_mean, running_var, weight, bias,
                                 batch_stats, momentum, eps, addend, relu, target, n_threads,
                                 coef, bits, None if batch_stats else cache)
    if target is not result:
        np.copyto(result, target)
    mask = None if bits is None else ReluMask(bits, x.shape, layout)
    return result, coef, mask, entry


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
