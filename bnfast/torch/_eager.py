"""Eager calls: the operators' kernels under a plain ``torch.autograd.Function``.

A ``torch.library.custom_op`` call goes through the dispatcher and torch's
generic Python autograd wrapper (argument defaults filled, a keyset
redispatch, a generated Function); on (1, 512, 7, 7) that costs ~100 us per
forward + backward, more than the kernels.  In plain eager mode (no
compile/export tracing, no dispatch or function mode, no functorch
transform, plain tensors) the functional layer calls the same kernel bodies
(:func:`._ops.forward_kernel`, :func:`._ops.backward_kernel`) through these
Functions instead, and updates the running buffers in place.  Everything
else (tracing, fake tensors, subclasses) goes through ``torch.ops.bnfast``.
"""
import contextlib

import torch
from torch.autograd import profiler

from ._ops import backward_kernel, forward_kernel
from ._tensors import kernel_layout

__all__ = ["eager", "batch_norm", "fused_batch_norm"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_C = torch._C
_functorch = torch._C._functorch


def eager(input, *tensors):
    """True when these tensors can be handed to the kernels without the dispatcher."""
    if (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack()
            or _C._is_torch_function_mode_enabled()
            or _functorch.peek_interpreter_stack() is not None
            or type(input) not in _PLAIN):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _profiled(name):
    """A profiler label where the dispatcher would have recorded the op (only while a
    profiler runs: a record_function costs microseconds)."""
    if profiler._is_profiler_enabled:
        return profiler.record_function(name)
    return contextlib.nullcontext()


def _bump(running_mean, running_var):
    # Written through NumPy views: tell autograd, as an in-place torch op would.
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        with _profiled("bnfast::batch_norm"):
            out, mean, invstd, _, _, _ = forward_kernel(input, None, weight, bias, running_mean,
                                                        running_var, training, momentum, eps,
                                                        False, True)
        if training and running_mean is not None:
            _bump(running_mean, running_var)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2], False)
        with _profiled("bnfast::batch_norm_backward"):
            gx, gw, gb, _ = backward_kernel(grad, input, None, 0, weight, mean, invstd,
                                            ctx.training, ctx.eps, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None)


class _FusedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, addend, weight, bias, running_mean, running_var, training, momentum,
                eps):
        with _profiled("bnfast::fused_batch_norm"):
            out, mean, invstd, bits, _, _ = forward_kernel(input, addend, weight, bias,
                                                           running_mean, running_var, training,
                                                           momentum, eps, True, True)
        if training and running_mean is not None:
            _bump(running_mean, running_var)
        ctx.save_for_backward(input, weight, mean, invstd, bits)
        ctx.training, ctx.eps = training, eps
        ctx.relu_layout = int(kernel_layout(input))
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, mean, invstd, bits = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[2], need[3], need[1])
        with _profiled("bnfast::fused_batch_norm_backward"):
            gx, gw, gb, ga = backward_kernel(grad, input, bits, ctx.relu_layout, weight, mean,
                                             invstd, ctx.training, ctx.eps, mask)
        return (gx if mask[0] else None, ga if mask[3] else None, gw if mask[1] else None,
                gb if mask[2] else None, None, None, None, None, None)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """``bnfast::batch_norm``'s output, the running buffers updated in place."""
    if _needs_grad(input, weight, bias):
        return _BatchNorm.apply(input, weight, bias, running_mean, running_var, training,
                                momentum, eps)
    with _profiled("bnfast::batch_norm"):
        out = forward_kernel(input, None, weight, bias, running_mean, running_var, training,
                             momentum, eps, False, True, False)[0]
    if training and running_mean is not None:
        _bump(running_mean, running_var)
    return out


def fused_batch_norm(input, addend, weight, bias, running_mean, running_var, training,
                     momentum, eps):
    """``bnfast::fused_batch_norm``'s output, the running buffers updated in place."""
    if _needs_grad(input, addend, weight, bias):
        return _FusedBatchNorm.apply(input, addend, weight, bias, running_mean, running_var,
                                     training, momentum, eps)
    with _profiled("bnfast::fused_batch_norm"):
        out = forward_kernel(input, addend, weight, bias, running_mean, running_var, training,
                             momentum, eps, True, True, False)[0]
    if training and running_mean is not None:
        _bump(running_mean, running_var)
    return out
