"""Invalid input: the right exception, a message naming the argument, and no side effects."""
import re

import ml_dtypes
import numpy as np
import pytest

import bnfast
from conftest import assert_close, make_input, reference_batch_norm

MODULES = [bnfast.BatchNorm1d, bnfast.BatchNorm2d, bnfast.BatchNorm3d,
           bnfast.FusedBatchNorm1d, bnfast.FusedBatchNorm2d, bnfast.FusedBatchNorm3d]


def _good_shape(cls):
    return {1: (4, 3, 5), 2: (4, 3, 5, 5), 3: (2, 3, 2, 3, 4)}[int(cls.__name__[-2])]


# -- dimensions and channels -----------------------------------------------------------
@pytest.mark.parametrize("cls,shape,message", [
    (bnfast.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
    (bnfast.BatchNorm2d, (2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
    (bnfast.BatchNorm2d, (3,), "expected 4D input (got 1D input)"),
    (bnfast.BatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
    (bnfast.BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
    (bnfast.BatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
    (bnfast.FusedBatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
], ids=str)
def test_wrong_ndim_message_like_torch(torch, cls, shape, message):
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        cls(3)(np.zeros(shape, np.float32))
    tname = cls.__name__.replace("Fused", "")
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        getattr(torch.nn, tname)(3)(torch.zeros(shape))


@pytest.mark.parametrize("cls", MODULES)
def test_wrong_channel_count(cls):
    shape = list(_good_shape(cls))
    shape[1] = 4
    m = cls(3)
    with pytest.raises(ValueError, match=r"3 channels.*\(4, 3|3 channels.*shape \(\d+, 4"):
        m(np.zeros(shape, np.float32))
    assert int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", [(3,), ()], ids=str)
def test_functional_needs_two_dimensions(shape):
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, \*spatial\)"):
        bnfast.batch_norm(np.zeros(shape), None, None, training=True)


# -- dtypes ----------------------------------------------------------------------------
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object,
              ml_dtypes.float8_e5m2, np.dtype(ml_dtypes.bfloat16).newbyteorder(),
              np.dtype(np.float16).newbyteorder()]
SUPPORTED = "float16, bfloat16, float32 or float64"


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).str)
def test_non_float_input_is_type_error(bad):
    # Only the four dtypes the kernels know pass (they read any other type
    # number as bfloat16): also not a byte-swapped half, nor a float8.
    x = np.ones((4, 3, 2, 2), dtype=bad)
    with pytest.raises(TypeError, match=rf"input must be a {SUPPORTED} array, got dtype "
                                        rf"{re.escape(str(np.dtype(bad)))}"):
        bnfast.batch_norm(x, None, None, training=True)
    with pytest.raises(TypeError, match="float32 or float64"):
        bnfast.batch_norm(x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        bnfast.BatchNorm2d(3)(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        bnfast.fused_batch_norm(x, None, None, training=True)


def test_integer_list_is_not_silently_cast():
    with pytest.raises(TypeError, match="got dtype int"):
        bnfast.batch_norm([[1, 2], [3, 4]], None, None, training=True)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("bad", [np.int64, ml_dtypes.float8_e4m3fn, np.complex128],
                         ids=lambda d: np.dtype(d).name)
def test_non_float_channel_vectors(name, bad):
    x = np.ones((4, 3), np.float32)
    kwargs = dict(running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32))
    kwargs[name] = np.ones(3, bad)
    with pytest.raises(TypeError, match=rf"{name} must be a {SUPPORTED} array"):
        bnfast.batch_norm(x, training=True, **kwargs)


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("module_dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_module_dtype_mismatch_is_type_error(cls, module_dtype):
    other = np.float64 if module_dtype == np.float32 else np.float32
    m = cls(3, dtype=module_dtype)
    with pytest.raises(TypeError, match=rf"input dtype {np.dtype(other).name} does not match "
                                        rf"the module's dtype {np.dtype(module_dtype).name}"):
        m(np.ones(_good_shape(cls), other))
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)


@pytest.mark.parametrize("bad", [np.int32, "complex64", "float8_e5m2", "nonsense",
                                 np.dtype(np.float16).newbyteorder()])
@pytest.mark.parametrize("arg", ["dtype", "param_dtype"])
def test_module_dtype_must_be_supported(bad, arg):
    with pytest.raises(TypeError, match=rf"^{arg} must be {SUPPORTED}"):
        bnfast.BatchNorm2d(3, **{arg: bad})


def test_module_dtype_none_is_not_float64():
    # np.dtype(None) is float64: not a silent default (param_dtype=None is "the default").
    with pytest.raises(TypeError, match=rf"^dtype must be {SUPPORTED}, got None"):
        bnfast.BatchNorm2d(3, dtype=None)


# -- constructor -----------------------------------------------------------------------
@pytest.mark.parametrize("num_features,exc", [(0, ValueError), (-2, ValueError),
                                              (3.0, TypeError), (True, TypeError),
                                              ("3", TypeError)])
def test_bad_num_features(num_features, exc):
    with pytest.raises(exc, match="num_features"):
        bnfast.BatchNorm1d(num_features)


@pytest.mark.parametrize("eps", [-1e-5, -1, float("nan"), float("-inf")])
def test_eps_must_be_non_negative(eps):
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnfast.BatchNorm2d(3, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnfast.FrozenBatchNorm2d(3, eps=eps)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bnfast.batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnfast.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), eps=eps)
    g = np.ones_like(x)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnfast.batch_norm_backward(g, x, None, np.zeros(3), np.ones(3), False, eps=eps)


@pytest.mark.parametrize("zero", [0, 0.0, -0.0])
def test_eps_zero_is_for_evaluation_only(rng, zero):
    # torch's rules: eps = 0 where the batch's variance (which may be 0) normalises is
    # an error; in evaluation it is the running variance alone.
    x = make_input(rng, (6, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.array([0.5, 2.0, 0.0], np.float32)
    with pytest.raises(ValueError, match="eps must be positive during training, but got"):
        bnfast.batch_norm(x, rm, rv, training=True, eps=zero)
    no_stats = bnfast.BatchNorm1d(3, eps=zero, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="eps must be positive during training"):
        no_stats(x)  # no running statistics: the batch's normalise
    m = bnfast.BatchNorm1d(3, eps=zero)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    m.running_var[...] = rv
    y = m.eval()(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = reference_batch_norm(x, rm, rv, eps=0.0)
    assert_close(y, ref.out, np.float32)
    # A zero running variance: (x - mean) / 0, +-inf (torch's x * inf + (-mean * inf)
    # makes the whole channel NaN).
    assert np.array_equal(np.isinf(y[:, 2]), x[:, 2] != 0) and np.isnan(y[:, 2]).sum() == 0


@pytest.mark.parametrize("bad", ["0.1", True, [0.1]])
def test_momentum_must_be_a_number(bad):
    with pytest.raises(TypeError, match="momentum must be a real number"):
        bnfast.BatchNorm2d(3, momentum=bad)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        bnfast.batch_norm(np.ones((2, 3)), None, None, training=True, momentum=bad)


# -- channel vectors -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), ()], ids=str)
def test_channel_vector_size(name, shape):
    x = np.ones((4, 3, 2), np.float64)
    kwargs = dict(running_mean=np.zeros(3), running_var=np.ones(3), weight=np.ones(3),
                  bias=np.zeros(3))
    kwargs[name] = np.ones(shape)
    for training in (True, False):
        with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\).*"
                                             rf"got shape {re.escape(str(shape))}"):
            bnfast.batch_norm(x, training=training, **kwargs)


def test_running_stats_both_or_neither():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="both"):
        bnfast.batch_norm(x, np.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="both"):
        bnfast.batch_norm(x, None, np.ones(3), training=True)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        bnfast.batch_norm(np.ones((4, 3)), None, None, training=False)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_training_needs_writable_running_buffers(which):
    x = make_input(np.random.default_rng(0), (4, 3), np.float64)
    bufs = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    bufs[which].setflags(write=False)
    before = {k: v.copy() for k, v in bufs.items()}
    with pytest.raises(ValueError, match=rf"{which} must be a writable numpy array"):
        bnfast.batch_norm(x, training=True, **bufs)
    for k in bufs:
        np.testing.assert_array_equal(bufs[k], before[k])
    # Evaluation only reads them.
    bnfast.batch_norm(x, training=False, **bufs)


def test_training_rejects_running_stats_it_cannot_update():
    # Lists would be converted to temporary arrays: the update would be lost silently.
    x = make_input(np.random.default_rng(0), (4, 3), np.float64)
    with pytest.raises(ValueError, match="running_mean must be a writable numpy array"):
        bnfast.batch_norm(x, [0.0, 0.0, 0.0], np.ones(3), training=True)
    with pytest.raises(ValueError, match="running_var must be a writable numpy array"):
        bnfast.batch_norm(x, np.zeros(3), [1.0, 1.0, 1.0], training=True)
    # In evaluation they are only read, so array-likes are fine.
    bnfast.batch_norm(x, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], training=False)


# -- one value per channel -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)], ids=str)
def test_one_value_per_channel_in_training(shape):
    x = np.ones(shape, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    message = rf"^Expected more than 1 value per channel when training, got input size " \
              rf"\({', '.join(map(str, shape))}\)$"
    with pytest.raises(ValueError, match=message):
        bnfast.batch_norm(x, rm, rv, training=True)
    with pytest.raises(ValueError, match=message):
        bnfast.batch_norm(x, None, None, training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    # Evaluation with running stats is fine.
    bnfast.batch_norm(x, rm, rv, training=False)


def test_one_value_per_channel_message_like_torch(torch):
    with pytest.raises(ValueError, match=r"got input size torch.Size\(\[1, 3\]\)"):
        torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when "
                                         r"training, got input size \(1, 3\)$"):
        bnfast.BatchNorm1d(3)(np.ones((1, 3), np.float32))


@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (1, 3)),
                                       (bnfast.BatchNorm1d, (1, 3, 1)),
                                       (bnfast.BatchNorm2d, (1, 3, 1, 1)),
                                       (bnfast.BatchNorm3d, (1, 3, 1, 1, 1)),
                                       (bnfast.FusedBatchNorm2d, (1, 3, 1, 1))], ids=str)
