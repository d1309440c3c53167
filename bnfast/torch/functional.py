"""``torch.nn.functional.batch_norm`` on bnfast's kernels, with torch's op as the fallback.

CPU tensors of a dtype in :data:`bnfast.torch.DTYPES` (their parameters and
buffers alike) in torch's strided layout go to bnfast's kernels in place
(contiguous, ``channels_last`` and ``channels_last_3d`` memory without a
copy; other strides are copied once by the core).
Everything else (another device, a sparse or mkldnn layout, another dtype,
forward-mode AD) runs torch's own op, with a one-time warning.

In plain eager mode a call runs a :class:`._plan.Plan` (its checks made once;
a module keeps its plan until its configuration changes; a call passes its
tensors' addresses) under a plain autograd Function (:mod:`._eager`: the
dispatcher round trip costs more than the kernels on small inputs); traced
calls (``torch.compile``, ``torch.export``, fake tensors, modes, subclasses)
go through ``torch.ops.bnfast``.
"""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_momentum
from . import _eager, _plan
from ._tensors import DTYPES, vector_dtype_ok

__all__ = ["batch_norm", "fused_batch_norm"]

_warned: "set[str]" = set()  # fallback reasons already warned about


def _fallback_reason(input, vectors, eps, training):
    """Why torch's op must run instead of ours, or None (cheap checks first: per call)."""
    dtype = input.dtype
    if not input.is_cpu or not all(v is None or v.is_cpu for v in vectors):
        devices = {t.device.type for t in (input,) + vectors if t is not None and not t.is_cpu}
        return "tensors on " + ", ".join(sorted(devices))
    if input.layout is not torch.strided:
        return f"layout {input.layout}"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    # (vectors[4], an addend, must have input's dtype: _dispatched's own check says so.)
    if not all(v is None or v.dtype is dtype or vector_dtype_ok(v, dtype) for v in vectors[:4]):
        dtypes = ", ".join(str(v.dtype) for v in vectors[:4] if v is not None)
        return f"parameters or buffers of dtype {dtypes} with {dtype} input"
    if _is_compiling():  # traced: neither applies (and both would break the graph)
        return None
    if any(v is not None and v.is_neg() for v in vectors[:4]):  # a plan reads their memory
        return "parameters or buffers that are lazy negations (Tensor.is_neg())"
    if _forward_mode((input,) + vectors):
        return "forward-mode AD tangents (torch.func.jvp, torch.autograd.forward_ad)"
    if _transformed():
        return "torch.func transforms (grad, vjp, jacrev, vmap)"
    return None


_is_compiling = torch.compiler.is_compiling
_forward_ad = torch.autograd.forward_ad
_functorch = torch._C._functorch
_interpreter_stack = getattr(_functorch, "get_interpreter_stack", None)
_TRANSFORM_TYPE = getattr(_functorch, "TransformType", None)
_JVP = getattr(_TRANSFORM_TYPE, "Jvp", None)
# The reverse transforms and vmap (Jvp is forward-mode AD's; Functionalize is not
# here: the custom operators declare what they mutate).
_TRANSFORMS = tuple(getattr(_TRANSFORM_TYPE, name) for name in ("Grad", "Vmap")
                    if hasattr(_TRANSFORM_TYPE, name))


def _transform_keys():
    """The functorch transforms the call runs inside (their TransformType keys)."""
    stack = _interpreter_stack() if _interpreter_stack is not None else None
    return [interpreter.key() for interpreter in stack] if stack else []


def _transformed():
    """True inside a torch.func transform (grad, vjp, jacrev, vmap): torch's custom
    operators support none of them (an autograd.Function needs setup_context, an op
    a batching rule), while torch's batch_norm has every rule."""
    return any(key in _TRANSFORMS for key in _transform_keys())


def _forward_mode(tensors):
    """True where forward-mode AD would carry a tangent through the call: the kernels
    have no forward-mode formula (nor can a custom operator register one), and torch
    would treat their outputs as constants (zero or no tangents, without an error)."""
    if _forward_ad._current_level >= 0 and any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return True
    return _JVP in _transform_keys()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"bnfast.torch: {reason} are not supported by bnfast's kernels; "
                      "running torch's batch_norm instead (warned once)", UserWarning,
                      stacklevel=3)


def _shape_ok(input, vectors):
    """Shapes our op takes; anything else goes to torch, which raises its own error."""
    if input.dim() < 2:
        return False
    C = input.shape[1]
    return all(v is None or (v.dim() == 1 and v.shape[0] == C) for v in vectors)


def _checks(input, training, eps, running_mean, running_var):
    # F.batch_norm's own checks, with its messages (and exception types).
    if not training and input.numel():  # torch lets an empty input through
        for buffer, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            if buffer is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    if training:
        if (running_mean is None) != (running_var is None) and input.numel():
            raise ValueError("running_mean and running_var must either both be None or "
                             "neither be None")
        size = input.shape
        # torch's rule (F._verify_batch_size): the sizes but the channels' multiply to 1.
        if input.dim() >= 2 and math.prod(size[:1] + size[2:]) == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {size}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _one_buffer(running_mean, running_var):
    # Past _checks only with an empty input, which torch's op returns as it is (the core
    # takes both buffers or neither).
    return (running_mean is None) != (running_var is None)


def _write_back(running_mean, running_var, new_mean, new_var):
    # The ops return the updated statistics (non-differentiable); this is the mutation
    # compile and export see.
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """As ``torch.nn.functional.batch_norm``, on bnfast's kernels.

    Parameters
    ----------
    input : Tensor, shape (N, C, *spatial)
    running_mean, running_var : Tensor of shape (C,) or None
        Updated in place in training (``running_var`` with the unbiased
        batch variance).
    weight, bias : Tensor of shape (C,) or None
    training : bool
        Normalise with the batch's statistics.
    momentum : float
    eps : float

    Returns
    -------
    Tensor
        Input's shape, dtype and memory format.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> bnfast.torch.batch_norm(x, None, None, training=True)
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    """
    return call(input, None, running_mean, running_var, weight, bias, training, momentum, eps,
                False, None)


