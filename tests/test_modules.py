"""BatchNorm1d/2d/3d (and the fused modules' shared surface) against torch.nn.BatchNormXd."""
import contextlib
import copy
import fractions
import itertools
import pickle

import numpy as np
import pytest

import bnfast
from conftest import (
    STAT_TOL,
    TOL,
    TORCH_TOL,
    assert_close,
    assert_same,
    channels_last,
    is_channels_last,
    make_input,
    make_params,
    make_running,
    other_float,
    reference_batch_norm,
    strided,
)

C = 4
# (bnfast class, torch class name, input shapes for successive steps)
KINDS = {
    "1d-2D": (bnfast.BatchNorm1d, "BatchNorm1d", [(6, C), (5, C), (9, C), (3, C)]),
    "1d-3D": (bnfast.BatchNorm1d, "BatchNorm1d", [(5, C, 7), (3, C, 4), (2, C, 9), (4, C, 1)]),
    "2d": (bnfast.BatchNorm2d, "BatchNorm2d", [(4, C, 5, 6), (2, C, 3, 3), (3, C, 4, 2),
                                               (1, C, 5, 5)]),
    "3d": (bnfast.BatchNorm3d, "BatchNorm3d", [(3, C, 3, 4, 5), (2, C, 2, 3, 3),
                                               (1, C, 4, 3, 2), (2, C, 1, 2, 3)]),
}
# (affine, bias): bias only means something with affine.
AFFINE = [(True, True), (True, False), (False, True)]
# Training modes of a step sequence: eval in the middle, and a return to training.
SEQUENCE = [True, True, False, True, False, False, True, True]


def _torch_module(torch, name, dtype, **kwargs):
    return getattr(torch.nn, name)(C, dtype=getattr(torch, np.dtype(dtype).name), **kwargs)


def _buffers(m):
    return {k: (None if getattr(m, k) is None else np.array(getattr(m, k)))
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def _torch_buffers(tm):
    out = {}
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        v = getattr(tm, k)
        out[k] = None if v is None else v.detach().numpy().copy()
    return out


def _reference_step(state, x, training, momentum, track, eps, weight, bias):
    """The module's step on the float64 reference: (out, new running_mean, new running_var, nbt)."""
    nbt = None if state["num_batches_tracked"] is None else int(state["num_batches_tracked"])
    factor = 0.0 if momentum is None else momentum
    if training and track:
        nbt += 1
        if momentum is None:
            factor = 1.0 / nbt
    rm, rv = state["running_mean"], state["running_var"]  # None without tracking
    use_batch = training or rm is None
    ref = reference_batch_norm(x, rm, rv, weight, bias, training=use_batch, momentum=factor,
                               eps=eps)
    return ref, nbt


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("affine,bias", AFFINE, ids=["affine", "affine-nobias", "noaffine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
def test_step_sequence_matches_torch_and_reference(dtype, rng, torch, kind, affine, bias,
                                                    track, momentum):
    cls, tname, shapes = KINDS[kind]
    eps = 1e-4
    m = cls(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
            bias=bias, dtype=dtype)
    tm = _torch_module(torch, tname, dtype, eps=eps, momentum=momentum, affine=affine,
                       track_running_stats=track, bias=bias)
    if affine:
        w, b = make_params(rng, C, dtype)
        m.weight[...] = w
        tm.weight.data = torch.from_numpy(w.copy())
        if bias:
            m.bias[...] = b
            tm.bias.data = torch.from_numpy(b.copy())
    assert list(m.state_dict()) == list(tm.state_dict())
    assert m.training is tm.training is True

    for step, training in enumerate(SEQUENCE):
        m.train(training)
        tm.train(training)
        shape = shapes[step % len(shapes)]
        if not training and not track and np.prod(shape) // C == 1:
            shape = shapes[0]  # eval without running stats normalises with batch stats
        x = make_input(rng, shape, dtype, loc=step - 2.0, scale=1.0 + step)
        before = _buffers(m)

        y = m(x)
        with torch.no_grad():
            yt = tm(torch.from_numpy(x)).numpy()

        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, yt, dtype, TORCH_TOL)
        after, t_after = _buffers(m), _torch_buffers(tm)
        for key in after:
            if t_after[key] is None:
                assert after[key] is None, key
                continue
            assert after[key].dtype == t_after[key].dtype, key
            if key == "num_batches_tracked":
                assert after[key].shape == () and after[key] == t_after[key], step
            else:
                assert_close(after[key], t_after[key], dtype, TORCH_TOL)

        ref, nbt = _reference_step(before, x, training, momentum, track, eps,
                                   before["weight"], before["bias"])
        assert_close(y, ref.out, dtype, TOL)
        if track:
            assert int(after["num_batches_tracked"]) == nbt
            assert_close(after["running_mean"], ref.running_mean, dtype, STAT_TOL)
            assert_close(after["running_var"], ref.running_var, dtype, STAT_TOL)


@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (0, 3)),
                                       (bnfast.BatchNorm1d, (0, 3, 4)),
                                       (bnfast.BatchNorm2d, (0, 3, 4, 4)),
                                       (bnfast.BatchNorm3d, (0, 3, 2, 2, 2))], ids=str)
def test_empty_batch_like_torch(dtype, torch, cls, shape):
    m = cls(3, dtype=dtype)
    tm = getattr(torch.nn, cls.__name__)(3, dtype=getattr(torch, np.dtype(dtype).name))
    for training in (True, False):
        m.train(training)
        tm.train(training)
        y = m(np.zeros(shape, dtype))
        with torch.no_grad():
            yt = tm(torch.zeros(shape, dtype=tm.weight.dtype))
        assert y.shape == tuple(yt.shape) and y.dtype == dtype
        for key, value in _torch_buffers(tm).items():
            np.testing.assert_array_equal(getattr(m, key), value, err_msg=key)
    assert int(m.num_batches_tracked) == 1  # as torch: the empty training step counts


