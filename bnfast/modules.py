"""BatchNorm1d/2d/3d: thin holders of parameters and running buffers.

They mirror ``torch.nn.BatchNormXd`` (constructor, attributes, train/eval,
state_dict keys, error messages) and dispatch to :mod:`bnfast.functional`.
``backward`` (see :mod:`bnfast.backward`) replays the last forward from what
it saved, and accumulates parameter gradients into ``weight_grad``/``bias_grad``.
"""
from collections import namedtuple

import numpy as np

from . import _forward
from . import backward as B
from . import functional as F
from ._dtypes import is_bfloat16, resolve_dtype, resolve_param_dtype
from ._layout import overlaps
from ._threads import check_n_threads, resolve_threads
from ._validation import (
    as_float_array,
    check_eps,
    check_flag,
    check_forward,
    check_momentum,
    check_out,
    check_same_shape,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_NO_FORWARD = "backward() needs a forward() first: nothing was saved for backward"
_NO_GRAD = "the last forward() ran under bnfast.no_grad(), which saves nothing for backward"


class _Saved:
    """What a forward keeps for backward (torch's saved tensors): a reference to
    the input, the statistics it normalised with, and the packed ReLU mask."""

    __slots__ = ("input", "weight", "mean", "invstd", "batch_stats", "relu_mask",
                 "has_addend", "input_overwritten")

    def __init__(self, input, weight, mean, invstd, batch_stats, relu_mask, has_addend,
                 input_overwritten):
        # Plain assignments: this runs on every forward (a **kwargs loop cost microseconds).
        self.input = input
        self.weight = weight
        self.mean = mean
        self.invstd = invstd
        self.batch_stats = batch_stats
        self.relu_mask = relu_mask
        self.has_addend = has_addend
        self.input_overwritten = input_overwritten


#: The attributes that hold parameters and buffers (ndarrays or None).
_ARRAYS = frozenset(("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))


class _BatchNorm:
    """Shared implementation; subclasses set the accepted input dimensions."""

    _ndims: "tuple[int, ...]" = ()   # accepted input.ndim values
    _ndim_text = ""        # as PyTorch words it: "4D", "2D or 3D"

    def __setattr__(self, name, value):
        # torch's rule for parameters and buffers: a tensor (here an ndarray) or
        # None.  A list would run, then break state_dict() and load_state_dict().
        if name in _ARRAYS and value is not None and not isinstance(value, np.ndarray):
            raise TypeError(f"cannot assign {type(value).__name__!r} as {name!r} "
                            "(numpy.ndarray or None expected)")
        object.__setattr__(self, name, value)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, bias=True, dtype=np.float32, param_dtype=None,
                 n_threads=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        dtype = resolve_dtype(dtype)
        param_dtype = resolve_param_dtype(param_dtype, dtype)
        if momentum is not None:
            check_momentum(momentum)
        n_threads = check_n_threads(n_threads)
        self.num_features = int(num_features)
        self.eps = check_eps(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.n_threads = n_threads
        self.training = True
        C = self.num_features
        if self.affine:
            self.weight = np.empty(C, param_dtype)
            self.bias = np.empty(C, param_dtype) if bias else None
        else:
            self.weight = None
            self.bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, param_dtype)
            self.running_var = np.ones(C, param_dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        # Gradients accumulated by backward(), as torch's .grad (None until then).
        self.weight_grad = None
        self.bias_grad = None
        self._saved = None
        self._saved_missing = _NO_FORWARD
        # Evaluation coefficients, reused while the buffers and parameters are unchanged.
        self._coef_cache = _forward.CoefficientCache()
        self.reset_parameters()

    # -- PyTorch's Module surface -------------------------------------------------
    def reset_running_stats(self):
        """Running mean to 0, running variance to 1, num_batches_tracked to 0."""
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            self.weight.fill(1)
            if self.bias is not None:
                self.bias.fill(0)

    def train(self, mode=True):
        """Set training mode (batch statistics, running buffers updated); returns self."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def eval(self):
        """Set evaluation mode (running statistics); returns self."""
        return self.train(False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input, *, out=None):
        """Normalise ``input`` (see :func:`bnfast.batch_norm`); returns the output array."""
        return self._forward(input, None, False, out)

    def _forward(self, input, addend, relu, out):
        x = as_float_array(input, "input")
        self._check_input_dim(x)  # before any generic shape check: torch's message
        if x.dtype != self.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the module's dtype {self.dtype}: "
                f"build the module with dtype={x.dtype.name!r} or cast the input explicitly"
            )
        C = self.num_features
        if x.shape[1] != C:
            raise ValueError(f"expected input with {C} channels (axis 1), "
                             f"got input of shape {x.shape}")
        counted = self.training and self.track_running_stats
        if not counted:
            factor = 0.0  # no running statistics are updated
        elif self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked + 1)
        else:
            factor = check_momentum(self.momentum)
        # Batch statistics in training, and in eval when no running stats exist.
        batch_stats = self.training or self.running_mean is None
        tracking = not self.training or self.track_running_stats
        running_mean, running_var, weight, bias, eps, addend, out, nt = check_forward(
            x, self.running_mean if tracking else None, self.running_var if tracking else None,
            self.weight, self.bias, batch_stats, self.eps, addend, out, self.n_threads)
        save = B.is_grad_enabled()
        cache = None if batch_stats else self._coef_cache
        result, coef, mask, entry = F.normalize(
            x, running_mean, running_var, weight, bias, batch_stats, factor, eps, addend, relu,
            out, nt, save and batch_stats, save, cache)
        if counted:  # only once the call succeeded: a rejected call changes nothing
            self.num_batches_tracked += 1
        if save:
            if batch_stats:
                saved_weight = None if weight is None else weight.copy()
                mean, invstd = coef[0], coef[1]
            else:
                # The cache entry this call used: immutable, so its own snapshot.
                saved_weight, mean, invstd = entry.weight, entry.mean, entry.invstd
            # Positional: keyword arguments cost ~0.3 us on this per-call path.  x is
            # a reference, as torch saves it: mutating it before backward is
            # undefined.  Only a caller's out= can be the input: a fresh one cannot.
            self._saved = _Saved(x, saved_weight, mean, invstd, batch_stats, mask,
                                 addend is not None,
                                 out is not None and overlaps(out, x))
        else:
            self._saved = None
            self._saved_missing = _NO_GRAD
        return result

    # -- backward -----------------------------------------------------------------
    def backward(self, grad_output, *, out=None, retain_graph=False):
        """Gradient of the last forward with respect to its input.

        Uses what that forward saved: a reference to its input (do not modify
        it in between: the result is then undefined) and the statistics it
        normalised with (batch statistics in training and whenever there are
        no running statistics, else the running ones).  Parameter gradients
        are *added* to ``weight_grad`` and ``bias_grad`` (created on first
        use; see :meth:`zero_grad`), as torch accumulates ``.grad``.

        Parameters
        ----------
        grad_output : array_like
            Gradient of the loss with respect to the forward's output (its
            shape and dtype).
        out : ndarray, optional
            Where to write the input's gradient (may be ``grad_output``).
        retain_graph : bool
            Keep the saved state for another backward; by default it is
            released, as torch frees its graph.

        Returns
        -------
        ndarray
            The input's gradient (input's shape, dtype and memory layout).

        Raises
        ------
        RuntimeError
            No forward since the last backward (or it ran under
            :func:`bnfast.no_grad`), or it wrote its output over its input.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> m = bnfast.BatchNorm1d(2, dtype=np.float64)
        >>> y = m(np.array([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.backward(np.ones_like(y))
        array([[0., 0.],
               [0., 0.]])
        >>> m.bias_grad
        array([2., 2.])
        """
        return self._backward(grad_output, retain_graph, out)[0]

    def zero_grad(self, set_to_none=True):
        """Reset ``weight_grad``/``bias_grad``: to None (default, as torch), or fill with zeros."""
        for name in ("weight_grad", "bias_grad"):
            grad = getattr(self, name)
            if set_to_none:
                setattr(self, name, None)
            elif grad is not None:
                grad.fill(0)

    def _backward(self, grad_output, retain_graph, out=None):
        """(grad_input, grad_addend) of the last forward; accumulates parameter gradients."""
        retain_graph = check_flag(retain_graph, "retain_graph")
        saved = self._saved
        if saved is None:
            raise RuntimeError(self._saved_missing)
        # Only grad_output and out come from the caller: what the forward saved
        # (its input, statistics, weight snapshot and ReLU mask) is trusted.
        x = saved.input
        dy, out = _backward_arguments(saved, grad_output, out, retain_graph)
        wanted = (True, saved.weight is not None, self.bias is not None, saved.has_addend)
        gx, gw, gb, ga = B._run(x, dy, saved.relu_mask, saved.weight, saved.mean, saved.invstd,
                                saved.batch_stats, wanted, resolve_threads(self.n_threads), out,
                                None)
        if not retain_graph:
            self._saved = None
            self._saved_missing = ("backward() was already called on the last forward, which "
                                   "freed what it saved (pass retain_graph=True to keep it)")
        if gw is not None:
            gw = self._as_param_dtype(gw)
            if self.weight_grad is None:
                self.weight_grad = gw
            else:
                self.weight_grad += gw
        if gb is not None:
            gb = self._as_param_dtype(gb)
            if self.bias_grad is None:
                self.bias_grad = gb
            else:
                self.bias_grad += gb
        return gx, ga

    def _as_param_dtype(self, grad):
        """A parameter gradient in the parameters' dtype (as torch's ``.grad``)."""
        return grad if grad.dtype == self.param_dtype else grad.astype(self.param_dtype)

    def _check_input_dim(self, x):
        if x.ndim not in self._ndims:
            raise ValueError(f"expected {self._ndim_text} input (got {x.ndim}D input)")

    # -- state dict ---------------------------------------------------------------
    def state_dict(self):
        """Parameters and buffers under PyTorch's key names (arrays, not copies)."""
        state = {}
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from ``state_dict`` (NumPy arrays or torch tensors) into this module.

        Values are cast to the module's dtypes as torch casts them (a bfloat16
        or float16 torch state dict loads into a float32 module, a float32 one
        into a bfloat16 module; ``ml_dtypes.bfloat16`` arrays, e.g. from
        ``safetensors.numpy.load_file``, are accepted).  Everything is checked
        and converted before anything is written: a call that raises leaves
        the module unchanged.

        Parameters
        ----------
        state_dict : mapping
            Keys as produced by :meth:`state_dict` or by ``torch.nn.BatchNormXd``;
            values array-likes of real numbers (float, int or bool).
            A state dict without ``num_batches_tracked`` (from old PyTorch, or a
            plain dict) keeps the current count, as PyTorch does; one from torch's
            ``state_dict()`` (``_metadata`` version 2) misses it, as in PyTorch.
        strict : bool
            Raise on missing or unexpected keys.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as PyTorch returns.

        Raises
        ------
        TypeError
            A value that is not an array of real numbers (a string, a complex
            array, ...), naming its key.
        RuntimeError
            Missing/unexpected keys (strict), a shape mismatch, a finite
            value that overflows the module's dtype, or a
            ``num_batches_tracked`` that is no count int64 holds (negative,
            NaN, infinite: torch stores those as garbage), listing all of them.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> m = bnfast.BatchNorm1d(2)
        >>> m.load_state_dict({"weight": [1, 2], "bias": np.ones(2)}, strict=False)
        IncompatibleKeys(missing_keys=['running_mean', 'running_var'], unexpected_keys=[])
        >>> m.weight
        array([1., 2.], dtype=float32)
        """
        own = self.state_dict()
        # torch's rule: a count may be absent from dicts before version 2 (PyTorch
        # 0.4.1), and from those that carry no version (plain dicts); torch's own
        # state_dict() carries _metadata with the module's version (2).
        metadata = getattr(state_dict, "_metadata", None)
        version = (metadata.get("", {}).get("version") if isinstance(metadata, dict)
                   else None)
        count_optional = version is None or version < 2
        missing = [k for k in own if k not in state_dict
                   and (k != "num_batches_tracked" or not count_optional)]
        unexpected = [k for k in state_dict if k not in own]
        bad, errors = [], []
        staged = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            if not target.flags.writeable:  # found now, not after the others are written
                errors.append(f"cannot load {key}: the module's {key} is a read-only array "
                              "(assign a writable one first)")
                continue
            try:
                value = _to_numpy(state_dict[key])
            except (TypeError, ValueError) as exc:
                bad.append(f"{key!r} ({exc})")
                continue
            if value.dtype.kind not in "biuf" and not is_bfloat16(value.dtype):
                bad.append(f"{key!r} (dtype {value.dtype})")
                continue
            if target.ndim == 0 and value.shape == (1,):  # torch's rule for 0-d tensors
                value = value.reshape(())
            if value.shape != target.shape:
                errors.append(f"size mismatch for {key}: copying a param with shape "
                              f"{value.shape} from checkpoint, the shape in current model "
                              f"is {target.shape}.")
                continue
            # A converted copy: the writes below cannot fail, nor see one another
            # (the state dict may hold this module's own arrays).  Any real dtype
            # casts, as torch's copy_ does (floats truncate into the integer count),
            # but a finite value that overflows the module's dtype is an error.
            with np.errstate(over="ignore", invalid="ignore"):
                converted = value.astype(target.dtype, casting="unsafe")
            if target.dtype.kind == "i" and not _count_fits(value, target.dtype):
                errors.append(f"value out of range for {key}: a count of batches is a "
                              f"non-negative integer of {target.dtype}, got {value!r}")
                continue
            if target.dtype.kind != "i" and _overflowed(value, converted):
                errors.append(f"value out of range for {key}: the checkpoint's {value.dtype} "
                              f"values overflow the module's {target.dtype} (largest "
                              f"magnitude {float(np.max(np.abs(value.astype(np.float64)))):.6g})")
                continue
            staged[key] = converted
        if bad:
            raise TypeError(f"state_dict values must be arrays of real numbers (float, int or "
                            f"bool) to load into {type(self).__name__}; got " + ", ".join(bad))
        if strict:
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in missing) + ".")
            if unexpected:
                errors.insert(0, "Unexpected key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in unexpected) + ".")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        for key, value in staged.items():  # all checked and converted first
            own[key][...] = value
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats})")

    # -- deployment: building from a state dict, the evaluation affine map ----------
    @classmethod
    def from_state_dict(cls, state_dict, prefix="", *, dtype=None, **kwargs):
        """A module built from the keys under ``prefix`` of a (whole model's) state dict.

        ``affine``, ``bias`` and ``track_running_stats`` are inferred from the
        keys present (``weight``, ``bias``, ``running_mean``/``running_var``),
        ``num_features`` from their shape; the values are then loaded with
        :meth:`load_state_dict` (strict).  Like a new torch module, the result
        is in training mode: call :meth:`eval` for inference.

        Parameters
        ----------
        state_dict : mapping
            Keys to arrays (NumPy, ml_dtypes, torch tensors), e.g. from
            :func:`bnfast.io.load_state_dict`.
        prefix : str
            The module's key prefix, e.g. ``"layer1.0.bn1."``.
        dtype : dtype, optional
            The module's dtype; default: the dtype of the stored floating values.
        **kwargs
            Other constructor arguments (``eps``, ``momentum``, ``n_threads``):
            a state dict does not hold them.

        Returns
        -------
        module : cls

        Raises
        ------
        ValueError
            No BatchNorm keys under ``prefix``, or keys of inconsistent shapes.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> state = {"bn.weight": np.full(2, 2.0), "bn.bias": np.zeros(2),
        ...          "bn.running_mean": np.zeros(2), "bn.running_var": np.ones(2)}
        >>> bn = bnfast.BatchNorm2d.from_state_dict(state, "bn.")
        >>> bn
        BatchNorm2d(2, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
        >>> bn.weight
        array([2., 2.])
        """
        from ._state_dict import module_from_state_dict
        return module_from_state_dict(cls, state_dict, prefix, dtype, kwargs)

    def affine_coefficients(self, dtype=None):
        """``(scale, shift)`` of shape (C,) with ``eval(x) == x * scale + shift`` per channel.

        ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias -
        running_mean * scale``, computed in float64 and rounded once to
        ``dtype`` (default: the module's dtype): what folding a BatchNorm
        into the layer before it (:mod:`bnfast.fold`) multiplies and adds.

        Raises
        ------
        ValueError
            The module keeps no running statistics: its evaluation uses each
            batch's statistics and is no fixed affine map.

        Examples
        --------
        >>> import numpy as np, bnfast
        >>> bn = bnfast.BatchNorm1d(2, dtype=np.float64)
        >>> bn.running_mean[:] = [1.0, 2.0]
        >>> bn.running_var[:] = [4.0, 0.25]
        >>> scale, shift = bn.affine_coefficients()
        >>> scale.round(3), shift.round(3)
        (array([0.5, 2. ]), array([-0.5, -4. ]))
        """
        from ._state_dict import affine_coefficients
        return affine_coefficients(self, self.dtype if dtype is None else dtype)


def _count_fits(value, dtype):
    """Whether ``value`` (any real dtype) holds counts ``dtype`` can take: finite, not
    negative, in range (a float truncates, as torch's copy_ does)."""
    if value.dtype.kind == "b":
        return True
    if value.dtype.kind == "u":
        return bool(np.all(value <= np.iinfo(dtype).max))
    if value.dtype.kind == "i":
        return bool(np.all(value >= 0))
    wide = value.astype(np.float64)
    return bool(np.all(np.isfinite(wide) & (wide > -1.0) & (wide < 2.0 ** 63)))


def _backward_arguments(saved, grad_output, out, retain_graph):
    """``(grad_output, out)`` of a module's backward, checked against what its forward
    saved (``saved.input``, ``saved.input_overwritten``): the modules' and
    SyncBatchNorm's checks."""
    x = saved.input
    if saved.input_overwritten:
        raise RuntimeError("backward() needs the forward's input, but that forward wrote "
                           "its output over it (out=input): run it out of place")
    dy = check_same_shape(grad_output, "grad_output", x)
    if out is not None:
        out = check_out(out, x)
        # The saved input is the forward's own array: a retained graph reads it again.
        if retain_graph and overlaps(out, x):
            raise ValueError("out shares memory with the forward's input, which "
                             "retain_graph=True keeps for another backward: write "
                             "grad_input elsewhere")
    return dy, out


def _overflowed(value, converted):
    """True if a finite value became infinite in the conversion."""
    wide = converted.astype(np.float64)
    return bool(np.any(np.isinf(wide) & np.isfinite(value.astype(np.float64))))


def _to_numpy(value):
    """``value`` as a NumPy array; torch tensors are accepted without importing torch.

    Floating tensors narrower than float32 (bfloat16, float8: no NumPy dtype)
    are widened to float32 first, which is exact; the caller then casts to the
    module's dtype, as torch's ``load_state_dict`` casts.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        elif tensor.is_complex():
            raise TypeError(f"a complex tensor ({tensor.dtype})")
        return tensor.numpy()
    return np.asarray(value)


class BatchNorm1d(_BatchNorm):
    """Batch Normalization over (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance: non-negative, positive where batch statistics
        normalise (torch's rules).
    momentum : float or None, default 0.1
        Running-stat update factor; None for a cumulative average.
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
    bias : bool, default True (keyword-only)
        With ``affine``, whether there is a ``bias``.
    dtype : dtype or str, default np.float32
        Dtype of the data: float32, float64, float16 or ``"bfloat16"``
        (``ml_dtypes.bfloat16``); input must have this dtype.
    param_dtype : dtype or str, optional (keyword-only)
        Dtype of ``weight``, ``bias`` and the running statistics (any of the
        four).  Default: float32 for half-precision data (PyTorch's CPU
        "mixed" rule: half data, float32 parameters; a float16 running_var
        would overflow above 65504), else ``dtype``.
    n_threads : int or None (keyword-only)
        OpenMP threads (None: the OpenMP maximum).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm1d(3)
    >>> y = bn(np.random.default_rng(0).standard_normal((8, 3), dtype=np.float32))
    >>> bn.num_batches_tracked
    array(1)

    bfloat16 data (``ml_dtypes``) with float32 parameters and statistics:

    >>> bf = bnfast.BatchNorm1d(3, dtype="bfloat16")
    >>> bf.dtype, bf.param_dtype
    (dtype(bfloat16), dtype('float32'))
    >>> y = bf(np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]]).astype(bf.dtype))
    >>> y.dtype == bf.dtype, y.astype(np.float32)  # (ml_dtypes' repr changes by release)
    (True, array([[-1., -1., -1.],
           [ 1.,  1.,  1.]], dtype=float32))
    """

    _ndims = (2, 3)
    _ndim_text = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """Batch Normalization over (N, C, H, W) input, as ``torch.nn.BatchNorm2d``.

    Parameters are those of :class:`BatchNorm1d`.  Channels-last input
    (``nhwc.transpose(0, 3, 1, 2)``) is used without a copy and gives
    channels-last output.
    """

    _ndims = (4,)
    _ndim_text = "4D"


class BatchNorm3d(_BatchNorm):
    """Batch Normalization over (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``.

    Parameters are those of :class:`BatchNorm1d`.
    """

    _ndims = (5,)
    _ndim_text = "5D"
