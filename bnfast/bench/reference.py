"""The float64 NumPy reference every implementation is checked against, and the check.

The formulas are PyTorch's definitions written out plainly, computed in float64
from the same inputs; they are the ground truth for the correctness column.
"""
import math

import numpy as np

from .data import channel_axes, channel_view

__all__ = ["reference", "compare", "TOLERANCE"]

#: Largest accepted error per dtype, scaled by ``max(1, max |reference|)``.
#: Float32 carries ~7 digits; summing a million values in float32 costs
#: about two more, and an algorithm error (a biased instead of unbiased
#: running variance, a missing eps, a wrong channel) costs far more than that.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def reference(mode, inputs):
    """Exact-as-possible outputs of ``mode`` for ``inputs``, as a dict of float64 arrays.

    Keys: ``y`` (eval, fused_eval); ``y``, ``running_mean``, ``running_var``
    (train, from the initial running statistics); ``grad_input``,
    ``grad_weight``, ``grad_bias`` (backward).
    """
    x = inputs.x.astype(np.float64)
    nd = x.ndim
    axes = channel_axes(nd)
    w = inputs.weight.astype(np.float64)
    b = inputs.bias.astype(np.float64)
    rm = inputs.running_mean.astype(np.float64)
    rv = inputs.running_var.astype(np.float64)
    eps = inputs.eps

    if mode in ("eval", "fused_eval"):
        scale = w / np.sqrt(rv + eps)
        y = (x - channel_view(rm, nd)) * channel_view(scale, nd) + channel_view(b, nd)
        if mode == "fused_eval":
            y += inputs.addend
            np.maximum(y, 0.0, out=y)
        return {"y": y}

    if mode == "train":
        count = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        y = (x - channel_view(mean, nd)) / channel_view(np.sqrt(var + eps), nd)
        y = y * channel_view(w, nd) + channel_view(b, nd)
        m = inputs.momentum
        return {
            "y": y,
            "running_mean": (1 - m) * rm + m * mean,
            "running_var": (1 - m) * rv + m * var * count / (count - 1),
        }

    if mode == "backward":
        dy = inputs.grad_output.astype(np.float64)
        mean, invstd = inputs.save_mean, inputs.save_invstd
        count = x.size // x.shape[1]
        xhat = (x - channel_view(mean, nd)) * channel_view(invstd, nd)
        grad_bias = dy.sum(axis=axes)
        grad_weight = (dy * xhat).sum(axis=axes)
        grad_input = channel_view(w * invstd, nd) * (
            dy - channel_view(grad_bias / count, nd) - xhat * channel_view(grad_weight / count, nd))
        return {"grad_input": grad_input, "grad_weight": grad_weight, "grad_bias": grad_bias}

    raise ValueError(f"unknown mode {mode!r}")


def compare(outputs, expected, dtype):
    """Check an implementation's outputs against the reference.

    Parameters
    ----------
    outputs, expected : dict of str to ndarray
        The implementation's results and :func:`reference`'s, same keys.
    dtype : str
        Storage dtype of the case (selects the tolerance).

    Returns
    -------
    dict
        ``max_abs_error`` (largest absolute difference over all outputs),
        ``error`` (the largest difference scaled by ``max(1, max |reference|)``
        of its output), ``worst`` (the output it came from), ``tolerance``
        and ``correct`` (``error <= tolerance``, False for NaN, a missing
        output or a wrong shape).
    """
    tol = TOLERANCE[str(dtype)]
    errors = {}
    for key, ref in expected.items():
        got = outputs.get(key)
        if got is None or np.shape(got) != ref.shape:
            note = f"{key}: missing" if got is None else f"{key}: shape {np.shape(got)}, expected {ref.shape}"
            return {"max_abs_error": None, "error": None, "worst": key, "tolerance": tol,
                    "correct": False, "note": note}
        if ref.size == 0:
            errors[key] = (0.0, 0.0)
            continue
        d = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))  # NaN propagates
        errors[key] = (d, d / max(1.0, float(np.max(np.abs(ref)))))
    if not errors:
        return {"max_abs_error": 0.0, "error": 0.0, "worst": None, "tolerance": tol, "correct": True}
    worst = max(errors, key=lambda k: math.inf if math.isnan(errors[k][1]) else errors[k][1])
    abs_errors = [d for d, _ in errors.values()]
    max_abs = math.nan if any(math.isnan(d) for d in abs_errors) else max(abs_errors)
    scaled = errors[worst][1]
    return {"max_abs_error": max_abs, "error": scaled, "worst": worst, "tolerance": tol,
            "correct": bool(scaled <= tol)}  # False for NaN
