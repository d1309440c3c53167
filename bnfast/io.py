"""Weights from model files: state dicts in and out, BatchNorm modules from them.

Formats, chosen by the file's suffix:

- ``.safetensors``: ``safetensors.numpy`` (``pip install "bnfast[safetensors]"``;
  bfloat16 and float8 tensors load as ``ml_dtypes`` arrays, keeping their dtype:
  read by the format's own layout where ``safetensors.numpy`` has no NumPy type);
- ``.npz``: NumPy, without pickles (no bfloat16: NumPy's format cannot name it);
- ``.pt``/``.pth``: torch, if installed (``torch.load(..., weights_only=True)``).

Nothing is cast: every array keeps the dtype it was stored with.
"""
import json
import os

import numpy as np

from ._state_dict import as_numpy, batch_norm_prefixes, is_floating, merged_state_dict
from .modules import BatchNorm2d

__all__ = ["batch_norm_layers", "load_state_dict", "save_state_dict", "state_dict"]

_FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch"}


def _format(path):
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    try:
        return _FORMATS[suffix]
    except KeyError:
        raise ValueError(f"unknown state-dict file suffix {suffix!r} in {os.fspath(path)!r}: "
                         f"expected one of {', '.join(_FORMATS)}") from None


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError('.safetensors files need safetensors: '
                          'pip install "bnfast[safetensors]"') from None
    return safetensors.numpy


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError('.pt/.pth files need torch: pip install torch') from None
    return torch


# safetensors' dtype names (all little-endian) whose NumPy types come from ml_dtypes.
_ML_DTYPE_NAMES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                   "F8_E8M0": "float8_e8m0fnu"}
_NUMPY_DTYPE_NAMES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                      "U8": "u1", "BOOL": "?", "C64": "<c8"}


