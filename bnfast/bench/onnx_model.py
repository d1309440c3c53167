"""Serialise the two small ONNX graphs the ONNX Runtime peer runs, without the ``onnx`` package.

Only ``onnxruntime`` is needed to benchmark it: the ModelProto is written
directly in protobuf wire format (field numbers from ``onnx/onnx.proto``).
The graphs are

* ``eval``:       ``Y = BatchNormalization(X, scale, B, mean, var)``
* ``fused_eval``: ``Y = Relu(Add(BatchNormalization(X, ...), A))``

with scale, B, mean and var as initializers (constants, as in an exported
inference model) and X, A, Y of fixed shape.
"""
import struct

import numpy as np

__all__ = ["batch_norm_model", "OPSET"]

OPSET = 15
IR_VERSION = 8
_ELEM_TYPE = {np.dtype(np.float32): 1, np.dtype(np.float64): 11}  # TensorProto.DataType

# wire types
_VARINT, _LEN, _I32 = 0, 2, 5


def _varint(n):
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field, wire):
    return _varint((field << 3) | wire)


def _int(field, value):
    return _key(field, _VARINT) + _varint(int(value))


def _bytes(field, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _key(field, _LEN) + _varint(len(data)) + data


def _float(field, value):
    return _key(field, _I32) + struct.pack("<f", value)


def _tensor(name, array):
    """TensorProto: dims=1, data_type=2, name=8, raw_data=9 (little-endian)."""
    array = np.ascontiguousarray(array)
    msg = b"".join(_int(1, d) for d in array.shape)
    msg += _int(2, _ELEM_TYPE[array.dtype]) + _bytes(8, name)
    msg += _bytes(9, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return msg


def _value_info(name, dtype, shape):
    """ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2}}}."""
    dims = b"".join(_bytes(1, _int(1, d)) for d in shape)  # Dimension{dim_value=1}
    tensor_type = _int(1, _ELEM_TYPE[np.dtype(dtype)]) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op_type, inputs, outputs, name, float_attrs=()):
    """NodeProto: input=1, output=2, name=3, op_type=4, attribute=5."""
    msg = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    msg += _bytes(3, name) + _bytes(4, op_type)
    for attr_name, value in float_attrs:
        # AttributeProto: name=1, f=2, type=20 (FLOAT = 1)
        msg += _bytes(5, _bytes(1, attr_name) + _float(2, value) + _int(20, 1))
    return msg


def batch_norm_model(shape, dtype, weight, bias, running_mean, running_var, eps, fused=False):
    """Return a serialised ONNX model (bytes) for eval BatchNorm, optionally BN->Add->Relu.

    Parameters
    ----------
    shape : tuple of int
        Input shape ``(N, C, *spatial)``; inputs are named ``X`` (and ``A``,
        the addend, when ``fused``), the output ``Y``.
    dtype : numpy dtype
        float32 or float64, for the tensors and the parameters.
    weight, bias, running_mean, running_var : ndarray of shape (C,)
        Stored as initializers.
    eps : float
        The ``epsilon`` attribute (ONNX stores it as float32).
    fused : bool
        Append ``Add(., A)`` and ``Relu``.
    """
    dtype = np.dtype(dtype)
    params = {"scale": weight, "B": bias, "mean": running_mean, "var": running_var}
    bn_out = "T" if fused else "Y"
    nodes = [_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], [bn_out], "bn",
                   float_attrs=[("epsilon", float(eps))])]
    inputs = [_value_info("X", dtype, shape)]
    if fused:
        nodes += [_node("Add", ["T", "A"], ["U"], "add"), _node("Relu", ["U"], ["Y"], "relu")]
        inputs.append(_value_info("A", dtype, shape))
    # GraphProto: node=1, name=2, initializer=5, input=11, output=12
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "bnfast_bench")
    graph += b"".join(_bytes(5, _tensor(k, np.asarray(v, dtype=dtype))) for k, v in params.items())
    graph += b"".join(_bytes(11, i) for i in inputs)
    graph += _bytes(12, _value_info("Y", dtype, shape))
    # ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8 {domain=1, version=2}
    return (_int(1, IR_VERSION) + _bytes(2, "bnfast.bench") + _bytes(7, graph)
            + _bytes(8, _bytes(1, "") + _int(2, OPSET)))
