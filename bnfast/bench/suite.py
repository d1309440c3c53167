"""What to benchmark: the shape suite, the modes, the dtypes, and the bytes each mode must move.

A *case* is one (mode, dtype, shape) triple.  The default suite covers the
BatchNorm layers of ResNet-50 at batch 32, BatchNorm1d in MLPs, single-image
inference tensors and a few odd shapes (3 channels, large batch).
"""
import math
import os
from dataclasses import dataclass

from bnfast._dtypes import resolve_dtype

__all__ = [
    "Case", "DEFAULT_SHAPES", "QUICK_SHAPES", "MODES", "DTYPES", "DEFAULT_DTYPES", "ITEMSIZE",
    "parse_shapes", "parse_modes", "parse_dtypes", "format_shape", "make_cases",
]

#: Default shape suite, in report order.
DEFAULT_SHAPES = (
    (32, 64, 112, 112),   # ResNet-50 stem
    (32, 256, 56, 56),    # ResNet-50 stage 1
    (32, 512, 28, 28),    # stage 2
    (32, 1024, 14, 14),   # stage 3
    (32, 2048, 7, 7),     # stage 4
    (64, 2048, 7, 7),     # stage 4, batch 64
    (8, 64, 56, 56),      # small batch
    (256, 3, 32, 32),     # CIFAR input, 3 channels
    (256, 1024),          # MLP BatchNorm1d
    (4096, 512),          # MLP BatchNorm1d, large batch
    (1, 512, 7, 7),       # single-image inference
    (1, 64, 56, 56),      # single-image inference
)

#: ``--quick``: a medium, an MLP and a tiny shape.
QUICK_SHAPES = ((8, 64, 56, 56), (256, 1024), (1, 512, 7, 7))

#: Benchmark modes, in report order.
#:
#: eval            ``y = batch_norm(x)`` with running statistics.
#: train           forward with batch statistics, including the running-stat update.
#: backward        ``(grad_input, grad_weight, grad_bias)`` after a training forward.
#: backward_eval   the same after an evaluation forward (running statistics).
#: fused_eval      ``y = relu(batch_norm(x) + addend)`` with running statistics.
#: fused_backward  the gradients of a training ``relu(batch_norm(x) + addend)``,
#:                 and ``grad_addend``, from the packed ReLU mask.
MODES = ("eval", "train", "backward", "backward_eval", "fused_eval", "fused_backward")

#: Every dtype a case may have; half precision (float16, bfloat16: ``ml_dtypes``)
#: runs with float32 parameters and running statistics, PyTorch's CPU rule.
DTYPES = ("float32", "float64", "float16", "bfloat16")

#: The dtypes of a run without ``--dtypes``.
DEFAULT_DTYPES = ("float32", "float64")

#: Bytes per value (by name: "bfloat16" is a NumPy dtype only once ml_dtypes is imported).
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

#: Bytes a mode must move, in multiples of ``x.nbytes``: the traffic of the
#: best two-pass algorithm when the tensor does not fit in cache.
#: eval: read x, write y.  train: read x (statistics), read x and write y.
#: backward: read dy and x (reductions), read dy and x and write dx.
#: backward_eval: read dy and x (parameter gradients), read dy and write dx.
#: fused_eval: read x and addend, write y.
#: fused_backward: backward's, plus writing grad_addend (the mask is 1/32 of x).
TRAFFIC = {"eval": 2, "train": 3, "backward": 5, "backward_eval": 4, "fused_eval": 3,
           "fused_backward": 6}

#: Modes that use batch statistics (they need more than one value per channel).
_BATCH_STAT_MODES = ("train", "backward", "fused_backward")

