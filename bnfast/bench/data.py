"""Deterministic inputs for one (shape, dtype): activations, parameters, statistics.

Every implementation of a case gets the same arrays (read-only: nothing may
write to them), so their results can be compared with one reference.
"""
import numpy as np

from bnfast._dtypes import is_half, resolve_dtype
from bnfast.testing import reference_batch_norm

__all__ = ["Inputs"]


def _read_only(a):
    a.flags.writeable = False
    return a


class Inputs:
    """Arrays for one (shape, dtype), made on first use and kept for all modes.

    Parameters
    ----------
    shape : tuple of int
        ``(N, C, *spatial)``.
    dtype : str
        One of :data:`bnfast.bench.suite.DTYPES`.
    seed : int
        Seed of the generator; the same seed gives the same arrays.

    Attributes
    ----------
    x : ndarray
        Input, ``2 * standard normal + 0.5`` (a non-zero mean exercises the
        variance computation).
    weight, bias, running_mean, running_var : ndarray of shape (C,)
        Affine parameters and running statistics, in ``param_dtype``.
    param_dtype : numpy.dtype
        ``dtype``, or float32 for half-precision data (PyTorch's CPU rule:
        half data with float32 parameters).
    addend, grad_output : ndarray
        The residual of the fused modes and the upstream gradient of the
        backward modes (standard normal, made on first use).
    eps, momentum : float
        BatchNorm constants (PyTorch's defaults).
    """

    eps = 1e-5
    momentum = 0.1

    def __init__(self, shape, dtype, seed=0):
        self.shape, self.dtype = tuple(shape), resolve_dtype(dtype)
        self.param_dtype = np.dtype(np.float32) if is_half(self.dtype) else self.dtype
        self._rng = np.random.default_rng(seed)
        C = self.shape[1]
        self.x = _read_only(self._normal(scale=2.0, shift=0.5))
        p = self.param_dtype
        self.weight = _read_only(self._rng.uniform(0.5, 1.5, C).astype(p))
        self.bias = _read_only((0.1 * self._rng.standard_normal(C)).astype(p))
        self.running_mean = _read_only((0.5 + 0.1 * self._rng.standard_normal(C)).astype(p))
        self.running_var = _read_only(self._rng.uniform(0.5, 2.0, C).astype(p))
        self._cache = {}

    def _normal(self, scale=1.0, shift=0.0):
        if not is_half(self.dtype):
            x = self._rng.standard_normal(self.shape, dtype=self.dtype)
            return x * self.dtype.type(scale) + self.dtype.type(shift)
        # The generator makes float32 at most: drawn in float32, rounded once.
        x = self._rng.standard_normal(self.shape, dtype=np.float32)
        x *= np.float32(scale)
        x += np.float32(shift)
        return x.astype(self.dtype)

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def addend(self):
        return self._once("addend", lambda: _read_only(self._normal()))

    @property
    def grad_output(self):
        return self._once("grad_output", lambda: _read_only(self._normal()))

    def forward(self, training, fused=False):
        """:func:`bnfast.testing.reference_batch_norm` of these inputs (float64, cached)."""
        return self._once(("forward", training, fused), lambda: reference_batch_norm(
            self.x, self.running_mean, self.running_var, self.weight, self.bias, training,
            self.momentum, self.eps, addend=self.addend if fused else None, relu=fused))

    def stats(self, training):
        """``(save_mean, save_invstd)`` in float64: batch ones, or the running ones in eval."""
        ref = self.forward(training)
        return _read_only(ref.mean), _read_only(ref.invstd)

    @property
    def relu_output(self):
        """``relu(bn(x) + addend)`` of a training forward, in ``dtype``.

        The fused backward's gate.
        """
        return self._once("relu_output", lambda: _read_only(
            self.forward(True, fused=True).out.astype(self.dtype)))

    def fresh_running_stats(self):
        """Writable copies of the running statistics (training updates them in place)."""
        return self.running_mean.copy(), self.running_var.copy()
