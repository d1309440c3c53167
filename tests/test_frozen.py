"""FrozenBatchNorm1d/2d/3d and freeze: torchvision's frozen map, against torch and the reference."""
import ml_dtypes
import numpy as np
import pytest

import bnfast
from bnfast.testing import reference_batch_norm
from conftest import DTYPES, assert_close, channels_last, make_input, make_params, make_running

ALL_DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)


def _frozen(rng, C, dtype, cls=bnfast.FrozenBatchNorm2d, eps=1e-5):
    m = cls(C, eps=eps, dtype=dtype)
    w, b = make_params(rng, C, np.float64)
    rm, rv = make_running(rng, C, np.float64)
    m.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    return m


def _bound(x, scale, shift, shape):
    """What rounding scale, shift, the product and the sum to dtype can cost."""
    eps = float(ml_dtypes.finfo(x.dtype).eps)
    x64 = x.astype(np.float64)
    return 2 * eps * (np.abs(x64 * scale.astype(np.float64).reshape(shape))
                      + np.abs(shift.astype(np.float64).reshape(shape)))


@pytest.mark.parametrize("dtype_", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls, shape", [(bnfast.FrozenBatchNorm1d, (4, 3)),
                                        (bnfast.FrozenBatchNorm1d, (4, 3, 5)),
                                        (bnfast.FrozenBatchNorm2d, (2, 3, 4, 5)),
                                        (bnfast.FrozenBatchNorm3d, (2, 3, 2, 3, 2))])
def test_output_is_the_reference_up_to_the_documented_rounding(rng, dtype_, cls, shape):
    m = _frozen(rng, 3, dtype_, cls)
    x = make_input(rng, shape, np.float64).astype(dtype_)
    y = m(x)
    assert y.dtype == np.dtype(dtype_) and y.shape == x.shape
    expected = reference_batch_norm(x.astype(np.float64), m.running_mean, m.running_var,
                                    m.weight, m.bias, eps=m.eps).out
    scale, shift = m.affine_coefficients()
    sh = (1, -1) + (1,) * (len(shape) - 2)
    assert np.all(np.abs(y.astype(np.float64) - expected) <= _bound(x, scale, shift, sh))


def test_matches_torchvisions_formula_in_torch(rng, torch):
    """torchvision's forward, written out in torch (float32 tensors)."""
    m = _frozen(rng, 6, np.float32, eps=1e-3)
    x = make_input(rng, (2, 6, 3, 4), np.float32)
    t = {k: torch.from_numpy(v).reshape(1, -1, 1, 1) for k, v in m.state_dict().items()}
    scale = t["weight"] * (t["running_var"] + m.eps).rsqrt()
    expected = torch.from_numpy(x) * scale + (t["bias"] - t["running_mean"] * scale)
    # scale/shift rounded once from float64 here, in float32 steps there: an ulp or two
    s, sh = m.affine_coefficients()
    assert np.all(np.abs(m(x) - expected.numpy()) <= _bound(x, s, sh, (1, -1, 1, 1)))


def test_freeze_keeps_the_eval_output(rng, dtype):
    bn = bnfast.BatchNorm2d(4, eps=1e-3, dtype=dtype)
    bn(make_input(rng, (8, 4, 3, 3), dtype))  # a training step: running stats change
    bn.weight[:], bn.bias[:] = make_params(rng, 4, dtype)
    frozen = bnfast.freeze(bn)
    assert type(frozen) is bnfast.FrozenBatchNorm2d and frozen.eps == bn.eps
    assert frozen.dtype == np.dtype(dtype)
    assert "num_batches_tracked" not in frozen.state_dict()
    x = make_input(rng, (2, 4, 3, 3), dtype)
    expected = bn.eval()(x)
    scale, shift = frozen.affine_coefficients()
    y = frozen(x)
    assert np.all(np.abs(y.astype(np.float64) - expected) <= _bound(x, scale, shift,
                                                                     (1, -1, 1, 1)))
    # copies: the frozen module does not follow the BatchNorm
    bn.running_mean += 1
    np.testing.assert_array_equal(frozen(x), y)


