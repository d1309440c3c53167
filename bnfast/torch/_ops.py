"""bnfast's kernels as PyTorch custom operators (namespace ``bnfast``).

Four operators, each with a fake (meta) implementation for ``torch.compile``
and ``torch.export``; the two forwards have autograd formulas that call the
two backwards:

* ``bnfast::batch_norm(input, weight, bias, running_mean, running_var,
  training, momentum, eps) -> (out, save_mean, save_invstd, new_running_mean,
  new_running_var)``
* ``bnfast::fused_batch_norm(input, addend, weight, bias, running_mean,
  running_var, training, momentum, eps) -> (out, save_mean, save_invstd,
  relu_bits, new_running_mean, new_running_var)``: ``relu(bn(input) + addend)``
* ``bnfast::batch_norm_backward`` and ``bnfast::fused_batch_norm_backward``.

The forwards are *functional*: they return the updated running statistics
(``torch.empty(0)`` when none are updated) instead of writing the buffers,
and :mod:`bnfast.torch.functional` copies them back (``copy_``, which
compile and export see as the buffer mutation).  PyTorch refuses autograd
formulas on operators that declare mutated arguments
(``register_autograd``: "Cannot register autograd formula for non-functional
operator"); this is its own recipe, as ``aten::_native_batch_norm_legit_functional``.

Tensors are handed to the core as NumPy views (``Tensor.numpy()``): outputs
are allocated with the strides the fake promises (``empty_like``'s; large
ones from the pool of warm buffers, see ``_buffers``) and written by the
kernels in place.  ``save_mean``/``save_invstd`` are float64,
as the core computes them.  Threads: ``torch.get_num_threads()``.
"""
import torch

from .. import backward as _backward
from .. import functional as _functional
from .._validation import check_forward, check_input, check_momentum
from ._tensors import as_numpy, empty_like, kernel_layout

__all__ = ["batch_norm", "batch_norm_backward", "fused_batch_norm", "fused_batch_norm_backward"]

Tensor = torch.Tensor
_F64 = torch.float64


def _empty(like):
    """The placeholder for an output that is not computed (custom ops return tensors)."""
    return like.new_empty(0)


def forward_kernel(input, addend, weight, bias, running_mean, running_var, training, momentum,
                   eps, relu, in_place=False, want_stats=True):
    """The body of both forwards: one validation and one compiled call.

    Returns ``(out, save_mean, save_invstd, relu_bits, new_running_mean,
    new_running_var)``, None for what is not computed (statistics without
    ``want_stats``, bits without ``relu``).  The running buffers are updated
    in place with ``in_place`` (the new ones are then None), else in copies
    (the operators are functional).
    """
    out = empty_like(input)
    update = training and running_mean is not None and not in_place
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    x = check_input(as_numpy(input))
    momentum = check_momentum(momentum) if training else 0.0
    rm, rv, w, b, eps, a, y, nt = check_forward(
        x, as_numpy(running_mean), as_numpy(running_var), as_numpy(weight), as_numpy(bias),
        training, eps, as_numpy(addend), as_numpy(out), torch.get_num_threads())
    want_mask = relu and want_stats
    _, coef, mask, _ = _functional.normalize(x, rm, rv, w, b, training, momentum, eps, a, relu,
                                             y, nt, want_stats, want_mask, None)
    mean = invstd = bits = None
    if want_stats:
        # Outputs of an op may not share memory: invstd is copied out of the (4, C) table.
        mean, invstd = torch.from_numpy(coef[0]), torch.from_numpy(coef[1].copy())
    if want_mask:
        bits = torch.from_numpy(mask.bits)
    if not update:
        running_mean = running_var = None
    return out, mean, invstd, bits, running_mean, running_var


def _filled(outputs, input):
    """Operator outputs: an empty tensor for each None (an op returns tensors)."""
    return tuple(_empty(input) if t is None else t for t in outputs)


def _fake_forward(input, training, running_mean, running_var):
    C = input.shape[1]
    if training and running_mean is not None:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_mean, new_var = _empty(input), _empty(input)
    return (torch.empty_like(input), input.new_empty(C, dtype=_F64),
            input.new_empty(C, dtype=_F64), new_mean, new_var)


