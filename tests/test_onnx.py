"""bnfast.onnx: the BatchNormalization op for onnx.reference, and modules from ONNX models.

References: onnx.reference's own operator where it follows the specification,
its own formulas (``_batchnorm_test_mode``/``_batchnorm_training_mode``) where
its versioned classes do not (versions 6-9 in training, 7-9 in inference:
onnx/onnx#8442), bnfast.testing's float64 reference for ``spatial=0``, and
the outputs the onnx wheel ships with its test models.
"""
import glob
import os
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the "onnx" extra; in the "test" extra too

from onnx import TensorProto, helper, numpy_helper, version_converter  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.ops.op_batch_normalization import (  # noqa: E402
    _batchnorm_test_mode,
    _batchnorm_training_mode,
)

import bnfast  # noqa: E402
import bnfast.onnx  # noqa: E402
from bnfast.testing import reference_batch_norm  # noqa: E402
from conftest import make_input, make_params, make_running  # noqa: E402

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}
OPSETS = (6, 7, 9, 14, 15)
# Running statistics, computed in float64 here, in the data's dtype by onnx.reference.
STAT_TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _bn_bound(x, scale, bias, mean, var, eps):
    """A few ulps of the terms of ``(x - mean) * a + b``: how far two correct
    float computations (ours rounds once, the reference at every step) may be."""
    sh = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    a = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    terms = (np.abs(x64 - np.asarray(mean, np.float64).reshape(sh)) * np.abs(a.reshape(sh))
             + np.abs(np.asarray(bias, np.float64).reshape(sh)))
    return 8 * np.finfo(x.dtype).eps * terms


def assert_bn_close(actual, expected, x, scale, bias, mean, var, eps):
    """Within _bn_bound; NaN exactly where expected (0 / 0 with epsilon = 0)."""
    assert actual.dtype == expected.dtype == x.dtype and actual.shape == x.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.all(diff[~nan] <= _bn_bound(x, scale, bias, mean, var, eps)[~nan])


# -- single-node models ----------------------------------------------------------
def _model(opset, dtype, n_outputs=1, **attrs):
    t = ONNX_TYPE[dtype]
    names = ["x", "scale", "B", "mean", "var"]
    outputs = ["y", "running_mean", "running_var", "saved_mean", "saved_var"][:n_outputs]
    node = helper.make_node("BatchNormalization", names, outputs,
                            **{k: v for k, v in attrs.items() if v is not None})
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info(n, t, None)
                                             for n in names],
                              [helper.make_tensor_value_info(n, t, None) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(rng, dtype, shape=(4, 3, 5, 2)):
    C = shape[1]
    s, b = make_params(rng, C, dtype)
    m, v = make_running(rng, C, dtype)
    return {"x": make_input(rng, shape, dtype), "scale": s, "B": b, "mean": m, "var": v}


def _ours(model, feeds):
    return ReferenceEvaluator(model, new_ops=bnfast.onnx.ops).run(None, feeds)


def _mode_attrs(opset, training):
    if opset == 6:
        return {"is_test": 0 if training else 1}
    if opset >= 14:
        return {"training_mode": 1 if training else 0}
    return {}  # 7, 9: the number of outputs decides


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("eps", [None, 1e-3, 0.0], ids=["eps_default", "eps", "eps_zero"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 3), (2, 3, 2, 3, 2)])
def test_inference_matches_onnx_reference(rng, dtype, opset, eps, shape):
    feeds = _feeds(rng, dtype, shape)
    model = _model(opset, dtype, epsilon=eps, **_mode_attrs(opset, False))
    (y,) = _ours(model, feeds)
    e = np.float32(1e-5 if eps is None else eps)  # a float32 attribute (so is its default)
    args = [feeds[k] for k in ("x", "scale", "B", "mean", "var")]
    if opset in (7, 9):  # the reference's class blends batch statistics in (onnx#8442)
        expected = _batchnorm_test_mode(*args, epsilon=e)
    else:
        (expected,) = ReferenceEvaluator(model).run(None, feeds)
    assert_bn_close(y, expected, *args, float(e))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("momentum", [None, 0.5], ids=["momentum_default", "momentum"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 3), (1, 3)])
