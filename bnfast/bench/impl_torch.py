"""The PyTorch CPU peer (imported only when the benchmark runs, never by ``import bnfast``)."""
import warnings

import torch

from .base import Implementation, Prepared
from .check import GRADS

__all__ = ["TorchPeer"]


class TorchPeer(Implementation):
    """PyTorch's CPU BatchNorm kernels on tensors sharing the NumPy arrays' memory.

    Calls, per mode (``allocate=True`` / default with preallocated outputs):

    * eval, train: ``F.batch_norm`` / ``aten.native_batch_norm.out`` (the
      kernel ``F.batch_norm`` dispatches to on CPU, writing into ``out``).
    * backward, backward_eval: ``aten.native_batch_norm_backward`` / its
      ``.out`` overload, with the saved (training) or running (evaluation)
      statistics in PyTorch's own dtype.
    * fused_eval: ``relu_(F.batch_norm(x).add_(addend))``, three passes, as
      PyTorch has no fused CPU kernel for it.
    * fused_backward: ``aten.threshold_backward`` (the ReLU's gradient, which
      is also ``grad_addend``), then ``native_batch_norm_backward``.

    ``threads`` sets ``torch.set_num_threads`` (restored by :meth:`close`).
    """

    name = "torch"
    version = torch.__version__

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        self._saved_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))

    @property
    def effective_threads(self):
        return torch.get_num_threads()

    def close(self):
        torch.set_num_threads(self._saved_threads)

    def prepare(self, case, inputs):
        F, aten, mode = torch.nn.functional, torch.ops.aten, case.mode

        def t(array):  # inputs are read-only arrays: torch warns, but never writes to them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(array)

        x, w, b, rm, rv = (t(a) for a in (inputs.x, inputs.weight, inputs.bias,
                                          inputs.running_mean, inputs.running_var))
        eps, m, alloc = inputs.eps, inputs.momentum, self.allocate
        y = None if alloc else torch.empty_like(x)
        # save_mean/save_invstd outputs of the .out overload (empty in evaluation)
        save = dict(save_mean=torch.empty(0, dtype=x.dtype),
                    save_invstd=torch.empty(0, dtype=x.dtype))

        def forward(rm, rv, training):
            if alloc:
                return F.batch_norm(x, rm, rv, w, b, training, m, eps)
            return aten.native_batch_norm.out(x, w, b, rm, rv, training, m, eps, out=y, **save)[0]

        if mode in ("eval", "fused_eval"):
            a = t(inputs.addend) if mode == "fused_eval" else None

            def run():
                out = forward(rm, rv, False)
                return out if a is None else torch.relu_(out.add_(a))

            return Prepared(run, lambda: {"y": run().numpy().copy()}, alloc)

        if mode == "train":
            def check():
                rm, rv = inputs.fresh_running_stats()
                out = forward(torch.from_numpy(rm), torch.from_numpy(rv), True)
                return {"y": out.numpy().copy(), "running_mean": rm, "running_var": rv}

            running = [torch.from_numpy(a) for a in inputs.fresh_running_stats()]
            return Prepared(lambda: forward(*running, True), check, alloc)

        dy, training = t(inputs.grad_output), mode != "backward_eval"
        if training:
            stats = (None, None) + tuple(torch.from_numpy(s.astype(inputs.dtype))
                                         for s in inputs.stats(True))
        else:
            stats = (rm, rv, None, None)
        grads = tuple(torch.empty_like(a) for a in (x, w, w, x))

        def bn_backward(g):
            args = (g, x, w, *stats, training, eps, [True, True, True])
            if alloc:
                return aten.native_batch_norm_backward(*args)
            return aten.native_batch_norm_backward.out(*args, out0=grads[0], out1=grads[1],
                                                       out2=grads[2])

        if mode == "fused_backward":
            relu_out = t(inputs.relu_output)

            def run():
                if alloc:
                    g = aten.threshold_backward(dy, relu_out, 0)
                else:
                    g = aten.threshold_backward.grad_input(dy, relu_out, 0, grad_input=grads[3])
                return tuple(bn_backward(g)) + (g,)
        else:
            def run():
                return bn_backward(dy)

        return Prepared(run, lambda: {k: g.numpy().copy() for k, g in zip(GRADS, run())}, alloc)