def test_cumulative_average_is_mean_of_batch_statistics(dtype, rng):
    m = bnfast.BatchNorm1d(3, momentum=None, dtype=dtype)
    means, unbiased = [], []
    for n in (4, 7, 5, 9):
        x = make_input(rng, (n, 3), dtype)
        m(x)
        means.append(x.astype(np.float64).mean(axis=0))
        unbiased.append(x.astype(np.float64).var(axis=0, ddof=1))
    # running = (1 - 1/k) running + (1/k) batch_k, starting from (0, 1): the mean of
    # the batch statistics (the initial values get weight 0 at k = 1).
    tol = dict(rtol=1e-5 if dtype == np.float32 else 1e-12,
               atol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(m.running_mean, np.mean(means, axis=0), **tol)
    np.testing.assert_allclose(m.running_var, np.mean(unbiased, axis=0), **tol)
    assert int(m.num_batches_tracked) == 4


def test_defaults_and_attributes():
    m = bnfast.BatchNorm2d(5)
    assert m.num_features == 5 and m.eps == 1e-5 and m.momentum == 0.1
    assert m.affine is True and m.track_running_stats is True and m.training is True
    assert m.dtype == np.float32
    for key, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        arr = getattr(m, key)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (5,)
        np.testing.assert_array_equal(arr, np.full(5, value, np.float32))
    nbt = m.num_batches_tracked
    assert isinstance(nbt, np.ndarray) and nbt.dtype == np.int64 and nbt.shape == () and nbt == 0
    m64 = bnfast.BatchNorm1d(2, affine=False, track_running_stats=False, dtype=np.float64)
    assert m64.weight is None and m64.bias is None
    assert m64.running_mean is None and m64.running_var is None and m64.num_batches_tracked is None
    assert m64.state_dict() == {}
    mb = bnfast.BatchNorm3d(2, bias=False)
    assert mb.weight is not None and mb.bias is None


def test_num_batches_tracked_counts_training_steps_only(dtype, rng):
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    x = make_input(rng, (2, 3, 4, 4), dtype)
    m(x)
    m(x)
    m.eval()
    m(x)
    assert int(m.num_batches_tracked) == 2
    m.train()
    m(x)
    assert int(m.num_batches_tracked) == 3
    assert m.num_batches_tracked.dtype == np.int64 and m.num_batches_tracked.shape == ()


def test_train_eval_return_self_and_validate_mode():
    m = bnfast.BatchNorm1d(2)
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and m.training is False
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        m.train("yes")
    assert m.training is False


def test_reset_running_stats_and_parameters(dtype, rng):
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    m.weight[...] = 2.0
    m.bias[...] = -1.0
    m(make_input(rng, (4, 3, 2, 2), dtype))
    m.reset_running_stats()
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)
    assert int(m.num_batches_tracked) == 0
    np.testing.assert_array_equal(m.weight, 2.0)  # parameters untouched
    m(make_input(rng, (4, 3, 2, 2), dtype))
    m.reset_parameters()
    np.testing.assert_array_equal(m.weight, 1)
    np.testing.assert_array_equal(m.bias, 0)
    np.testing.assert_array_equal(m.running_mean, 0)
    assert int(m.num_batches_tracked) == 0
    assert m.weight.dtype == m.running_var.dtype == dtype


def test_parameters_are_live(dtype, rng):
    # Editing weight/bias/running buffers in place changes the next forward.
    m = bnfast.BatchNorm1d(3, dtype=dtype).eval()
    x = make_input(rng, (5, 3), dtype)
    m.weight[...] = [1.0, 2.0, 3.0]
    m.bias[...] = [0.0, 1.0, -1.0]
    m.running_mean[...] = [0.5, 0.0, -0.5]
    m.running_var[...] = [1.0, 4.0, 0.25]
    ref = reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias)
    assert_close(m(x), ref.out, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_out(dtype, rng, training):
    m = bnfast.BatchNorm2d(3, dtype=dtype).train(training)
    x = make_input(rng, (2, 3, 4, 5), dtype)
    ref = reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                               training=training)
    out = np.empty_like(x)
    assert m(x, out=out) is out
    assert m.forward(x, out=x) is x
    assert_close(out, ref.out, dtype)
    assert_close(x, ref.out, dtype)


def test_module_n_threads(dtype, rng):
    x = make_input(rng, (64, 3, 32, 32), dtype)  # large enough to run threaded
    a = bnfast.BatchNorm2d(3, dtype=dtype, n_threads=1)
    b = bnfast.BatchNorm2d(3, dtype=dtype, n_threads=2)
    np.testing.assert_array_equal(a(x), b(x))
    np.testing.assert_array_equal(a.running_var, b.running_var)


