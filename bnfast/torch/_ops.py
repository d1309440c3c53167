"""bnfast's kernels as PyTorch custom operators (namespace ``bnfast``).

Four operators, each with a fake (meta) implementation for ``torch.compile``
and ``torch.export``; the two forwards have autograd formulas that call the
two backwards:

* ``bnfast::batch_norm(input, weight, bias, running_mean, running_var,
  training, momentum, eps) -> (out, save_mean, save_invstd, new_running_mean,
  new_running_var)``
* ``bnfast::fused_batch_norm(input, addend, weight, bias, running_mean,
  running_var, training, momentum, eps) -> (out, save_mean, save_invstd,
  relu_bits, new_running_mean, new_running_var)``: ``relu(bn(input) + addend)``;
  ``relu_bits`` is the ReLU's mask, one bit per value in the memory order the
  kernels read ``input`` in, and one more byte naming that order
  (``bnfast._layout.Layout``): the backward reads it there, since under
  ``torch.compile`` the layout at run time is inductor's choice, not the traced one
* ``bnfast::batch_norm_backward`` and ``bnfast::fused_batch_norm_backward``.

The forwards are *functional*: they return the updated running statistics
(``torch.empty(0)`` when none are updated) instead of writing the buffers,
and :mod:`bnfast.torch.functional` copies them back (``copy_``, which
compile and export see as the buffer mutation).  PyTorch refuses autograd
formulas on operators that declare mutated arguments
(``register_autograd``: "Cannot register autograd formula for non-functional
operator"); this is its own recipe, as ``aten::_native_batch_norm_legit_functional``.

The kernels are run through plans (:mod:`._plan`), as in eager mode: a
plan's checks are made once per configuration (input geometry, the
parameters' and buffers' memory, mode) and kept in a small table
(:func:`_plan_for`), so a call passes only addresses.  The four operators
are tagged ``flexible_layout``: inductor hands them its own layout (a
channels_last activation where it made the convolutions channels_last) and
does not reorder it for them; the kernels take both layouts in place.
Configurations a plan cannot run in place (inputs in no kernel layout,
running buffers of mixed dtypes) take the core's NumPy road
(``Tensor.numpy()`` views, copying what it must).

Outputs are allocated with the strides the fake promises (torch's batch
norm's: ``_tensors.output_like``; large ones from the pool of warm buffers,
see ``_buffers``) and written by the kernels in place.
``save_mean``/``save_invstd`` are float64, as the core computes them.
Threads: ``torch.get_num_threads()``.
"""
import threading

import torch

from .. import backward as _backward
from .. import functional as _functional
from .._layout import Layout
from .._validation import check_forward, check_input, check_momentum
from . import _plan
from ._tensors import as_numpy, empty_like, output_like

__all__ = ["batch_norm", "batch_norm_backward", "fused_batch_norm", "fused_batch_norm_backward"]

Tensor = torch.Tensor
_F64 = torch.float64
_LAYOUT = (torch.Tag.flexible_layout,)
_LAYOUTS = frozenset(int(layout) for layout in Layout)


def _empty(like):
    """The placeholder for an output that is not computed (custom ops return tensors)."""
    return like.new_empty(0)


# -- plans -------------------------------------------------------------------------------
#: Plans of the operators' calls, by configuration; the oldest dropped beyond _MAX_PLANS
#: (two per BatchNorm layer of a compiled model: forward and backward).
_plans: "dict[tuple, _plan.Plan]" = {}
_MAX_PLANS = 1024
_plans_lock = threading.Lock()


def _owns_its_memory(vector):
    """Whether ``vector`` is (about) all of its storage.  A plan holds views of its
    vectors, so a kept plan of a vector carved from a larger buffer (flat
    parameters) would keep the whole buffer alive."""
    return vector is None or vector.untyped_storage().nbytes() <= vector.nbytes + 64


def _keep(plan_key, plan, vectors):
    if not all(_owns_its_memory(v) for v in vectors):
        return
    with _plans_lock:  # an eviction by two threads at once would drop one key twice
        while len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]
        _plans[plan_key] = plan


def _plan_for(input, running_mean, running_var, weight, bias, training, eps, relu,
              backward_only=False):
    """The direct plan of this configuration (kept for the next call like it), or None
    where the core's NumPy road runs it.  Raises what the core's checks raise."""
    plan_key = _plan.key(input, running_mean, running_var, weight, bias, training, eps, relu)
    if plan_key is None:
        return None
    plan_key = (plan_key, backward_only)
    plan = _plans.get(plan_key)
    if plan is None:
        plan = _plan.Plan(plan_key, input, running_mean, running_var, weight, bias, training,
                          eps, relu, True, backward_only)
        _keep(plan_key, plan, (running_mean, running_var, weight, bias))
    return plan if plan.direct else None


