"""The backward under ``create_graph=True``: torch's differentiable ops instead of the kernels.

bnfast's kernels return gradients autograd cannot differentiate.  With
``create_graph=True`` (a gradient penalty, a Hessian-vector product) the
gradients must be functions of ``grad_output``, the input and the weight that
autograd can differentiate again, with the same second-order terms as
torch's BatchNorm: in training through ``aten.native_batch_norm_backward``
(whose derivative, torch's ``batchnorm_double_backward``, treats the batch
statistics as functions of the input), in evaluation through the affine map's
own gradient (its statistics are constants).  The forward's statistics come
from its saved table, the fused ReLU's mask from its saved bits.  First-order
values agree with the kernels' to rounding; this road is only taken where a
graph of the backward is asked for.
"""
import torch

from ..backward import ReluMask

__all__ = ["backward"]


def backward(plan, grad, input, weight, bits, stats, mask):
    """``(grad_input, grad_weight, grad_bias, grad_addend)`` of ``plan``'s forward of
    ``input`` (its saved ``stats`` and ReLU ``bits``), as the kernels give them, None
    where ``mask`` (input, weight, bias, addend) asks for none; differentiable."""
    want_x, want_w, want_b, want_a = mask
    if bits is not None:  # the fused ReLU: the gradient passes where the output was > 0
        passes = ReluMask(bits.numpy(), tuple(input.shape), plan.layout).to_array()
        grad = grad * torch.from_numpy(passes)
    table = stats.table() if hasattr(stats, "table") else stats  # SavedStats or ndarray
    # torch's statistics dtype: float64 for float64 data, else float32.
    dtype = torch.float64 if input.dtype is torch.float64 else torch.float32
    mean, invstd = (torch.from_numpy(table[i]).to(dtype) for i in (0, 1))
    want = [want_x, want_w and weight is not None, want_b]
    if plan.batch_stats:
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, input, weight, None, None, mean, invstd, True, plan.eps, want)
    else:
        gx, gw, gb = _affine_backward(grad, input, weight, mean, invstd, want)
    return (gx if want_x else None, plan._vector(gw) if want[1] else None,
            plan._vector(gb) if want_b else None, grad if want_a else None)


def _affine_backward(grad, input, weight, mean, invstd, want):
    # Evaluation: y = (x - mean) * invstd * weight + bias, mean and invstd constant.
    shape = (1, -1) + (1,) * (input.dim() - 2)
    axes = [0] + list(range(2, input.dim()))
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    wide = grad.to(invstd.dtype)
    gx = (wide * scale.reshape(shape)).to(input.dtype) if want[0] else None
    gw = gb = None
    if want[1]:
        normalized = (input.to(invstd.dtype) - mean.reshape(shape)) * invstd.reshape(shape)
        gw = (wide * normalized).sum(axes)
    if want[2]:
        gb = wide.sum(axes)
    return gx, gw, gb