# -- state dict ------------------------------------------------------------------------
@pytest.mark.parametrize("affine,bias", AFFINE, ids=["affine", "affine-nobias", "noaffine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
def test_state_dict_keys_match_torch(torch, affine, bias, track):
    m = bnfast.BatchNorm2d(3, affine=affine, bias=bias, track_running_stats=track)
    tm = torch.nn.BatchNorm2d(3, affine=affine, bias=bias, track_running_stats=track)
    assert list(m.state_dict()) == list(tm.state_dict())


def test_state_dict_to_torch(dtype, rng, torch):
    m = bnfast.BatchNorm2d(C, dtype=dtype)
    m.weight[...], m.bias[...] = make_params(rng, C, dtype)
    for _ in range(3):
        m(make_input(rng, (4, C, 3, 3), dtype))
    tm = _torch_module(torch, "BatchNorm2d", dtype)
    result = tm.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    for key, value in _torch_buffers(tm).items():
        np.testing.assert_array_equal(value, getattr(m, key), err_msg=key)
    assert int(tm.num_batches_tracked) == 3
    x = make_input(rng, (2, C, 4, 4), dtype)
    m.eval()
    tm.eval()
    with torch.no_grad():
        assert_close(m(x), tm(torch.from_numpy(x)).numpy(), dtype, TORCH_TOL)


def test_state_dict_from_torch(dtype, rng, torch):
    tm = _torch_module(torch, "BatchNorm3d", dtype, momentum=0.3)
    with torch.no_grad():
        tm.weight.uniform_(0.5, 2)
        tm.bias.uniform_(-1, 1)
        for _ in range(4):
            tm(torch.from_numpy(make_input(rng, (2, C, 2, 3, 2), dtype)))
    m = bnfast.BatchNorm3d(C, momentum=0.3, dtype=dtype)
    result = m.load_state_dict(tm.state_dict())
    assert result == ([], []) and result.missing_keys == [] and result.unexpected_keys == []
    for key, value in _torch_buffers(tm).items():
        np.testing.assert_array_equal(getattr(m, key), value, err_msg=key)
        assert getattr(m, key).dtype == value.dtype
    assert int(m.num_batches_tracked) == 4
    # Loaded values are copies, not views of the tensors.
    with torch.no_grad():
        tm.running_mean.add_(100.0)
    assert np.all(np.abs(m.running_mean) < 100)
    # Both continue identically.
    x = make_input(rng, (3, C, 2, 2, 2), dtype)
    with torch.no_grad():
        assert_close(m(x), tm(torch.from_numpy(x)).numpy(), dtype, TORCH_TOL)
    assert_close(m.running_var, tm.running_var.numpy(), dtype, TORCH_TOL)
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 5


def test_state_dict_round_trip_between_bnfast_modules(dtype, rng):
    a = bnfast.BatchNorm1d(3, dtype=dtype)
    a.weight[...], a.bias[...] = make_params(rng, 3, dtype)
    a(make_input(rng, (5, 3), dtype))
    b = bnfast.FusedBatchNorm1d(3, dtype=dtype)  # fused and plain share the format
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
        assert not np.shares_memory(b.state_dict()[key], value)


def test_state_dict_without_num_batches_tracked_keeps_count(dtype, torch):
    # State dicts saved before PyTorch 0.4.1 have no num_batches_tracked.
    m = bnfast.BatchNorm1d(3, dtype=dtype)
    m.num_batches_tracked[...] = 7
    tm = torch.nn.BatchNorm1d(3, dtype=getattr(torch, np.dtype(dtype).name))
    tm.num_batches_tracked.fill_(7)
    old = {"weight": np.full(3, 2.0, dtype), "bias": np.zeros(3, dtype),
           "running_mean": np.ones(3, dtype), "running_var": np.full(3, 3.0, dtype)}
    result = m.load_state_dict(old)
    t_result = tm.load_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
    assert list(result.missing_keys) == list(t_result.missing_keys) == []
    assert list(result.unexpected_keys) == list(t_result.unexpected_keys) == []
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 7
    np.testing.assert_array_equal(m.running_var, 3.0)
    np.testing.assert_array_equal(m.weight, 2.0)


def test_load_state_dict_missing_and_unexpected_keys(dtype, torch):
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    tm = torch.nn.BatchNorm2d(3)
    full = {k: np.array(v) for k, v in bnfast.BatchNorm2d(3, dtype=dtype).state_dict().items()}
    full["running_mean"][...] = 5.0

    missing = {k: v for k, v in full.items() if k != "weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        m.load_state_dict(missing)
    np.testing.assert_array_equal(m.running_mean, 0.0)  # nothing loaded

    extra = dict(full, foo=np.zeros(3, dtype))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "foo"'):
        m.load_state_dict(extra)
    np.testing.assert_array_equal(m.running_mean, 0.0)

    both = dict(missing, foo=np.zeros(3, dtype))
    with pytest.raises(RuntimeError) as info:
        m.load_state_dict(both)
    assert '"weight"' in str(info.value) and '"foo"' in str(info.value)
    np.testing.assert_array_equal(m.running_mean, 0.0)

    # Non-strict: what matches is loaded; the report is torch's.
    result = m.load_state_dict(both, strict=False)
    t_result = tm.load_state_dict({k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f"
                                                       else v) for k, v in both.items()},
                                  strict=False)
    assert list(result.missing_keys) == list(t_result.missing_keys) == ["weight"]
    assert list(result.unexpected_keys) == list(t_result.unexpected_keys) == ["foo"]
    np.testing.assert_array_equal(m.running_mean, 5.0)


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_size_mismatch_loads_nothing(dtype, strict):
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    state = {"weight": np.full(3, 2.0, dtype), "bias": np.full(3, 1.0, dtype),
             "running_mean": np.zeros(4, dtype), "running_var": np.full(3, 9.0, dtype),
             "num_batches_tracked": np.array(4)}
    with pytest.raises(RuntimeError, match=r"size mismatch for running_mean"):
        m.load_state_dict(state, strict=strict)
    np.testing.assert_array_equal(m.weight, 1.0)
    np.testing.assert_array_equal(m.bias, 0.0)
    np.testing.assert_array_equal(m.running_var, 1.0)
    assert int(m.num_batches_tracked) == 0


def test_size_mismatch_is_runtime_error_in_torch_too(torch):
    tm = torch.nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match=r"size mismatch for running_mean"):
        tm.load_state_dict(dict(tm.state_dict(), running_mean=torch.zeros(4)))


def test_parameters_and_buffers_take_ndarrays_or_none(dtype):
    # torch's rule (a tensor or None): a list would run, then break state_dict().
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    for name, value in (("weight", [1.0, 2.0, 3.0]), ("running_var", (1.0, 1.0, 1.0)),
                        ("num_batches_tracked", np.int64(4)), ("bias", 0.5)):
        with pytest.raises(TypeError, match=f"cannot assign '{type(value).__name__}' as "
                                            f"'{name}' \\(numpy.ndarray or None expected\\)"):
            setattr(m, name, value)
    m.bias = None  # no bias, as torch allows
    m.weight = np.full(3, 2.0, dtype)
    assert m.state_dict().keys() == {"weight", "running_mean", "running_var",
                                     "num_batches_tracked"}


def test_load_state_dict_into_a_read_only_buffer_loads_nothing(dtype):
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    rv = np.ones(3, dtype)
    rv.flags.writeable = False  # e.g. an array mapped from a file
    m.running_var = rv
    state = {"weight": np.full(3, 2.0), "bias": np.full(3, 5.0), "running_mean": np.full(3, 7.0),
             "running_var": np.full(3, 4.0), "num_batches_tracked": 9}
    with pytest.raises(RuntimeError, match="cannot load running_var: the module's running_var "
                                           "is a read-only array"):
        m.load_state_dict(state)
    np.testing.assert_array_equal(m.bias, 0)  # nothing written, the keys before it neither
    np.testing.assert_array_equal(m.running_mean, 0)
    assert int(m.num_batches_tracked) == 0



@pytest.mark.parametrize("count", [np.array(1e30), np.array(np.nan), np.array(-np.inf),
                                   np.array(-5), np.array([3, 4]), np.array(2.0 ** 63)],
                         ids=["huge", "nan", "-inf", "negative", "two", "2**63"])
def test_load_state_dict_rejects_counts_int64_cannot_hold(count):
    # torch stores 1e30 and NaN as -2**63 without a word (and a negative count makes
    # momentum=None's factor negative): an error naming the key, nothing loaded.
    m = bnfast.BatchNorm2d(2, momentum=None)
    state = dict(m.state_dict(), running_var=np.full(2, 4.0, np.float32),
                 num_batches_tracked=count)
    expected = "size mismatch" if count.shape == (2,) else "value out of range"
    with pytest.raises(RuntimeError, match=f"{expected} for num_batches_tracked"):
        m.load_state_dict(state)
    assert int(m.num_batches_tracked) == 0 and np.all(m.running_var == 1.0)


@pytest.mark.parametrize("count", [np.array([7]), np.array(7.9), np.array(True), [7]],
                         ids=["shape-1", "float", "bool", "list"])
def test_load_state_dict_counts_as_torch_reads_them(count, torch):
    # A 1-element count loads into the 0-d buffer (torch's rule for 0-d tensors);
    # a float truncates, as torch's copy_ does.
    m, tm = bnfast.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    state = dict(m.state_dict(), num_batches_tracked=count)
    m.load_state_dict(state)
    tm.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    assert m.num_batches_tracked.shape == () and m.num_batches_tracked.dtype == np.int64
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked)


