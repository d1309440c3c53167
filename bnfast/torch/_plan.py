"""Plans: an eager call's configuration, validated once, then run with no further check.

A :class:`Plan` holds what the checks of a call decide before its first
kernel, for every later call that looks the same: torch's argument errors,
the fallback rules, the core's checks (``bnfast._validation``) on NumPy
views of the parameters and buffers, the kernel layout of the input, the
coefficient cache of evaluation.  It keeps those views, so a call that
matches it runs on one ``Tensor.numpy()`` per tensor that changes between
calls (input, addend, grad_output) and one compiled call
(``bnfast._forward.forward``, ``bnfast._backward.backward``).

Its :attr:`~Plan.key` is everything those decisions read: the input's
shape, strides, dtype and device; training, eps and the ReLU; each
parameter and buffer's data pointer, dtype and shape.  A plan holds views of
the memory its key names, so that memory stays allocated (and the pointer
cannot name other memory) while the plan lives.  A module keeps its last
plan (:func:`lookup`) and builds a new one when the key changes; the
functional layer builds one per call.
"""
import numpy as np
import torch

from .. import _forward, _layout
from .. import backward as _backward_api
from .. import functional as _functional
from .._backward import backward as _backward
from .._validation import check_forward, check_input
from . import _buffers
from ._tensors import _BF16, as_numpy

__all__ = ["Plan", "key", "lookup", "ATTRIBUTE"]

#: Where a module keeps its plan (dropped from pickles and copies, see _modules).
ATTRIBUTE = "_bnfast_plan"
_STRIDED = torch.strided
_get_num_threads = torch.get_num_threads
_from_numpy = torch.from_numpy
_torch_empty_like = torch.empty_like
_buffers_empty = _buffers.empty
_np_empty = np.empty
_np_zeros = np.zeros
_U8 = np.uint8


def key(input, running_mean, running_var, weight, bias, training, eps, relu):
    """What a plan's decisions depend on (see the module docstring); None for an input
    that is not a strided CPU tensor (no plan: the per-call road decides)."""
    if input.layout is not _STRIDED or not input.is_cpu:
        return None
    return (input.shape, input.stride(), input.dtype, training, eps, relu,
            None if running_mean is None else (running_mean.data_ptr(), running_mean.dtype,
                                               running_mean.shape),
            None if running_var is None else (running_var.data_ptr(), running_var.dtype,
                                              running_var.shape),
            None if weight is None else (weight.data_ptr(), weight.dtype, weight.shape),
            None if bias is None else (bias.data_ptr(), bias.dtype, bias.shape))


def lookup(owner, plan_key):
    """``owner``'s plan if its key is ``plan_key``, else None."""
    plan = owner.__dict__.get(ATTRIBUTE)
    if plan is not None and plan.key == plan_key:
        return plan
    return None


def _bfloat16_view(tensor):
    return tensor.view(torch.int16).numpy().view(_BF16)


