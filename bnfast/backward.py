"""Backward pass of Batch Normalization, mirroring ``torch.ops.aten.native_batch_norm_backward``.

Every call reaches the compiled entry ``bnfast._backward.backward`` by one
road: validate once (the checks live in ``_validation``), lay the arrays out
(``_run``), one compiled call.  A module's backward validates only what its
caller passes and trusts what its own forward saved.  The forward hands over what the backward
needs without recomputing it: ``batch_norm(..., return_stats=True)`` returns
``(out, save_mean, save_invstd)``.
"""
import contextlib
import threading

import numpy as np

from . import _backward, _layout
from ._threads import resolve_threads
from ._validation import (
    check_backward,
    check_distinct_outputs,
    check_input,
    check_out,
    check_relu_mask,
    check_same_shape,
)

# grad_input is written with non-temporal stores (bypassing the caches) from this
# size of input up: pass 2 then saves the read-for-ownership of every line.  4 MiB
# (twice a core's L2): 4096x512 float32 backward 829 -> 763 us, 8x64x56x56 597 ->
# 529 (2 threads; was 16 MiB).  Half data too since the flat and 32-value streamed
# leaves (two threads, 4 against 16 MiB, paired: 32x2048x7x7 float16 0.84,
# bfloat16 0.86; 8x128x56x56 float16 0.78; 4096x1024 bfloat16 0.83).
STREAM_BYTES = 1 << 22

__all__ = [
    "ReluMask",
    "batch_norm_backward",
    "fused_batch_norm_backward",
    "is_grad_enabled",
    "no_grad",
    "relu_mask",
]


def streams(x):
    """Whether the backward of ``x`` (a kernel-layout array) stores grad_input with
    non-temporal stores (also asked by bnfast.torch's plans)."""
    return x.nbytes >= STREAM_BYTES


class _GradState(threading.local):
    # A class default, so a thread that never entered no_grad reads it without
    # the AttributeError that getattr(local, name, default) raises inside (0.6 us).
    enabled = True


_grad_state = _GradState()

@contextlib.contextmanager
def no_grad():
    """Context manager: module forwards inside it save nothing for backward.

    Like ``torch.no_grad()`` for inference: a module's forward then keeps no
    reference to its input and a fused module skips packing its ReLU mask.
    ``m.backward`` after such a forward raises RuntimeError.  Thread-local.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> m = bnfast.BatchNorm1d(2).eval()
    >>> with bnfast.no_grad():
    ...     y = m(np.ones((3, 2), np.float32))
    """
    previous = is_grad_enabled()
    _grad_state.enabled = False
    try:
        yield
    finally:
        _grad_state.enabled = previous


def is_grad_enabled():
    """False inside :func:`no_grad` (in this thread), True otherwise."""
    return _grad_state.enabled


class ReluMask:
    """Where a fused forward's ReLU let the gradient through, packed 8 values per byte.

    Made by :func:`relu_mask`; 1/32 of the memory of a float32 copy of the
    output.  Bit ``i`` (little bit order) belongs to the ``i``-th value of the
    output in its memory order (``layout``: ``"channels_first"`` or
    ``"channels_last"``, see ``bnfast._layout``).

    Attributes
    ----------
    bits : ndarray of uint8, shape (ceil(size / 8),)
    shape : tuple
        The output's shape.
    layout : str
    """

    __slots__ = ("bits", "shape", "layout")

    def __init__(self, bits, shape, layout):
        self.bits = bits
        self.shape = tuple(shape)
        try:  # "channels_first"/"channels_last" or a _layout.Layout
            self.layout = _layout.Layout(layout)
        except ValueError:  # kept as given: the backward that reads it says what is wrong
            self.layout = layout

    @property
    def nbytes(self):
        return self.bits.nbytes

    def to_array(self):
        """The mask as a bool array of the output's shape (True: gradient passes)."""
        size = int(np.prod(self.shape))
        flat = np.unpackbits(self.bits, count=size, bitorder="little").view(np.bool_)
        return _from_kernel_order(flat, self.shape, self.layout)

    def __repr__(self):
        return f"ReluMask(shape={self.shape}, layout={str(self.layout)!r}, nbytes={self.nbytes})"


