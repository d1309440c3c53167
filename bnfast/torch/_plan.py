"""Plans: an eager call's configuration, validated once, then run with no further check.

A :class:`Plan` holds what the checks of a call decide before its first
kernel, for every later call that looks the same: torch's argument errors,
the fallback rules, the core's checks (``bnfast._validation``) on NumPy
views of the parameters and buffers, the kernel layout of the input, the
coefficient cache of evaluation.  It binds those to the compiled entries
(``bnfast._forward.BoundForward``, ``bnfast._backward.BoundBackward``), so a
call that matches it passes only addresses (``Tensor.data_ptr()``) of the
tensors that change between calls (input, addend, grad_output, the outputs
torch allocates): no NumPy array is made per call.  In a model every call
finds its caches cold (the layers in between evict them), and NumPy's
array and torch's ``Tensor.numpy()`` machinery then cost more than the
kernels of a small layer: a (16, 512, 4, 4) training layer took ~240 us in
a ResNet-18 step for ~100 us of kernels.

Its :attr:`~Plan.key` is everything those decisions read: the input's
shape, strides, dtype and device; training, eps and the ReLU; each
parameter and buffer's data pointer, dtype, shape and strides.  A plan holds views of
the memory its key names, so that memory stays allocated (and the pointer
cannot name other memory) while the plan lives.  A module keeps its last
plan (:func:`lookup`) and builds a new one when the key changes; the
functional layer builds one per call.

Inputs whose memory is in no kernel layout, and running buffers the
kernels cannot update in place, take the core's NumPy road instead
(``bnfast.functional.normalize``, ``bnfast.backward._run``), which copies
what it must.
"""
import torch

from .. import _forward, _layout
from .. import backward as _backward_api
from .. import functional as _functional
from .._backward import BoundBackward
from .._validation import check_channel_vector, check_eps, check_forward, check_input
from . import _buffers
from ._tensors import _BF16, as_numpy, keeps_strides, output_like

__all__ = ["Plan", "key", "lookup", "ATTRIBUTE"]

#: Where a module keeps its plan (dropped from pickles and copies, see _modules).
ATTRIBUTE = "_bnfast_plan"
_STRIDED = torch.strided
_UINT8 = torch.uint8
_get_num_threads = torch.get_num_threads
_from_numpy = torch.from_numpy
_torch_empty_like = torch.empty_like
_torch_empty_strided = torch.empty_strided
_is_neg = torch.Tensor.is_neg
# A zero tensor (torch._efficientzerotensor) has no memory: data_ptr() is 0.
_is_zero = getattr(torch.Tensor, "_is_zerotensor", lambda tensor: False)
_torch_zeros = torch.zeros
_torch_empty = torch.empty
_F64 = torch.float64
_buffers_empty = _buffers.empty
_buffers_empty_tensor = _buffers.empty_tensor


def key(input, running_mean, running_var, weight, bias, training, eps, relu):
    """What a plan's decisions depend on (see the module docstring); None for an input
    that is not a strided CPU tensor (no plan: the per-call road decides)."""
    if input.layout is not _STRIDED or not input.is_cpu:
        return None
    # A vector's strides too: the plan reads it through the view it was built with.
    return (input.shape, input.stride(), input.dtype, training, eps, relu,
            None if running_mean is None else (running_mean.data_ptr(), running_mean.dtype,
                                               running_mean.shape, running_mean.stride()),
            None if running_var is None else (running_var.data_ptr(), running_var.dtype,
                                              running_var.shape, running_var.stride()),
            None if weight is None else (weight.data_ptr(), weight.dtype, weight.shape,
                                         weight.stride()),
            None if bias is None else (bias.data_ptr(), bias.dtype, bias.shape, bias.stride()))


def lookup(owner, plan_key):
    """``owner``'s plan if its key is ``plan_key``, else None."""
    plan = owner.__dict__.get(ATTRIBUTE)
    if plan is not None and plan.key == plan_key:
        return plan
    return None


def _bfloat16_view(tensor):
    return tensor.view(torch.int16).numpy().view(_BF16)


def _address(tensor):
    return 0 if tensor is None else tensor.data_ptr()


def _resolved(tensor):
    """``tensor``, or its values where it is a lazy negation (``Tensor.is_neg()``: its
    memory holds the opposites, and ``Tensor.numpy()`` refuses it)."""
    return tensor.resolve_neg() if _is_neg(tensor) else tensor


def _geometry(tensor):
    """A NumPy view with ``tensor``'s shape, strides and dtype, for a plan's decisions:
    of its own memory, or of new memory where ``tensor`` is a lazy negation."""
    tensor = tensor.detach()
    if _is_neg(tensor):
        tensor = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
    return as_numpy(tensor)