def test_load_state_dict_casts_to_module_dtype(torch):
    tm = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        tm.running_mean.fill_(0.1)
    m = bnfast.BatchNorm1d(3, dtype=np.float32)
    m.load_state_dict(tm.state_dict())
    assert m.running_mean.dtype == np.float32
    np.testing.assert_array_equal(m.running_mean, np.float32(0.1))



@pytest.mark.parametrize("bad", [np.array(["1", "2", "3"]), np.ones(3, np.complex128),
                                 np.full(3, None), [[1.0], [1.0, 2.0]], "abc"],
                         ids=["string", "complex", "object", "ragged", "str"])
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_bad_value_is_type_error_and_loads_nothing(dtype, bad, strict):
    # Keys before and after the bad one: none of them may be written.
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    state = {"weight": np.full(3, 2.0), "bias": np.full(3, 1.0), "running_mean": bad,
             "running_var": np.full(3, 9.0), "num_batches_tracked": np.array(4)}
    with pytest.raises(TypeError, match="'running_mean'"):
        m.load_state_dict(state, strict=strict)
    np.testing.assert_array_equal(m.weight, 1.0)
    np.testing.assert_array_equal(m.bias, 0.0)
    np.testing.assert_array_equal(m.running_mean, 0.0)
    np.testing.assert_array_equal(m.running_var, 1.0)
    assert int(m.num_batches_tracked) == 0


def test_load_state_dict_complex_tensor_is_type_error(torch):
    m = bnfast.BatchNorm1d(3)
    tm = torch.nn.BatchNorm1d(3)
    state = dict(tm.state_dict(), running_var=torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="'running_var'"):
        m.load_state_dict(state)
    np.testing.assert_array_equal(m.running_var, 1.0)


def test_load_state_dict_of_its_own_arrays(dtype, rng):
    m = bnfast.BatchNorm1d(3, dtype=dtype)
    m.weight[...], m.bias[...] = make_params(rng, 3, dtype)
    expected = {k: v.copy() for k, v in m.state_dict().items()}
    m.load_state_dict(m.state_dict())
    m.load_state_dict({"weight": m.bias, "bias": m.weight}, strict=False)  # a swap
    np.testing.assert_array_equal(m.weight, expected["bias"])
    np.testing.assert_array_equal(m.bias, expected["weight"])


@pytest.mark.parametrize("source", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_load_half_precision_torch_state_dict_as_torch_does(dtype, rng, torch, source, name):
    # torch casts a bfloat16/float16 state dict into a float32/float64 module.
    half = getattr(torch.nn, name)(C, momentum=0.3, dtype=getattr(torch, source))
    with torch.no_grad():
        half.weight.uniform_(0.5, 2)
        half.bias.uniform_(-1, 1)
        for _ in range(3):
            half(torch.randn(4, C, *(3,) * int(name[-2]), dtype=getattr(torch, source)))
    state = half.state_dict()
    tm = _torch_module(torch, name, dtype)
    tm.load_state_dict(state)
    m = getattr(bnfast, name)(C, dtype=dtype)
    assert m.load_state_dict(state) == ([], [])
    for key, value in _torch_buffers(tm).items():
        np.testing.assert_array_equal(getattr(m, key), value, err_msg=key)
        assert getattr(m, key).dtype == value.dtype
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("spelling", [None, 1, 2, -1, np.int64(2), 65536, -65536],
                         ids=repr)
def test_every_n_threads_spelling_gives_the_same_result(dtype, rng, spelling):
    # Large enough to run threaded.
    x = make_input(rng, (16, 3, 64, 64), dtype)
    serial = bnfast.BatchNorm2d(3, dtype=dtype, n_threads=1)
    m = bnfast.BatchNorm2d(3, dtype=dtype, n_threads=spelling)
    for training in (True, False):
        serial.train(training)
        m.train(training)
        np.testing.assert_array_equal(m(x), serial(x))
    np.testing.assert_array_equal(
        bnfast.batch_norm(x, None, None, training=True, n_threads=spelling),
        bnfast.batch_norm(x, None, None, training=True, n_threads=1))


@pytest.mark.parametrize("bad", [2**31, 2**40, -2**40, 65537, np.int64(2**40)], ids=repr)
def test_n_threads_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError, match="n_threads"):
        bnfast.BatchNorm2d(3, n_threads=bad)
    m = bnfast.BatchNorm2d(3)
    m.n_threads = bad
    with pytest.raises(ValueError, match="n_threads"):
        m(np.ones((2, 3, 2, 2), np.float32))
    assert int(m.num_batches_tracked) == 0

# -- repr ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("kwargs", [
    {}, {"eps": 1e-3}, {"momentum": None}, {"momentum": 0.01, "eps": 0.1},
    {"affine": False}, {"bias": False}, {"track_running_stats": False},
    {"affine": False, "track_running_stats": False, "momentum": None, "eps": 2e-5},
], ids=str)
def test_repr_matches_torch(torch, name, kwargs):
    assert repr(getattr(bnfast, name)(7, **kwargs)) == repr(getattr(torch.nn, name)(7, **kwargs))


