"""bnfast itself, called through its public functional API."""
import numpy as np

import bnfast

from .base import Implementation, Prepared, team_threads
from .check import GRADS

__all__ = ["Bnfast"]


class Bnfast(Implementation):
    """``bnfast.batch_norm`` (``addend``, ``relu`` in fused_eval), ``batch_norm_backward``
    and ``fused_batch_norm_backward`` (from the packed ``relu_mask`` a fused module keeps).

    With ``threads=None`` every OpenMP thread is used (:func:`team_threads`),
    resolved when this object is made (before any peer is imported: torch's
    start-up may change the OpenMP default) and passed explicitly on every call.
    """

    name = "bnfast"
    version = bnfast.__version__

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        self.n_threads = team_threads(threads)

    @property
    def effective_threads(self):
        return self.n_threads

    def prepare(self, case, inputs):
        mode, nt, alloc = case.mode, self.n_threads, self.allocate
        x, w, b, eps, momentum = inputs.x, inputs.weight, inputs.bias, inputs.eps, inputs.momentum
        out = None if alloc else np.empty_like(x)

        if mode in ("eval", "fused_eval"):
            rm, rv = inputs.running_mean, inputs.running_var
            addend = inputs.addend if mode == "fused_eval" else None

            def run():
                return bnfast.batch_norm(x, rm, rv, w, b, False, momentum, eps, addend=addend,
                                         relu=addend is not None, out=out, n_threads=nt)

            return Prepared(run, lambda: {"y": run().copy()}, alloc)

        if mode == "train":
            def train(rm, rv):
                return bnfast.batch_norm(x, rm, rv, w, b, True, momentum, eps, out=out,
                                         n_threads=nt)

            def check():
                rm, rv = inputs.fresh_running_stats()
                return {"y": train(rm, rv).copy(), "running_mean": rm, "running_var": rv}

            running = inputs.fresh_running_stats()
            return Prepared(lambda: train(*running), check, alloc)

        dy, training = inputs.grad_output, mode != "backward_eval"
        mean, invstd = inputs.stats(training)
        if mode == "fused_backward":
            mask = bnfast.relu_mask(inputs.relu_output, n_threads=nt)  # what a fused module keeps
            addend_out = None if alloc else np.empty_like(x)

            def run():
                return bnfast.fused_batch_norm_backward(dy, x, mask, w, mean, invstd, True, eps,
                                                        out=out, addend_out=addend_out,
                                                        n_threads=nt)
        else:
            def run():
                return bnfast.batch_norm_backward(dy, x, w, mean, invstd, training, eps, out=out,
                                                  n_threads=nt)

        return Prepared(run, lambda: {k: g.copy() for k, g in zip(GRADS, run())}, alloc)
