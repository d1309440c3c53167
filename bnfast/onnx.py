"""ONNX: BatchNormalization for ``onnx.reference`` on bnfast's kernels, modules from models.

``ops`` plugs into the reference evaluator::

    from onnx.reference import ReferenceEvaluator
    session = ReferenceEvaluator(model, new_ops=bnfast.onnx.ops)

Its ``BatchNormalization`` follows the operator's versions 6, 7, 9, 14 and 15
(the one the model's opset selects), with ONNX's conventions, which are not
PyTorch's:

- ``momentum`` weighs the old value: ``running = running * momentum +
  batch * (1 - momentum)`` (default 0.9);
- the batch variance is the biased one (divided by N, not N - 1), in the
  running variance as in ``saved_var``;
- ``epsilon`` defaults to 1e-5 when the attribute is absent;
- the mode: ``is_test`` (version 6, default training), the number of outputs
  (7 and 9: one output is inference), ``training_mode`` (14, 15);
- ``spatial=0`` (versions 6 and 7): statistics per activation, the input
  flattened to (N, C * D1 * ... * Dn), as the operator's documentation says.

Note that ``onnx.reference``'s own version-9 operator (used for opsets 9 to
13) normalises one-output nodes with batch statistics blended into the
running ones, not with the running statistics (onnx/onnx#8442); this one
follows the specification.

Needs the ``onnx`` extra: ``pip install "bnfast[onnx]"``.
"""
try:
    import onnx
    from onnx import numpy_helper
    from onnx.reference.op_run import OpRun
except ImportError:
    raise ImportError('bnfast.onnx needs onnx: pip install "bnfast[onnx]"') from None

import numpy as np

from .functional import batch_norm
from .modules import BatchNorm2d

__all__ = ["BatchNormalization", "batch_norm_layers", "ops"]


class BatchNormalization(OpRun):
    """ONNX BatchNormalization (versions 6, 7, 9, 14, 15) on :func:`bnfast.batch_norm`.

    The version is the one the evaluated model's opset selects.  Inputs and
    outputs follow the operator's specification (see :mod:`bnfast.onnx`);
    the data types are those :func:`bnfast.batch_norm` takes.

    Examples
    --------
    >>> import numpy as np, bnfast.onnx
    >>> from onnx import helper, TensorProto
    >>> from onnx.reference import ReferenceEvaluator
    >>> node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    >>> vec = [helper.make_tensor(n, TensorProto.FLOAT, [2], [1.0, 1.0])
    ...        for n in ("s", "b", "m", "v")]
    >>> graph = helper.make_graph(
    ...     [node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], vec)
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    >>> session = ReferenceEvaluator(model, new_ops=bnfast.onnx.ops)
    >>> session.run(None, {"x": np.array([[1.0, 3.0]], np.float32)})[0]
    array([[1.     , 2.99999]], dtype=float32)
    """

    op_domain = ""

    def __init__(self, onnx_node, run_params, schema=None):
        opset = run_params["opsets"].get(onnx_node.domain, onnx.defs.onnx_opset_version())
        schema = onnx.defs.get_schema("BatchNormalization", opset, onnx_node.domain)
        if schema.since_version < 6:
            raise NotImplementedError(f"BatchNormalization version {schema.since_version} "
                                      f"(opset {opset}) is not implemented: versions 6 and up")
        # The version's own attribute defaults (is_test, spatial, training_mode).
        super().__init__(onnx_node, run_params, schema)
        self.version = schema.since_version

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, is_test=None,
             spatial=None, training_mode=None):
        eps = 1e-5 if epsilon is None else float(epsilon)
        momentum = 0.9 if momentum is None else float(momentum)
        if self.version == 6:
            training = not is_test
        elif self.version < 14:  # an optional output named "" is absent
            training = any(self.onnx_node.output[1:])
        else:
            training = bool(training_mode)
        shape, stat_shape = x.shape, np.shape(mean)
        if spatial == 0 and self.version < 9:  # per activation: features C * D1 * ... * Dn
            x = x.reshape(shape[0], -1)
            scale, bias, mean, var = (np.reshape(v, -1) for v in (scale, bias, mean, var))
        if not training:
            return (batch_norm(x, mean, var, scale, bias, eps=eps).reshape(shape),)
        y, batch_mean, batch_var = _batch_statistics(x, scale, bias, eps)
        mean_dtype = np.asarray(mean).dtype if self.version >= 15 else y.dtype
        running_mean = (np.asarray(mean, np.float64) * momentum
                        + batch_mean * (1.0 - momentum)).astype(mean_dtype)
        running_var = (np.asarray(var, np.float64) * momentum
                       + batch_var * (1.0 - momentum)).astype(mean_dtype)
        y = y.reshape(shape)
        # The statistics in the shape of the given ones ((C, D1, ..., Dn) with spatial=0).
        stats = [s.reshape(stat_shape) for s in (running_mean, running_var)]
        if self.version >= 14:
            return (y, *stats)
        return (y, *stats, batch_mean.astype(y.dtype).reshape(stat_shape),
                batch_var.astype(y.dtype).reshape(stat_shape))


