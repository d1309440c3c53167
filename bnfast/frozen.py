"""FrozenBatchNorm: a BatchNorm reduced to its evaluation map, torchvision's semantics.

``torchvision.ops.FrozenBatchNorm2d`` (and detectron2's) hold four buffers
(``weight``, ``bias``, ``running_mean``, ``running_var``), no parameters, no
training mode, and compute ``x * scale + shift`` with ``scale = weight /
sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.

How it differs from a BatchNorm in evaluation, in the last bits: bnfast's
BatchNorm computes ``(x - mean) * a + b`` per element, where ``x - mean`` is
exact when ``x`` is close to ``mean``, so the output is within a few ulps of
*itself*.  The frozen map rounds ``scale`` and ``shift`` (computed in float64)
once to the compute type (float32 for float32 and half data, float64 for
float64) and then the product ``x * scale`` and the sum: near ``x == mean``
the two large terms cancel, and the error is a few ulps of ``|x * scale|``
(of ``|shift|``), not of the small output.  That is the price of one
multiply-add, the form a convolution absorbs.  It runs as the BatchNorm
kernels' one pass (threads, channels-last in place) with mean 0 and scale 1
folded into ``weight = scale``, ``bias = shift``; half data is computed in
float (as the BatchNorm modules, within an ulp of the half dtype), not in the
half dtype, where a shift beyond 65504 would be inf.
"""
import numpy as np

from ._dtypes import resolve_dtype, resolve_param_dtype
from ._state_dict import affine_coefficients
from ._validation import check_eps
from .functional import batch_norm
from .fused import is_fused
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys, _BatchNorm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze"]

