"""Type stub for the compiled normalise/epilogue kernels (src/_normalize.pyx).

``coef`` is the (4, C) float64 table written by :func:`coefficients`:
rows mean, invstd, scale (= weight * invstd), shift (= bias).  The apply
kernels compute ``relu?((x - mean) * scale + shift + addend?)``; ``out`` may be
``x`` or ``addend`` itself; ``mask`` (optional, ``ceil(size / 8)`` bytes)
receives the packed ReLU mask bits ``not (out <= 0)``; ``residual`` (optional,
from ``_stats``) is the batch mean's rounding residual, folded into the shift.  Index a kernel with ``"float"``/``"double"`` (and
``coefficients`` with a pair) to get a specialisation directly.
"""
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.floating[Any]]

class _Coefficients:
    def __call__(self, mean: _F, var: _F, weight: _F, bias: _F, has_weight: bool,
                 has_bias: bool, eps: float, coef: npt.NDArray[np.float64]) -> None: ...
    def __getitem__(self, ctypes: "tuple[str, str]") -> "_Coefficients": ...

class _Apply:
    def __call__(self, x: _F, coef: npt.NDArray[np.float64], out: _F, addend: Optional[_F],
                 relu: bool, n_threads: int,
                 mask: Optional[npt.NDArray[np.uint8]] = None,
                 residual: Optional[npt.NDArray[np.float64]] = None) -> None: ...
    def __getitem__(self, ctype: str) -> "_Apply": ...

coefficients: _Coefficients
channels_first: _Apply  # (N, C, S) C-contiguous
channels_last: _Apply   # (M, C) C-contiguous