def forward_kernel(input, addend, weight, bias, running_mean, running_var, training, momentum,
                   eps, relu):
    """The body of both forwards.

    Returns ``(out, save_mean, save_invstd, relu_bits, new_running_mean,
    new_running_var)``, None for what is not computed (bits without ``relu``,
    running statistics where none are updated).  The running buffers are not
    written: the updated statistics are copies (the operators are functional).
    """
    momentum = check_momentum(momentum) if training else 0.0
    if addend is None or (addend.shape == input.shape and addend.dtype is input.dtype):
        plan = _plan_for(input, running_mean, running_var, weight, bias, training, eps, relu)
        if plan is not None:
            return plan.functional_forward(input, addend, running_mean, running_var, momentum)
    return _numpy_forward(input, addend, weight, bias, running_mean, running_var, training,
                          momentum, eps, relu)


def _numpy_forward(input, addend, weight, bias, running_mean, running_var, training, momentum,
                   eps, relu):
    # forward_kernel on the core's NumPy road: one validation and one compiled call.
    out = empty_like(input)
    update = training and running_mean is not None
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    x = check_input(as_numpy(input))
    rm, rv, w, b, eps, a, y, nt = check_forward(
        x, as_numpy(running_mean), as_numpy(running_var), as_numpy(weight), as_numpy(bias),
        training, eps, as_numpy(addend), as_numpy(out), torch.get_num_threads())
    _, coef, mask, _ = _functional.normalize(x, rm, rv, w, b, training, momentum, eps, a, relu,
                                             y, nt, True, relu, None)
    # Outputs of an op may not share memory: invstd is copied out of the (4, C) table.
    mean, invstd = torch.from_numpy(coef[0]), torch.from_numpy(coef[1].copy())
    bits = _with_layout(torch.from_numpy(mask.bits), mask.layout) if relu else None
    if not update:
        running_mean = running_var = None
    return out, mean, invstd, bits, running_mean, running_var


def _with_layout(bits, layout):
    """``relu_bits``: the mask's bytes and the byte of its layout."""
    return torch.cat((bits, torch.tensor([int(layout)], dtype=torch.uint8)))


def _mask_layout(relu_bits, input):
    """The layout byte of the forward's ``relu_bits`` (checked against ``input``)."""
    size = (input.numel() + 7) // 8 + 1
    if (relu_bits.dtype is not torch.uint8 or relu_bits.shape != (size,)
            or not relu_bits.is_contiguous()):
        contiguous = "" if relu_bits.is_contiguous() else " (not contiguous)"
        raise ValueError(f"relu_bits must be the forward's: a contiguous uint8 tensor of shape "
                         f"({size},) for input of shape {tuple(input.shape)}, got "
                         f"{relu_bits.dtype} of shape {tuple(relu_bits.shape)}{contiguous}")
    layout = int(relu_bits[-1])
    if layout not in _LAYOUTS:
        raise ValueError(f"relu_bits must be the forward's: its last byte names a layout "
                         f"({sorted(_LAYOUTS)}), got {layout}")
    return layout


def _filled(outputs, input):
    """Operator outputs: an empty tensor for each None (an op returns tensors)."""
    return tuple(_empty(input) if t is None else t for t in outputs)


def _fake_forward(input, training, running_mean, running_var):
    C = input.shape[1]
    if training and running_mean is not None:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_mean, new_var = _empty(input), _empty(input)
    return (output_like(input), input.new_empty(C, dtype=_F64),
            input.new_empty(C, dtype=_F64), new_mean, new_var)