_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class _FrozenBatchNorm:
    """Shared implementation; subclasses set the accepted input dimensions."""

    _ndims: "tuple[int, ...]" = ()
    _ndim_text = ""
    __setattr__ = _BatchNorm.__setattr__  # buffers: ndarrays (or None), as torch's

    def __init__(self, num_features, eps=1e-5, *, dtype=np.float32, param_dtype=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        dtype = resolve_dtype(dtype)
        param_dtype = resolve_param_dtype(param_dtype, dtype)
        self.num_features = int(num_features)
        self.eps = check_eps(eps)  # torch's rule for evaluation: non-negative
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.training = False  # kept for train()/eval(): the forward ignores it
        self.weight = np.ones(num_features, param_dtype)
        self.bias = np.zeros(num_features, param_dtype)
        self.running_mean = np.zeros(num_features, param_dtype)
        self.running_var = np.ones(num_features, param_dtype)
        self._vectors_key = None  # _kernel_vectors' cache
        self._vectors = None

    def train(self, mode=True):
        """Record the mode and return self: a frozen BatchNorm computes the same in either."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Return self (see :meth:`train`)."""
        return self.train(False)

    def __call__(self, input, *, out=None):
        return self.forward(input, out=out)

    def affine_coefficients(self, dtype=None):
        """``(scale, shift)``: float64, rounded once to ``dtype`` (default: the module's)."""
        return affine_coefficients(self, self.dtype if dtype is None else dtype)

    def forward(self, input, *, out=None):
        """``input * scale + shift`` per channel, in the input's dtype and memory layout.

        Parameters
        ----------
        input : array_like
            Of the module's dtype, channels on axis 1.
        out : ndarray, optional
            Where to write the result (may be ``input``), checked as
            :func:`bnfast.batch_norm` checks it.
        """
        x = np.asarray(input)
        if x.ndim not in self._ndims:
            raise ValueError(f"expected {self._ndim_text} input (got {x.ndim}D input)")
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the module's dtype "
                            f"{self.dtype}: cast the input explicitly")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (axis 1), "
                             f"got input of shape {x.shape}")
        # (x - 0) * (scale / sqrt(1 + 0)) + shift: the kernel's coefficients are
        # scale and shift exactly, its float rows round them once, as before.
        return batch_norm(x, *self._kernel_vectors(), False, eps=0.0, out=out)

    def _kernel_vectors(self):
        """(zeros, ones, scale, shift) in float64, kept while the buffers' bytes and eps
        are unchanged (in-place edits are seen: the key is their bytes, not their
        identity); computing them took ~25 of a small call's ~45 us."""
        buffers = [getattr(self, k) for k in _BUFFERS]
        key = (self.eps,) + tuple((b.dtype, b.tobytes()) for b in buffers)
        if self._vectors_key != key:
            scale, shift = self.affine_coefficients(np.float64)
            self._vectors = (np.zeros_like(scale), np.ones_like(scale), scale, shift)
            self._vectors_key = key
        return self._vectors

    def state_dict(self):
        """The four buffers under torch's names (arrays, not copies)."""
        return {key: getattr(self, key) for key in _BUFFERS}

    def load_state_dict(self, state_dict, strict=True):
        """Load the four buffers; ``num_batches_tracked`` (from a BatchNorm) is dropped.

        Loads torchvision's and detectron2's FrozenBatchNorm2d state dicts and
        BatchNorm ones, with the checks and casting of
        :meth:`bnfast.BatchNorm2d.load_state_dict` (nothing changes on error).
        """
        state = {k: v for k, v in state_dict.items() if k != "num_batches_tracked"}
        result = _BatchNorm.load_state_dict(self, state, strict)  # the same checks
        return IncompatibleKeys(result.missing_keys, result.unexpected_keys)

    def __repr__(self):
        return f"{type(self).__name__}({self.num_features}, eps={self.eps})"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """:class:`FrozenBatchNorm2d` for (N, C) or (N, C, L) input."""

    _ndims = (2, 3)
    _ndim_text = "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """BatchNorm2d with fixed statistics and affine parameters, as torchvision's.

    Four buffers (``weight``, ``bias``, ``running_mean``, ``running_var``),
    no parameters, no training mode; the output is ``x * scale + shift``.
    How that differs from ``BatchNorm2d.eval()`` in the last bits: see
    :mod:`bnfast.frozen`.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance.
    dtype : dtype, default np.float32
        The data's dtype: float32, float64, float16 or bfloat16.
    param_dtype : dtype, optional (keyword-only)
        The buffers' dtype: by default float32 for half-precision data (as
        the BatchNorm modules keep their statistics; a float16 running_var
        above 65504 would be inf), else ``dtype``.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> m = bnfast.FrozenBatchNorm2d(2, eps=0.0001)
    >>> m.load_state_dict({"weight": [1.0, 2.0], "bias": [0.0, 1.0],
    ...                    "running_mean": [0.0, 1.0], "running_var": [1.0, 4.0],
    ...                    "num_batches_tracked": 10})
    IncompatibleKeys(missing_keys=[], unexpected_keys=[])
    >>> m(np.ones((1, 2, 1, 1), np.float32)).ravel()
    array([0.99995, 1.     ], dtype=float32)
    """

    _ndims = (4,)
    _ndim_text = "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """:class:`FrozenBatchNorm2d` for (N, C, D, H, W) input."""

    _ndims = (5,)
    _ndim_text = "5D"


_FROZEN = {BatchNorm1d: FrozenBatchNorm1d, BatchNorm2d: FrozenBatchNorm2d,
           BatchNorm3d: FrozenBatchNorm3d}
_FUSED_NOTE = " (its ReLU and addend are no affine map: freezing would drop them)"


def freeze(module):
    """The FrozenBatchNormXd of a BatchNormXd: its running statistics and affine
    parameters (copies, in the module's ``param_dtype``), ``eps`` and dtype;
    ``num_batches_tracked`` dropped.

    Parameters
    ----------
    module : BatchNorm1d, BatchNorm2d or BatchNorm3d
        With running statistics; without ``weight``/``bias`` they are 1 and 0.

    Returns
    -------
    FrozenBatchNorm1d, FrozenBatchNorm2d or FrozenBatchNorm3d

    Raises
    ------
    TypeError
        Not a bnfast BatchNormXd (a FusedBatchNormXd's ReLU is no affine map).
    ValueError
        No running statistics (``track_running_stats=False``).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm2d(3, eps=1e-3)
    >>> bnfast.freeze(bn)
    FrozenBatchNorm2d(3, eps=0.001)
    """
    frozen_cls = next((f for cls, f in _FROZEN.items() if isinstance(module, cls)), None)
    if frozen_cls is None or is_fused(module):
        raise TypeError(f"freeze takes a bnfast BatchNorm1d, BatchNorm2d or BatchNorm3d, "
                        f"got {type(module).__name__}" + _FUSED_NOTE * is_fused(module))
    if module.running_mean is None or module.running_var is None:
        raise ValueError(f"{type(module).__name__} without running statistics "
                         "(track_running_stats=False) has no fixed map to freeze")
    frozen = frozen_cls(module.num_features, module.eps, dtype=module.dtype,
                        param_dtype=module.param_dtype)
    frozen.running_mean[...] = module.running_mean
    frozen.running_var[...] = module.running_var
    if module.weight is not None:
        frozen.weight[...] = module.weight
    if module.bias is not None:
        frozen.bias[...] = module.bias
    return frozen
