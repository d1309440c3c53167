"""State-dict plumbing shared by the modules, :mod:`bnfast.io` and :mod:`bnfast.fold`.

NumPy only: torch tensors are recognised without importing torch, and
ml_dtypes (bfloat16, float8) is imported only when such a tensor appears.
"""
import numpy as np

from ._dtypes import resolve_dtype

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# torch dtypes without a NumPy dtype, read through an integer view of the same width.
_ML_DTYPES = {"torch.bfloat16": ("bfloat16", "int16"),
              "torch.float8_e4m3fn": ("float8_e4m3fn", "uint8"),
              "torch.float8_e5m2": ("float8_e5m2", "uint8")}


def ml_dtypes_module(what):
    """``import ml_dtypes``, or an ImportError that names the extra to install."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"{what} needs ml_dtypes (NumPy has no such dtype): "
                          'pip install "bnfast[safetensors]"') from None
    return ml_dtypes


def as_numpy(value, key="value"):
    """``value`` as an ndarray of the same dtype: torch tensors (without importing
    torch; bfloat16/float8 tensors as ml_dtypes arrays), arrays, array-likes."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "dtype"):
        tensor = value.detach().cpu()
        special = _ML_DTYPES.get(str(tensor.dtype))
        if special is None:
            return tensor.numpy()
        ml_dtypes = ml_dtypes_module(f"{key} ({tensor.dtype})")
        import torch  # a tensor exists, so torch is installed (and already imported)
        int_view = tensor.contiguous().view(getattr(torch, special[1]))
        return int_view.numpy().view(getattr(ml_dtypes, special[0]))
    return np.asarray(value)


def is_floating(dtype):
    """NumPy floats and ml_dtypes' floating types (bfloat16, float8_*)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    if dtype.kind != "V" or dtype.names is not None:
        return False
    try:
        import ml_dtypes
    except ImportError:  # then no array can have its dtypes
        return False
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def module_keys(state_dict, prefix):
    """``{name: value}`` of the keys directly under ``prefix`` (no further dots)."""
    n = len(prefix)
    return {key[n:]: value for key, value in state_dict.items()
            if isinstance(key, str) and key.startswith(prefix) and "." not in key[n:]}


def batch_norm_prefixes(state_dict):
    """Prefixes holding both ``running_mean`` and ``running_var``, in key order."""
    found = {}
    for key in state_dict:
        if not isinstance(key, str):
            continue
        head, dot, name = key.rpartition(".")
        prefix = head + dot
        if name == "running_mean" and f"{prefix}running_var" in state_dict:
            found[prefix] = None
    return list(found)


def module_from_state_dict(cls, state_dict, prefix, dtype, kwargs):
    """What ``cls.from_state_dict`` does (see there)."""
    own = {k: as_numpy(v, prefix + k) for k, v in module_keys(state_dict, prefix).items()}
    if "weight" not in own and "running_mean" not in own:
        raise ValueError(f"no BatchNorm keys (weight, running_mean) under prefix {prefix!r}")
    affine = "weight" in own
    if "bias" in own and not affine:
        raise ValueError(f"{prefix}bias without {prefix}weight: a BatchNorm's bias needs its "
                         "weight (affine=True)")
    tracking = "running_mean" in own or "running_var" in own
    first = own["weight"] if affine else own["running_mean"]
    if first.ndim != 1:
        name = "weight" if affine else "running_mean"
        raise ValueError(f"{prefix}{name} must have shape (C,), got shape {first.shape}")
    if dtype is None:
        if not is_floating(first.dtype):
            raise TypeError(f"{prefix}{'weight' if affine else 'running_mean'} has dtype "
                            f"{first.dtype}: pass dtype= to choose the module's dtype")
        # The stored dtype, in native byte order (an .npz keeps big-endian arrays).  The
        # parameters take the module's default (float32 for half data, issue 10's rule:
        # statistics a training step updates must not overflow), unless param_dtype= says.
        dtype = first.dtype.newbyteorder("=")
    module = cls(first.shape[0], affine=affine, track_running_stats=tracking,
                 bias="bias" in own, dtype=dtype, **kwargs)
    target = np.dtype(module.dtype)
    for key, value in own.items():
        # ml_dtypes values (kind 'V') widen exactly to float32 first, as torch
        # widens a bfloat16 tensor loaded into a float32 module.
        if value.dtype != target and value.dtype.kind == "V" and is_floating(value.dtype):
            own[key] = value.astype(np.float32)
    module.load_state_dict(own, strict=True)
    return module


def merged_state_dict(layers):
    """``{prefix + key: array}`` of every module's state dict (its arrays, not copies)."""
    state = {}
    for prefix, module in layers.items():
        for key, value in module.state_dict().items():
            state[prefix + key] = value
    return state


def affine_coefficients(module, dtype):
    """``(scale, shift)`` of a module's evaluation map, in float64, rounded once to dtype."""
    if module.running_mean is None or module.running_var is None:
        raise ValueError(f"{type(module).__name__} without running statistics "
                         "(track_running_stats=False) normalises every batch with its own "
                         "statistics: its evaluation is no fixed affine map")
    scale = 1.0 / np.sqrt(np.asarray(module.running_var, np.float64) + float(module.eps))
    if module.weight is not None:
        scale *= np.asarray(module.weight, np.float64)
    shift = -np.asarray(module.running_mean, np.float64) * scale
    if module.bias is not None:
        shift += np.asarray(module.bias, np.float64)
    dtype = resolve_dtype(dtype)
    return rounded(scale, dtype, "scale"), rounded(shift, dtype, "shift")


def rounded(values, dtype, name):
    """float64 ``values`` rounded once to ``dtype``; OverflowError naming ``name`` where a
    finite value would round to inf (float16's 65504: a folded weight or a scale)."""
    with np.errstate(over="ignore"):
        result = values.astype(dtype)
    lost = np.isinf(result.astype(np.float64)) & np.isfinite(values)
    if lost.any():
        at = tuple(int(i) for i in np.unravel_index(int(np.argmax(lost)), lost.shape))
        index = at[0] if len(at) == 1 else at
        raise OverflowError(f"{name} {float(values[at]):.6g} (index {index}) rounds to inf "
                            f"in {np.dtype(dtype).name}")
    return result
