"""The correctness column: each implementation's outputs against :mod:`bnfast.testing`.

The expected outputs are the float64 reference of the package
(:func:`bnfast.testing.reference_batch_norm` and
:func:`~bnfast.testing.reference_batch_norm_backward`) on the case's inputs.
"""
import math

import numpy as np

from bnfast.testing import reference_batch_norm_backward

__all__ = ["expected", "compare", "TOLERANCE", "GRADS"]

#: Largest accepted error per dtype, scaled by ``max(1, max |reference|)``.
#: Float32 carries ~7 digits; summing a million values in float32 costs
#: about two more, and an algorithm error (a biased instead of unbiased
#: running variance, a missing eps, a wrong channel) costs far more than that.
#: Half precision: two units of the last place (2**-9 float16, 2**-6 bfloat16):
#: outputs are rounded once, and sums kept in half precision (NumPy's mean
#: of bfloat16 data) are off by far more.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}

#: Output names of the backward modes, in the order the calls return them.
GRADS = ("grad_input", "grad_weight", "grad_bias", "grad_addend")


def expected(mode, inputs):
    """The reference outputs of ``mode`` for ``inputs`` (a :class:`~bnfast.bench.data.Inputs`).

    Keys: ``y`` (eval, fused_eval); ``y``, ``running_mean``, ``running_var``
    (train, from the initial running statistics); ``grad_input``,
    ``grad_weight``, ``grad_bias`` (the backward modes; fused_backward also
    ``grad_addend``).
    """
    if mode in ("eval", "train", "fused_eval"):
        ref = inputs.forward(mode == "train", fused=mode == "fused_eval")
        if mode != "train":
            return {"y": ref.out}
        return {"y": ref.out, "running_mean": ref.running_mean, "running_var": ref.running_var}
    if mode not in ("backward", "backward_eval", "fused_backward"):
        raise ValueError(f"unknown mode {mode!r}")
    training, fused = mode != "backward_eval", mode == "fused_backward"
    grads = reference_batch_norm_backward(inputs.grad_output, inputs.x, inputs.weight,
                                          *inputs.stats(training), training,
                                          output=inputs.relu_output if fused else None)
    return dict(zip(GRADS[:4 if fused else 3], grads))


def compare(outputs, expected, dtype):
    """Check an implementation's outputs against the reference.

    Parameters
    ----------
    outputs, expected : dict of str to ndarray
        The implementation's results and :func:`expected`'s, same keys.
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
            note = (f"{key}: missing" if got is None
                    else f"{key}: shape {np.shape(got)}, expected {ref.shape}")
            return {"max_abs_error": None, "error": None, "worst": key, "tolerance": tol,
                    "correct": False, "note": note}
        if ref.size == 0:
            errors[key] = (0.0, 0.0)
            continue
        d = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))  # NaN propagates
        errors[key] = (d, d / max(1.0, float(np.max(np.abs(ref)))))
    if not errors:
        return {"max_abs_error": 0.0, "error": 0.0, "worst": None, "tolerance": tol,
                "correct": True}
    worst = max(errors, key=lambda k: math.inf if math.isnan(errors[k][1]) else errors[k][1])
    abs_errors = [d for d, _ in errors.values()]
    max_abs = math.nan if any(math.isnan(d) for d in abs_errors) else max(abs_errors)
    scaled = errors[worst][1]
    return {"max_abs_error": max_abs, "error": scaled, "worst": worst, "tolerance": tol,
            "correct": bool(scaled <= tol)}  # False for NaN