# -- bnfast::batch_norm -----------------------------------------------------------------
@torch.library.custom_op("bnfast::batch_norm", mutates_args=(), device_types="cpu")
def batch_norm(input: Tensor, weight: "Tensor | None", bias: "Tensor | None",
               running_mean: "Tensor | None", running_var: "Tensor | None", training: bool,
               momentum: float, eps: float) -> "tuple[Tensor, Tensor, Tensor, Tensor, Tensor]":
    """Batch normalization; returns
    (out, save_mean, save_invstd, new_running_mean, new_running_var)."""
    out, mean, invstd, _, new_mean, new_var = forward_kernel(
        input, None, weight, bias, running_mean, running_var, training, momentum, eps, False)
    return _filled((out, mean, invstd, new_mean, new_var), input)


@batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    return _fake_forward(input, training, running_mean, running_var)


# -- bnfast::fused_batch_norm -----------------------------------------------------------
@torch.library.custom_op("bnfast::fused_batch_norm", mutates_args=(), device_types="cpu")
def fused_batch_norm(input: Tensor, addend: "Tensor | None", weight: "Tensor | None",
                     bias: "Tensor | None", running_mean: "Tensor | None",
                     running_var: "Tensor | None", training: bool, momentum: float, eps: float
                     ) -> "tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]":
    """``relu(bn(input) + addend)``; returns (out, save_mean, save_invstd, relu_bits,
    new_running_mean, new_running_var): the ReLU's mask packed 1 bit per value."""
    return _filled(forward_kernel(input, addend, weight, bias, running_mean, running_var,
                                  training, momentum, eps, True), input)


