"""Eager calls: a :class:`._plan.Plan` run under a plain ``torch.autograd.Function``.

A ``torch.library.custom_op`` call goes through the dispatcher and torch's
generic Python autograd wrapper (argument defaults filled, a keyset
redispatch, a generated Function); on (1, 512, 7, 7) that costs ~100 us per
forward + backward, more than the kernels.  In plain eager mode (no
compile/export tracing, no dispatch or function mode, no functorch
transform, plain tensors: :func:`eager`) the functional layer runs a plan
under this Function instead, and updates the running buffers in place.
Everything else (tracing, fake tensors, subclasses) goes through
``torch.ops.bnfast``.

The Function saves what torch's own batch norm saves (input and weight:
autograd's version checks catch an in-place change before backward) and
keeps the statistics (a (4, C) float64 table) and the plan on its context.
"""
import torch
from torch.autograd import profiler

__all__ = ["eager", "run"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch.is_grad_enabled
_increment_version = torch._C._increment_version  # torch.autograd.graph.increment_version's
_from_numpy = torch.from_numpy


def eager(input, addend, running_mean, running_var, weight, bias):
    """True when these tensors can be handed to the kernels without the dispatcher."""
    if _is_compiling() or _dispatch_stack() or _function_mode() or _peek_interpreter() is not None:
        return False
    plain = _PLAIN
    return (type(input) in plain and (addend is None or type(addend) in plain)
            and (running_mean is None or type(running_mean) in plain)
            and (running_var is None or type(running_var) in plain)
            and (weight is None or type(weight) in plain)
            and (bias is None or type(bias) in plain))


def _forward(plan, input, addend, momentum, want_stats, want_mask):
    if profiler._is_profiler_enabled:  # a label where the dispatcher would record the op
        name = "bnfast::fused_batch_norm" if plan.relu else "bnfast::batch_norm"
        with profiler.record_function(name):
            return plan.forward(input, addend, momentum, want_stats, want_mask)
    return plan.forward(input, addend, momentum, want_stats, want_mask)


def _backward(plan, grad, input, coef, bits, mask):
    if profiler._is_profiler_enabled:
        name = ("bnfast::fused_batch_norm_backward" if plan.relu
                else "bnfast::batch_norm_backward")
        with profiler.record_function(name):
            return plan.backward(grad, input, coef[0], coef[1], bits, mask)
    return plan.backward(grad, input, coef[0], coef[1], bits, mask)


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, addend, weight, bias, plan, momentum):
        out, coef, bits = _forward(plan, input, addend, momentum, True, plan.relu)
        if bits is None:
            ctx.save_for_backward(input, weight)
        else:  # a saved tensor: freed after backward, as the activations
            ctx.save_for_backward(input, weight, _from_numpy(bits))
        ctx.plan, ctx.coef = plan, coef
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        bits = saved[2].numpy() if len(saved) == 3 else None
        need = ctx.needs_input_grad
        gx, gw, gb, ga = _backward(ctx.plan, grad, saved[0], ctx.coef, bits,
                                   (need[0], need[2], need[3], need[1]))
        return gx, ga, gw, gb, None, None


# Function.apply without its Python layers (no setup_context to bind defaults for; no
# functorch transform active, as eager() checked): dead functorch wrappers unwrapped as
# it would, then the C entry.
_apply = super(torch.autograd.Function, _BatchNormFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _unwrapped(tensor):
    return None if tensor is None else _unwrap_if_dead(tensor)


def run(plan, input, addend, running_mean, running_var, weight, bias, momentum):
    """The output of ``plan`` on these tensors (autograd when one requires grad); the
    running buffers updated in place."""
    if _grad_enabled() and (input.requires_grad
                            or (addend is not None and addend.requires_grad)
                            or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        out = _apply(_unwrap_if_dead(input), _unwrapped(addend), _unwrapped(weight),
                     _unwrapped(bias), plan, momentum)
    else:
        out = _forward(plan, input, addend, momentum, False, False)[0]
    if plan.update:
        # Written through NumPy views: tell autograd, as an in-place torch op would.
        _increment_version((running_mean, running_var))
    return out
