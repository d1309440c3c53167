"""FusedBatchNorm1d/2d/3d: ``relu(BN(x) + addend)`` in one pass, as OneFlow defines it.

Same constructor, buffers, state_dict keys and train/eval behaviour as
:class:`bnfast.BatchNorm2d` & co. (a fused module loads a plain one's state dict
and vice versa).  No CPU peer fuses this epilogue: PyTorch needs three passes
(``relu_(batch_norm(x).add_(addend))``) and oneDNN rejects BN+add+ReLU on CPU.
"""
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["FusedBatchNorm1d", "FusedBatchNorm2d", "FusedBatchNorm3d"]


def is_fused(module):
    """Whether ``module`` is a FusedBatchNormXd: relu(bn(x) + addend), no affine map."""
    return isinstance(module, _FusedMixin)


class _FusedMixin:
    def forward(self, input, addend=None, *, out=None):
        """Return ``relu(batch_norm(input) + addend)`` (``addend`` optional, input's shape).

        ``out`` may be ``input`` or ``addend`` itself (in place).
        """
        return self._forward(input, addend, True, out)

    def backward(self, grad_output, *, out=None, retain_graph=False):
        """Gradients of the last forward: ``(grad_input, grad_addend)``.

        ``grad_addend`` is ``grad_output`` where the ReLU passed it, 0
        elsewhere (None if that forward had no addend).  The forward keeps its
        ReLU mask packed 1 bit per value (not a copy of its output), and a
        reference to its input.  Otherwise as :meth:`bnfast.BatchNorm2d.backward`:
        parameter gradients accumulate into ``weight_grad``/``bias_grad``.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> m = bnfast.FusedBatchNorm1d(2, dtype=np.float64)
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> y = m(x, addend=np.full_like(x, 0.5))
        >>> gx, ga = m.backward(np.ones_like(y))
        >>> ga
        array([[0., 0.],
               [1., 1.]])
        """
        return self._backward(grad_output, retain_graph, out)


class FusedBatchNorm1d(_FusedMixin, BatchNorm1d):
    """``relu(BatchNorm1d(x) + addend)`` over (N, C) or (N, C, L) input, fused.

    Parameters are those of :class:`bnfast.BatchNorm1d`.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> m = bnfast.FusedBatchNorm1d(2)
    >>> x = np.array([[1., 2.], [3., 4.]], dtype=np.float32)
    >>> m(x, addend=np.zeros_like(x))
    array([[0.      , 0.      ],
           [0.999995, 0.999995]], dtype=float32)
    """


class FusedBatchNorm2d(_FusedMixin, BatchNorm2d):
    """``relu(BatchNorm2d(x) + addend)`` over (N, C, H, W) input, fused (ResNet's residual tail).

    Parameters are those of :class:`bnfast.BatchNorm1d`.
    """


class FusedBatchNorm3d(_FusedMixin, BatchNorm3d):
    """``relu(BatchNorm3d(x) + addend)`` over (N, C, D, H, W) input, fused.

    Parameters are those of :class:`bnfast.BatchNorm1d`.
    """
