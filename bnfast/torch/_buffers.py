"""Warm memory for the drop-in's large outputs: a pool of buffers that come back.

Every large tensor from torch's CPU allocator (glibc's ``malloc``) may arrive
as fresh pages, which the kernel zeroes on first touch: one more write pass
over the output before the batch norm writes it, and often the larger part
of the call (a 32x2048x7x7 forward + backward through autograd: ~3,100 page
faults, ~1.3 ms, against ~2.3 ms of kernels).  Which call pays depends on
the heap's history (glibc returns the top of its heap to the system past a
threshold, and maps large blocks afresh), so a layer's time swung with what
ran before it.

The outputs of :class:`._plan.Plan` (forward output, grad_input,
grad_addend) and of the ``torch.ops.bnfast`` operators (``_tensors.empty_like``)
of :data:`MIN_BYTES` and more come from here instead.  The pool
keeps every buffer it hands out; a buffer is free again once no array or
tensor uses it, which its reference count tells: a tensor made by
``torch.from_numpy`` holds a reference to its array until its storage dies
(its views, autograd's saved tensors and NumPy views included), and NumPy
views refer to the array that owns the memory.  A call takes a free buffer
of exactly its size, else a new one: the pool holds, per size, the most
buffers that were in use at one time, which a training loop needs again at
its next step's peak, and at most :data:`CAP_BYTES` in all (a new buffer that
would pass it first lets the free ones of every size go, else it is not kept).
:func:`empty_cache` lets the free ones go; :func:`pooled_bytes` tells what the
pool holds.

A lock makes finding a free buffer and claiming it (an array on it) one
step, so that two threads never take the same buffer.
"""
import os
import sys
import threading

import numpy as np
import torch

__all__ = ["CAP_BYTES", "MIN_BYTES", "empty", "empty_cache", "empty_tensor", "pooled_bytes"]

#: Outputs from this size on come from the pool.  Below it glibc serves them from its
#: heap's free lists, last freed first: memory often still in the caches, where the
#: pool's buffer was last written a layer or more ago (ResNet-18 eval, batch 16, the
#: BatchNorms below 4 MiB: 3.8 ms a step with the pool from 256 KiB, 2.9 ms from 4 MiB).
MIN_BYTES = 1 << 22
#: The pool keeps no more buffers once it holds this much.
CAP_BYTES = 1 << 30
_ALIGN = 64  # a cache line: the kernels' vector steps and streaming stores

# size in bytes -> the pool's buffers of that size: 64-byte aligned uint8 views of
# exactly that many bytes, each of an array of its own (its ``base``) that owns the
# memory.  Every array made on a buffer (np.ndarray(buffer=...), NumPy views) refers
# to that owner, so the owner's reference count says whether a buffer is in use.
_buffers: "dict[int, list[np.ndarray]]" = {}
_pooled = 0
_getrefcount = sys.getrefcount
_ndarray = np.ndarray
_U8 = np.dtype(np.uint8)
_lock = threading.Lock()


def _new_lock_in_child():
    # A fork while another thread held the lock would leave the child's copy held.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _owner_refs(buffer):
    """The reference count of the array that owns ``buffer``'s memory."""
    return _getrefcount(buffer.base)


# A free buffer's owner's count: the buffer's ``base`` alone, plus what getrefcount
# counts of its own argument -- probed, not assumed (Python 3.14 borrows some
# references that earlier versions counted).
_FREE = _owner_refs(np.empty(1, np.uint8)[:])


def _release_free():
    """Drop the free buffers (the caller holds ``_lock``); the bytes let go."""
    global _pooled
    released = 0
    for size, bucket in list(_buffers.items()):
        kept = [buffer for buffer in bucket if _owner_refs(buffer) > _FREE]
        released += sum(b.base.nbytes for b in bucket) - sum(b.base.nbytes for b in kept)
        if kept:
            _buffers[size] = kept
        else:
            del _buffers[size]
    _pooled -= released
    return released