def _read_safetensors(path, ml_dtypes):
    """A .safetensors file's tensors in its order, by the format's own layout (an 8-byte
    little-endian header size, a JSON header, the data): for the dtypes
    ``safetensors.numpy`` cannot give NumPy (float8), and bfloat16 before ml_dtypes was
    imported."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = bytearray(f.read())  # writable arrays, as safetensors.numpy gives
    header.pop("__metadata__", None)
    state = {}
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        kind = info["dtype"]
        if kind in _ML_DTYPE_NAMES and hasattr(ml_dtypes, _ML_DTYPE_NAMES[kind]):
            dtype = np.dtype(getattr(ml_dtypes, _ML_DTYPE_NAMES[kind]))
        elif kind in _NUMPY_DTYPE_NAMES:
            dtype = np.dtype(_NUMPY_DTYPE_NAMES[kind])
        else:
            raise TypeError(f"{os.fspath(path)}: tensor {name!r} has dtype {kind}, which "
                            "neither NumPy nor ml_dtypes has")
        start, stop = info["data_offsets"]
        state[name] = np.frombuffer(data, dtype, (stop - start) // dtype.itemsize,
                                    start).reshape(info["shape"])
    return state


def load_state_dict(path):
    """Read a state dict from a ``.safetensors``, ``.npz``, ``.pt`` or ``.pth`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its suffix selects the format.

    Returns
    -------
    dict of str to ndarray
        In the file's order, each array with its stored dtype and shape
        (bfloat16 and float8 as ml_dtypes arrays).

    Raises
    ------
    ValueError
        An unknown suffix, or an ``.npz`` entry of no numeric dtype.
    TypeError
        A torch file that holds no flat mapping of names to tensors (a
        whole checkpoint: load it with ``torch.load`` and pass its state dict
        to :func:`batch_norm_layers`).
    ImportError
        The format's library (or ml_dtypes, for bfloat16) is missing.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from bnfast import io
    >>> path = os.path.join(tempfile.mkdtemp(), "bn.npz")
    >>> io.save_state_dict(path, {"bn.running_var": np.ones(2, np.float32)})
    >>> io.load_state_dict(path)
    {'bn.running_var': array([1., 1.], dtype=float32)}
    """
    fmt = _format(path)
    if fmt == "safetensors":
        st = _safetensors_numpy()
        try:
            return dict(st.load_file(os.fspath(path)))
        except (TypeError, AttributeError, KeyError) as exc:
            # bfloat16 ("data type 'bfloat16' not understood" until ml_dtypes is imported)
            # or float8 (no NumPy name safetensors knows): ml_dtypes' types, read here.
            try:
                import ml_dtypes
            except ImportError:
                raise ImportError(f"{os.fspath(path)} holds a dtype NumPy lacks ({exc}): "
                                  'pip install "bnfast[safetensors]" (ml_dtypes)') from None
            return _read_safetensors(path, ml_dtypes)
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
        for key, value in state.items():
            if value.dtype.kind not in "biufc":
                raise ValueError(f"{key!r} in {os.fspath(path)} has dtype {value.dtype}, which "
                                 "NumPy's format cannot name (bfloat16? use .safetensors)")
        return state
    torch = _torch()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise TypeError(f"{os.fspath(path)} holds a {type(loaded).__name__}, not a state dict")
    state = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{os.fspath(path)} is no state dict (a flat mapping of names to "
                            f"tensors): key {key!r} holds a {type(value).__name__}; load a "
                            "checkpoint with torch.load and pass its state dict on")
        state[key] = as_numpy(value, key)
    return state


def save_state_dict(path, state_dict):
    """Write a state dict to a ``.safetensors``, ``.npz``, ``.pt`` or ``.pth`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its suffix selects the format.
    state_dict : mapping of str to array_like
        Arrays (NumPy, ml_dtypes, torch tensors), e.g. from :func:`state_dict`.
        Each is stored with its dtype and shape; a ``.pt`` file holds
        torch tensors that ``torch.nn.Module.load_state_dict`` takes.

    Raises
    ------
    TypeError
        A key that is not a string, an object array, or a bfloat16/float8
        array for ``.npz``.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from bnfast import io
    >>> path = os.path.join(tempfile.mkdtemp(), "bn.npz")
    >>> io.save_state_dict(path, {"bn.weight": np.ones(3)})
    >>> io.load_state_dict(path)["bn.weight"]
    array([1., 1., 1.])
    """
    fmt = _format(path)
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        arr = as_numpy(value, key)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            arr = arr.copy(order="C")
        if arr.dtype.kind not in "biufc" and not is_floating(arr.dtype):
            raise TypeError(f"{key!r} has dtype {arr.dtype}: not an array of numbers")
        if fmt == "npz" and arr.dtype.kind == "V":
            raise TypeError(f"{key!r} has dtype {arr.dtype}, which NumPy's .npz format "
                            "cannot name: save it as .safetensors")
        arrays[key] = arr
    if fmt == "safetensors":
        _safetensors_numpy().save_file(arrays, os.fspath(path))
    elif fmt == "npz":
        with open(path, "wb") as f:  # np.savez would append .npz to other names
            np.savez(f, **arrays)
    else:
        torch = _torch()
        torch.save({key: _to_tensor(torch, arr) for key, arr in arrays.items()}, path)


def _to_tensor(torch, arr):
    if arr.dtype.kind == "V":  # ml_dtypes: through an integer view of the same width
        tensor = torch.from_numpy(arr.view(f"i{arr.dtype.itemsize}"))
        return tensor.view(getattr(torch, arr.dtype.name))
    if not arr.dtype.isnative:  # torch takes native byte order only (an .npz keeps others)
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def batch_norm_layers(state_dict, *, cls=BatchNorm2d, dtype=None, **kwargs):
    """Every BatchNorm of a model's state dict, as bnfast modules.

    A BatchNorm is a key prefix holding ``running_mean`` and ``running_var``
    (e.g. ``layer1.0.bn1.``, ``layer2.0.downsample.1.``); ``affine`` and
    ``bias`` follow from its ``weight``/``bias`` keys.  (A BatchNorm with
    ``track_running_stats=False`` stores only ``weight`` and ``bias``, as a
    LayerNorm does: it cannot be told apart, and is not returned.)

    Parameters
    ----------
    state_dict : mapping of str to array_like
        A whole model's state dict (from :func:`load_state_dict` or torch).
    cls : class or callable, default :class:`bnfast.BatchNorm2d`
        The module class, or a function ``prefix -> class``.
    dtype : dtype, optional
        The modules' dtype; default: each one's stored floating dtype.
    **kwargs
        Other constructor arguments (``eps``, ``momentum``, ``n_threads``).

    Returns
    -------
    dict of str to module
        ``{prefix: module}`` in the state dict's order; modules are in
        training mode, as new torch modules are (call ``.eval()``).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import io
    >>> state = {"conv.weight": np.ones((4, 3, 3, 3), np.float32),
    ...          "bn.weight": np.ones(4, np.float32), "bn.bias": np.zeros(4, np.float32),
    ...          "bn.running_mean": np.zeros(4, np.float32),
    ...          "bn.running_var": np.ones(4, np.float32),
    ...          "bn.num_batches_tracked": np.array(7)}
    >>> layers = io.batch_norm_layers(state)
    >>> list(layers), layers["bn."].num_features
    (['bn.'], 4)
    >>> layers["bn."].num_batches_tracked
    array(7)
    """
    layers = {}
    for prefix in batch_norm_prefixes(state_dict):
        klass = cls if isinstance(cls, type) else cls(prefix)
        layers[prefix] = klass.from_state_dict(state_dict, prefix, dtype=dtype, **kwargs)
    return layers


def state_dict(layers):
    """``{prefix: module}`` back to one state dict under PyTorch's keys.

    The keys are ``prefix + name`` as torch names them, the values the
    modules' own arrays (not copies): merge them into the model's state dict,
    and ``torch.nn.Module.load_state_dict`` takes the result (as tensors,
    e.g. after :func:`save_state_dict` to a ``.pt`` or ``.safetensors`` file).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> from bnfast import io
    >>> sorted(io.state_dict({"fc.1.": bnfast.BatchNorm1d(3)}))  # doctest: +NORMALIZE_WHITESPACE
    ['fc.1.bias', 'fc.1.num_batches_tracked', 'fc.1.running_mean', 'fc.1.running_var',
     'fc.1.weight']
    """
    return merged_state_dict(layers)
