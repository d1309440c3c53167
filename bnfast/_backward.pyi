"""Type stub for the compiled backward entry (src/_backward.pyx).

Nothing is validated there: ``bnfast.backward`` checks and lays out every
argument first (see ``backward``'s docstring for the contract).  Data of
float32, float64, float16 or bfloat16 (``ml_dtypes``); ``backward`` returns
``(grad_weight, grad_bias)`` as float64 arrays for float64 data and float32
arrays for the other three (None where not wanted).
"""

import numpy as np
from typing_extensions import disjoint_base

# Cython's doctest dictionary (the docstrings of the def functions).

def backward(
    x: np.ndarray,
    grad_output: np.ndarray,
    mask: np.ndarray | None,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: np.ndarray | None,
    grad_input: np.ndarray | None,
    grad_addend: np.ndarray | None,
    want_weight: bool,
    want_bias: bool,
    layout: int,
    training: bool,
    stream: bool,
    n_threads: int,
    sums: np.ndarray | None = None,
    sums_given: bool = False,
    count: int = 0,
) -> tuple[np.ndarray | None, np.ndarray | None]: ...
@disjoint_base
class BoundBackward:
    """``backward`` with the geometry, weight and mode fixed, run on addresses."""
    def __init__(
        self, x: np.ndarray, weight: np.ndarray | None, layout: int, training: bool
    ) -> None: ...
    def run(
        self, x: int, grad_output: int, mask: int, mean: int, invstd: int, grad_input: int,
        grad_addend: int, grad_weight: int, grad_bias: int, stream: bool, n_threads: int,
    ) -> None: ...

def pack_positive(output: np.ndarray, bits: np.ndarray, n_threads: int) -> None: ...
