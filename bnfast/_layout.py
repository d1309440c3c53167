"""Map an (N, C, *spatial) array onto one of the two kernel layouts, without copying
when its memory already fits one.

* ``FIRST``: C-contiguous, viewed as ``(N, C, S)`` with ``S = prod(spatial)``
  (and a Fortran-ordered ``(N, C)`` array, viewed as ``(1, C, N)``).
* ``LAST``:  channels-last (C varies fastest, as ``img_nhwc.transpose(0, 3, 1, 2)``),
  viewed as ``(M, C)`` rows with ``M = N * S``.  A C-contiguous ``(N, C)`` array
  (and any array with ``S == 1``) is also this layout: one row per sample.

Anything else is copied to C order: that copy is the documented price of an
arbitrary stride pattern.
"""
import enum
import math

import numpy as np

from ._dtypes import is_bfloat16


class Layout(enum.IntEnum):
    """The two memory layouts the kernels process; the value is what the compiled
    entries take (``src/_dtypes.pxd``'s ``Layout``)."""

    CHANNELS_FIRST = 0   # (N, C, S), C-contiguous
    CHANNELS_LAST = 1    # (M, C) rows, C varies fastest

    def __str__(self):
        return self.name.lower()

    @classmethod
    def _missing_(cls, value):
        # Layout("channels_last"): the names users see in ReluMask.layout.
        for member in cls:
            if value == str(member):
                return member
        return None


FIRST = Layout.CHANNELS_FIRST
LAST = Layout.CHANNELS_LAST


def _to_last(ndim):
    """Axis order (N, *spatial, C): a tuple for ndarray.transpose (np.moveaxis
    costs microseconds of argument normalisation per call)."""
    return (0,) + tuple(range(2, ndim)) + (1,)


def _from_last(ndim):
    """The inverse of _to_last: (N, *spatial, C) back to (N, C, *spatial)."""
    return (0, ndim - 1) + tuple(range(1, ndim - 1))


def _is_channels_last(x):
    return x.transpose(_to_last(x.ndim)).flags.c_contiguous


def layout_of(x):
    """Return FIRST or LAST if ``x`` can be viewed without a copy, else None."""
    if x.flags.c_contiguous:
        # One value per (sample, channel): rows.  (Empty arrays: either will do.)
        return LAST if x.size == x.shape[0] * x.shape[1] else FIRST
    if x.ndim > 2 and _is_channels_last(x):
        return LAST
    if x.ndim == 2 and x.flags.f_contiguous:
        return FIRST
    return None


def copy_layout(x):
    """The layout to copy an arbitrarily strided ``x`` into."""
    return LAST if math.prod(x.shape[2:]) == 1 else FIRST


def kernel_layout(x):
    """The layout the kernels process ``x`` in: its own, else the one it is copied to."""
    layout = layout_of(x)
    return copy_layout(x) if layout is None else layout  # not `or`: FIRST is 0, falsy


def in_kernel_layout(x):
    """``(x, layout)``: ``x`` itself if its memory fits a kernel layout, else a copy that does."""
    layout = layout_of(x)
    if layout is None:
        layout = copy_layout(x)
        x = _copied(x, layout)
    return x, layout


def kernel_view(x, layout):
    """View ``x`` (already in ``layout``) as the kernel's 3-D or 2-D array."""
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    if layout == FIRST:
        if x.ndim == 2:
            return x.T.reshape(1, c, n)
        return x.reshape(n, c, spatial)
    return x.transpose(_to_last(x.ndim)).reshape(n * spatial, c)


#: Arrays bnfast allocates of at least this many bytes start on a cache line.
#: NumPy's start 16 bytes past one, and every other 32-byte vector store then
#: straddles two lines: a channels-last eval of 12.8 MB took ~4% longer.
ALIGNED_BYTES = 1 << 20