def test_one_value_per_channel_modules(cls, shape):
    x = np.ones(shape, np.float32)
    # Training, and evaluation without running stats (batch statistics), as torch.
    for m in (cls(3), cls(3, track_running_stats=False).eval(),
              cls(3, track_running_stats=False)):
        with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when "
                                             r"training, got input size \(1, 3"):
            m(x)
    # The rejected step is not counted (torch, which counts before it checks, would
    # leave num_batches_tracked at 1 here).
    m = cls(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    m = cls(3)
    m.eval()
    assert m(x).shape == shape  # running stats: fine


def test_one_value_per_channel_eval_without_running_stats_like_torch(torch):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(3, track_running_stats=False).eval()(torch.ones(1, 3, 1, 1))


# -- addend and out ------------------------------------------------------------------
@pytest.mark.parametrize("func", ["batch_norm", "fused_batch_norm"])
def test_addend_shape_and_dtype(func):
    f = getattr(bnfast, func)
    x = np.ones((4, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"addend must have the input's shape \(4, 3, 2, 2\), "
                                         r"got shape \(4, 3, 2, 1\)"):
        f(x, None, None, training=True, addend=np.ones((4, 3, 2, 1), np.float32))
    with pytest.raises(ValueError, match="addend must have the input's shape"):
        f(x, None, None, training=True, addend=np.ones((1, 3, 1, 1), np.float32))  # no broadcast
    with pytest.raises(TypeError, match="addend must have the input's dtype float32, got float64"):
        f(x, None, None, training=True, addend=np.ones(x.shape, np.float64))
    with pytest.raises(TypeError, match=f"addend must be a {SUPPORTED} array"):
        f(x, None, None, training=True, addend=np.ones(x.shape, np.int32))


@pytest.mark.parametrize("cls", [bnfast.FusedBatchNorm1d, bnfast.FusedBatchNorm2d,
                                 bnfast.FusedBatchNorm3d])
def test_fused_module_addend_errors_leave_state(cls):
    shape = _good_shape(cls)
    m = cls(3)
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match="addend must have the input's shape"):
        m(x, np.ones(shape[:-1] + (shape[-1] + 1,), np.float32))
    with pytest.raises(TypeError, match="addend must have the input's dtype"):
        m(x, np.ones(shape, np.float64))
    # A rejected call changes nothing.
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)