@pytest.mark.parametrize("epsilon", [1e-3, 0.0], ids=["eps", "eps_zero"])
def test_training_matches_onnx_reference(rng, dtype, opset, momentum, shape, epsilon):
    feeds = _feeds(rng, dtype, shape)
    n_outputs = 3 if opset >= 14 else 5
    model = _model(opset, dtype, n_outputs, momentum=momentum, epsilon=epsilon,
                   **_mode_attrs(opset, True))
    got = _ours(model, feeds)
    assert len(got) == n_outputs
    args = [feeds[k] for k in ("x", "scale", "B", "mean", "var")]
    eps = float(np.float32(epsilon))
    m = float(np.float32(0.9 if momentum is None else momentum))  # float32 attributes
    with np.errstate(invalid="ignore"):  # one value per channel, epsilon 0: 0 / 0
        if opset >= 14:
            expected = ReferenceEvaluator(model).run(None, feeds)
        else:  # the reference's classes mishandle these outputs (onnx#8442): its formula
            y, saved_mean, saved_var, run_mean, run_var = _batchnorm_training_mode(
                *args, momentum=m, epsilon=eps)
            expected = [y, run_mean, run_var, saved_mean, saved_var]
    # y: normalised with the batch's own statistics
    batch_mean = feeds["x"].astype(np.float64).mean(axis=(0,) + tuple(range(2, len(shape))))
    batch_var = feeds["x"].astype(np.float64).var(axis=(0,) + tuple(range(2, len(shape))))
    assert_bn_close(got[0], expected[0], feeds["x"], feeds["scale"], feeds["B"], batch_mean,
                    batch_var, eps)
    for ours, theirs in zip(got[1:], expected[1:]):
        assert ours.dtype == theirs.dtype == np.dtype(dtype) and ours.shape == (shape[1],)
        np.testing.assert_allclose(ours, theirs, **STAT_TOL[dtype])
    # ONNX's conventions: momentum weighs the old value, the variance is biased
    np.testing.assert_allclose(got[2], feeds["var"] * m + batch_var * (1 - m), **STAT_TOL[dtype])


def test_opset15_running_statistics_keep_their_own_dtype(rng):
    feeds = _feeds(rng, np.float32)
    for key in ("mean", "var"):
        feeds[key] = feeds[key].astype(np.float64)
    model = _model(15, np.float32, 3, training_mode=1)
    for i in (3, 4):  # mean, var: T2 = double
        model.graph.input[i].type.tensor_type.elem_type = TensorProto.DOUBLE
    y, rm, rv = _ours(model, feeds)
    assert y.dtype == np.float32 and rm.dtype == rv.dtype == np.float64
    batch_mean = feeds["x"].astype(np.float64).mean(axis=(0, 2, 3))
    m = float(np.float32(0.9))
    np.testing.assert_allclose(rm, feeds["mean"] * m + batch_mean * (1 - m), rtol=1e-12)


@pytest.mark.parametrize("opset", [6, 7])
@pytest.mark.parametrize("training", [False, True])
def test_non_spatial_normalises_per_activation(rng, dtype, opset, training):
    shape = (5, 2, 3)
    F = 6
    feeds = _feeds(rng, dtype, shape)
    for k, (a, b) in {"scale": make_params(rng, F, dtype),
                      "mean": make_running(rng, F, dtype)}.items():
        feeds[k] = a.reshape(2, 3)
        feeds["B" if k == "scale" else "var"] = b.reshape(2, 3)
    model = _model(opset, dtype, 5 if training else 1, spatial=0, epsilon=1e-3,
                   **_mode_attrs(opset, training))
    got = _ours(model, feeds)
    x2 = feeds["x"].reshape(5, F)
    flat = {k: feeds[k].reshape(F) for k in ("scale", "B", "mean", "var")}
    eps = float(np.float32(1e-3))
    ref = reference_batch_norm(x2, flat["mean"], flat["var"], flat["scale"], flat["B"],
                               training=training, eps=eps)
    assert got[0].shape == shape
    bmean = ref.mean if training else flat["mean"]
    bvar = 1 / ref.invstd**2 - eps if training else flat["var"]
    assert_bn_close(got[0].reshape(5, F), ref.out.astype(dtype), x2, flat["scale"], flat["B"],
                    bmean, bvar, eps)
    if training:
        assert all(g.shape == (2, 3) for g in got[1:])  # the shape of the given statistics
        m = float(np.float32(0.9))
        np.testing.assert_allclose(got[1].reshape(F), flat["mean"] * m + ref.mean * (1 - m),
                                   **STAT_TOL[dtype])
        np.testing.assert_allclose(got[4].reshape(F), x2.astype(np.float64).var(axis=0),
                                   **STAT_TOL[dtype])


def test_versions_before_6_are_refused():
    with pytest.raises(NotImplementedError, match="version 1"):
        ReferenceEvaluator(_model(5, np.float32, is_test=1, consumed_inputs=[0, 0, 0, 1, 1]),
                           new_ops=bnfast.onnx.ops)