def aligned_empty(n, dtype):
    """A new 1-D array of ``n`` values of ``dtype`` starting on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    return raw[-raw.ctypes.data % 64:][:n * dtype.itemsize].view(dtype)


def empty_like_aligned(x):
    """``np.empty_like(x)`` (shape, dtype, memory order), 64-byte aligned when large.

    ``x`` is in a kernel layout (C- or Fortran-contiguous, or channels-last).

    Examples
    --------
    >>> x = np.zeros((4, 32, 32, 64), np.float32).transpose(0, 3, 1, 2)  # channels-last
    >>> y = empty_like_aligned(x)
    >>> y.strides == np.empty_like(x).strides, y.ctypes.data % 64
    (True, 0)
    """
    if x.nbytes < ALIGNED_BYTES:
        return np.empty_like(x)
    flat = aligned_empty(x.size, x.dtype)
    if x.flags.c_contiguous:
        return flat.reshape(x.shape)
    if x.flags.f_contiguous:
        return flat.reshape(x.shape[::-1]).T
    if x.ndim > 2 and _is_channels_last(x):
        moved = flat.reshape((x.shape[0],) + x.shape[2:] + (x.shape[1],))
        return moved.transpose(_from_last(x.ndim))
    return np.empty_like(x)


def empty_like_layout(x, layout, dtype):
    """A new array shaped like ``x`` whose memory is in ``layout`` (and x's order)."""
    if x.ndim == 2:
        order = "F" if layout == FIRST else "C"
        return np.empty(x.shape, dtype=dtype, order=order)
    if layout == FIRST:
        return np.empty(x.shape, dtype=dtype)
    moved = np.empty((x.shape[0],) + x.shape[2:] + (x.shape[1],), dtype=dtype)
    return moved.transpose(_from_last(x.ndim))


def to_layout(x, layout):
    """``x`` itself if it is in ``layout``, else a copy that is."""
    return x if layout_of(x) == layout else _copied(x, layout)


def _copied(x, layout):
    copy = empty_like_layout(x, layout, x.dtype)
    np.copyto(copy, x)
    return copy


#: NumPy's "overlap problem too hard" (np.exceptions from 1.25, np before).
_TOO_HARD = getattr(np, "exceptions", np).TooHardError


def overlaps(a, b):
    """Whether arrays a and b share an element: their bounds first (one cheap test),
    then NumPy's exact check, so interleaved views of one buffer (the two halves of a
    concatenation along channels, DenseNet's) are told apart; an overlap too costly
    to decide counts as one."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))
    except _TOO_HARD:
        return True


def same_memory(a, b):
    """True if a and b are the same elements of the same buffer (elementwise in-place is safe)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def write_target(out, x, layout, same_ok=(), avoid=()):
    """``(array returned, array the kernel writes in layout)`` for an output like ``x``.

    A fresh array when ``out`` is None.  A caller's ``out`` is written directly
    when it is in ``layout`` and overlaps nothing it must not: the ``same_ok``
    arrays only as exactly the same elements (elementwise in place is safe), the
    ``avoid`` arrays not at all.  Otherwise the kernel writes a temporary that
    the caller copies into ``out`` at the end.  ``out`` is already validated.
    """
    if out is None:
        # x is in layout: empty_like keeps its memory order (C, F or channels-last).
        result = empty_like_aligned(x)
        return result, result
    # Plain loops, the cheap tests first: this runs on every out= call (generators
    # and any() had cost ~1 of its 3.4 us on (1, 512, 7, 7)).
    if layout_of(out) == layout:
        for o in avoid:
            if o is not None and overlaps(out, o):
                break
        else:
            for o in same_ok:
                if o is not None and o is not out and overlaps(out, o) and not same_memory(out, o):
                    break
            else:
                return out, out
    return out, empty_like_layout(x, layout, x.dtype)


#: What the kernel updates in place: float32 or float64 (never half precision).
_UPDATABLE = (np.dtype(np.float32), np.dtype(np.float64))


def updatable_pair(running_mean, running_var, data_dtype=None):
    """The running buffers as the kernel updates them: both C-contiguous, float32
    or float64, of one dtype.

    Themselves when they are; otherwise float64 copies (lossless for the
    update, which is computed in double and rounded once) for
    :func:`write_back_pair` to copy back: mixed dtypes, other strides,
    half-precision buffers, and float32 buffers of float64 data (a mix torch
    refuses: the float64 update rounded once).
    """
    if (running_mean.dtype == running_var.dtype and running_mean.dtype in _UPDATABLE
            and running_mean.flags.c_contiguous and running_var.flags.c_contiguous
            and not (data_dtype == np.float64 and running_mean.dtype == np.float32)):
        return running_mean, running_var
    return running_mean.astype(np.float64), running_var.astype(np.float64)


#: Half an ulp past each dtype's largest finite value (whose odd last bit rounds
#: that tie up): the magnitude from which a double rounds to inf there.  A dict: this
#: runs per training call (dtype comparisons cost ~0.4 us each).
_OVERFLOW_AT = {np.dtype(np.float16): float.fromhex("0x1.ffep15"),
                np.dtype(np.float32): float.fromhex("0x1.ffffffp127"),
                np.dtype(np.float64): math.inf}
_BFLOAT16_OVERFLOW_AT = float.fromhex("0x1.ffp127")


def overflow_limits(running_mean, running_var):
    """``(mean_limit, var_limit)``: the magnitudes from which the buffers' dtypes round
    a value to inf, for :func:`bnfast._forward.forward`; None for float64 buffers."""
    limits = (_overflow_limit(running_mean.dtype), _overflow_limit(running_var.dtype))
    return None if limits == (math.inf, math.inf) else limits


def _overflow_limit(dtype):
    limit = _OVERFLOW_AT.get(dtype)
    if limit is None:
        return _BFLOAT16_OVERFLOW_AT if is_bfloat16(dtype) else math.inf
    return limit


def write_back_pair(updated, running_mean, running_var):
    """Copy :func:`updatable_pair`'s temporaries (if any) back into the buffers."""
    if updated[0] is not running_mean:
        np.copyto(running_mean, updated[0], casting="unsafe")
        np.copyto(running_var, updated[1], casting="unsafe")