def test_out_errors():
    x = np.ones((4, 3, 2, 2), np.float64)
    with pytest.raises(ValueError, match=r"out must have the input's shape \(4, 3, 2, 2\), "
                                         r"got shape \(4, 3, 4\)"):
        bnfast.batch_norm(x, None, None, training=True, out=np.empty((4, 3, 4)))
    with pytest.raises(TypeError, match="out must have the input's dtype float64, got float32"):
        bnfast.batch_norm(x, None, None, training=True, out=np.empty(x.shape, np.float32))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray, got list"):
        bnfast.batch_norm(x, None, None, training=True, out=x.tolist())
    ro = np.zeros(x.shape)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        bnfast.batch_norm(x, None, None, training=True, out=ro)
    np.testing.assert_array_equal(ro, 0)


def test_out_is_read_only_input():
    x = np.ones((4, 3), np.float32)
    x.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        bnfast.batch_norm(x, None, None, training=True, out=x)


@pytest.mark.parametrize("cls", MODULES)
def test_module_out_errors_leave_state(cls):
    shape = _good_shape(cls)
    m = cls(3, momentum=None)
    x = make_input(np.random.default_rng(0), shape, np.float32)
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        m(x, out=np.empty(shape, np.float64))
    with pytest.raises(ValueError, match="out must have the input's shape"):
        m(x, out=np.empty(shape[:-1] + (shape[-1] + 1,), np.float32))
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)


