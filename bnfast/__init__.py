"""bnfast: PyTorch-exact Batch Normalization for NumPy arrays, Cython + OpenMP kernels."""
__version__ = "0.1.0"

try:
    from . import _openmp  # noqa: F401  (the first compiled module; the others sit beside it)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    from ._not_built import not_built_error
    raise not_built_error(exc) from None  # the message carries the cause

from ._config import openmp_enabled, show_config
from .backward import ReluMask, batch_norm_backward, fused_batch_norm_backward, no_grad, relu_mask
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze
from .functional import batch_norm, fused_batch_norm
from .fused import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "ReluMask",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "convert_sync_batchnorm",
    "freeze",
    "fused_batch_norm",
    "fused_batch_norm_backward",
    "no_grad",
    "openmp_enabled",
    "relu_mask",
    "revert_sync_batchnorm",
    "show_config",
]
