"""Type stub for the compiled backward kernels (src/_backward.pyx).

Arrays are float32 or float64 (one dtype per call, C-contiguous); ``mask`` is a
packed ReLU mask (uint8, little bit order) or None.  The caller validates.
"""
from typing import Optional

import numpy as np
import numpy.typing as npt

_Float = npt.NDArray[np.floating]
_F64 = npt.NDArray[np.float64]
_Bits = npt.NDArray[np.uint8]

MEAN: int
SCALE: int
SLOPE: int
OFFSET: int
GRAD_WEIGHT: int
GRAD_BIAS: int

def reduce_channels_first(x: _Float, dy: _Float, mask: Optional[_Bits], mean: _F64,
                          sum_dy: _F64, sum_xdy: _F64, g: Optional[_Float],
                          n_threads: int) -> None: ...
def reduce_channels_last(x: _Float, dy: _Float, mask: Optional[_Bits], mean: _F64,
                         sum_dy: _F64, sum_xdy: _F64, g: Optional[_Float],
                         n_threads: int) -> None: ...
def coefficients(sum_dy: _F64, sum_xdy: _F64, mean: _F64, invstd: _F64, weight: _Float,
                 has_weight: bool, count: float, training: bool, coef: _F64) -> None: ...
def apply_channels_first(x: _Float, dy: _Float, mask: Optional[_Bits], coef: _F64,
                         dx: Optional[_Float], g: Optional[_Float], training: bool,
                         stream: bool, n_threads: int) -> None: ...
def apply_channels_last(x: _Float, dy: _Float, mask: Optional[_Bits], coef: _F64,
                        dx: Optional[_Float], g: Optional[_Float], training: bool,
                        stream: bool, n_threads: int) -> None: ...
def pack_positive(y: _Float, bits: _Bits, n_threads: int) -> None: ...
