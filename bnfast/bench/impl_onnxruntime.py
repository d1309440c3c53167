"""The ONNX Runtime peer: a BatchNormalization graph (BN->Add->Relu for fused_eval), inference only.

Needs the ``onnx`` extra (``pip install 'bnfast[onnx]'``): ``onnx`` builds the
graph, ``onnxruntime`` runs it.
"""
import functools

import numpy as np

from bnfast._dtypes import resolve_dtype

try:
    import onnx
    import onnxruntime
except ImportError as exc:
    raise ImportError(f"{exc.name or exc} is not installed: the ONNX Runtime peer needs "
                      "pip install 'bnfast[onnx]'") from exc

from .base import Implementation, Prepared

__all__ = ["OnnxRuntimePeer", "batch_norm_model"]

OPSET = 15


def batch_norm_model(shape, dtype, weight, bias, running_mean, running_var, eps, fused=False):
    """Serialised ONNX model (bytes): ``Y = BatchNormalization(X)``, or ``Relu(Add(BN(X), A))``.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are initializers
    (constants, as in an exported inference model); X, A and Y have the fixed
    ``shape`` and ``dtype``.
    """
    h, dtype = onnx.helper, np.dtype(dtype)
    elem = h.np_dtype_to_tensor_dtype(dtype)
    params = {"scale": weight, "B": bias, "mean": running_mean, "var": running_var}
    nodes = [h.make_node("BatchNormalization", ["X", *params], ["T" if fused else "Y"],
                         epsilon=float(eps))]
    inputs = [h.make_tensor_value_info("X", elem, shape)]
    if fused:
        nodes += [h.make_node("Add", ["T", "A"], ["U"]), h.make_node("Relu", ["U"], ["Y"])]
        inputs.append(h.make_tensor_value_info("A", elem, shape))
    graph = h.make_graph(nodes, "bnfast_bench", inputs,
                         [h.make_tensor_value_info("Y", elem, shape)],
                         [onnx.numpy_helper.from_array(np.asarray(v, dtype), k)
                          for k, v in params.items()])
    model = h.make_model(graph, producer_name="bnfast.bench",
                         opset_imports=[h.make_opsetid("", OPSET)])
    model.ir_version = 8  # what onnxruntime releases since 1.10 load
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def _runs_dtype(dtype):
    """Whether this onnxruntime has CPU kernels for the graphs in ``dtype`` (probed once)."""
    dtype = resolve_dtype(dtype)
    try:
        for fused in (False, True):
            model = batch_norm_model((2, 1), dtype, *([1.0],) * 4, 1e-5, fused)
            onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception:  # NOT_IMPLEMENTED (bfloat16 in 1.2x), or any failure to load it
        return False
    return True


class OnnxRuntimePeer(Implementation):
    """ONNX Runtime's CPU execution provider on a one-node (or three-node) graph.

    Inputs and the output are bound to the NumPy buffers with ``io_binding``
    (no copies) unless every call should allocate, in which case
    ``InferenceSession.run`` is timed.  ``threads`` sets
    ``intra_op_num_threads``; None keeps ONNX Runtime's default (one thread
    per physical core).
    """

    name = "onnxruntime"
    version = onnxruntime.__version__
    modes = ("eval", "fused_eval")

    @property
    def effective_threads(self):
        return self.threads if self.threads is not None else "default"

    def unsupported(self, case):
        if case.mode not in self.modes:
            return "onnxruntime: BatchNormalization is benchmarked for inference (eval) only"
        if not _runs_dtype(case.dtype):
            return (f"onnxruntime {onnxruntime.__version__}: no CPU BatchNormalization "
                    f"kernel for {case.dtype}")
        return None

    def prepare(self, case, inputs):
        fused = case.mode == "fused_eval"
        model = batch_norm_model(case.shape, inputs.dtype, inputs.weight, inputs.bias,
                                 inputs.running_mean, inputs.running_var, inputs.eps, fused)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.inter_op_num_threads = 1
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        sess = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feeds = {"X": inputs.x, "A": inputs.addend} if fused else {"X": inputs.x}

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
