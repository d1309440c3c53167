"""bnfast's kernels inside PyTorch models on the CPU: a drop-in for ``torch.nn.BatchNorm*``.

* ``convert(model)`` / ``revert(model)``: swap every ``torch.nn.BatchNorm1d/2d/3d``
  for :class:`BatchNorm1d` & co. (subclasses of torch's) and back.
* ``fuse(model)``: rewrite ``bn -> relu`` and ``bn -> add -> relu`` into
  :class:`FusedBatchNorm2d` & co. (``torch.fx``).
* ``batch_norm``, ``fused_batch_norm``: the functional forms.
* ``empty_cache()``, ``pooled_bytes()``: let go of / count the buffers of the
  pool the large outputs come from (reused memory: no page faults of fresh
  memory on every call).
* The operators ``torch.ops.bnfast.batch_norm``, ``fused_batch_norm`` and their
  backwards (custom ops: autograd, ``torch.compile``, ``torch.export``).

Only this package imports torch (``pip install "bnfast[torch]"``).

Examples
--------
>>> import torch, bnfast.torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
>>> model = bnfast.torch.convert(model)
>>> model(torch.randn(5, 4)).shape
torch.Size([5, 3])
"""
try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError('bnfast.torch needs PyTorch: pip install "bnfast[torch]"') from exc

from . import _ops  # noqa: F401  (registers the torch.ops.bnfast operators)
from ._buffers import empty_cache, pooled_bytes
from ._convert import convert, revert
from ._fuse import fuse
from ._modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FusedBatchNorm1d,
    FusedBatchNorm2d,
    FusedBatchNorm3d,
)
from ._sync import SyncBatchNorm, convert_sync_batchnorm
from ._tensors import DTYPES
from .functional import batch_norm, fused_batch_norm

__all__ = [
    "DTYPES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "convert_sync_batchnorm",
    "empty_cache",
    "fuse",
    "fused_batch_norm",
    "pooled_bytes",
    "revert",
]
