"""bnfast: PyTorch-exact Batch Normalization for NumPy arrays, Cython + OpenMP kernels."""
__version__ = "0.1.0"

from ._config import openmp_enabled, show_config
from .functional import batch_norm, fused_batch_norm
from .fused import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "batch_norm",
    "fused_batch_norm",
    "openmp_enabled",
    "show_config",
]