def relu_mask(output, *, n_threads=None):
    """Pack ``not (output <= 0)`` into a :class:`ReluMask` (one parallel read of ``output``).

    That is where ``relu`` passes its input's gradient, as torch's
    ``threshold_backward`` decides it (a NaN output passes it too).

    Parameters
    ----------
    output : array_like, shape (N, C, *spatial)
        The output of :func:`bnfast.fused_batch_norm` (or of ``batch_norm``
        with ``relu=True``).
    n_threads : int, optional
        OpenMP threads (see :func:`bnfast.batch_norm`).

    Returns
    -------
    ReluMask

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bnfast.relu_mask(np.array([[1.0, 0.0], [-2.0, 3.0]])).to_array()
    array([[ True, False],
           [False,  True]])
    """
    y = check_input(output, "output")
    nt = resolve_threads(n_threads)
    return _pack_mask(y, nt)


def _pack_mask(y, nt, layout=None):
    """The ReluMask of a validated ``y``, its bits in ``layout``'s memory order
    (by default ``y``'s own kernel layout; else ``y`` is copied into it first)."""
    if layout is None:
        layout = _layout.kernel_layout(y)
    y = _layout.to_layout(y, layout)
    bits = np.empty((y.size + 7) // 8, dtype=np.uint8)
    _backward.pack_positive(y, bits, nt)
    return ReluMask(bits, y.shape, layout)


def _from_kernel_order(flat, shape, layout):
    """A flat array in ``layout``'s memory order, as an array of the logical ``shape``."""
    n, c = shape[0], shape[1]
    if layout == _layout.FIRST:
        if len(shape) == 2:
            return flat.reshape(c, n).T
        return flat.reshape(shape)
    return flat.reshape((n,) + tuple(shape[2:]) + (c,)).transpose(_layout._from_last(len(shape)))


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=True,
                        eps=1e-5, *, output_mask=(True, True, True), out=None, n_threads=None):
    """Gradients of :func:`bnfast.batch_norm`, as ``torch.ops.aten.native_batch_norm_backward``.

    With ``a = save_invstd * weight`` per channel, ``sum_dy = sum(grad_output)``
    and ``sum_xdy = sum((input - save_mean) * grad_output)`` over all axes but 1,
    and ``n`` values per channel:

    * training: ``grad_input = (grad_output - sum_dy/n - (input - save_mean)
      * save_invstd**2 * sum_xdy/n) * a``
    * evaluation: ``grad_input = grad_output * a``
    * ``grad_weight = sum_xdy * save_invstd``, ``grad_bias = sum_dy``.

    Parameters
    ----------
    grad_output : array_like, shape (N, C, *spatial)
        Gradient of the loss with respect to the forward's output; input's dtype.
    input : array_like, shape (N, C, *spatial)
        The forward's input (float32, float64, float16 or bfloat16).
    weight : array_like of shape (C,) or None
        The forward's weight (gamma); None means ones.
    save_mean, save_invstd : array_like of shape (C,)
        From ``batch_norm(..., return_stats=True)``: in training the batch mean
        and ``1/sqrt(var + eps)``; in evaluation the running mean and
        ``1/sqrt(running_var + eps)``.
    training : bool
        Whether the forward normalised with batch statistics (then the
        gradient flows through the mean and variance too).
    eps : float
        Validated for parity with torch's signature; ``save_invstd`` already
        includes it.
    output_mask : sequence of 3 bools
        Which of ``(grad_input, grad_weight, grad_bias)`` to compute; the
        others are returned as None.  In training, ``grad_input`` needs the
        reduction pass anyway; without it only that pass runs.
    out : ndarray, optional
        Where to write grad_input (input's shape and dtype): saves allocating
        (and page-faulting) a new array.  May be ``grad_output`` or ``input``
        itself (in place).
    n_threads : int, optional
        OpenMP threads; results do not depend on it.

    Returns
    -------
    grad_input : ndarray or None
        Input's shape and dtype, and its memory layout (channels-last in,
        channels-last out).
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Computed in float64, rounded once to float32 (float64 for float64
        input) and returned in torch's dtype: the weight's (float32 in torch's
        mixed rule: half input, float32 weight), or without a weight the
        input's.

    Raises
    ------
    TypeError
        Non-float arrays, or grad_output's (or out's) dtype differs from input's.
    ValueError
        Shapes that do not match input's, a missing save_mean/save_invstd, a
        malformed output_mask, or a read-only out.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, mean, invstd = bnfast.batch_norm(x, None, None, training=True, return_stats=True)
    >>> gx, gw, gb = bnfast.batch_norm_backward(np.ones_like(x), x, None, mean, invstd)
    >>> gx
    array([[0., 0.],
           [0., 0.]])
    >>> gb
    array([2., 2.])
    """
    x, dy, weight, mean, invstd, training, mask = check_backward(
        grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask, 3)
    nt = resolve_threads(n_threads)
    if out is not None:
        out = check_out(out, x)
    gx, gw, gb, _ = _run(x, dy, None, weight, mean, invstd, training, mask + (False,), nt,
                         out, None)
    return gx, _in_param_dtype(gw, weight, x), _in_param_dtype(gb, weight, x)


