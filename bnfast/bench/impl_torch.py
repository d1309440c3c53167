"""The PyTorch CPU peer (imported only when the benchmark runs, never by ``import bnfast``)."""
import warnings

import numpy as np
import torch

from bnfast._dtypes import is_bfloat16

from .base import Implementation, Prepared
from .check import GRADS

__all__ = ["TorchPeer", "to_torch", "to_numpy"]


def to_torch(array):
    """A tensor sharing ``array``'s memory; bfloat16 (``ml_dtypes``) through an int16 view,
    as torch.from_numpy does not know that dtype."""
    with warnings.catch_warnings():  # read-only inputs: torch warns, but never writes to them
        warnings.simplefilter("ignore", UserWarning)
        if is_bfloat16(array.dtype):
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def to_numpy(tensor, like):
    """``tensor`` as a NumPy array of ``like``'s dtype family (bfloat16 through int16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(like.dtype)
    return tensor.numpy()


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

    Half-precision data (float16, bfloat16) runs with float32 parameters and
    statistics, PyTorch's CPU "mixed" rule, as :class:`~bnfast.bench.data.Inputs`
    makes them.  ``threads`` sets ``torch.set_num_threads`` (restored by
    :meth:`close`).
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

        t = to_torch
        x, w, b, rm, rv = (t(a) for a in (inputs.x, inputs.weight, inputs.bias,
                                          inputs.running_mean, inputs.running_var))
        eps, m, alloc = inputs.eps, inputs.momentum, self.allocate
        y = None if alloc else torch.empty_like(x)

        def n(tensor):
            return to_numpy(tensor, inputs.x)

        # save_mean/save_invstd outputs of the .out overload (empty in evaluation),
        # in the parameters' dtype (float32 for half data)
        save = dict(save_mean=torch.empty(0, dtype=w.dtype),
                    save_invstd=torch.empty(0, dtype=w.dtype))

        def forward(rm, rv, training):
            if alloc:
                return F.batch_norm(x, rm, rv, w, b, training, m, eps)
            return aten.native_batch_norm.out(x, w, b, rm, rv, training, m, eps, out=y, **save)[0]

        if mode in ("eval", "fused_eval"):
            a = t(inputs.addend) if mode == "fused_eval" else None

            def run():
                out = forward(rm, rv, False)
                return out if a is None else torch.relu_(out.add_(a))

            return Prepared(run, lambda: {"y": n(run()).copy()}, alloc)

        if mode == "train":
            def check():
                rm, rv = inputs.fresh_running_stats()
                out = forward(torch.from_numpy(rm), torch.from_numpy(rv), True)
                return {"y": n(out).copy(), "running_mean": rm, "running_var": rv}

            running = [torch.from_numpy(a) for a in inputs.fresh_running_stats()]
            return Prepared(lambda: forward(*running, True), check, alloc)

        dy, training = t(inputs.grad_output), mode != "backward_eval"
        if training:
            stats = (None, None) + tuple(torch.from_numpy(s.astype(inputs.param_dtype))
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

        return Prepared(run, lambda: {k: n(g).copy() for k, g in zip(GRADS, run())}, alloc)