# -- bnfast::batch_norm -----------------------------------------------------------------
@torch.library.custom_op("bnfast::batch_norm", mutates_args=(), device_types="cpu",
                         tags=_LAYOUT)
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
@torch.library.custom_op("bnfast::fused_batch_norm", mutates_args=(), device_types="cpu",
                         tags=_LAYOUT)
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
    bits = input.new_empty(((input.numel() + 7) // 8 + 1,), dtype=torch.uint8)
    return out, mean, invstd, bits, new_mean, new_var


# -- backwards --------------------------------------------------------------------------
def _vector_dtype(input, weight):
    """grad_weight's and grad_bias's dtype: the parameters' (float32 for reduced-precision
    input), as torch's."""
    return input.dtype if weight is None else weight.dtype


def _fake_grads(input, weight, mask):
    C = input.shape[1]
    vec = _vector_dtype(input, weight)
    return (output_like(input) if mask[0] else _empty(input),
            input.new_empty(C, dtype=vec) if mask[1] else _empty(input),
            input.new_empty(C, dtype=vec) if mask[2] else _empty(input))


def _vector(value, input, weight):
    """A core (C,) gradient (input's dtype) in the parameters' dtype, or None."""
    if value is None:
        return None
    grad = torch.from_numpy(value)
    dtype = _vector_dtype(input, weight)
    return grad if grad.dtype is dtype else grad.to(dtype)


def _saved_vector(vector, C):
    """``save_mean``/``save_invstd`` as the plans read them (C contiguous float64
    values), or None where the core's checks must see it."""
    if vector.shape != (C,) or not vector.is_floating_point():
        return None
    if vector.dtype is not _F64 or vector.stride() != (1,):
        return vector.to(_F64).contiguous()
    return vector


def backward_kernel(grad_output, input, relu_bits, weight, save_mean, save_invstd, training,
                    eps, mask):
    """The body of both backwards (``relu_bits`` None: the plain one); ``mask``: 4 bools
    (input, weight, bias, addend).  Returns (gx, gw, gb, ga), None where not asked for."""
    relu = relu_bits is not None
    relu_layout = _mask_layout(relu_bits, input) if relu else None
    if (grad_output.shape == input.shape and grad_output.dtype is input.dtype
            and input.dim() >= 2):
        # The backward reads neither the buffers nor the bias: a plan without them.
        plan = _plan_for(input, None, None, weight, None, training, eps, relu, True)
        C = input.shape[1]
        mean, invstd = _saved_vector(save_mean, C), _saved_vector(save_invstd, C)
        if (plan is not None and mean is not None and invstd is not None
                and (not relu or relu_layout == plan.layout)):
            return plan.functional_backward(grad_output, input, mean, invstd, relu_bits, mask)
    return _numpy_backward(grad_output, input, relu_bits, relu_layout, weight, save_mean,
                           save_invstd, training, eps, mask)


def _numpy_backward(grad_output, input, relu_bits, relu_layout, weight, save_mean, save_invstd,
                    training, eps, mask):
    # backward_kernel on the core's NumPy road (it checks what the plans do not).
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
        relu = _backward.ReluMask(as_numpy(relu_bits)[:-1], tuple(input.shape), relu_layout)
        x, weight_np, mean, invstd, training, eps = args
        _, w, b, _ = _backward.fused_batch_norm_backward(
            as_numpy(grad_output), x, relu, weight_np, mean, invstd, training, eps,
            output_mask=mask, out=out, addend_out=as_numpy(ga) if mask[3] else None,
            n_threads=nt)
    return gx, _vector(w, input, weight), _vector(b, input, weight), ga


@torch.library.custom_op("bnfast::batch_norm_backward", mutates_args=(), device_types="cpu",
                         tags=_LAYOUT)
def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: "Tensor | None",
                        save_mean: Tensor, save_invstd: Tensor, training: bool, eps: float,
                        output_mask: "list[bool]") -> "tuple[Tensor, Tensor, Tensor]":
    """(grad_input, grad_weight, grad_bias) of ``bnfast::batch_norm``; an empty tensor
    for each gradient ``output_mask`` does not ask for."""
    mask = tuple(bool(m) for m in output_mask) + (False,)
    return _filled(backward_kernel(grad_output, input, None, weight, save_mean, save_invstd,
                                   training, eps, mask)[:3], input)


@batch_norm_backward.register_fake
def _(grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask):
    return _fake_grads(input, weight, output_mask)


@torch.library.custom_op("bnfast::fused_batch_norm_backward", mutates_args=(),
                         device_types="cpu", tags=_LAYOUT)
def fused_batch_norm_backward(grad_output: Tensor, input: Tensor, relu_bits: Tensor,
                              weight: "Tensor | None", save_mean: Tensor, save_invstd: Tensor,
                              training: bool, eps: float, output_mask: "list[bool]"
                              ) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(grad_input, grad_weight, grad_bias, grad_addend) of ``bnfast::fused_batch_norm``.

    ``relu_bits`` is the forward's mask of this very ``input`` (its last byte names its
    memory order; its size is checked, but it holds no shape: a mask of another input of
    as many values would pass)."""
    return _filled(backward_kernel(grad_output, input, relu_bits, weight, save_mean,
                                   save_invstd, training, eps,
                                   tuple(bool(m) for m in output_mask)), input)


@fused_batch_norm_backward.register_fake
def _(grad_output, input, relu_bits, weight, save_mean, save_invstd, training, eps, output_mask):
    gx, gw, gb = _fake_grads(input, weight, output_mask)
    return gx, gw, gb, output_like(input) if output_mask[3] else _empty(input)


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


def _backward_fused(ctx, grad, *_):
    input, weight, mean, invstd, bits = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[2], need[3], need[1]]
    gx, gw, gb, ga = torch.ops.bnfast.fused_batch_norm_backward(
        grad, input, bits, weight, mean, invstd, ctx.training, ctx.eps, mask)
    return (gx if mask[0] else None, ga if mask[3] else None, gw if mask[1] else None,
            gb if mask[2] else None, None, None, None, None, None)


fused_batch_norm.register_autograd(_backward_fused, setup_context=_setup_fused)