def fused_batch_norm(input, running_mean, running_var, weight=None, bias=None, addend=None,
                     training=False, momentum=0.1, eps=1e-5):
    """``relu(batch_norm(input) + addend)`` in one pass (``addend`` optional, input's shape).

    Arguments as :func:`batch_norm`.  The fallback computes it with torch's
    ops (three passes).

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> bnfast.torch.fused_batch_norm(x, None, None, addend=torch.full_like(x, 0.5),
    ...                               training=True)
    tensor([[0.0000, 0.0000],
            [1.5000, 1.5000]])
    """
    return call(input, addend, running_mean, running_var, weight, bias, training, momentum,
                eps, True, None)


def call(input, addend, running_mean, running_var, weight, bias, training, momentum, eps, relu,
         owner):
    """The road of both functions and of the modules: ``relu`` selects the fused op;
    ``owner`` is the module whose plan is kept across calls (None: a plan per call)."""
    if type(eps) is not float:  # torch takes any real number, a bool or a 1-element tensor
        eps = _number(eps, "eps")
    if type(momentum) is not float and momentum is not None:
        momentum = _number(momentum, "momentum")
    if _eager.eager(input, addend, running_mean, running_var, weight, bias):
        plan_key = _plan.key(input, running_mean, running_var, weight, bias, training, eps, relu)
        plan = None
        if plan_key is not None and (addend is None or _addend_fits(addend, input)):
            if owner is not None:
                plan = _plan.lookup(owner, plan_key)
            if plan is None:
                plan = _new_plan(plan_key, input, running_mean, running_var, weight, bias,
                                 training, eps, relu, owner)
        if plan is not None:
            momentum = check_momentum(momentum) if training else 0.0
            return _eager.run(plan, input, addend, running_mean, running_var, weight, bias,
                              momentum)
    return _dispatched(input, addend, running_mean, running_var, weight, bias, training,
                       momentum, eps, relu)


def _number(value, name):
    """``value`` as torch's batch_norm reads a double argument: bools and 0-d tensors
    are numbers too; anything else raises torch's TypeError."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dim() == 0
                                   and not value.requires_grad):
        return float(value)
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float, np.floating,
                                                                  np.integer)):
        raise TypeError(f"batch_norm(): argument '{name}' must be float, not "
                        f"{type(value).__name__}")
    return value


def _addend_fits(addend, input):
    return (addend.layout is torch.strided and addend.is_cpu and addend.dtype is input.dtype
            and addend.shape == input.shape)


def _new_plan(plan_key, input, running_mean, running_var, weight, bias, training, eps, relu,
              owner):
    """A plan for this call (kept by ``owner``), or None where torch's op runs instead."""
    vectors = (running_mean, running_var, weight, bias)
    _checks(input, training, eps, running_mean, running_var)
    if (_fallback_reason(input, vectors, eps, training) is not None
            or not _shape_ok(input, vectors) or _one_buffer(running_mean, running_var)):
        return None  # _dispatched falls back (and warns)
    plan = _plan.Plan(plan_key, input, running_mean, running_var, weight, bias, training, eps,
                      relu, owner is not None)
    if owner is not None:
        owner.__dict__[_plan.ATTRIBUTE] = plan
    return plan


def _dispatched(input, addend, running_mean, running_var, weight, bias, training, momentum, eps,
                relu):
    """Through ``torch.ops.bnfast`` (tracing, modes, subclasses), or torch's own op."""
    vectors = (running_mean, running_var, weight, bias)
    # TorchScript's tracer: its graph records torch's ops alone.  (Asked only outside
    # torch.compile, whose dynamo would break the graph at the question.)
    tracing = not _is_compiling() and _eager._is_jit_tracing()
    if tracing:
        _warn_once("torch.jit.trace (TorchScript, and torch.onnx.export(dynamo=False))")
    if tracing or not all(isinstance(t, torch.Tensor) for t in (input,) + vectors
                          if t is not None):
        # Not tensors: NumPy arrays or lists, for which torch's op raises its own error, or
        # fx Proxies and other __torch_function__ objects, which record torch's ops.
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                         eps)
        return torch.relu(y if addend is None else y + addend) if relu else y
    if addend is not None and not isinstance(addend, torch.Tensor):
        # A number (fuse's fx graph cannot tell an int from a tensor): added after the op.
        return torch.relu(call(input, None, running_mean, running_var, weight, bias, training,
                               momentum, eps, False, None) + addend)
    _checks(input, training, eps, running_mean, running_var)
    reason = _fallback_reason(input, vectors + (addend,), eps, training)
    if addend is not None and reason is None and (addend.shape != input.shape
                                                  or addend.dtype != input.dtype):
        reason = "an addend of another shape or dtype than the input"
    if (reason is not None or not _shape_ok(input, vectors)
            or _one_buffer(running_mean, running_var)):
        if reason is not None:
            _warn_once(reason)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if not relu:
            return y
        return torch.relu(y if addend is None else y + addend)
    if relu:
        out, _, _, _, new_mean, new_var = torch.ops.bnfast.fused_batch_norm(
            input, addend, weight, bias, running_mean, running_var, training, momentum, eps)
    else:
        out, _, _, new_mean, new_var = torch.ops.bnfast.batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
    if training and running_mean is not None:
        _write_back(running_mean, running_var, new_mean, new_var)
    return out