_DTYPE_ALIASES = {"float32": "float32", "f32": "float32", "single": "float32",
                  "float64": "float64", "f64": "float64", "double": "float64",
                  "float16": "float16", "f16": "float16", "half": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes
    ----------
    mode : str
        One of :data:`MODES`.
    dtype : str
        One of :data:`DTYPES`.
    shape : tuple of int
        ``(N, C, *spatial)``.
    """

    mode: str
    dtype: str
    shape: tuple

    @property
    def nbytes(self):
        """Size of one array of this shape and dtype, in bytes."""
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def bytes_moved(self):
        """Bytes the operation must read and write (see :data:`TRAFFIC`)."""
        return TRAFFIC[self.mode] * self.nbytes

    @property
    def values_per_channel(self):
        """``N * prod(spatial)``: how many values each channel's statistics see."""
        return self.shape[0] * math.prod(self.shape[2:])

    def skip_reason(self):
        """A reason this case cannot run, or None."""
        if self.mode in _BATCH_STAT_MODES and self.values_per_channel < 2:
            return "needs more than one value per channel"
        return None

    @property
    def label(self):
        return f"{self.mode} {self.dtype} {format_shape(self.shape)}"


def format_shape(shape):
    """``(32, 64, 112, 112)`` -> ``"32x64x112x112"`` (the ``--shapes`` syntax)."""
    return "x".join(str(d) for d in shape)


_MAX_DIMS = 64  # NumPy's most dimensions


def _physical_memory():
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def parse_shapes(text):
    """Parse ``"32x64x112x112,256x1024"`` into a tuple of shapes (repeats dropped).

    Raises
    ------
    ValueError
        Empty list, a non-integer or non-positive dimension, fewer than two
        dimensions (BatchNorm needs ``(N, C, ...)``) or more than NumPy's 64, or
        a float64 array of the shape beyond the machine's memory.
    """
    shapes = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected integers joined by 'x', "
                             "e.g. 32x64x56x56") from None
        if len(dims) < 2:
            raise ValueError(f"bad shape {item!r}: "
                             "BatchNorm needs at least 2 dimensions (N, C, ...)")
        if any(d <= 0 for d in dims):
            raise ValueError(f"bad shape {item!r}: dimensions must be positive")
        if len(dims) > _MAX_DIMS:
            raise ValueError(f"bad shape {item!r}: at most {_MAX_DIMS} dimensions (NumPy's)")
        memory = _physical_memory()
        if memory and math.prod(dims) * 8 > memory:  # one float64 array of it
            raise ValueError(f"bad shape {item!r}: one float64 array of it needs "
                             f"{math.prod(dims) * 8 / 2**30:.3g} GiB, more than this "
                             f"machine's {memory / 2**30:.3g} GiB")
        if dims not in shapes:
            shapes.append(dims)
    if not shapes:
        raise ValueError(f"no shapes in {text!r}")
    return tuple(shapes)


def _parse_choices(text, choices, what, aliases=None):
    picked = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item == "all":
            return tuple(choices)
        if aliases is not None:
            item = aliases.get(item, item)
        if item not in choices:
            raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(choices)} (or all)")
        if item not in picked:
            picked.append(item)
    if not picked:
        raise ValueError(f"no {what}s in {text!r}")
    return tuple(picked)


def parse_modes(text):
    """Parse ``"eval,train"`` (or ``"all"``) into a tuple of :data:`MODES`."""
    return _parse_choices(text, MODES, "mode")


def parse_dtypes(text):
    """Parse ``"float32,float16,bfloat16"`` (``f32``/``f64``/``f16``/``bf16`` accepted,
    or ``"all"``).

    Raises
    ------
    ValueError
        An unknown dtype, or bfloat16 without ``ml_dtypes`` installed.
    """
    dtypes = _parse_choices(text, DTYPES, "dtype", _DTYPE_ALIASES)
    if "bfloat16" in dtypes:
        try:
            resolve_dtype("bfloat16")
        except ImportError as exc:
            raise ValueError(str(exc)) from None
    return dtypes


def make_cases(shapes, modes, dtypes):
    """All cases, ordered by mode, then dtype, then shape."""
    return [Case(mode, dtype, tuple(shape))
            for mode in modes for dtype in dtypes for shape in shapes]