# -- n_threads -------------------------------------------------------------------------
@pytest.mark.parametrize("bad,exc", [(0, ValueError), (1.5, TypeError), (True, TypeError),
                                     ("2", TypeError), (2**40, ValueError),
                                     (-2**40, ValueError), ((1 << 16) + 1, ValueError)])
def test_bad_n_threads(bad, exc):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(exc, match="n_threads"):
        bnfast.batch_norm(x, None, None, training=True, n_threads=bad)
    with pytest.raises(exc, match="n_threads"):  # the constructor checks it too
        bnfast.BatchNorm1d(3, n_threads=bad)
    m = bnfast.BatchNorm1d(3)
    m.n_threads = bad  # and so does every call, when it is set later
    with pytest.raises(exc, match="n_threads"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.running_mean, 0)


def test_errors_leave_running_buffers_untouched():
    # Every argument is checked before anything is written.
    x = make_input(np.random.default_rng(0), (4, 3, 5), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    bad_calls = [
        dict(weight=np.ones(4)),
        dict(addend=np.ones((4, 3, 4))),
        dict(out=np.ones((4, 3, 5), np.float32)),
        dict(n_threads=0),
        dict(eps=0.0),
    ]
    for kwargs in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            bnfast.batch_norm(x, rm, rv, training=True, **kwargs)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize("bad", ["False", 1, None, 0.0])
def test_flags_must_be_bools(rng, bad):
    # torch's rule for training (argument 'training' must be bool): "False" would be true.
    x = make_input(rng, (4, 3, 5), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    name = type(bad).__name__
    with pytest.raises(TypeError, match=f"training must be a bool, got {name}"):
        bnfast.batch_norm(x, rm, rv, training=bad)
    with pytest.raises(TypeError, match=f"training must be a bool, got {name}"):
        bnfast.fused_batch_norm(x, rm, rv, training=bad)
    with pytest.raises(TypeError, match=f"relu must be a bool, got {name}"):
        bnfast.batch_norm(x, rm, rv, relu=bad)
    with pytest.raises(TypeError, match=f"return_stats must be a bool, got {name}"):
        bnfast.batch_norm(x, rm, rv, return_stats=bad)
    y, mean, invstd = bnfast.batch_norm(x, None, None, training=True, return_stats=True)
    with pytest.raises(TypeError, match=f"training must be a bool, got {name}"):
        bnfast.batch_norm_backward(x, x, None, mean, invstd, training=bad)
    with pytest.raises(TypeError, match=f"training must be a bool, got {name}"):
        bnfast.fused_batch_norm_backward(x, x, y, None, mean, invstd, training=bad)
    m = bnfast.BatchNorm1d(3)
    m(x)
    with pytest.raises(TypeError, match=f"retain_graph must be a bool, got {name}"):
        m.backward(x, retain_graph=bad)
    assert rm[0] == 0 and rv[0] == 1  # nothing updated by the refused calls
    # NumPy's bools are bools.
    np.testing.assert_array_equal(bnfast.batch_norm(x, rm, rv, training=np.bool_(False)),
                                  bnfast.batch_norm(x, rm, rv, training=False))
    m.backward(x, retain_graph=np.True_)
    m.backward(x)
