"""Type stub for the compiled statistics kernels (src/_stats.pyx).

Arrays are float32 or float64 (one specialisation each); ``mean`` and ``var``
are float64 outputs of shape (C,), ``var`` biased; ``residual`` (optional)
receives the exact mean minus ``mean`` (what rounding the mean lost).  Index a kernel with
``"float"`` or ``"double"`` to get its specialisation directly.
"""
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

class _Kernel:
    def __call__(self, x: npt.NDArray[np.floating[Any]], mean: npt.NDArray[np.float64],
                 var: npt.NDArray[np.float64], n_threads: int,
                 residual: Optional[npt.NDArray[np.float64]] = None) -> None: ...
    def __getitem__(self, ctype: str) -> "_Kernel": ...

channels_first: _Kernel  # x: (N, C, S) C-contiguous
channels_last: _Kernel   # x: (M, C) C-contiguous

class _Update:
    def __call__(self, running_mean: npt.NDArray[np.floating[Any]],
                 running_var: npt.NDArray[np.floating[Any]], mean: npt.NDArray[np.float64],
                 var: npt.NDArray[np.float64], count: float, momentum: float) -> None: ...
    def __getitem__(self, ctype: str) -> "_Update": ...

# In place: running = (1 - momentum) * running + momentum * batch (unbiased var).
update_running: _Update
