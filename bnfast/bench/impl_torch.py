"""The PyTorch CPU peer (imported only when the benchmark runs, never by ``import bnfast``)."""
import warnings

from .base import Implementation, Prepared, Unavailable

__all__ = ["TorchPeer"]


class TorchPeer(Implementation):
    """PyTorch's CPU BatchNorm kernels on tensors sharing the NumPy arrays' memory.

    Calls, per mode (``allocate=True`` / default with preallocated outputs):

    * eval, train: ``F.batch_norm`` / ``aten.native_batch_norm.out`` (the
      kernel ``F.batch_norm`` dispatches to on CPU, writing into ``out``).
    * backward: ``aten.native_batch_norm_backward`` / its ``.out`` overload,
      with the saved statistics in PyTorch's own dtype.
    * fused_eval: ``relu_(F.batch_norm(x).add_(addend))``, three passes, as
      PyTorch has no fused CPU kernel for it.

    ``threads`` sets ``torch.set_num_threads`` (restored by :meth:`close`).
    """

    name = "torch"

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        try:
            import torch
        except ImportError as exc:  # also when sys.modules["torch"] is None
            raise Unavailable(f"torch is not importable ({exc})") from None
        self.torch = torch
        self._saved_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))

    @property
    def version(self):
        return self.torch.__version__

    @property
    def effective_threads(self):
        return self.torch.get_num_threads()

    def close(self):
        self.torch.set_num_threads(self._saved_threads)

    def _tensor(self, array):
        # Inputs are read-only arrays; torch warns about that but never writes to them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.torch.from_numpy(array)

    def prepare(self, case, inputs):
        torch, F = self.torch, self.torch.nn.functional
        aten = torch.ops.aten
        t = self._tensor
        x, w, b = t(inputs.x), t(inputs.weight), t(inputs.bias)
        eps, m = inputs.eps, inputs.momentum
        alloc = self.allocate
        y = None if alloc else torch.empty_like(x)
        # save_mean/save_invstd outputs of the .out overload (empty in evaluation)
        save = (torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype))

        if case.mode in ("eval", "fused_eval"):
            rm, rv = t(inputs.running_mean), t(inputs.running_var)
            a = t(inputs.addend) if case.mode == "fused_eval" else None

            def run():
                if alloc:
                    out = F.batch_norm(x, rm, rv, w, b, False, m, eps)
                else:
                    out = aten.native_batch_norm.out(x, w, b, rm, rv, False, m, eps, out=y,
                                                     save_mean=save[0], save_invstd=save[1])[0]
                if a is not None:
                    torch.relu_(out.add_(a))
                return out

            return Prepared(run, lambda: {"y": run().numpy().copy()}, alloc)

        if case.mode == "train":
            def train(rm, rv):
                if alloc:
                    return F.batch_norm(x, rm, rv, w, b, True, m, eps)
                return aten.native_batch_norm.out(x, w, b, rm, rv, True, m, eps, out=y,
                                                  save_mean=save[0], save_invstd=save[1])[0]

            rm_run, rv_run = (torch.from_numpy(a) for a in inputs.fresh_running_stats())

            def check():
                rm, rv = inputs.fresh_running_stats()
                out = train(torch.from_numpy(rm), torch.from_numpy(rv))
                return {"y": out.numpy().copy(), "running_mean": rm, "running_var": rv}

            return Prepared(lambda: train(rm_run, rv_run), check, alloc)

        if case.mode == "backward":
            dy = t(inputs.grad_output)
            sm = torch.from_numpy(inputs.save_mean.astype(inputs.dtype))
            si = torch.from_numpy(inputs.save_invstd.astype(inputs.dtype))
            mask = [True, True, True]
            if alloc:
                def run():
                    return aten.native_batch_norm_backward(dy, x, w, None, None, sm, si, True, eps, mask)
            else:
                gi, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)

                def run():
                    return aten.native_batch_norm_backward.out(dy, x, w, None, None, sm, si, True, eps,
                                                               mask, out0=gi, out1=gw, out2=gb)

            def check():
                grads = run()
                return {k: g.numpy().copy() for k, g in zip(("grad_input", "grad_weight", "grad_bias"), grads)}

            return Prepared(run, check, alloc)

        raise ValueError(f"unknown mode {case.mode!r}")