@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_freeze_of_half_data_keeps_the_parameters_dtype(rng, half):
    # float32 statistics a float16 (bfloat16) buffer cannot hold (round): kept as they are.
    bn = bnfast.BatchNorm2d(2, dtype=half).eval()
    assert bn.param_dtype == np.float32
    bn.running_mean[:] = [100.3, 0.0]
    bn.running_var[:] = [7e4, 1e-7]
    frozen = bnfast.freeze(bn)
    assert frozen.dtype == np.dtype(half) and frozen.param_dtype == np.float32
    for key, value in frozen.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, getattr(bn, key))
    x = np.array([600.0, 0.01], np.float32).astype(half).reshape(1, 2, 1, 1)
    expected = reference_batch_norm(x.astype(np.float64), bn.running_mean, bn.running_var,
                                    bn.weight, bn.bias, eps=bn.eps).out
    scale, shift = frozen.affine_coefficients()
    y = frozen(x)
    assert np.all(np.isfinite(y.astype(np.float64)))
    assert np.all(np.abs(y.astype(np.float64) - expected) <= _bound(x, scale, shift,
                                                                     (1, -1, 1, 1)))


def test_param_dtype_of_frozen_modules():
    assert bnfast.FrozenBatchNorm2d(2, dtype="float16").running_var.dtype == np.float32
    assert bnfast.FrozenBatchNorm2d(2, dtype="float16",
                                    param_dtype="float16").running_var.dtype == np.float16
    assert bnfast.FrozenBatchNorm1d(2, dtype=np.float64).weight.dtype == np.float64
    with pytest.raises(TypeError, match="param_dtype"):
        bnfast.FrozenBatchNorm2d(2, param_dtype="int32")


@pytest.mark.parametrize("affine, bias", [(False, False), (True, False)])
def test_freeze_without_affine_or_bias(rng, affine, bias):
    bn = bnfast.BatchNorm1d(3, affine=affine, bias=bias, dtype=np.float64)
    bn.running_mean[:], bn.running_var[:] = make_running(rng, 3, np.float64)
    frozen = bnfast.freeze(bn)
    assert type(frozen) is bnfast.FrozenBatchNorm1d
    x = make_input(rng, (5, 3), np.float64)
    assert_close(frozen(x), bn.eval()(x), np.float64)


def test_freeze_errors():
    with pytest.raises(ValueError, match="no fixed map"):
        bnfast.freeze(bnfast.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="got FrozenBatchNorm2d"):
        bnfast.freeze(bnfast.FrozenBatchNorm2d(3))


def test_loads_torch_batch_norm_state_dict(rng, torch):
    tbn = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        tbn.running_mean.uniform_(-1, 1)
        tbn.running_var.uniform_(0.5, 2)
        tbn.weight.uniform_(0.5, 2)
        tbn.num_batches_tracked.fill_(3)
    m = bnfast.FrozenBatchNorm2d(5)
    result = m.load_state_dict(tbn.state_dict())  # num_batches_tracked dropped
    assert result == ([], [])
    x = make_input(rng, (2, 5, 3, 3), np.float32)
    with torch.no_grad():
        expected = tbn(torch.from_numpy(x)).numpy()
    s, sh = m.affine_coefficients()
    assert np.all(np.abs(m(x) - expected) <= _bound(x, s, sh, (1, -1, 1, 1)) + 1e-6)


