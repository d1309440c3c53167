"""The ONNX Runtime peer: a BatchNormalization graph (BN->Add->Relu for fused_eval), inference only."""
import numpy as np

from .base import Implementation, Prepared, Unavailable
from .onnx_model import batch_norm_model

__all__ = ["OnnxRuntimePeer"]


class OnnxRuntimePeer(Implementation):
    """ONNX Runtime's CPU execution provider on a one-node (or three-node) graph.

    The graph is built by :mod:`bnfast.bench.onnx_model` (the ``onnx`` package
    is not needed).  Inputs and the output are bound to the NumPy buffers with
    ``io_binding`` (no copies) unless every call should allocate, in which
    case ``InferenceSession.run`` is timed.  ``threads`` sets
    ``intra_op_num_threads``; None keeps ONNX Runtime's default (one thread
    per physical core).
    """

    name = "onnxruntime"
    modes = ("eval", "fused_eval")

    def __init__(self, threads=None, allocate=False):
        super().__init__(threads, allocate)
        try:
            import onnxruntime
        except ImportError as exc:
            raise Unavailable(f"onnxruntime is not importable ({exc})") from None
        self.ort = onnxruntime

    @property
    def version(self):
        return self.ort.__version__

    @property
    def effective_threads(self):
        return self.threads if self.threads is not None else "default"

    def unsupported(self, case):
        if case.mode not in self.modes:
            return "onnxruntime: BatchNormalization is benchmarked for inference (eval) only"
        return None

    def _session(self, case, inputs):
        fused = case.mode == "fused_eval"
        model = batch_norm_model(case.shape, inputs.dtype, inputs.weight, inputs.bias,
                                 inputs.running_mean, inputs.running_var, inputs.eps, fused=fused)
        options = self.ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.inter_op_num_threads = 1
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        return self.ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def prepare(self, case, inputs):
        sess = self._session(case, inputs)
        feeds = {"X": inputs.x}
        if case.mode == "fused_eval":
            feeds["A"] = inputs.addend

        if self.allocate:
            def run():
                return sess.run(["Y"], feeds)[0]

            return Prepared(run, lambda: {"y": run()}, allocates=True)

        y = np.empty(case.shape, dtype=inputs.dtype)
        binding = sess.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("Y", "cpu", 0, inputs.dtype, case.shape, y.ctypes.data)

        def run():
            sess.run_with_iobinding(binding)
            return y

        return Prepared(run, lambda: {"y": run().copy()})
