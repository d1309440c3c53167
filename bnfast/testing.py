"""The float64 reference: PyTorch's BatchNorm written out plainly in NumPy.

:func:`reference_batch_norm` and :func:`reference_batch_norm_backward` are
the specification bnfast's compiled kernels are held to, by the tests, by
``bnfast bench``'s correctness column and by ``benchmarks/``.  They follow
``torch.nn.functional.batch_norm`` (plus the fused ``+ addend`` and ReLU) and
``torch.ops.aten.native_batch_norm_backward`` (after ``threshold_backward``
for the fused variant), computed in float64 from the inputs as given,
whatever their dtype or memory layout.  NumPy only, and slow: they are meant
for checking, not for use.
"""
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["ForwardReference", "BackwardReference", "reference_batch_norm",
           "reference_batch_norm_backward"]


class ForwardReference(NamedTuple):
    """What :func:`reference_batch_norm` returns (float64 arrays)."""

    #: The output, of the input's shape.
    out: np.ndarray
    #: The running statistics after the step (None when not given).
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]
    #: The statistics that normalised the input, shape (C,): the batch mean and
    #: ``1 / sqrt(biased batch variance + eps)`` in training, the running mean and
    #: ``1 / sqrt(running_var + eps)`` in evaluation (``save_mean``, ``save_invstd``).
    mean: np.ndarray
    invstd: np.ndarray


class BackwardReference(NamedTuple):
    """What :func:`reference_batch_norm_backward` returns (float64 arrays)."""

    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray
    #: ``grad_output``, gated by the ReLU when the fused forward's output is given.
    grad_addend: np.ndarray


def _channel_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """A (C,) vector as float64, shaped to broadcast against ``x`` (N, C, *spatial)."""
    return _vector(v, x.shape[1]).reshape((1, -1) + (1,) * (x.ndim - 2))


def _vector(v, C, name="a per-channel vector"):
    """``v`` as a float64 (C,) array; ValueError for another shape (torch raises too)."""
    v = np.array(v, dtype=np.float64)
    if v.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got shape {v.shape}")
    return v


def reference_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5, addend=None, relu=False):
    """``torch.nn.functional.batch_norm`` (then ``+ addend``, ``relu``) in float64 NumPy.

    Pure: the running statistics given are not modified; their values after
    the step are returned.

    Parameters
    ----------
    x : array_like, shape (N, C, *spatial)
        Input, any float dtype and memory layout.
    running_mean, running_var : array_like of shape (C,) or None
        Running statistics: normalise in evaluation (required there); in
        training they are updated as torch does, with the *unbiased* batch
        variance: ``(1 - momentum) * running + momentum * batch``.
    weight, bias : array_like of shape (C,) or None
        Affine parameters; None means 1 and 0.
    training : bool
        Batch statistics (biased variance, two-pass in float64) if True.
    momentum, eps : float
        As in torch.
    addend : array_like of x's shape, optional
        Added after the affine map (a residual connection).
    relu : bool
        ``max(y, 0)`` last (NaN stays NaN, as in ``torch.relu``).

    Returns
    -------
    ForwardReference
        ``(out, running_mean, running_var, mean, invstd)``, all float64.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.testing import reference_batch_norm
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> ref = reference_batch_norm(x, np.zeros(2), np.ones(2), training=True, eps=0.0)
    >>> ref.out
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> ref.running_mean, ref.running_var  # momentum 0.1; unbiased variance 2 and 200
    (array([0.2, 2. ]), array([ 1.1, 20.9]))
    >>> reference_batch_norm(x, [2.0, 20.0], [1.0, 100.0], bias=[0.0, -9.0],
    ...                      addend=x, relu=True).out.round(3)  # evaluation, fused
    array([[ 0.,  0.],
           [ 4., 22.]])
    """
    with np.errstate(invalid="ignore"):  # NaN/Inf inputs give NaN where torch does
        return _forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        addend, relu)


