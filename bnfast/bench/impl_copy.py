"""The roofline: ``np.copyto`` of the same array (``np.add`` of x and the addend for fused_eval)."""
import numpy as np

from .base import Implementation, Prepared

__all__ = ["CopyRoofline"]


class CopyRoofline(Implementation):
    """Memory traffic with no arithmetic worth the name: the speed limit for a pass over ``x``.

    ``eval``, ``train``, ``backward``: ``np.copyto(y, x)`` (read x, write y).
    ``fused_eval``: ``np.add(x, addend, out=y)`` (read two arrays, write one),
    the same traffic as the fused operation.  Always single-threaded (NumPy).
    """

    name = "copy"

    @property
    def version(self):
        return np.__version__

    @property
    def effective_threads(self):
        return 1

    def prepare(self, case, inputs):
        x = inputs.x
        y = np.empty_like(x)
        if case.mode == "fused_eval":
            addend = inputs.addend
            return Prepared(run=lambda: np.add(x, addend, out=y))
        return Prepared(run=lambda: np.copyto(y, x))

    @staticmethod
    def bytes_moved(case):
        """Bytes the roofline operation moves: 3 arrays for fused_eval, else 2."""
        return (3 if case.mode == "fused_eval" else 2) * case.nbytes