# -- the models the onnx wheel ships ----------------------------------------------
def _read_pb(path):
    tensor = TensorProto()
    with open(path, "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


PYTORCH_CONVERTED = sorted(glob.glob(os.path.join(DATA, "pytorch-converted",
                                                  "test_BatchNorm*", "model.onnx")))


def test_pytorch_converted_models_exist():
    assert len(PYTORCH_CONVERTED) >= 5


@pytest.mark.parametrize("path", PYTORCH_CONVERTED, ids=lambda p: p.split(os.sep)[-2])
def test_pytorch_converted_models(path):
    model = onnx.load(path)
    data = os.path.join(os.path.dirname(path), "test_data_set_0")
    feeds = {model.graph.input[0].name: _read_pb(os.path.join(data, "input_0.pb"))}
    expected = _read_pb(os.path.join(data, "output_0.pb"))
    (ours,) = ReferenceEvaluator(model, new_ops=bnfast.onnx.ops).run(None, feeds)
    (theirs,) = ReferenceEvaluator(model).run(None, feeds)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # and the module batch_norm_layers builds from it computes the same
    (bn,) = bnfast.onnx.batch_norm_layers(path, cls=_cls_for(feeds)).values()
    np.testing.assert_allclose(bn(next(iter(feeds.values()))), expected, rtol=1e-5, atol=1e-6)


def _cls_for(feeds):
    ndim = next(iter(feeds.values())).ndim
    return {3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d, 5: bnfast.BatchNorm3d}[ndim]


# The light models: real BatchNorm parameters (convolution weights constant).
# Each runs at a small input where its shape allows, cut after its
# BatchNormalizations, with our operator (opset 9, as shipped) and without it
# (the model converted to opset 15, whose reference operator's inference
# follows the specification); every BatchNormalization output is also checked
# against onnx.reference's own operator applied to the same inputs.
LIGHT = [("light_resnet50", 64, 53), ("light_densenet121", 32, 121),
         ("light_inception_v2", 32, 69), ("light_shufflenet", 224, 49)]


def _through_batch_norms(model):
    """The model cut after its BatchNormalizations, whose outputs it returns (the
    models' heads need 224x224 input)."""
    outputs = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    needed, kept = set(outputs), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    graph = helper.make_graph(kept[::-1], model.graph.name, list(model.graph.input),
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in outputs],
                              list(model.graph.initializer))
    return helper.make_model(graph, opset_imports=model.opset_import,
                             ir_version=model.ir_version)


def _data_input(model):
    initialized = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initialized)


@pytest.mark.parametrize("name, size, n_bn", LIGHT, ids=[m[0] for m in LIGHT])
def test_light_models_with_and_without_our_op(rng, name, size, n_bn):
    model = _through_batch_norms(onnx.load(os.path.join(DATA, "light", name + ".onnx")))
    nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(nodes) == n_bn
    feeds = {_data_input(model): rng.standard_normal((1, 3, size, size)).astype(np.float32)}
    results = ReferenceEvaluator(model, new_ops=bnfast.onnx.ops).run(None, feeds,
                                                                     intermediate=True)
    reference_op = onnx.reference.ops.load_op("", "BatchNormalization", 15)
    for node in nodes:  # each node against the reference's operator, same inputs
        args = [results[i] for i in node.input]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        expected = reference_op.eval(*args, epsilon=eps, training_mode=0)
        assert_bn_close(results[node.output[0]], expected, *args, eps)
    theirs = ReferenceEvaluator(version_converter.convert_version(model, 15)).run(None, feeds)
    assert len(theirs) == n_bn
    for node, b in zip(nodes, theirs):  # the whole model: float32 rounding accumulates
        a = results[node.output[0]]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


# -- batch_norm_layers ---------------------------------------------------------------
def test_batch_norm_layers_of_a_light_model(rng):
    path = os.path.join(DATA, "light", "light_resnet50.onnx")
    model = onnx.load(path)
    layers = bnfast.onnx.batch_norm_layers(model)
    nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert list(layers) == [n.name for n in nodes]
    # parameters from initializers, and from ConstantOfShape nodes (evaluated by onnx)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    params = {i for n in nodes for i in n.input[1:]}
    makers = [n for n in model.graph.node if n.output[0] in params and n.output[0] not in inits]
    assert makers and all(n.op_type == "ConstantOfShape" for n in makers)
    graph = helper.make_graph(makers, "params", [], [helper.make_tensor_value_info(
        n.output[0], TensorProto.FLOAT, None) for n in makers], list(model.graph.initializer))
    made = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import))
    inits.update(zip([n.output[0] for n in makers], made.run(None, {})))
    for node in nodes:
        bn = layers[node.name]
        assert not bn.training and type(bn) is bnfast.BatchNorm2d
        for key, input_name in zip(("weight", "bias", "running_mean", "running_var"),
                                   node.input[1:]):
            np.testing.assert_array_equal(getattr(bn, key), inits[input_name])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        assert bn.eps == eps  # as stored
        assert bn.momentum == pytest.approx(0.1)
        x = make_input(rng, (2, bn.num_features, 3, 3), np.float32)
        args = [x] + [inits[i] for i in node.input[1:]]
        assert_bn_close(bn(x), _batchnorm_test_mode(*args, epsilon=eps), *args, eps)


