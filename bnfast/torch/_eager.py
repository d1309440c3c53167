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
autograd's version checks catch an in-place change before backward; the
fused op's ReLU mask bits too) and keeps the statistics (the plan's (4, C)
float64 table) and the plan on its context.

Private torch entries make this road cheap (the mode checks, the C entry of
``Function.apply``, the engine's call of the backward node, the version
counter); :func:`bind` takes each one this torch has and the public road
where it lacks one: no mode checks, no eager road (the custom operators);
``Function.apply`` and ``torch.autograd.graph.increment_version`` for the
others.
"""
import torch
from torch.autograd import profiler

from . import _second_order

__all__ = ["bind", "eager", "run"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_forward_ad = torch.autograd.forward_ad
_is_compiling = torch.compiler.is_compiling
#: torch.jit.trace (and the TorchScript ONNX exporter) records aten ops only: the
#: kernels' raw writes would be missing from its graph (the dispatched road falls back).
_is_jit_tracing = torch._C._is_tracing
_grad_enabled = torch.is_grad_enabled
_record_function = profiler.record_function
_FORWARD_LABELS = ("bnfast::batch_norm", "bnfast::fused_batch_norm")
_BACKWARD_LABELS = ("bnfast::batch_norm_backward", "bnfast::fused_batch_norm_backward")


def _false():
    return False


def _profiler_flag():
    # A module global read without a call into torch (torch.autograd._profiler_enabled: ~0.1 us).
    return profiler._is_profiler_enabled


# Set by bind() (see the module docstring).
_dispatch_stack = _function_mode = _peek_interpreter = _unwrap_if_dead = None
_modes_visible = False
_apply = _increment_version = _profiling = _batched = _false


def eager(input, addend, running_mean, running_var, weight, bias):
    """True when these tensors can be handed to the kernels without the dispatcher."""
    if (not _modes_visible or _is_compiling() or _dispatch_stack() or _function_mode()
            or _peek_interpreter() is not None or _forward_ad._current_level >= 0
            or _is_jit_tracing()):
        return False  # (forward-mode AD: the dispatched road falls back where tangents are)
    plain = _PLAIN
    return (type(input) in plain and (addend is None or type(addend) in plain)
            and (running_mean is None or type(running_mean) in plain)
            and (running_var is None or type(running_var) in plain)
            and (weight is None or type(weight) in plain)
            and (bias is None or type(bias) in plain))


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, addend, weight, bias, plan, momentum):
        if _profiling():  # a label where the dispatcher would record the op
            with _record_function(_FORWARD_LABELS[plan.relu]):
                out, stats, bits = plan.forward(input, addend, momentum, True, plan.relu)
        else:
            out, stats, bits = plan.forward(input, addend, momentum, True, plan.relu)
        if bits is None:
            ctx.save_for_backward(input, weight)
        else:  # a saved tensor: freed after backward, as the activations
            ctx.save_for_backward(input, weight, bits)
        ctx.plan, ctx.stats = plan, stats
        return out

    @staticmethod
    def backward(ctx, grad):
        # create_graph=True: gradients autograd can differentiate.  A batched grad
        # (is_grads_batched, jacobian(vectorize=True): a legacy batched tensor; or under
        # a functorch transform) has no memory the kernels could read: torch's ops take it.
        if _grad_enabled() or _batched(grad) or _peek_interpreter() is not None:
            return _backward_differentiable(ctx, grad)
        return _backward(ctx, grad)


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    plan = ctx.plan
    need = ctx.needs_input_grad
    mask = (need[0], need[2], need[3], need[1])
    bits = saved[2] if len(saved) == 3 else None
    if _profiling():
        with _record_function(_BACKWARD_LABELS[plan.relu]):
            gx, gw, gb, ga = plan.backward(grad, saved[0], ctx.stats, bits, mask)
    else:
        gx, gw, gb, ga = plan.backward(grad, saved[0], ctx.stats, bits, mask)
    return gx, ga, gw, gb, None, None


def _backward_differentiable(ctx, grad):
    # The kernels' gradients are constants to autograd: a second backward through them
    # would leave out the second-order terms (of the saved input and weight too, which
    # once_differentiable does not see).  Torch's ops give them (_second_order).
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw, gb, ga = _second_order.backward(
        ctx.plan, grad, saved[0], saved[1], saved[2] if len(saved) == 3 else None, ctx.stats,
        (need[0], need[2], need[3], need[1]))
    return gx, ga, gw, gb, None, None


_node_class = getattr(_BatchNormFunction, "_backward_cls", None)


def _node_apply(node, grad):
    """The backward node's ``apply`` (what the engine calls): the backward itself, without
    ``BackwardCFunction.apply``'s lookups (no vjp, no boxed gradients here)."""
    return _BatchNormFunction.backward(node, grad)