def fused_batch_norm_backward(grad_output, input, output, weight, save_mean, save_invstd,
                              training=True, eps=1e-5, *, output_mask=(True, True, True, True),
                              out=None, addend_out=None, n_threads=None):
    """Gradients of :func:`bnfast.fused_batch_norm`: ``y = relu(batch_norm(input) + addend)``.

    The ReLU's mask ``m = not (y <= 0)`` (torch's ``threshold_backward``)
    gates ``grad_output`` on the fly: ``g = where(m, grad_output, 0)`` is the
    addend's gradient, and :func:`batch_norm_backward` of ``g`` gives the rest.
    Two passes over the data in training, one in evaluation; ``g`` is never
    materialised unless asked for.

    Parameters
    ----------
    grad_output, input, weight, save_mean, save_invstd, training, eps, n_threads
        As in :func:`batch_norm_backward`.
    output : ndarray or ReluMask
        The fused forward's output ``y`` (input's shape), or ``relu_mask(y)``
        (keep that instead of ``y`` to save memory: 1 bit per value).
    output_mask : sequence of 4 bools
        Which of ``(grad_input, grad_weight, grad_bias, grad_addend)`` to compute.
    out : ndarray, optional
        Where to write grad_input, as in :func:`batch_norm_backward`.
    addend_out : ndarray, optional
        Where to write grad_addend; may be ``grad_output`` itself.

    Returns
    -------
    grad_input, grad_weight, grad_bias : ndarray or None
        As in :func:`batch_norm_backward`.
    grad_addend : ndarray or None
        ``where(m, grad_output, 0)``, input's shape, dtype and memory layout.

    Raises
    ------
    TypeError, ValueError
        As in :func:`batch_norm_backward`; also an ``output`` whose shape or
        dtype differs from input's.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> a = np.array([[0.5, -5.0], [0.5, 5.0]])  # the residual
    >>> y, mean, invstd = bnfast.fused_batch_norm(x, None, None, addend=a, training=True,
    ...                                           return_stats=True)
    >>> gx, gw, gb, ga = bnfast.fused_batch_norm_backward(np.ones_like(x), x, y, None,
    ...                                                   mean, invstd)
    >>> ga
    array([[0., 0.],
           [1., 1.]])
    """
    x, dy, weight, mean, invstd, training, mask = check_backward(
        grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask, 4)
    nt = resolve_threads(n_threads)
    if out is not None:
        out = check_out(out, x)
    if addend_out is not None:
        addend_out = check_out(addend_out, x, "addend_out")
    check_distinct_outputs(out, addend_out)
    if isinstance(output, ReluMask):
        check_relu_mask(output, x)
        relu = output
        if not relu.bits.flags.c_contiguous:
            relu = ReluMask(np.ascontiguousarray(relu.bits), relu.shape, relu.layout)
    else:
        y = check_same_shape(output, "output", x)
        relu = _pack_mask(y, nt, _layout.kernel_layout(x))
    gx, gw, gb, g = _run(x, dy, relu, weight, mean, invstd, training, mask, nt, out, addend_out)
    return gx, _in_param_dtype(gw, weight, x), _in_param_dtype(gb, weight, x), g