def test_batch_norm_layers_from_constants_and_errors():
    vec = {n: np.arange(1, 4, dtype=np.float64) * (i + 1) for i, n in
           enumerate(("s", "b", "m", "v"))}
    consts = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n))
              for n, a in vec.items()]
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                          momentum=0.75, epsilon=1e-3)
    model = helper.make_model(helper.make_graph(consts + [bn], "g", [], []))
    (module,) = bnfast.onnx.batch_norm_layers(model, cls=lambda name: bnfast.BatchNorm1d).values()
    assert type(module) is bnfast.BatchNorm1d and module.dtype == np.float64
    np.testing.assert_array_equal(module.running_var, vec["v"])
    assert module.momentum == 1 - np.float32(0.75) and module.eps == float(np.float32(1e-3))
    # a parameter computed in the graph
    relu = helper.make_node("Relu", ["s0"], ["s"])
    model = helper.make_model(helper.make_graph([relu] + consts[1:] + [bn], "g", [], []))
    with pytest.raises(ValueError, match="input 's' .weight. is no initializer or Constant"):
        bnfast.onnx.batch_norm_layers(model)
    flat = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                            name="flat", spatial=0)
    model = helper.make_model(helper.make_graph(consts + [flat], "g", [], []),
                              opset_imports=[helper.make_opsetid("", 7)])
    with pytest.raises(ValueError, match="'flat' has spatial=0"):
        bnfast.onnx.batch_norm_layers(model)


@pytest.mark.parametrize("opset", [7, 9])
def test_absent_optional_outputs_leave_inference_mode(rng, dtype, opset):
    # ["y", "", "", "", ""]: an output named "" is absent; versions 7 and 9 train only
    # when the statistics outputs are there.
    feeds = _feeds(rng, dtype)
    model = _model(opset, dtype)
    model.graph.node[0].output.extend(["", "", "", ""])
    (y,) = _ours(model, feeds)
    args = [feeds[k] for k in ("x", "scale", "B", "mean", "var")]
    e = np.float32(1e-5)
    assert_bn_close(y, _batchnorm_test_mode(*args, epsilon=e), *args, float(e))


@pytest.mark.parametrize("opset", [14, 15])
def test_training_on_an_empty_batch_gives_nan_statistics_as_the_reference(rng, opset):
    # The mean of no values is NaN in ONNX's reference; no ZeroDivisionError.
    feeds = _feeds(rng, np.float32, (0, 3, 2, 2))
    model = _model(opset, np.float32, 3, training_mode=1)
    got = _ours(model, feeds)
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's mean of empty
            expected = ReferenceEvaluator(model).run(None, feeds)
    assert got[0].shape == expected[0].shape == (0, 3, 2, 2)
    for ours, theirs in zip(got[1:], expected[1:]):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))


def _two_nodes_model(scale_type, names=("bn1", "bn2")):
    def vec(n, v, t=TensorProto.FLOAT):
        return helper.make_tensor(n, t, [len(v)], v)
    inits = [vec("s", [1.0, 2.0], scale_type), vec("b", [0.0, 1.0], scale_type),
             vec("m", [0.5, 0.5]), vec("v", [1.0, 4.0]), vec("s2", [3.0, 3.0]),
             vec("b2", [0.0, 0.0]), vec("m2", [0.0, 0.0]), vec("v2", [1.0, 1.0])]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y1"],
                              name=names[0]),
             helper.make_node("BatchNormalization", ["y1", "s2", "b2", "m2", "v2"], ["y2"],
                              name=names[1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 1, 1])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 2, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_batch_norm_layers_refuse_two_nodes_of_one_name():
    with pytest.raises(ValueError, match="two BatchNormalization nodes are named 'bn'"):
        bnfast.onnx.batch_norm_layers(_two_nodes_model(TensorProto.FLOAT, ("bn", "bn")))


def test_batch_norm_layers_take_the_data_dtype_from_the_graph(rng):
    # Opset 15: float16 scale and bias, float32 data (and the inferred y1 feeding bn2).
    model = _two_nodes_model(TensorProto.FLOAT16)
    layers = bnfast.onnx.batch_norm_layers(model)
    assert [m.dtype for m in layers.values()] == [np.dtype(np.float32)] * 2
    x = rng.standard_normal((2, 2, 1, 1)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x})
    y = layers["bn2"](layers["bn1"](x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    forced = bnfast.onnx.batch_norm_layers(model, dtype=np.float64)
    assert [m.dtype for m in forced.values()] == [np.dtype(np.float64)] * 2