def _batch_statistics(x, scale, bias, eps):
    """``(y, mean, biased var)`` of a batch; the statistics in float64.

    The kernel's running update with momentum 1 into float64 buffers returns
    the batch mean and the unbiased variance, exactly as computed; the biased
    variance is that times (n - 1) / n.  One value per channel (where torch
    raises) gives the mean itself and a zero variance, as ONNX computes.
    """
    C = x.shape[1]
    n = x.size // C if C else 0
    if n == 0:  # the mean of no values: NaN, as ONNX's reference computes it
        nan = np.full(C, np.nan)
        return np.empty_like(x), nan, nan.copy()
    if n == 1:
        batch_mean = x.reshape(C).astype(np.float64)
        batch_var = np.zeros(C)
        return batch_norm(x, batch_mean, batch_var, scale, bias, eps=eps), batch_mean, batch_var
    batch_mean, batch_var = np.zeros(C), np.zeros(C)
    # epsilon = 0 is ONNX's to allow (torch's rule, the kernel's, refuses it in
    # training): the statistics (which eps does not change), then the normalise.
    y = batch_norm(x, batch_mean, batch_var, scale, bias, training=True, momentum=1.0,
                   eps=eps if eps > 0.0 else 1.0)
    batch_var *= (n - 1) / n
    if not eps > 0.0:
        y = batch_norm(x, batch_mean, batch_var, scale, bias, eps=eps, out=y)
    return y, batch_mean, batch_var


#: The operators for ``ReferenceEvaluator(model, new_ops=bnfast.onnx.ops)``.
ops = [BatchNormalization]


def _constants(model):
    """Names to arrays: the graph's initializers, its Constant nodes' values and
    ConstantOfShape nodes of a constant shape (the onnx test models' light_*)."""
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "ConstantOfShape" and node.input[0] in values:
            fill = (numpy_helper.to_array(node.attribute[0].t) if node.attribute
                    else np.zeros(1, np.float32))  # the operator's default: float32 zero
            values[node.output[0]] = np.full(values[node.input[0]].astype(np.int64),
                                             fill.reshape(()), fill.dtype)
        elif node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats"):
                values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr),
                                                    np.float32)
    return values


def _value_dtypes(model):
    """Names to the NumPy dtypes the graph declares for them (inputs, outputs,
    value_info, and what ONNX's shape inference adds where it can)."""
    graph = model.graph
    infos = list(graph.input) + list(graph.output) + list(graph.value_info)
    try:
        infos += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # a model inference cannot type: the declared types only
        pass
    dtypes = {}
    for info in infos:
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        if elem:
            try:
                dtypes.setdefault(info.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)))
            except (KeyError, TypeError, ValueError):
                pass
    return dtypes


def batch_norm_layers(model, *, cls=BatchNorm2d, dtype=None):
    """Every BatchNormalization node of an ONNX model's graph, as a bnfast module in eval mode.

    Parameters come from the graph's initializers, ``Constant`` nodes or
    ``ConstantOfShape`` nodes of a constant shape;
    ``epsilon`` is taken as stored (a float32 attribute), ``momentum`` is
    converted to PyTorch's convention (``1 - momentum``).

    Parameters
    ----------
    model : onnx.ModelProto or str or os.PathLike
        The model, or its file.
    cls : class or callable, default :class:`bnfast.BatchNorm2d`
        The module class, or a function ``node name -> class``.
    dtype : dtype, optional
        The modules' data dtype; by default the node's input ``X`` as the
        graph types it (opset 15 lets it differ from ``scale``'s), else the
        dtype of ``scale``.

    Returns
    -------
    dict of str to module
        ``{node name: module}`` in graph order (a node without a name is
        named by its first output).

    Raises
    ------
    ValueError
        A parameter that is no constant (computed in the graph), a
        non-spatial node (``spatial=0``), which no BatchNormXd computes, or
        two nodes of one name.

    Examples
    --------
    >>> import numpy as np, bnfast.onnx
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
    ...                         name="bn1", epsilon=1e-3, momentum=0.99)
    >>> vec = [helper.make_tensor(n, TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    ...        for n in ("s", "b", "m", "v")]
    >>> graph = helper.make_graph([node], "g", [], [], vec)
    >>> layers = bnfast.onnx.batch_norm_layers(helper.make_model(graph))
    >>> bn = layers["bn1"]
    >>> bn.training, bn.weight, round(bn.momentum, 6), round(bn.eps, 9)
    (False, array([1., 2., 3.], dtype=float32), 0.01, 0.001)
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    constants = _constants(model)
    data_dtypes = _value_dtypes(model) if dtype is None else {}
    layers = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        if name in layers:
            raise ValueError(f"two BatchNormalization nodes are named {name!r}: the layers are "
                             "keyed by node name: rename one of them")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("spatial", 1) == 0:
            raise ValueError(f"BatchNormalization node {name!r} has spatial=0 (statistics per "
                             "activation), which no BatchNormXd computes")
        state = {}
        for key, input_name in zip(("weight", "bias", "running_mean", "running_var"),
                                   node.input[1:5]):
            if input_name not in constants:
                raise ValueError(f"BatchNormalization node {name!r}: input {input_name!r} "
                                 f"({key}) is no initializer or Constant")
            state[key] = constants[input_name]
        momentum = float(attrs.get("momentum", 0.9))
        klass = cls if isinstance(cls, type) else cls(name)
        module = klass.from_state_dict(state, dtype=dtype or data_dtypes.get(node.input[0]),
                                       eps=float(attrs.get("epsilon", 1e-5)),
                                       momentum=1.0 - momentum)
        layers[name] = module.eval()
    return layers