def test_fused_repr_names_fused_class():
    assert repr(bnfast.FusedBatchNorm2d(3)).startswith("FusedBatchNorm2d(3, eps=1e-05")


# -- every combination, every class, against the reference only (no torch needed) ----
@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (6, 3)),
                                       (bnfast.BatchNorm1d, (3, 3, 4)),
                                       (bnfast.BatchNorm2d, (2, 3, 3, 4)),
                                       (bnfast.BatchNorm3d, (2, 3, 2, 2, 3))],
                         ids=["1d-2D", "1d-3D", "2d", "3d"])
def test_option_grid_against_reference(dtype, rng, cls, shape):
    for affine, bias, track, momentum in itertools.product(
            (True, False), (True, False), (True, False), (0.25, None)):
        m = cls(3, affine=affine, bias=bias, track_running_stats=track, momentum=momentum,
                dtype=dtype)
        if affine:
            m.weight[...] = [0.5, 2.0, -1.0]
            if bias:
                m.bias[...] = [1.0, -2.0, 0.0]
        for step, training in enumerate(SEQUENCE):
            m.train(training)
            x = make_input(rng, shape, dtype, loc=float(step))
            before = _buffers(m)
            y = m(x)
            ref, nbt = _reference_step(before, x, training, momentum, track, m.eps,
                                       before["weight"], before["bias"])
            assert_close(y, ref.out, dtype)
            if track:
                assert int(m.num_batches_tracked) == nbt
                assert_close(m.running_mean, ref.running_mean, dtype, STAT_TOL)
                assert_close(m.running_var, ref.running_var, dtype, STAT_TOL)


# =====================================================================================
# Behaviour once held by the "fast path equals general path" suites (issue 9, part 4):
# modules in train and eval, every argument form, out=, failures, copies, backward.
# (Kept as one block: other work appends its own tests after it.)
# =====================================================================================
MODULE_OF_NDIM = {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d,
                  5: bnfast.BatchNorm3d}
FUSED_OF_NDIM = {2: bnfast.FusedBatchNorm1d, 3: bnfast.FusedBatchNorm1d,
                 4: bnfast.FusedBatchNorm2d, 5: bnfast.FusedBatchNorm3d}
# ResNet's last block, C < the channels-last tile width with S > 1, (N, C) rows, S == 1
# in 3-D, a 5-D volume, rows with C >= 64, and (N, C, L).
EVAL_SHAPES = [(1, 512, 7, 7), (2, 3, 5, 5), (4, 16), (3, 8, 1), (2, 4, 3, 3, 3), (5, 80),
               (3, 6, 7)]
SUM_TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def _module(rng, shape, dtype, *, fused=False, training=False, **kwargs):
    """A module of ``shape``'s kind with parameters and buffers that are not the defaults."""
    C = shape[1]
    m = (FUSED_OF_NDIM if fused else MODULE_OF_NDIM)[len(shape)](C, dtype=dtype, **kwargs)
    if m.weight is not None:
        m.weight[...] = make_params(rng, C, dtype)[0]
    if m.bias is not None:
        m.bias[...] = make_params(rng, C, dtype)[1]
    if m.running_mean is not None:
        m.running_mean[...], m.running_var[...] = make_running(rng, C, dtype)
    return m.train(training)


def _expected(m, x, addend=None, relu=False):
    """The float64 reference of m's next call on its current values (training: momentum)."""
    batch = m.training or m.running_mean is None
    momentum = m.momentum if m.momentum is not None else 1.0 / (int(m.num_batches_tracked) + 1)
    return reference_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                training=batch, momentum=float(momentum), eps=float(m.eps),
                                addend=addend, relu=relu)


@pytest.mark.parametrize("shape", EVAL_SHAPES, ids=str)
@pytest.mark.parametrize("affine,bias", AFFINE, ids=["affine", "affine-nobias", "noaffine"])
def test_eval_module_matches_reference(dtype, rng, shape, affine, bias):
    m = _module(rng, shape, dtype, affine=affine, bias=bias)
    x = make_input(rng, shape, dtype)
    ref = _expected(m, x)
    for grad in (False, True):
        with (contextlib.nullcontext() if grad else bnfast.no_grad()):
            y = m(x)
            y_again = m(x)
        assert type(y) is np.ndarray and y is not x and y.flags.c_contiguous
        assert_close(y, ref.out, dtype)
        assert_same(y_again, y)
        if grad:
            assert m.backward(np.zeros_like(x)).shape == shape
        else:
            with pytest.raises(RuntimeError, match="no_grad"):
                m.backward(np.zeros_like(x))


@pytest.mark.parametrize("shape", EVAL_SHAPES, ids=str)
@pytest.mark.parametrize("with_addend", [True, False], ids=["addend", "no_addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_module_relu_and_its_gradient_mask(dtype, rng, shape, with_addend, training):
    m = _module(rng, shape, dtype, fused=True, training=training)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if with_addend else None
    ref = _expected(m, x, addend, relu=True)
    y = m(x, addend)
    assert_close(y, ref.out, dtype)
    assert (y == 0).any() and (y > 0).any()  # the relu did something, not everything
    # The gradient flows exactly where the output is positive.
    gx, ga = m.backward(np.ones_like(x))
    if with_addend:
        np.testing.assert_array_equal(ga, (y > 0).astype(dtype))
    else:
        assert ga is None
    if not training:  # eval: an elementwise map, so the input's gradient is masked the same
        np.testing.assert_array_equal(gx == 0, y <= 0)


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (4, 16), (3, 8, 1), (2, 4, 3, 3, 3)], ids=str)
def test_eval_module_matches_torch(dtype, rng, torch, shape):
    m = _module(rng, shape, dtype, eps=1e-3)
    x = make_input(rng, shape, dtype)
    tm = getattr(torch.nn, type(m).__name__)(shape[1], eps=1e-3,
                                             dtype=getattr(torch, np.dtype(dtype).name))
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
    tm.eval()
    with torch.no_grad():
        yt = tm(torch.from_numpy(x)).numpy()
    assert_close(m(x), yt, dtype, TORCH_TOL)