def _take(nbytes):
    """``nbytes`` of pooled memory (see ``_buffers``) that nothing else uses, or new
    memory: a uint8 array whose life keeps the buffer in use."""
    global _pooled
    with _lock:  # the check and the claim as one step (a thread switch between them
        # could hand one buffer to two callers)
        for buffer in _buffers.get(nbytes, ()):
            if _owner_refs(buffer) == _FREE:
                return _ndarray(buffer.shape, _U8, buffer)  # refers to the owner
        raw = np.empty(nbytes + _ALIGN, _U8)  # NumPy asks for huge pages from 4 MiB
        start = -raw.ctypes.data % _ALIGN
        buffer = raw[start:start + nbytes]
        if _pooled + raw.nbytes > CAP_BYTES:  # free buffers of other sizes go first
            _release_free()
        if _pooled + raw.nbytes <= CAP_BYTES:
            _buffers.setdefault(nbytes, []).append(buffer)
            _pooled += raw.nbytes
        return _ndarray(buffer.shape, _U8, buffer)


def empty(x, dtype):
    """``(tensor, array)``: memory from the pool shaped as the kernel-layout array
    ``x`` (its shape and strides), as a tensor of torch dtype ``dtype`` and as the
    NumPy view of ``x``'s dtype that the kernels write.  For ``x.nbytes`` of
    :data:`MIN_BYTES` and more (callers take smaller ones from torch).

    Neither is a torch view (autograd lets in-place ops write the tensor).

    Examples
    --------
    >>> x = np.zeros((1024, 1024), np.float32)  # 4 MiB
    >>> out, y = empty(x, torch.float32)
    >>> out.shape, y.strides == x.strides, y.ctypes.data == out.data_ptr()
    (torch.Size([1024, 1024]), True, True)
    """
    memory = _take(x.nbytes)
    return (_tensor_on(memory, x.shape, [s // x.itemsize for s in x.strides], dtype),
            _ndarray(x.shape, x.dtype, memory, 0, x.strides))


def empty_tensor(nbytes, shape, strides, dtype):
    """A tensor of ``shape``, ``strides`` (in elements) and torch ``dtype`` on pooled
    memory of ``nbytes`` (the bytes that shape and strides span densely), with no
    NumPy view: the outputs of ``bnfast.torch``'s plans, which pass addresses.

    Not a torch view (autograd lets in-place ops write the tensor).

    Examples
    --------
    >>> out = empty_tensor(4 << 20, (1024, 1024), (1, 1024), torch.float32)
    >>> out.shape, out.stride(), out.data_ptr() % 64
    (torch.Size([1024, 1024]), (1, 1024), 0)
    """
    return _tensor_on(_take(nbytes), shape, strides, dtype)


def _tensor_on(memory, shape, strides, dtype):
    """A tensor of torch ``dtype`` (any, bfloat16 too: torch has no NumPy dtype for
    it) on the pooled uint8 array ``memory``, whose storage keeps the array alive
    (and so the buffer in use); not a view."""
    return torch.empty((), dtype=dtype).set_(
        torch.from_numpy(memory).untyped_storage(), 0, shape, strides)


def pooled_bytes():
    """The bytes the pool of large outputs holds, and those of them no tensor uses.

    Returns
    -------
    (int, int)
        ``(held, free)``.

    Examples
    --------
    >>> import bnfast.torch
    >>> held, free = bnfast.torch.pooled_bytes()
    >>> 0 <= free <= held
    True
    """
    with _lock:
        free = sum(buffer.base.nbytes for bucket in _buffers.values() for buffer in bucket
                   if _owner_refs(buffer) == _FREE)
        return _pooled, free


def empty_cache():
    """Let go of the pool's free buffers (their memory returns to the allocator).

    Buffers in use stay pooled; they come back when their tensors die.

    Returns
    -------
    int
        The bytes let go.

    Examples
    --------
    >>> import bnfast.torch
    >>> bnfast.torch.empty_cache() >= 0
    True
    """
    with _lock:
        return _release_free()