def _no_storage(tensor):
    # Without the private check: a tensor whose storage cannot be reached (batched).
    try:
        tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return True
    return False


def _public_increment_version(tensors):
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)


def _private(owner, name):
    """``owner.name``, or None where this torch has no such entry (tests hide some)."""
    return getattr(owner, name, None)


def bind():
    """Take torch's private entries where this torch has them, else the public roads.

    Called once at import; again by tests that hide an entry (``_private``).
    """
    global _dispatch_stack, _function_mode, _peek_interpreter, _modes_visible
    global _apply, _unwrap_if_dead, _increment_version, _profiling, _batched
    C = torch._C
    functorch = _private(C, "_functorch")
    _batched = _private(functorch, "is_legacy_batchedtensor") or _no_storage
    _dispatch_stack = _private(C, "_len_torch_dispatch_stack")
    _function_mode = _private(C, "_is_torch_function_mode_enabled")
    _peek_interpreter = _private(functorch, "peek_interpreter_stack")
    # Without all three the eager road cannot tell a mode from none: the custom ops only.
    _modes_visible = None not in (_dispatch_stack, _function_mode, _peek_interpreter)
    # Function.apply without its Python layers (no setup_context to bind defaults for; no
    # functorch transform active, as eager() checked): dead functorch wrappers unwrapped as
    # it would, then the C entry.
    c_apply = _private(_private(C, "_FunctionBase"), "apply")
    _unwrap_if_dead = _private(functorch, "unwrap_if_dead")
    if c_apply is None or _unwrap_if_dead is None:
        _apply, _unwrap_if_dead = _BatchNormFunction.apply, None
    else:
        _apply = super(torch.autograd.Function, _BatchNormFunction).apply
    # torch.autograd.graph.increment_version's body, for a tuple.
    _increment_version = _private(C, "_increment_version") or _public_increment_version
    _profiling = (_profiler_flag if _private(profiler, "_is_profiler_enabled") is not None
                  else torch.autograd._profiler_enabled)
    # The engine calls a Python node's `apply`; torch's (BackwardCFunction.apply) looks up
    # backward, vjp and boxed_grads_call first (_get_user_fn): none of which this has.
    node_base = torch.autograd.function.BackwardCFunction
    if (_node_class is not None and _private(_node_class, "_forward_cls") is _BatchNormFunction
            and _private(node_base, "_get_user_fn") is not None):
        _node_class.apply = _node_apply
    elif _node_class is not None and "apply" in vars(_node_class):
        del _node_class.apply  # back to torch's


bind()


def run(plan, input, addend, running_mean, running_var, weight, bias, momentum):
    """The output of ``plan`` on these tensors (autograd when one requires grad); the
    running buffers updated in place."""
    if _grad_enabled() and (input.requires_grad
                            or (addend is not None and addend.requires_grad)
                            or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        unwrap = _unwrap_if_dead
        if unwrap is None:  # the public Function.apply unwraps
            out = _apply(input, addend, weight, bias, plan, momentum)
        else:
            out = _apply(unwrap(input), None if addend is None else unwrap(addend),
                         None if weight is None else unwrap(weight),
                         None if bias is None else unwrap(bias), plan, momentum)
    elif _profiling():
        with _record_function(_FORWARD_LABELS[plan.relu]):
            out = plan.forward(input, addend, momentum, False, False)[0]
    else:
        out = plan.forward(input, addend, momentum, False, False)[0]
    if plan.update:
        # Written by the kernels, not by a torch op: tell autograd, as an in-place op would.
        _increment_version((running_mean, running_var))
    return out