def _forward(x, running_mean, running_var, weight, bias, training, momentum, eps, addend,
             relu):
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[1]
    count = x.size // C if C else 0
    momentum = float(momentum)  # 1 - np.float32(0.1) would stay a float32
    rm = None if running_mean is None else _vector(running_mean, C, "running_mean")
    rv = None if running_var is None else _vector(running_var, C, "running_var")
    for v, name in ((weight, "weight"), (bias, "bias")):
        if v is not None:
            _vector(v, C, name)
    centered = None
    if training:
        if count == 0:
            mean, var = np.zeros(C), np.zeros(C)
        else:
            # Shifted by one finite sample of each channel, then two-pass: the mean
            # exact to about an ulp even for data far from zero (mean 1e12, std 1).
            first = x[(0, slice(None)) + (0,) * (x.ndim - 2)]
            shift = np.where(np.isfinite(first), first, 0.0)
            mean = (x - _per_channel(shift, x)).mean(axis=_channel_axes(x)) + shift
            # What rounding the mean to float64 lost, taken out too (corrected two-pass):
            # data at 1e10 with std 1 normalises to ~1e-15, not ~1e-6.
            centered = x - _per_channel(mean, x)
            centered = centered - _per_channel(centered.mean(axis=_channel_axes(x)), x)
            var = (centered ** 2).mean(axis=_channel_axes(x))  # biased
            if rm is not None:
                unbiased = var * count / (count - 1) if count > 1 else np.full(C, np.nan)
                rm = (1.0 - momentum) * rm + momentum * mean
                rv = (1.0 - momentum) * rv + momentum * unbiased
    else:
        if rm is None or rv is None:
            raise ValueError("evaluation needs running_mean and running_var")
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + eps)
    if centered is None:
        centered = x - _per_channel(mean, x)
    y = centered * _per_channel(invstd, x)
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    if addend is not None:
        y = y + np.asarray(addend, dtype=np.float64)
    if relu:
        y = np.maximum(y, 0.0)  # NaN propagates, as torch.relu
    return ForwardReference(y, rm, rv, mean, invstd)


def reference_batch_norm_backward(grad_output, x, weight, save_mean, save_invstd,
                                  training=True, *, output=None):
    """Gradients of :func:`reference_batch_norm`, as torch's ``native_batch_norm_backward``.

    Parameters
    ----------
    grad_output : array_like, shape (N, C, *spatial)
        Gradient of the loss with respect to the forward's output.
    x : array_like, shape (N, C, *spatial)
        The forward's input.
    weight : array_like of shape (C,) or None
        None means 1.
    save_mean, save_invstd : array_like of shape (C,)
        The statistics the forward normalised with (``ForwardReference.mean``
        and ``.invstd``): batch ones in training, running ones in evaluation.
    training : bool
        Whether the forward used batch statistics: then the mean and variance
        depend on ``x`` and contribute to ``grad_input``; in evaluation
        ``grad_input = grad_output * weight * invstd``.
    output : array_like of x's shape, optional
        The output of a fused forward ``relu(batch_norm(x) + addend)``: its
        ReLU gates ``grad_output`` first (zero where ``output <= 0``, as torch's
        ``threshold_backward``).

    Returns
    -------
    BackwardReference
        ``(grad_input, grad_weight, grad_bias, grad_addend)``, all float64;
        ``grad_weight = sum(g * xhat)`` and ``grad_bias = sum(g)`` over all
        but the channel axis, where ``g`` is the (gated) ``grad_output`` and
        ``xhat = (x - save_mean) * save_invstd``; ``grad_addend = g``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.testing import reference_batch_norm, reference_batch_norm_backward
    >>> x = np.array([[1.0], [2.0], [6.0]])
    >>> fwd = reference_batch_norm(x, training=True, eps=0.0)
    >>> g = reference_batch_norm_backward([[1.0], [0.0], [0.0]], x, [2.0], fwd.mean, fwd.invstd)
    >>> g.grad_input.round(4)  # sums to zero: the batch mean absorbs any shift of x
    array([[ 0.3527],
           [-0.4409],
           [ 0.0882]])
    >>> g.grad_weight.round(4), g.grad_bias
    (array([-0.9258]), array([1.]))
    >>> y = reference_batch_norm(x, training=True, eps=0.0, relu=True).out
    >>> reference_batch_norm_backward(np.ones_like(x), x, None, fwd.mean, fwd.invstd,
    ...                               output=y).grad_addend
    array([[0.],
           [0.],
           [1.]])
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)
    if output is not None:
        g = np.where(np.asarray(output) <= 0, 0.0, g)
    axes = _channel_axes(x)
    invstd = _vector(save_invstd, x.shape[1], "save_invstd")
    xhat = (x - _per_channel(_vector(save_mean, x.shape[1], "save_mean"), x)) \
        * _per_channel(invstd, x)
    grad_bias = g.sum(axis=axes)
    grad_weight = (g * xhat).sum(axis=axes)
    scale = invstd if weight is None else invstd * _vector(weight, x.shape[1], "weight")
    grad_input = g
    if training:
        n = max(x.size // x.shape[1], 1)
        grad_input = g - _per_channel(grad_bias / n, x) - xhat * _per_channel(grad_weight / n, x)
    return BackwardReference(grad_input * _per_channel(scale, x), grad_weight, grad_bias, g)
