"""Torch tensors as the NumPy arrays bnfast's core takes, without copying.

The dtypes of the drop-in are one table (:data:`DTYPES`): a torch dtype whose
NumPy counterpart the core accepts.  float16 and bfloat16 join it as soon as
the core supports them (bfloat16 has no ``Tensor.numpy()``: its bits are
viewed as int16 and reinterpreted as ``ml_dtypes.bfloat16``).
"""
import math

import numpy as np
import torch

from .._dtypes import is_supported
from .._layout import Layout
from . import _buffers


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


# torch dtype -> NumPy dtype (or None where NumPy has none); filtered below by the core.
_CANDIDATES = (
    (torch.float32, np.dtype(np.float32)),
    (torch.float64, np.dtype(np.float64)),
    (torch.float16, np.dtype(np.float16)),
    (torch.bfloat16, _bfloat16()),
)

#: The torch dtypes bnfast's kernels take (the rest falls back to torch).
DTYPES = tuple(t for t, n in _CANDIDATES if n is not None and is_supported(n))

# Reduced-precision inputs take float32 parameters and buffers, as torch's CPU kernels do.
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_BF16 = dict(_CANDIDATES)[torch.bfloat16]


def as_numpy(tensor):
    """A NumPy view of a CPU tensor (same memory, same strides), or None for None."""
    if tensor is None:
        return None
    try:  # the common case first: this runs for every tensor of every call
        return tensor.numpy()
    except (RuntimeError, TypeError):
        pass
    # A tensor that requires grad while grad mode is on, or one NumPy has no dtype for.
    tensor = tensor.detach()
    if tensor.dtype is torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BF16)
    return tensor.numpy()


def from_numpy(array):
    """``torch.from_numpy(array)`` (same memory), bfloat16 arrays too (as_numpy's inverse:
    torch takes their bits as int16 and reinterprets them)."""
    if _BF16 is not None and array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


_DENSE_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _suggest_memory_format(tensor):
    # C++'s Tensor::suggest_memory_format (torch's own Python copy where it has one).
    if tensor.dim() in _DENSE_FORMATS and tensor.is_contiguous(
            memory_format=_DENSE_FORMATS[tensor.dim()]) and not tensor.is_contiguous():
        return _DENSE_FORMATS[tensor.dim()]
    return torch.contiguous_format


try:
    from torch._prims_common import suggest_memory_format
except ImportError:  # a torch without it: exact channels-last strides only
    suggest_memory_format = _suggest_memory_format


def keeps_strides(tensor):
    """Whether :func:`output_like` has ``tensor``'s own strides (up to those of size-1
    dimensions): contiguous or exactly channels_last(_3d) input.  Cheaper than making it."""
    return tensor.is_contiguous() or (tensor.dim() in _DENSE_FORMATS and tensor.is_contiguous(
        memory_format=_DENSE_FORMATS[tensor.dim()]))


def output_like(tensor):
    """A new tensor of ``tensor``'s shape and dtype in the memory format torch's batch
    norm gives its outputs (``Tensor::suggest_memory_format()``: channels_last(_3d) for
    such input, else contiguous, whatever other strides the input has)."""
    return torch.empty_like(tensor, memory_format=suggest_memory_format(tensor))


def empty_like(tensor):
    """:func:`output_like` (the input's own strides for a contiguous or channels-last
    tensor), large ones from the pool of warm buffers (:mod:`._buffers`)."""
    if tensor.dtype in DTYPES and tensor.nbytes >= _buffers.MIN_BYTES and (
            tensor.is_contiguous() or tensor.dim() in _DENSE_FORMATS
            and tensor.is_contiguous(memory_format=_DENSE_FORMATS[tensor.dim()])):
        return _buffers.empty_tensor(tensor.nbytes, tensor.shape, tensor.stride(), tensor.dtype)
    return output_like(tensor)


def vector_dtype_ok(vector, input_dtype):
    """A (C,) parameter or buffer dtype the kernels take with ``input_dtype``."""
    return vector is None or vector.dtype is input_dtype or (
        vector.dtype is torch.float32 and input_dtype in _LOW_PRECISION)


def kernel_layout(tensor):
    """The layout the core processes ``tensor`` in (``bnfast._layout.kernel_layout``,
    decided from torch strides, so that it also works on fake tensors)."""
    n, c = tensor.shape[0], tensor.shape[1]
    spatial = math.prod(tensor.shape[2:])
    if tensor.is_contiguous():  # one value per (sample, channel), or empty: rows
        return Layout.CHANNELS_LAST if tensor.numel() == n * c else Layout.CHANNELS_FIRST
    ndim = tensor.dim()
    if ndim > 2 and tensor.permute(0, *range(2, ndim), 1).is_contiguous():
        return Layout.CHANNELS_LAST
    if ndim == 2 and tensor.t().is_contiguous():
        return Layout.CHANNELS_FIRST
    # Copied by the core, into this layout.
    return Layout.CHANNELS_LAST if spatial == 1 else Layout.CHANNELS_FIRST
