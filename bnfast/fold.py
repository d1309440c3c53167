"""Folding a BatchNorm into the convolution or linear layer before it, for inference.

In evaluation a BatchNorm is the per-channel affine map ``x * scale + shift``
(:meth:`bnfast.BatchNorm2d.affine_coefficients`), so ``bn(conv(x))`` is one
convolution with weight ``weight * scale`` (per output channel) and bias
``bias * scale + shift``.  Both are computed in float64 from the stored
values and rounded once to the weight's dtype (float16, bfloat16 and other
ml_dtypes included).  Unlike ``torch.nn.utils.fuse_conv_bn_weights`` (2.13),
grouped transposed convolutions and BatchNorms without ``weight``
(``affine=False``) fold too.
"""
import numpy as np

from ._state_dict import as_numpy, is_floating, rounded
from .fused import is_fused

__all__ = ["conv", "linear"]


def _weight(weight, ndims, what):
    w = as_numpy(weight, "weight")
    if not is_floating(w.dtype):
        raise TypeError(f"weight must be a floating array, got dtype {w.dtype}")
    if w.ndim not in ndims:
        raise ValueError(f"weight must be a {what} weight with {' or '.join(map(str, ndims))} "
                         f"dimensions, got shape {w.shape}")
    return w


def _coefficients(bn, channels, what, broadcast_one=False):
    """The float64 (scale, shift) of bn, one per output channel (``broadcast_one``: a
    BatchNorm of one channel serves them all, as torch's fuse_linear_bn_eval allows)."""
    if is_fused(bn):
        raise TypeError(f"{type(bn).__name__}'s ReLU and addend are no affine map: folding "
                        f"it into the {what} would drop them; fold a BatchNorm")
    scale, shift = bn.affine_coefficients(np.float64)
    if broadcast_one and scale.shape == (1,):
        scale, shift = np.repeat(scale, channels), np.repeat(shift, channels)
    if scale.shape != (channels,):
        raise ValueError(f"the BatchNorm has {scale.shape[0]} channels but the {what} has "
                         f"{channels} output channels")
    return scale, shift


def _folded_bias(bias, scale, shift, dtype):
    if bias is None:
        return rounded(shift, dtype, "folded bias")
    b = as_numpy(bias, "bias")
    if not is_floating(b.dtype) and b.dtype.kind not in "biu":  # complex would lose its part
        raise TypeError(f"bias must be an array of real numbers, got dtype {b.dtype}")
    if b.shape != scale.shape:
        raise ValueError(f"bias must have shape {scale.shape} (one per output channel), "
                         f"got shape {b.shape}")
    return rounded(b.astype(np.float64) * scale + shift, dtype, "folded bias")


def conv(weight, bias, bn, *, transposed=False, groups=1):
    """Fold ``bn`` (after the convolution) into a Conv or ConvTranspose layer's weights.

    Parameters
    ----------
    weight : array_like
        The convolution's weight, as torch stores it: ``(out, in / groups,
        *kernel)`` for ``Conv1d/2d/3d``, ``(in, out / groups, *kernel)`` for
        ``ConvTranspose1d/2d/3d``.
    bias : array_like of shape (out,) or None
        The convolution's bias (None: no bias).
    bn : BatchNorm module
        A module with ``affine_coefficients`` (a bnfast BatchNormXd with
        running statistics, or a FrozenBatchNorm2d): its evaluation map.
    transposed : bool
        ``weight`` is a transposed convolution's.
    groups : int
        The convolution's ``groups``.

    Returns
    -------
    weight, bias : ndarray
        The folded layer's weight (``weight``'s shape) and bias (``(out,)``),
        both of ``weight``'s dtype: ``conv(x, *folded) == bn.eval()(conv(x))``
        up to rounding.

    Raises
    ------
    ValueError
        Shapes that do not fit (``groups``, channel counts, bias).
    TypeError
        A weight that is not floating point.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm2d(2)
    >>> bn.running_var[:] = [4.0, 0.25]
    >>> from bnfast import fold
    >>> w, b = fold.conv(np.ones((2, 1, 1, 1), np.float32), None, bn)
    >>> w.ravel().round(4), b
    (array([0.5, 2. ], dtype=float32), array([0., 0.], dtype=float32))
    """
    w = _weight(weight, (3, 4, 5), "Conv1d/2d/3d or ConvTranspose1d/2d/3d")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if w.shape[0] % groups:
        raise ValueError(f"weight's first dimension ({w.shape[0]}) must be divisible by "
                         f"groups={groups}, got shape {w.shape}")
    out = w.shape[1] * groups if transposed else w.shape[0]
    scale, shift = _coefficients(bn, out, "convolution")
    w64 = w.astype(np.float64)
    kernel = (1,) * (w.ndim - 2)
    if transposed:  # weight[g * in/groups + i, j] feeds output channel g * out/groups + j
        grouped = w64.reshape((groups, w.shape[0] // groups) + w.shape[1:])
        grouped *= scale.reshape((groups, 1, w.shape[1]) + kernel)
    else:
        w64 *= scale.reshape((out, 1) + kernel)
    return rounded(w64, w.dtype, "folded weight"), _folded_bias(bias, scale, shift, w.dtype)


def linear(weight, bias, bn):
    """Fold ``bn`` (after the linear layer) into a Linear layer's weights.

    Parameters
    ----------
    weight : array_like of shape (out, in)
        The Linear layer's weight.
    bias : array_like of shape (out,) or None
        Its bias (None: no bias).
    bn : BatchNorm module
        A module with ``affine_coefficients`` (e.g. a BatchNorm1d of ``out``
        features with running statistics; ``affine=False`` is fine), or of
        one feature, which serves every output as in torch's
        ``fuse_linear_bn_eval``.

    Returns
    -------
    weight, bias : ndarray
        Of ``weight``'s dtype, computed in float64 and rounded once.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm1d(2, affine=False, dtype=np.float64)
    >>> bn.running_mean[:] = [1.0, -1.0]
    >>> from bnfast import fold
    >>> w, b = fold.linear(np.eye(2), np.zeros(2), bn)
    >>> b.round(4)
    array([-1.,  1.])
    """
    w = _weight(weight, (2,), "Linear")
    scale, shift = _coefficients(bn, w.shape[0], "linear layer", broadcast_one=True)
    return (rounded(w.astype(np.float64) * scale[:, None], w.dtype, "folded weight"),
            _folded_bias(bias, scale, shift, w.dtype))