def _in_param_dtype(grad, weight, x):
    """A parameter's gradient in torch's dtype: the weight's, or without one the input's
    (the kernel's is float32 for float32 and half data, float64 for float64)."""
    dtype = x.dtype if weight is None else weight.dtype
    return grad if grad is None or grad.dtype == dtype else grad.astype(dtype)


def _run(x, dy, relu, weight, mean, invstd, training, mask, nt, out, addend_out):
    """One backward on validated arguments: lay them out, then one compiled call.

    Nothing is checked here: the public functions validate, and a module's
    backward passes what its own forward saved (only ``grad_output`` and
    ``out`` are its caller's, and it validates those).  The contract:

    * ``x`` a float32/float64 ndarray of shape (N, C, ...); ``dy`` one of x's
      shape and dtype (any strides: copied into x's kernel layout if needed);
    * ``relu`` None (plain backward) or a well-formed ReluMask of x's shape;
    * ``weight`` None or, like ``mean`` and ``invstd``, a (C,) float32/float64
      ndarray of any stride;
    * ``mask`` = (input, weight, bias, addend) gradients wanted, 4 bools;
    * ``nt`` a positive int; ``out``/``addend_out`` None or writable ndarrays
      of x's shape and dtype that do not share memory with each other.

    Returns ``(grad_input, grad_weight, grad_bias, grad_addend)``, None for
    what was not wanted.
    """
    want_dx, want_w, want_b, want_g = mask
    want_g = want_g and relu is not None
    x_given, dy_given = x, dy
    x, layout = _layout.in_kernel_layout(x)
    if dy.strides != x.strides:  # same shape and dtype: same strides, same layout
        dy = _layout.to_layout(dy, layout)
    bits = None
    if relu is not None:
        if relu.layout != layout:  # rare: the forward wrote into an out= of another layout
            relu = _relayout(relu, layout)
        bits = relu.bits

    # grad_input is written in pass 2, elementwise after reading x and dy at the
    # same index: it may be either of them.  g is written in pass 1 and read in
    # pass 2 (with x): it may only be grad_output itself.
    if out is None:  # the common case: x is in layout, empty_like keeps its memory order
        dx = dx_t = _layout.empty_like_aligned(x) if want_dx else None
    else:
        dx, dx_t = _target(out, x, layout, want_dx, same_ok=(x_given, dy_given), avoid=())
    g, g_t = _target(addend_out, x, layout, want_g, same_ok=(dy_given,), avoid=(x_given, dx_t))
    gw, gb = _backward.backward(x, dy, bits, mean, invstd, weight, dx_t, g_t, want_w, want_b,
                                layout, training, streams(x), nt)
    if dx is not dx_t:
        np.copyto(dx, dx_t)
    if g is not g_t:
        np.copyto(g, g_t)
    return dx, gw, gb, g


def _relayout(relu, layout):
    """``relu`` with its bits in ``layout``'s memory order (one documented copy)."""
    passed = _layout.to_layout(relu.to_array(), layout)
    flat = _layout.kernel_view(passed, layout).reshape(-1)
    return ReluMask(np.packbits(flat, bitorder="little"), relu.shape, layout)


def _target(out, x, layout, wanted, same_ok, avoid):
    """``(array returned, array the kernel writes)`` for a validated ``out`` (see
    ``_layout.write_target``), or ``(None, None)`` when not wanted."""
    if not wanted:
        return None, None
    return _layout.write_target(out, x, layout, same_ok, avoid)
