"""Type stub for the one-call paths (src/_inference.pyx).

``normalize_with_running_stats`` (evaluation) and ``normalize_with_batch_stats``
(training; evaluation without running statistics) return the output, or None
when an argument is not "plain" (then the caller takes the validating general
path).
"""
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.floating[Any]]

class CoefficientCache:
    """A module's last coefficients, reused while its inputs are bitwise equal."""
    key: Optional[_F]                          # (4, C): running_mean, running_var, weight, bias
    table: Optional[npt.NDArray[np.float64]]   # (4, C): mean, invstd, scale, shift
    storage_table: Optional[npt.NDArray[np.float64]]  # _affine.table_len(C): the apply table
    mean: Optional[npt.NDArray[np.float64]]    # table[0]
    invstd: Optional[npt.NDArray[np.float64]]  # table[1]
    weight: Optional[_F]                       # key[2], or None without a weight
    def __init__(self) -> None: ...

def normalize_with_running_stats(
    x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: Any,
    addend: Any, relu: bool, out: Any, n_threads: Any,
    coef: Optional[npt.NDArray[np.float64]], mask: Optional[npt.NDArray[np.uint8]],
    cache: Optional[CoefficientCache],
) -> Optional[_F]: ...

def normalize_with_batch_stats(
    x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: Any,
    momentum: Any, addend: Any, relu: bool, out: Any, n_threads: Any,
    coef: Optional[npt.NDArray[np.float64]], mask: Optional[npt.NDArray[np.uint8]],
) -> Optional[_F]: ...
