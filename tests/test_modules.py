"""BatchNorm1d/2d/3d (and the fused modules' shared surface) against torch.nn.BatchNormXd."""
import itertools

import numpy as np
import pytest

import bnfast
from conftest import (
    STAT_TOL,
    TOL,
    TORCH_TOL,
    assert_close,
    make_input,
    make_params,
    reference_batch_norm,
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


@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (0, 3)), (bnfast.BatchNorm1d, (0, 3, 4)),
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
    tol = dict(rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6 if dtype == np.float32 else 1e-13)
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
    result = tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
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
    # Large enough to run threaded; the module's call takes the one-call path.
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
@pytest.mark.parametrize("cls,shape", [(bnfast.BatchNorm1d, (6, 3)), (bnfast.BatchNorm1d, (3, 3, 4)),
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
