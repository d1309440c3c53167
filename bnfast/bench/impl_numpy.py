"""The NumPy peer: a straightforward vectorised BatchNorm, as a NumPy user would write it.

Computed in the input's dtype (as a user would), with ufunc ``out=`` into
preallocated buffers unless the benchmark asks every call to allocate.
Temporaries that the formulas need (``x.var``, ``xhat``) are allocated as
NumPy allocates them.
"""
import numpy as np

from .base import Implementation, Prepared

__all__ = ["NumpyPeer"]


def channel_axes(ndim):
    """The axes BatchNorm reduces over: all but axis 1."""
    return (0,) + tuple(range(2, ndim))


def channel_view(vec, ndim):
    """A (C,) vector shaped to broadcast against an (N, C, *spatial) array."""
    return vec.reshape((1, -1) + (1,) * (ndim - 2))


class NumpyPeer(Implementation):
    """BatchNorm in plain NumPy (single-threaded: ufuncs and reductions do not use threads)."""

    name = "numpy"
    version = np.__version__
    modes = ("eval", "train", "backward", "fused_eval")

    @property
    def effective_threads(self):
        return 1

    def unsupported(self, case):
        if case.dtype in ("float16", "bfloat16"):
            return ("numpy: not benchmarked in half precision (its reductions accumulate in "
                    "the storage type: a bfloat16 mean of 10,000 U(0, 1) values is 0.0256)")
        return super().unsupported(case)

    def prepare(self, case, inputs):
        x, eps, m = inputs.x, inputs.eps, inputs.momentum
        nd, dtype = x.ndim, x.dtype
        axes = channel_axes(nd)
        w, b = inputs.weight, inputs.bias
        alloc = self.allocate
        y = None if alloc else np.empty_like(x)

        def normalize(mean, var, out):
            scale = w / np.sqrt(var + dtype.type(eps))
            shift = b - mean * scale
            if out is None:
                return x * channel_view(scale, nd) + channel_view(shift, nd)
            np.multiply(x, channel_view(scale, nd), out=out)
            np.add(out, channel_view(shift, nd), out=out)
            return out

        if case.mode in ("eval", "fused_eval"):
            rm, rv = inputs.running_mean, inputs.running_var
            addend = inputs.addend if case.mode == "fused_eval" else None

            def run():
                out = normalize(rm, rv, y)
                if addend is not None:
                    np.add(out, addend, out=out)
                    np.maximum(out, 0, out=out)
                return out

            return Prepared(run, lambda: {"y": run().copy()}, alloc)

        if case.mode == "train":
            count = x.size // x.shape[1]

            def train(rm, rv):
                mean = x.mean(axis=axes)
                var = x.var(axis=axes)
                out = normalize(mean, var, y)
                rm *= 1 - m
                rm += m * mean
                rv *= 1 - m
                rv += (m * count / (count - 1)) * var
                return out

            rm_run, rv_run = inputs.fresh_running_stats()

            def check():
                rm, rv = inputs.fresh_running_stats()
                return {"y": train(rm, rv).copy(), "running_mean": rm, "running_var": rv}

            return Prepared(lambda: train(rm_run, rv_run), check, alloc)

        if case.mode == "backward":
            dy = inputs.grad_output
            mean, invstd = (s.astype(dtype) for s in inputs.stats(True))
            count = x.size // x.shape[1]
            gi = None if alloc else np.empty_like(x)

            def run():
                xhat = (x - channel_view(mean, nd)) * channel_view(invstd, nd)
                grad_bias = dy.sum(axis=axes)
                grad_weight = (dy * xhat).sum(axis=axes)
                k = channel_view(grad_weight / count, nd)
                if gi is None:
                    grad_input = dy - xhat * k
                else:
                    grad_input = np.multiply(xhat, k, out=gi)
                    np.subtract(dy, grad_input, out=grad_input)
                np.subtract(grad_input, channel_view(grad_bias / count, nd), out=grad_input)
                np.multiply(grad_input, channel_view(w * invstd, nd), out=grad_input)
                return grad_input, grad_weight, grad_bias

            def check():
                gi_, gw, gb = run()
                return {"grad_input": gi_.copy(), "grad_weight": gw, "grad_bias": gb}

            return Prepared(run, check, alloc)

        raise ValueError(f"unknown mode {case.mode!r}")