@fused_batch_norm.register_fake
def _(input, addend, weight, bias, running_mean, running_var, training, momentum, eps):
    out, mean, invstd, new_mean, new_var = _fake_forward(input, training, running_mean,
                                                         running_var)
    bits = input.new_empty(((input.numel() + 7) // 8,), dtype=torch.uint8)
    return out, mean, invstd, bits, new_mean, new_var


# -- backwards --------------------------------------------------------------------------
def _vector_dtype(input, weight):
    """grad_weight's and grad_bias's dtype: the parameters' (float32 for reduced-precision
    input), as torch's."""
    return input.dtype if weight is None else weight.dtype


def _fake_grads(input, weight, mask):
    C = input.shape[1]
    vec = _vector_dtype(input, weight)
    return (torch.empty_like(input) if mask[0] else _empty(input),
            input.new_empty(C, dtype=vec) if mask[1] else _empty(input),
            input.new_empty(C, dtype=vec) if mask[2] else _empty(input))


def _vector(value, input, weight):
    """A core (C,) gradient (input's dtype) in the parameters' dtype, or None."""
    if value is None:
        return None
    grad = torch.from_numpy(value)
    dtype = _vector_dtype(input, weight)
    return grad if grad.dtype is dtype else grad.to(dtype)


def backward_kernel(grad_output, input, relu_bits, relu_layout, weight, save_mean, save_invstd,
                    training, eps, mask):
    """The body of both backwards (``relu_bits`` None: the plain one); ``mask``: 4 bools
    (input, weight, bias, addend).  Returns (gx, gw, gb, ga), None where not asked for."""
    gx = empty_like(input) if mask[0] else None
    ga = empty_like(input) if mask[3] else None
    args = (as_numpy(input), as_numpy(weight), as_numpy(save_mean), as_numpy(save_invstd),
            training, eps)
    out = as_numpy(gx) if mask[0] else None
    nt = torch.get_num_threads()
    if relu_bits is None:
        _, w, b = _backward.batch_norm_backward(as_numpy(grad_output), *args,
                                                output_mask=mask[:3], out=out, n_threads=nt)
    else:
        relu = _backward.ReluMask(as_numpy(relu_bits), tuple(input.shape), relu_layout)
        x, weight_np, mean, invstd, training, eps = args
        _, w, b, _ = _backward.fused_batch_norm_backward(
            as_numpy(grad_output), x, relu, weight_np, mean, invstd, training, eps,
            output_mask=mask, out=out, addend_out=as_numpy(ga) if mask[3] else None,
            n_threads=nt)
    return gx, _vector(w, input, weight), _vector(b, input, weight), ga


@torch.library.custom_op("bnfast::batch_norm_backward", mutates_args=(), device_types="cpu")
def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: "Tensor | None",
                        save_mean: Tensor, save_invstd: Tensor, training: bool, eps: float,
                        output_mask: "list[bool]") -> "tuple[Tensor, Tensor, Tensor]":
    """(grad_input, grad_weight, grad_bias) of ``bnfast::batch_norm``; an empty tensor
    for each gradient ``output_mask`` does not ask for."""
    mask = tuple(bool(m) for m in output_mask) + (False,)
    return _filled(backward_kernel(grad_output, input, None, 0, weight, save_mean, save_invstd,
                                   training, eps, mask)[:3], input)


@batch_norm_backward.register_fake
def _(grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask):
    return _fake_grads(input, weight, output_mask)


@torch.library.custom_op("bnfast::fused_batch_norm_backward", mutates_args=(),
                         device_types="cpu")
def fused_batch_norm_backward(grad_output: Tensor, input: Tensor, relu_bits: Tensor,
                              relu_layout: int, weight: "Tensor | None", save_mean: Tensor,
                              save_invstd: Tensor, training: bool, eps: float,
                              output_mask: "list[bool]"
                              ) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(grad_input, grad_weight, grad_bias, grad_addend) of ``bnfast::fused_batch_norm``.

    ``relu_bits`` is the forward's mask, in the memory order ``relu_layout``
    (``bnfast._layout.Layout``) of the forward's input."""
    return _filled(backward_kernel(grad_output, input, relu_bits, relu_layout, weight,
                                   save_mean, save_invstd, training, eps,
                                   tuple(bool(m) for m in output_mask)), input)


@fused_batch_norm_backward.register_fake
def _(grad_output, input, relu_bits, relu_layout, weight, save_mean, save_invstd, training, eps,
      output_mask):
    gx, gw, gb = _fake_grads(input, weight, output_mask)
    return gx, gw, gb, torch.empty_like(input) if output_mask[3] else _empty(input)


# -- autograd ---------------------------------------------------------------------------
def _setup(ctx, input, weight, outputs, training, eps, *more):
    ctx.mark_non_differentiable(*outputs[1:])
    ctx.save_for_backward(input, weight, outputs[1], outputs[2], *more)
    ctx.training = training
    ctx.eps = eps
    ctx.has_weight = weight is not None


def _setup_batch_norm(ctx, inputs, output):
    input, weight, bias, _, _, training, _, eps = inputs
    _setup(ctx, input, weight, output, training, eps)


def _backward_batch_norm(ctx, grad, *_):
    input, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2]]
    gx, gw, gb = torch.ops.bnfast.batch_norm_backward(grad, input, weight, mean, invstd,
                                                      ctx.training, ctx.eps, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None)


batch_norm.register_autograd(_backward_batch_norm, setup_context=_setup_batch_norm)


def _setup_fused(ctx, inputs, output):
    input, addend, weight, bias, _, _, training, _, eps = inputs
    _setup(ctx, input, weight, output, training, eps, output[3])
    ctx.relu_layout = int(kernel_layout(input))


def _backward_fused(ctx, grad, *_):
    input, weight, mean, invstd, bits = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[2], need[3], need[1]]
    gx, gw, gb, ga = torch.ops.bnfast.fused_batch_norm_backward(
        grad, input, bits, ctx.relu_layout, weight, mean, invstd, ctx.training,
        ctx.eps, mask)
    return (gx if mask[0] else None, ga if mask[3] else None, gw if mask[1] else None,
            gb if mask[2] else None, None, None, None, None, None)


fused_batch_norm.register_autograd(_backward_fused, setup_context=_setup_fused)
