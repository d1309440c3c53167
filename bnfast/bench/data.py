"""Deterministic inputs for one (shape, dtype): activations, parameters, statistics.

Every implementation of a case gets the same arrays (read-only views where it
must not write), so their results can be compared with one reference.
"""
import numpy as np

__all__ = ["Inputs", "channel_axes", "channel_view"]

EPS = 1e-5
MOMENTUM = 0.1


def channel_axes(ndim):
    """The axes BatchNorm reduces over: all but axis 1."""
    return (0,) + tuple(range(2, ndim))


def channel_view(vec, ndim):
    """A (C,) vector shaped to broadcast against an (N, C, *spatial) array."""
    return vec.reshape((1, -1) + (1,) * (ndim - 2))


class Inputs:
    """Arrays for one (shape, dtype), made on first use and kept for all modes.

    Parameters
    ----------
    shape : tuple of int
        ``(N, C, *spatial)``.
    dtype : str
        ``"float32"`` or ``"float64"``.
    seed : int
        Seed of the generator; the same seed gives the same arrays.

    Attributes
    ----------
    x : ndarray
        Input, ``2 * standard normal + 0.5`` (a non-zero mean exercises the
        variance computation).
    weight, bias, running_mean, running_var : ndarray of shape (C,)
        Affine parameters and running statistics, in ``dtype``.
    eps, momentum : float
        BatchNorm constants (PyTorch's defaults).
    """

    def __init__(self, shape, dtype, seed=0):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.eps = EPS
        self.momentum = MOMENTUM
        self._rng = np.random.default_rng(seed)
        C = self.shape[1]
        self.x = self._normal(self.shape, scale=2.0, loc=0.5)
        self.weight = self._rng.uniform(0.5, 1.5, C).astype(self.dtype)
        self.bias = (0.1 * self._rng.standard_normal(C)).astype(self.dtype)
        self.running_mean = (0.5 + 0.1 * self._rng.standard_normal(C)).astype(self.dtype)
        self.running_var = self._rng.uniform(0.5, 2.0, C).astype(self.dtype)
        for a in (self.x, self.weight, self.bias, self.running_mean, self.running_var):
            a.flags.writeable = False
        self._addend = self._grad_output = self._stats = None

    def _normal(self, shape, scale=1.0, loc=0.0):
        a = self._rng.standard_normal(shape, dtype=self.dtype)
        if scale != 1.0:
            a *= scale
        if loc:
            a += loc
        return a

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def addend(self):
        """Residual added before the ReLU in ``fused_eval`` (standard normal)."""
        if self._addend is None:
            self._addend = self._normal(self.shape)
            self._addend.flags.writeable = False
        return self._addend

    @property
    def grad_output(self):
        """Upstream gradient for ``backward`` (standard normal)."""
        if self._grad_output is None:
            self._grad_output = self._normal(self.shape)
            self._grad_output.flags.writeable = False
        return self._grad_output

    @property
    def save_mean(self):
        """Batch mean of ``x`` per channel, float64 (what a training forward saves)."""
        return self._batch_stats()[0]

    @property
    def save_invstd(self):
        """``1 / sqrt(batch_var + eps)`` per channel, float64 (biased variance)."""
        return self._batch_stats()[1]

    def _batch_stats(self):
        if self._stats is None:
            x64 = self.x.astype(np.float64)
            axes = channel_axes(self.ndim)
            mean = x64.mean(axis=axes)
            var = x64.var(axis=axes)
            invstd = 1.0 / np.sqrt(var + self.eps)
            mean.flags.writeable = invstd.flags.writeable = False
            self._stats = (mean, invstd)
        return self._stats

    def fresh_running_stats(self):
        """Writable copies of the running statistics (training updates them in place)."""
        return self.running_mean.copy(), self.running_var.copy()