class Plan:
    """A validated call configuration (see the module docstring).

    Built from a call that passed the functional layer's gates (a strided CPU
    input of a dtype the kernels take, parameters and buffers that go with
    it, shapes torch accepts); raises what the core's checks raise.

    Both roads return what the Function needs: :meth:`forward` gives
    ``(out, saved, bits)`` and :meth:`backward` takes them back; ``saved``
    is the forward's (4, C) float64 table (mean, invstd, scale, shift):
    ``bnfast._forward.SavedStats`` on the direct road, an ndarray on the
    NumPy road.
    """

    __slots__ = ("key", "C", "layout", "direct", "view", "running_mean", "running_var",
                 "weight", "bias", "batch_stats", "update", "eps", "relu", "cache",
                 "mask_bytes", "stream", "pooled", "vector_dtype", "strides",
                 "shape", "nbytes", "dtype", "vector_like", "bound_forward", "bound_backward")

    def __init__(self, plan_key, input, running_mean, running_var, weight, bias, training, eps,
                 relu, persistent, backward_only=False):
        # backward_only: a plan of the backward alone (torch.ops.bnfast's backwards, which
        # get no buffers, even in evaluation): no forward is bound.
        self.key = plan_key
        x = check_input(_geometry(input))
        if backward_only:  # what the backward checks (bnfast._validation.check_backward)
            rm = rv = b = None
            w = check_channel_vector(None if weight is None else as_numpy(weight.detach()),
                                     "weight", x.shape[1])
            eps = check_eps(eps, training)
        else:
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
        # Torch gives outputs its suggested memory format (contiguous unless channels_last):
        # the kernels write the input's layout, which for other dense strides (an (N, L, C)
        # tensor transposed to (N, C, L)) is not that.
        own_strides = keeps_strides(input)
        self.direct = layout is not None and in_place and own_strides
        self.layout = _layout.copy_layout(x) if layout is None else layout
        self.view = _bfloat16_view if input.dtype is torch.bfloat16 else torch.Tensor.numpy
        # Evaluation coefficients reused while the buffers and parameters are bitwise
        # unchanged (a module's plan lives across calls; a one-call plan needs none).
        self.cache = (_forward.CoefficientCache() if persistent and not self.batch_stats
                      else None)
        self.mask_bytes = (x.size + 7) // 8
        self.stream = _backward_api.streams(x)
        self.shape, self.strides, self.nbytes = input.shape, input.stride(), x.nbytes
        self.dtype = input.dtype
        # Large outputs from the pool of warm buffers (_buffers), in x's memory order.
        self.pooled = layout is not None and own_strides and x.nbytes >= _buffers.MIN_BYTES
        self.vector_dtype = input.dtype if weight is None else weight.dtype
        # Like the kernels' grad_weight and grad_bias: float64 for float64 data, else
        # float32 (empty_like of it: the factory the outputs' empty_like just warmed).
        self.vector_like = torch.empty(
            self.C, dtype=torch.float64 if input.dtype is torch.float64 else torch.float32)
        self.bound_forward = self.bound_backward = None
        if self.direct:  # x gives the geometry only: the compiled entries keep no input
            if not backward_only:
                self.bound_forward = _forward.BoundForward(
                    x, self.layout, rm, rv, w, b, self.batch_stats, eps, self.relu, self.cache)
            self.bound_backward = BoundBackward(x, w, self.layout, self.batch_stats)

    def _new(self, input):
        """A new output tensor like ``input`` (the plan's strides), of the direct road."""
        if self.pooled:
            return _buffers_empty_tensor(self.nbytes, self.shape, self.strides, self.dtype)
        return _torch_empty_like(input)

    def _planned(self, tensor):
        """``tensor`` (of the plan's shape) if its memory holds its values in the plan's
        strides and dtype, else a copy that does.  What the kernels read by address:
        an addend or gradient of other strides, an expanded gradient, a saved input
        that a saved-tensor hook gave back in other strides, a negative view, a zero
        tensor (no memory at all)."""
        if (tensor.stride() == self.strides and tensor.dtype is self.dtype
                and not _is_neg(tensor) and not _is_zero(tensor)):
            return tensor
        return _torch_empty_strided(self.shape, self.strides, dtype=self.dtype).copy_(tensor)

    def forward(self, input, addend, momentum, want_stats, want_mask):
        """``(out, saved, bits)``: the output tensor; the forward's statistics with
        ``want_stats`` (see the class docstring), else None; the ReLU mask's bits (a
        uint8 tensor) with ``want_mask`` (and ``relu``), else None.  ``addend``: None
        or a CPU tensor of input's shape and dtype; ``momentum``: a float."""
        if not self.direct:
            return self._numpy_forward(input, addend, momentum, want_stats, want_mask)
        x = self._planned(input)
        if addend is not None:
            addend = self._planned(addend)
        out = self._new(x)
        bits = _torch_zeros(self.mask_bytes, dtype=_UINT8) if want_mask else None
        saved = self.bound_forward.run(x.data_ptr(), _address(addend), out.data_ptr(),
                                       momentum, _get_num_threads(), want_stats,
                                       _address(bits))
        return out, saved, bits

    def backward(self, grad, input, saved, bits, mask):
        """``(grad_input, grad_weight, grad_bias, grad_addend)`` of this plan's forward
        of ``input`` (``saved`` and ``bits`` what it returned), None where ``mask``
        (4 bools: input, weight, bias, addend) asks for none."""
        if not self.direct:
            return self._numpy_backward(grad, input, saved, bits, mask)
        address = saved.address  # the table's rows 0 and 1: mean and invstd
        return self._backward(grad, input, address, address + 8 * self.C, bits, mask)

    def _backward(self, grad, input, mean, invstd, bits, mask):
        # The direct road, with the addresses of C float64 means and invstds.
        x, grad = self._planned(input), self._planned(grad)
        want_x, want_w, want_b, want_a = mask
        gx = self._new(x) if want_x else None
        ga = self._new(x) if want_a else None
        gw = _torch_empty_like(self.vector_like) if want_w else None
        gb = _torch_empty_like(self.vector_like) if want_b else None
        self.bound_backward.run(x.data_ptr(), grad.data_ptr(), _address(bits), mean, invstd,
                                _address(gx), _address(ga), _address(gw), _address(gb),
                                self.stream, _get_num_threads())
        return gx, self._vector(gw), self._vector(gb), ga

    # -- the functional forms of torch.ops.bnfast (direct plans only) --

    def functional_forward(self, input, addend, running_mean, running_var, momentum):
        """``(out, save_mean, save_invstd, bits, new_running_mean, new_running_var)``:
        :meth:`forward` without writing the running buffers (``running_mean`` and
        ``running_var``, the plan's own, are cloned and the clones updated: None
        where none are updated); ``bits`` None without ``relu``."""
        x = self._planned(input)
        if addend is not None:
            addend = self._planned(addend)
        out = self._new(x)
        table = _torch_empty((4, self.C), dtype=_F64)
        new_mean = new_var = None
        if self.update:  # the plan's buffers are contiguous, so are their clones
            new_mean, new_var = running_mean.clone(), running_var.clone()
        bits = None
        if self.relu:  # the mask and, last, the byte of its layout (see _ops)
            bits = _torch_zeros(self.mask_bytes + 1, dtype=_UINT8)
            bits[self.mask_bytes] = int(self.layout)
        self.bound_forward.run(x.data_ptr(), _address(addend), out.data_ptr(), momentum,
                               _get_num_threads(), False, _address(bits), table.data_ptr(),
                               _address(new_mean), _address(new_var))
        # Outputs of an operator may not share memory: invstd is copied out of the table.
        return out, table[0], table[1].clone(), bits, new_mean, new_var

    def functional_backward(self, grad, input, save_mean, save_invstd, bits, mask):
        """:meth:`backward` from the forward's ``save_mean`` and ``save_invstd``
        (C-contiguous float64 tensors of C values)."""
        return self._backward(grad, input, save_mean.data_ptr(), save_invstd.data_ptr(),
                              bits, mask)

    def _vector(self, grad):
        """A kernel's (C,) gradient (a tensor or None) in the parameters' dtype."""
        if grad is None or grad.dtype is self.vector_dtype:
            return grad
        return grad.to(self.vector_dtype)

    # -- the NumPy road: inputs in no kernel layout, buffers not updatable in place --

    def _numpy_empty(self, input, x):
        """``(tensor, its ndarray view)``: a new output for ``input``, in the memory format
        torch's batch norm would give it."""
        if self.pooled:
            return _buffers_empty(x, input.dtype)
        out = output_like(input)
        return out, self.view(out)

    def _numpy_forward(self, input, addend, momentum, want_stats, want_mask):
        x = self.view(_resolved(input))
        a = None if addend is None else self.view(_resolved(addend))
        out, y = self._numpy_empty(input, x)
        _, coef, mask, _ = _functional.normalize(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.batch_stats, momentum, self.eps, a, self.relu, y, _get_num_threads(),
            want_stats, want_mask, None)
        return out, coef, None if mask is None else _from_numpy(mask.bits)

    def _numpy_backward(self, grad, input, coef, bits, mask):
        x = self.view(_resolved(input))
        grad = _resolved(grad)
        try:
            dy = self.view(grad)
        except RuntimeError:  # a grad that requires grad (create_graph=True)
            dy = as_numpy(grad)
        want_x, want_w, want_b, want_a = mask
        gx = self._numpy_empty(input, x) if want_x else None
        ga = self._numpy_empty(input, x) if want_a else None
        relu = None if bits is None else _backward_api.ReluMask(bits.numpy(), x.shape,
                                                                self.layout)
        x, _ = _layout.in_kernel_layout(x)
        _, w, b, _ = _backward_api._run(x, dy, relu, self.weight, coef[0], coef[1],
                                        self.batch_stats, mask, _get_num_threads(),
                                        None if gx is None else gx[1],
                                        None if ga is None else ga[1])
        return (None if gx is None else gx[0],
                None if w is None else self._vector(_from_numpy(w)),
                None if b is None else self._vector(_from_numpy(b)),
                None if ga is None else ga[0])