def _set(name, value):
    return lambda m: setattr(m, name, value(m) if callable(value) else value)


# Argument forms a module call must take as the plain ones: (shape, module edit, input map).
ARGUMENT_FORMS = {
    "fortran-2d": ((6, 4), None, np.asfortranarray),
    "fortran-4d": ((2, 4, 3, 3), None, np.asfortranarray),
    "strided": ((2, 4, 3, 3), None, strided),
    "strided-2d": ((6, 4), None, strided),
    "channels_last": ((2, 4, 3, 3), None, channels_last),
    "read-only": ((2, 4, 3, 3), None, lambda x: np.lib.stride_tricks.as_strided(
        x, writeable=False)),
    "subclass": ((2, 4, 3, 3), None, lambda x: x.view(_ModuleSubclass)),
    "n_threads=-1": ((2, 4, 3, 3), _set("n_threads", -1), None),
    "n_threads=np.int64": ((2, 4, 3, 3), _set("n_threads", np.int64(1)), None),
    "eps-np.float64": ((2, 4, 3, 3), _set("eps", np.float64(1e-3)), None),
    "eps-np.float32": ((2, 4, 3, 3), _set("eps", np.float32(1e-2)), None),
    "eps-int": ((2, 4, 3, 3), _set("eps", 1), None),
    "momentum-np.float32": ((2, 4, 3, 3), _set("momentum", np.float32(0.25)), None),
    "momentum-int": ((2, 4, 3, 3), _set("momentum", 1), None),
    "momentum-Fraction": ((2, 4, 3, 3), _set("momentum", fractions.Fraction(1, 3)), None),
    "running-buffers-other-dtype": ((2, 4, 3, 3), lambda m: (
        setattr(m, "running_mean", m.running_mean.astype(other_float(m.dtype))),
        setattr(m, "running_var", m.running_var.astype(other_float(m.dtype)))), None),
    "params-other-dtype": ((2, 4, 3, 3), lambda m: (
        setattr(m, "weight", m.weight.astype(np.float64) * 1.25),
        setattr(m, "bias", m.bias.astype(np.float64) / 3)), None),
    "weight-strided": ((2, 4, 3, 3), _set("weight", lambda m: np.repeat(m.weight, 2)[::2]),
                       None),
    "running_var-strided": ((2, 4, 3, 3),
                            _set("running_var", lambda m: np.repeat(m.running_var, 2)[::2]),
                            None),
    "empty-batch": ((0, 4, 3, 3), None, None),
    "empty-spatial": ((2, 4, 0), None, None),
}


class _ModuleSubclass(np.ndarray):
    """An ndarray subclass: behaves as the ndarray it views."""


