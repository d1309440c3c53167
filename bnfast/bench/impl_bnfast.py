"""bnfast itself, called through its public functional API."""
import numpy as np

import bnfast
from bnfast._threads import resolve_threads

from .base import Implementation, Prepared

__all__ = ["Bnfast"]


class Bnfast(Implementation):
    """``bnfast.batch_norm`` / ``fused_batch_norm`` / ``batch_norm_backward``.

    With ``threads=None`` the OpenMP default is resolved when this object is
    made (before any peer is imported: torch's start-up may change the OpenMP
    default) and passed explicitly on every call.
    """

    name = "bnfast"

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        self.n_threads = resolve_threads(threads)

    @property
    def version(self):
        return bnfast.__version__

    @property
    def effective_threads(self):
        return self.n_threads

    def prepare(self, case, inputs):
        x, nt, eps, momentum = inputs.x, self.n_threads, inputs.eps, inputs.momentum
        w, b = inputs.weight, inputs.bias
        out = None if self.allocate else np.empty_like(x)

        if case.mode == "eval":
            rm, rv = inputs.running_mean, inputs.running_var

            def run():
                return bnfast.batch_norm(x, rm, rv, w, b, False, momentum, eps, out=out, n_threads=nt)

            return Prepared(run, lambda: {"y": run().copy()}, self.allocate)

        if case.mode == "fused_eval":
            rm, rv, addend = inputs.running_mean, inputs.running_var, inputs.addend

            def run():
                return bnfast.fused_batch_norm(x, rm, rv, w, b, addend, False, momentum, eps,
                                               out=out, n_threads=nt)

            return Prepared(run, lambda: {"y": run().copy()}, self.allocate)

        if case.mode == "train":
            rm_run, rv_run = inputs.fresh_running_stats()

            def train(rm, rv):
                return bnfast.batch_norm(x, rm, rv, w, b, True, momentum, eps, out=out, n_threads=nt)

            def check():
                rm, rv = inputs.fresh_running_stats()
                return {"y": train(rm, rv).copy(), "running_mean": rm, "running_var": rv}

            return Prepared(lambda: train(rm_run, rv_run), check, self.allocate)

        if case.mode == "backward":
            backward = bnfast.batch_norm_backward
            dy, save_mean, save_invstd = inputs.grad_output, inputs.save_mean, inputs.save_invstd

            def run():
                return backward(dy, x, w, save_mean, save_invstd, True, eps, out=out, n_threads=nt)

            def check():
                grad_input, gw, gb = run()
                return {"grad_input": grad_input.copy(), "grad_weight": gw, "grad_bias": gb}

            return Prepared(run, check, self.allocate)

        raise ValueError(f"unknown mode {case.mode!r}")

