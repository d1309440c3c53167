"""Type stub for the forward entry (src/_forward.pyx).

``forward`` is the one compiled forward: statistics, running update,
coefficients and the normalise pass with its epilogue.  It trusts its
arguments; ``bnfast.functional.normalize`` checks and lays them out.
``BoundForward`` is the same forward with its arguments bound once and the
data passed by address (``bnfast.torch``'s plans).
"""
from typing import Any, Optional

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

_F = npt.NDArray[np.floating[Any]]

_Key = tuple[Optional[_F], Optional[_F], Optional[_F], Optional[_F]]

@disjoint_base
class CoefficientTable:
    """One set of evaluation coefficients and the inputs they came from (immutable)."""
    @property
    def key(self) -> _Key: ...
    @property
    def table(self) -> npt.NDArray[np.float64]: ...          # (4, C): mean, invstd, scale, shift
    @property
    def storage_table(self) -> npt.NDArray[np.float64]: ...  # the kernels' apply table
    @property
    def mean(self) -> npt.NDArray[np.float64]: ...
    @property
    def invstd(self) -> npt.NDArray[np.float64]: ...
    @property
    def weight(self) -> Optional[_F]: ...

@disjoint_base
class CoefficientCache:
    """A module's last evaluation coefficients, reused while their inputs are bitwise equal."""
    @property
    def current(self) -> Optional[CoefficientTable]: ...
    def __init__(self) -> None: ...

def forward(
    x: _F, layout: int, running_mean: Optional[_F], running_var: Optional[_F],
    weight: Optional[_F], bias: Optional[_F], batch_stats: bool, momentum: float, eps: float,
    addend: Optional[_F], relu: bool, out: _F, n_threads: int,
    coef: Optional[npt.NDArray[np.float64]], mask: Optional[npt.NDArray[np.uint8]],
    cache: Optional[CoefficientCache], limits: Optional[tuple[float, float]] = None,
) -> Optional[CoefficientTable]: ...

class RunningUpdateOverflow(OverflowError):
    """A running buffer's update would round to inf in its own dtype: args (0 for
    running_mean or 1 for running_var, channel, value)."""

@disjoint_base
class SavedStats:
    """A training forward's (4, C) float64 table (mean, invstd, scale, shift) for its backward."""
    @property
    def address(self) -> int: ...
    @property
    def channels(self) -> int: ...
    def table(self) -> npt.NDArray[np.float64]: ...

@disjoint_base
class BoundForward:
    """``forward`` with every argument but the data fixed, run on addresses."""
    def __init__(
        self, x: _F, layout: int, running_mean: Optional[_F], running_var: Optional[_F],
        weight: Optional[_F], bias: Optional[_F], batch_stats: bool, eps: float, relu: bool,
        cache: Optional[CoefficientCache],
    ) -> None: ...
    def run(
        self, x: int, addend: int, out: int, momentum: float, n_threads: int, want_stats: bool,
        mask: int, table: int = 0, update_mean: int = 0, update_var: int = 0,
    ) -> Optional[SavedStats]: ...

def moments(x: _F, layout: int, n_threads: int) -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