def test_state_dict_and_load_errors(rng):
    m = bnfast.FrozenBatchNorm2d(3)
    assert sorted(m.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key.*running_var"):
        m.load_state_dict({"weight": np.full(3, 2.0), "bias": np.zeros(3),
                           "running_mean": np.zeros(3)})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        m.load_state_dict({"weight": np.ones(4), "bias": np.zeros(3),
                           "running_mean": np.zeros(3), "running_var": np.ones(3)})
    for k, v in m.state_dict().items():  # nothing changed
        np.testing.assert_array_equal(v, before[k])
    assert m.load_state_dict({"weight": np.ones(3)}, strict=False).missing_keys == [
        "bias", "running_mean", "running_var"]


def test_layout_out_and_errors(rng):
    m = _frozen(rng, 3, np.float32)
    x = make_input(rng, (2, 3, 4, 5), np.float32)
    y = m(x)
    cl = channels_last(x)
    y_cl = m(cl)
    assert np.moveaxis(y_cl, 1, -1).flags.c_contiguous
    np.testing.assert_array_equal(y_cl, y)
    xc = x.copy()
    assert m(xc, out=xc) is xc
    np.testing.assert_array_equal(xc, y)
    assert m.train() is m and m.eval() is m  # no training mode: same output
    np.testing.assert_array_equal(m.train()(x), y)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m(x[0])
    with pytest.raises(TypeError, match="input dtype float64"):
        m(x.astype(np.float64))
    with pytest.raises(ValueError, match="3 channels"):
        m(x[:, :2])
    with pytest.raises(ValueError, match="num_features must be positive"):
        bnfast.FrozenBatchNorm2d(0)
    # The four dtypes of every module: no integer, float8, long double or byte-swapped data.
    for bad in (np.int32, ml_dtypes.float8_e4m3fn, np.longdouble, ">f4"):
        with pytest.raises(TypeError, match="^dtype must be float16, bfloat16, float32 or "
                                            "float64"):
            bnfast.FrozenBatchNorm2d(2, dtype=bad)


@pytest.mark.parametrize("dtype_", DTYPES, ids=lambda d: np.dtype(d).name)
def test_repr(dtype_):
    assert repr(bnfast.FrozenBatchNorm2d(64, dtype=dtype_)) == "FrozenBatchNorm2d(64, eps=1e-05)"


@pytest.mark.parametrize("dtype_", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float_output_is_the_multiply_add_of_the_rounded_coefficients(rng, dtype_, layout):
    # The kernel's one pass gives NumPy's two: x * scale, then + shift, each rounded,
    # with scale and shift rounded once to the dtype.
    m = _frozen(rng, 5, dtype_)
    x = make_input(rng, (3, 5, 4, 6), dtype_)
    x = channels_last(x) if layout == "channels_last" else x
    scale, shift = m.affine_coefficients()
    expected = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(m(x), expected)


@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_half_data_is_computed_in_float_not_in_the_half_dtype(half):
    # shift = -1000 / sqrt(1e-4 + 1e-5) = -9.5e4: beyond float16's 65504 (it was -inf
    # there, and the outputs NaN); in float, as BatchNorm2d.eval() computes.
    bn = bnfast.BatchNorm2d(1, dtype=half).eval()
    bn.running_mean[:], bn.running_var[:] = 1000.0, 1e-4
    x = np.array([1000.0, 999.5, 1000.5], np.float32).astype(half).reshape(3, 1, 1, 1)
    frozen = bnfast.freeze(bn)
    y = frozen(x).astype(np.float64)
    expected = reference_batch_norm(x.astype(np.float64), bn.running_mean, bn.running_var,
                                    eps=bn.eps).out
    scale, shift = frozen.affine_coefficients(np.float32)
    bound = _bound(x.astype(np.float32), scale, shift, (1, -1, 1, 1))
    half_ulp = np.spacing(np.abs(expected).astype(np.float32)) * 2.0 ** (
        23 - {np.dtype(np.float16): 10, np.dtype(ml_dtypes.bfloat16): 7}[np.dtype(half)])
    assert np.all(np.abs(y - expected) <= bound + half_ulp), (y, expected)


def test_fused_modules_do_not_freeze():
    # relu(bn(x) + addend) is no affine map: a frozen one would drop the ReLU.
    with pytest.raises(TypeError, match="FusedBatchNorm2d.*ReLU and addend are no affine map"):
        bnfast.freeze(bnfast.FusedBatchNorm2d(3))


def test_argument_errors_as_the_modules_raise_them(rng):
    with pytest.raises(TypeError, match="eps must be a real number, got str"):
        bnfast.FrozenBatchNorm2d(3, eps="1e-3")
    with pytest.raises(TypeError, match="eps must be a real number, got bool"):
        bnfast.FrozenBatchNorm2d(3, eps=True)
    m = _frozen(rng, 3, np.float32)
    x = make_input(rng, (2, 3, 4, 5), np.float32)
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        m(x, out=np.empty(x.shape, np.float64))
    with pytest.raises(TypeError, match="cannot assign 'list' as 'weight'"):
        m.weight = [1.0, 2.0, 3.0]


def test_edits_of_buffers_and_eps_are_seen(rng):
    # The kernel's vectors are kept while the buffers' bytes and eps are unchanged.
    m = _frozen(rng, 3, np.float32)
    x = make_input(rng, (2, 3, 4, 5), np.float32)

    def fresh():
        f = bnfast.FrozenBatchNorm2d(3, eps=m.eps)
        f.load_state_dict(m.state_dict())
        return f(x)

    np.testing.assert_array_equal(m(x), fresh())
    for edit in (lambda: m.weight.__setitem__(0, 2.5), lambda: m.bias.__imul__(-1),
                 lambda: m.running_mean.__setitem__(2, 0.75),
                 lambda: m.running_var.__setitem__(1, 9.0),
                 lambda: setattr(m, "running_var", m.running_var.copy() * 4),
                 lambda: setattr(m, "eps", 0.5)):
        before = m(x)
        edit()
        after = m(x)
        assert not np.array_equal(before, after)
        np.testing.assert_array_equal(after, fresh())