class Plan:
    """A validated call configuration (see the module docstring).

    Built from a call that passed the functional layer's gates (a strided CPU
    input of a dtype the kernels take, parameters and buffers that go with
    it, shapes torch accepts); raises what the core's checks raise.
    """

    __slots__ = ("key", "C", "layout", "direct", "view", "running_mean", "running_var",
                 "weight", "bias", "batch_stats", "update", "eps", "relu", "cache",
                 "mask_bytes", "stream", "pooled", "np_dtype", "vector_dtype")

    def __init__(self, plan_key, input, running_mean, running_var, weight, bias, training, eps,
                 relu, persistent):
        self.key = plan_key
        x = check_input(as_numpy(input.detach()))
        rm, rv, w, b, eps, _, _, _ = check_forward(
            x, *(None if v is None else as_numpy(v.detach())
                 for v in (running_mean, running_var, weight, bias)),
            training, eps, None, None, 1)
        self.C = x.shape[1]
        self.running_mean, self.running_var, self.weight, self.bias = rm, rv, w, b
        self.batch_stats, self.eps, self.relu = bool(training), eps, bool(relu)
        self.update = self.batch_stats and rm is not None
        layout = _layout.layout_of(x)
        # Direct: the input is in a kernel layout and the buffers are updated in place
        # (float32/float64, one dtype, contiguous).  Otherwise the core's layout step
        # (bnfast.functional.normalize, bnfast.backward._run) copies what it must.
        in_place = not self.update or _layout.updatable_pair(rm, rv)[0] is rm
        self.direct = layout is not None and in_place
        self.layout = _layout.copy_layout(x) if layout is None else layout
        self.view = _bfloat16_view if input.dtype is torch.bfloat16 else torch.Tensor.numpy
        # Evaluation coefficients reused while the buffers and parameters are bitwise
        # unchanged (a module's plan lives across calls; a one-call plan needs none).
        self.cache = (_forward.CoefficientCache() if persistent and not self.batch_stats
                      else None)
        self.mask_bytes = (x.size + 7) // 8
        self.stream = _backward_api.streams(x)
        self.np_dtype = x.dtype
        # Large outputs from the pool of warm buffers (_buffers), in x's memory order.
        self.pooled = layout is not None and x.nbytes >= _buffers.MIN_BYTES
        self.vector_dtype = input.dtype if weight is None else weight.dtype

    def _empty(self, input, x):
        """``(tensor, its ndarray view)``: a new output like ``input`` (strides and all)."""
        if self.pooled:
            return _buffers_empty(x, input.dtype)
        out = _torch_empty_like(input)
        return out, self.view(out)

    def forward(self, input, addend, momentum, want_stats, want_mask, x=None):
        """``(out, coef, bits)``: the output tensor; the (4, C) float64 table (mean,
        invstd, scale, shift) with ``want_stats``; the ReLU mask's bits (uint8) with
        ``want_mask`` (and ``relu``).  ``addend``: None or a CPU tensor of input's shape
        and dtype; ``momentum``: a float; ``x``: ``self.view(input)`` if the caller has
        it (one ``Tensor.numpy()`` is ~5 dispatcher calls)."""
        if x is None:
            x = self.view(input)
        a = None if addend is None else self.view(addend)
        out, y = self._empty(input, x)
        nt = _get_num_threads()
        if not self.direct:
            _, coef, mask, _ = _functional.normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                self.batch_stats, momentum, self.eps, a, self.relu, y, nt, want_stats,
                want_mask, None)
            return out, coef, None if mask is None else mask.bits
        if a is not None and a.strides != x.strides:
            a = _layout.to_layout(a, self.layout)
        coef = _np_empty((4, self.C)) if want_stats else None
        bits = _np_zeros(self.mask_bytes, _U8) if want_mask else None
        _forward.forward(x, self.layout, self.running_mean, self.running_var, self.weight,
                         self.bias, self.batch_stats, momentum, self.eps, a, self.relu, y, nt,
                         coef, bits, self.cache)
        return out, coef, bits

    def _vector(self, grad):
        """A kernel's (C,) gradient as a tensor of the parameters' dtype."""
        grad = _from_numpy(grad)
        return grad if grad.dtype is self.vector_dtype else grad.to(self.vector_dtype)

    def backward(self, grad, input, mean, invstd, bits, mask, x=None):
        """``(grad_input, grad_weight, grad_bias, grad_addend)`` of this plan's forward
        of ``input`` (``mean``, ``invstd`` and ``bits`` what it returned), None where
        ``mask`` (4 bools: input, weight, bias, addend) asks for none; ``x`` as in
        :meth:`forward`."""
        if x is None:
            x = self.view(input)
        try:
            dy = self.view(grad)
        except RuntimeError:  # a grad that requires grad (create_graph=True)
            dy = as_numpy(grad)
        want_x, want_w, want_b, want_a = mask
        gx = self._empty(input, x) if want_x else None
        ga = self._empty(input, x) if want_a else None
        nt = _get_num_threads()
        if not self.direct:
            relu = None if bits is None else _backward_api.ReluMask(bits, x.shape, self.layout)
            x, _ = _layout.in_kernel_layout(x)
            _, w, b, _ = _backward_api._run(x, dy, relu, self.weight, mean, invstd,
                                            self.batch_stats, mask, nt,
                                            None if gx is None else gx[1],
                                            None if ga is None else ga[1])
        else:
            if dy.strides != x.strides:  # x's shape and dtype: other strides, other layout
                dy = _layout.to_layout(dy, self.layout)
            w, b = _backward(x, dy, bits, mean, invstd, self.weight,
                             None if gx is None else gx[1], None if ga is None else ga[1],
                             want_w, want_b, self.layout, self.batch_stats, self.stream, nt)
        return (None if gx is None else gx[0], None if w is None else self._vector(w),
                None if b is None else self._vector(b), None if ga is None else ga[0])