@pytest.mark.parametrize("case", list(ARGUMENT_FORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_argument_forms(dtype, rng, case, training):
    shape, edit, as_input = ARGUMENT_FORMS[case]
    m = _module(rng, shape, dtype, training=training)
    x = make_input(rng, shape, dtype)
    if edit is not None:
        edit(m)
    xin = x if as_input is None else as_input(x.copy())
    ref = _expected(m, x)
    y = m(xin)
    assert type(y) is np.ndarray and y.dtype == dtype and y.shape == shape
    assert_close(y, ref.out, dtype)
    if case == "channels_last":
        assert is_channels_last(y)
    if training and ref.running_mean is not None and x.size:
        rdt = m.running_mean.dtype.type
        assert_close(m.running_mean, ref.running_mean, rdt, STAT_TOL)
        assert_close(m.running_var, ref.running_var, rdt, STAT_TOL)
    if x.size == 0:
        assert y.size == 0
        return
    # The same module on the plain input next: still right (nothing stuck from the last call).
    ref = _expected(m, x)
    assert_close(m(x), ref.out, dtype)
    if not training:  # eval is elementwise: the same bits whatever the input's memory
        assert_same(np.ascontiguousarray(y), m(x))


def test_numpy_scalar_and_int_hyperparameters_equal_their_floats(dtype, rng):
    # A module built with NumPy-scalar / int eps and momentum steps exactly as one built
    # with the equal Python floats.
    x = make_input(rng, (4, 3, 5, 5), dtype)
    for eps, momentum in ((np.float64(1e-3), np.float32(0.25)), (1, 1), (np.float32(0.5), 0)):
        a = bnfast.BatchNorm2d(3, eps=eps, momentum=momentum, dtype=dtype)
        b = bnfast.BatchNorm2d(3, eps=float(eps), momentum=float(momentum), dtype=dtype)
        for m in (a, b):
            m.weight[...], m.bias[...] = make_params(np.random.default_rng(3), 3, dtype)
        for training in (True, True, False):
            assert_same(a.train(training)(x), b.train(training)(x))
        assert_same(a.running_mean, b.running_mean)
        assert_same(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 2
        assert_same(a.backward(x), b.backward(x))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("target", ["fresh", "input", "addend"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70)], ids=str)
def test_module_out_and_backward_after_it(dtype, rng, fused, target, training, shape):
    if target == "addend" and not fused:
        return
    m = _module(rng, shape, dtype, fused=fused, training=training)
    twin = copy.deepcopy(m)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if fused else None
    x0 = x.copy()
    addend0 = None if addend is None else addend.copy()
    ref = _expected(m, x0, addend0, relu=fused)
    args = (x, addend) if fused else (x,)
    out = {"fresh": np.full(shape, np.nan, dtype), "input": x, "addend": addend}[target]
    y = m(*args, out=out)
    assert y is out
    assert_close(y, ref.out, dtype)
    if target != "input":
        assert_same(x, x0)
    if fused and target != "addend":
        assert_same(addend, addend0)
    # The twin, called without out=, is the same module: same bits, same gradients.
    assert_same(y, twin(*((x0, addend0) if fused else (x0,))))
    assert_same(m.running_mean, twin.running_mean)
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    if target == "input":
        with pytest.raises(RuntimeError, match="wrote its output over"):
            m.backward(g)
        return
    grads, twin_grads = m.backward(g), twin.backward(g)
    for a, e in zip(grads if fused else (grads,), twin_grads if fused else (twin_grads,)):
        assert_same(a, e)
    assert_same(m.weight_grad, twin.weight_grad)


def test_module_out_partially_overlapping_input(dtype, rng):
    shape = (2, 4, 3, 3)
    n = int(np.prod(shape))
    for training in (True, False):
        m = _module(rng, shape, dtype, training=training)
        values = make_input(rng, shape, dtype)
        for shift in (1, 7, n - 1):
            buf = np.zeros(n + shift, dtype)
            x, out = buf[:n].reshape(shape), buf[shift:].reshape(shape)
            x[...] = values
            ref = _expected(m, values)
            assert m(x, out=out) is out
            assert_close(out, ref.out, dtype)


def _fail_one_value(m, x, extra):
    one = (slice(0, 1), slice(None)) + (slice(0, 1),) * (x.ndim - 2)
    return m(x[one], *(e[one] for e in extra))


def _fail_read_only_var(m, x, extra):
    m.running_var.flags.writeable = False
    try:
        return m(x, *extra)
    finally:
        m.running_var.flags.writeable = True


def _fail_attribute(name, value):
    def fail(m, x, extra):
        saved = getattr(m, name)
        setattr(m, name, value)
        try:
            return m(x, *extra)
        finally:
            setattr(m, name, saved)
    return fail


def _fail_channels(m, x, extra):
    bigger = np.concatenate([x, x[:, :1]], axis=1)
    return m(bigger, *(np.concatenate([e, e[:, :1]], axis=1) for e in extra))


def _fail_dtype(m, x, extra):
    return m(x.astype(other_float(x.dtype)), *(e.astype(other_float(e.dtype)) for e in extra))


def _fail_byteswapped(m, x, extra):
    return m(x.astype(x.dtype.newbyteorder()), *extra)


def _fail_out(m, x, extra):
    return m(x, *extra, out=np.zeros(x.shape, other_float(x.dtype)))


def _fail_addend(m, x, extra):
    return m(x, x[:1].copy())


FAILURES = {
    "one-value-per-channel": (_fail_one_value, ValueError, "more than 1 value per channel"),
    "read-only-running_var": (_fail_read_only_var, ValueError, "running_var must be a writable"),
    "momentum-str": (_fail_attribute("momentum", "0.1"), TypeError, "momentum must be a real"),
    "wrong-channels": (_fail_channels, ValueError, "expected input with"),
    "wrong-dtype": (_fail_dtype, TypeError, "does not match the module's dtype"),
    "byteswapped": (_fail_byteswapped, TypeError, "float32 or float64"),
    "eps-zero": (_fail_attribute("eps", 0.0), ValueError, "eps must be positive"),
    "n_threads-zero": (_fail_attribute("n_threads", 0), ValueError, "n_threads"),
    "weight-too-long": (_fail_attribute("weight", np.ones(5)), ValueError,
                        r"weight must have shape \(3,\)"),
    "out-wrong-dtype": (_fail_out, TypeError, "out must have the input's dtype"),
    "addend-wrong-shape": (_fail_addend, ValueError, "addend must have the input's shape"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 3)], ids=str)
def test_failed_call_leaves_module_unchanged(dtype, rng, failure, shape):
    # Cumulative average: a count bumped by the failed call would change the next
    # step's factor (1/3 instead of 1/2), so the next step shows it as well.
    fail, error, message = FAILURES[failure]
    fused = failure == "addend-wrong-shape"
    m = _module(rng, shape, dtype, fused=fused, training=True, momentum=None)
    x0 = make_input(rng, shape, dtype, loc=1.0)
    x = make_input(rng, shape, dtype, loc=-2.0)
    extra = (make_input(rng, shape, dtype, 0.0, 1.0),) if fused else ()
    m(x0, *extra)
    before = {k: np.array(getattr(m, k)) for k in
              ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")}
    with pytest.raises(error, match=message):
        fail(m, x, extra)
    for k, v in before.items():
        assert_same(np.asarray(getattr(m, k)), v, k)
    # The next step is the second one: factor 1/2, and the backward of the first
    # forward is still there (the failed call saved nothing over it).
    gx = m.backward(np.ones_like(x0))
    assert (gx[0] if fused else gx).shape == shape
    ref = _expected(m, x, extra[0] if fused else None, relu=fused)
    assert_close(m(x, *extra), ref.out, dtype)
    assert_close(m.running_mean, ref.running_mean, dtype, STAT_TOL)
    assert_close(m.running_var, ref.running_var, dtype, STAT_TOL)
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_wrong_channel_count_raises_without_params_or_buffers(dtype, rng, training, grad,
                                                              fused):
    # No (C,) array to compare the input against: the module's channel count still holds,
    # whatever the grad mode and the input's memory layout.
    m = (FUSED_OF_NDIM if fused else MODULE_OF_NDIM)[4](
        4, affine=False, track_running_stats=False, dtype=dtype).train(training)
    x = make_input(rng, (2, 5, 3, 3), dtype)
    for xin in (x, channels_last(x)):
        with (pytest.raises(ValueError, match=r"expected input with 4 channels.*\(2, 5, 3, 3\)"),
              contextlib.nullcontext() if grad else bnfast.no_grad()):
            m(xin)


def _torch_grads(torch, x, g, w, b, eps, training, rm=None, rv=None, addend=None, relu=False):
    """torch's (grad_input, grad_weight, grad_bias, grad_addend) of one batch norm."""
    xt = torch.from_numpy(x.copy()).requires_grad_()
    wt = None if w is None else torch.from_numpy(w.copy()).requires_grad_()
    bt = None if b is None else torch.from_numpy(b.copy()).requires_grad_()
    at = None if addend is None else torch.from_numpy(addend.copy()).requires_grad_()
    rmt = None if rm is None else torch.from_numpy(rm.copy())
    rvt = None if rv is None else torch.from_numpy(rv.copy())
    y = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training=training, eps=eps)
    if at is not None:
        y = y + at
    if relu:
        y = torch.relu(y)
    y.backward(torch.from_numpy(g))
    return tuple(None if t is None else t.grad.numpy() for t in (xt, wt, bt, at))


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (6, 70), (3, 8, 1), (1, 512, 7, 7)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_training_backward_uses_forward_time_values(dtype, rng, torch, shape, affine, fused):
    m = _module(rng, shape, dtype, fused=fused, training=True, affine=affine)
    x = make_input(rng, shape, dtype)
    addend = make_input(rng, shape, dtype, loc=0.0, scale=1.0) if fused else None
    g = make_input(rng, shape, dtype, loc=0.0, scale=1.0)
    w0, b0 = (None, None) if not affine else (m.weight.copy(), m.bias.copy())
    m(*((x, addend) if fused else (x,)))
    if affine:  # edit everything in place between forward and backward
        m.weight[...] *= -3
        m.bias[...] -= 2
    m.running_mean[...] += 1
    m.running_var[...] *= 4
    m.eps = 0.5  # the backward uses the forward's eps too (torch: the saved invstd)
    gx, ga = m.backward(g) if fused else (m.backward(g), None)
    # The float64 formula, with the gradient masked where the forward's ReLU cut.
    axes = (0,) + tuple(range(2, len(shape)))
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    x64 = x.astype(np.float64)
    ref = reference_batch_norm(x, None, None, w0, b0, training=True, addend=addend, relu=fused)
    g64 = g.astype(np.float64) * ((ref.out > 0) if fused else 1.0)
    inv = 1.0 / np.sqrt(x64.var(axis=axes) + 1e-5)
    xhat = (x64 - x64.mean(axis=axes).reshape(bshape)) * inv.reshape(bshape)
    wv = np.ones(shape[1]) if w0 is None else w0.astype(np.float64)
    gx64 = (wv * inv).reshape(bshape) * (g64 - g64.mean(axis=axes, keepdims=True)
                                         - xhat * (g64 * xhat).mean(axis=axes, keepdims=True))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gx, gx64, **tol)
    if fused:
        np.testing.assert_array_equal(ga, g * (ref.out > 0))
    if affine:
        assert_close(m.weight_grad, (g64 * xhat).sum(axis=axes), dtype, SUM_TOL)
        assert_close(m.bias_grad, g64.sum(axis=axes), dtype, SUM_TOL)
    else:
        assert m.weight_grad is None and m.bias_grad is None
    if shape != (2, 4, 3, 3):
        return  # torch is slow to call: once per kind is enough
    tgx, tgw, tgb, tga = _torch_grads(torch, x, g, w0, b0, 1e-5, True, addend=addend,
                                      relu=fused)
    assert_close(gx, tgx, dtype, TORCH_TOL)
    if fused:
        assert_close(ga, tga, dtype, TORCH_TOL)
    if affine:
        assert_close(m.weight_grad, tgw, dtype, TORCH_TOL)
        assert_close(m.bias_grad, tgb, dtype, TORCH_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mixed_dtype_parameters_forward_and_backward(rng, torch, training):
    # float64 parameters and running stats in a float32 module: used at their float64
    # values (as the functional call does), the data and the gradients stay float32.
    shape, C = (4, 3, 5, 5), 3
    m = _module(rng, shape, np.float32, training=training)
    w, b = make_params(rng, C, np.float64)
    rm, rv = make_running(rng, C, np.float64)
    m.weight, m.bias, m.running_mean, m.running_var = w, b, rm.copy(), rv.copy()
    x = make_input(rng, shape, np.float32)
    g = make_input(rng, shape, np.float32, loc=0.0, scale=1.0)
    ref = reference_batch_norm(x, rm, rv, w, b, training=training)
    y = m(x)
    assert y.dtype == np.float32
    assert_close(y, ref.out, np.float32)
    if training:
        assert_close(m.running_mean, ref.running_mean, np.float64, STAT_TOL)
        assert_close(m.running_var, ref.running_var, np.float64, STAT_TOL)
    gx = m.backward(g)
    assert gx.dtype == np.float32
    tgx, tgw, tgb, _ = _torch_grads(torch, x.astype(np.float64), g.astype(np.float64), w, b,
                                    1e-5, training, rm, rv)
    assert_close(gx, tgx, np.float32, TORCH_TOL)
    assert_close(m.weight_grad, tgw, np.float32, TORCH_TOL)
    assert_close(m.bias_grad, tgb, np.float32, TORCH_TOL)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_copy_and_pickle_round_trip(dtype, rng, fused, how, training):
    shape = (2, 4, 3, 3)
    m = _module(rng, shape, dtype, fused=fused, training=training)
    x = make_input(rng, shape, dtype)
    args = (x, make_input(rng, shape, dtype, 0.0, 1.0)) if fused else (x,)
    with bnfast.no_grad():
        m(*args)  # one step (training: the running stats move), eval coefficients held
    m2 = copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))
    assert type(m2) is type(m) and m2.training is training and m2.eps == m.eps
    for k, v in m.state_dict().items():
        assert_same(np.asarray(m2.state_dict()[k]), np.asarray(v), k)
        assert not np.may_share_memory(m2.state_dict()[k], v)
    y2 = m2(*args)
    assert_same(m(*args), y2)
    # Independent: editing the original changes neither the copy's buffers nor its output.
    m.weight[...] *= 2
    m.running_mean[...] += 1
    m.eval(), m2.eval()
    y2 = m2(*args)
    assert not np.array_equal(m(*args), y2)
    # And the copy follows its own edits.
    m2.bias[...] += 1
    assert_close(m2(*args), _expected(m2, x, args[1] if fused else None, relu=fused).out, dtype)
    assert not np.array_equal(m2(*args), y2)


@pytest.mark.parametrize("strict", [True, False])
def test_versioned_torch_state_dict_needs_its_count(torch, strict):
    # torch's state_dict() says it is version 2: without num_batches_tracked the key is
    # missing (strict: an error), as torch's load_state_dict says.
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    m = bnfast.BatchNorm2d(3)
    m.num_batches_tracked[...] = 5
    if strict:
        with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: '
                                               '"num_batches_tracked"'):
            m.load_state_dict(sd)
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            torch.nn.BatchNorm2d(3).load_state_dict(sd)
        np.testing.assert_array_equal(m.running_var, 1.0)  # nothing loaded
    else:
        result = m.load_state_dict(sd, strict=False)
        t_result = torch.nn.BatchNorm2d(3).load_state_dict(sd, strict=False)
        assert list(result.missing_keys) == list(t_result.missing_keys) == [
            "num_batches_tracked"]
        assert int(m.num_batches_tracked) == 5
    # The same values in a plain dict (no version): the count is kept, as torch keeps it.
    assert m.load_state_dict(dict(sd)).missing_keys == []
