"""bnfast.io and the modules' from_state_dict: state dicts in files, BatchNorms in them."""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import bnfast
from bnfast import io
from conftest import TOL, assert_close, make_input, make_params, make_running

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
# Every dtype a checkpoint may hold: stored and read back bit for bit.
ALL_DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
FORMATS = (".safetensors", ".npz", ".pt")


def _state(rng, dtype, C=5):
    w, b = make_params(rng, C, np.float64)
    m, v = make_running(rng, C, np.float64)
    return {"features.1.weight": w.astype(dtype), "features.1.bias": b.astype(dtype),
            "features.1.running_mean": m.astype(dtype),
            "features.1.running_var": v.astype(dtype),
            "features.1.num_batches_tracked": np.array(12, np.int64),
            "features.0.weight": rng.standard_normal((C, 3, 3, 3)).astype(dtype)}


def _assert_same_arrays(got, expected):
    assert sorted(got) == sorted(expected)  # a .safetensors file orders by dtype, then name
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        # bit for bit (a bfloat16 compares through its bytes)
        assert got[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_keeps_dtype_shape_and_bits(tmp_path, rng, suffix, dtype):
    if suffix == ".pt":
        pytest.importorskip("torch")
    state = _state(rng, dtype)
    path = tmp_path / f"model{suffix}"
    if suffix == ".npz" and dtype is ml_dtypes.bfloat16:
        with pytest.raises(TypeError, match="cannot name"):
            io.save_state_dict(path, state)
        assert not path.exists()
        return
    io.save_state_dict(path, state)
    _assert_same_arrays(io.load_state_dict(path), state)


def test_files_written_by_torch_and_safetensors_load(tmp_path, rng, torch):
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(4.0),
               "n": torch.tensor(3)}
    torch.save(tensors, tmp_path / "t.pth")
    st_torch.save_file(tensors, str(tmp_path / "t.safetensors"))
    for name in ("t.pth", "t.safetensors"):
        got = io.load_state_dict(tmp_path / name)
        assert got["a"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got["a"].astype(np.float32), tensors["a"].float().numpy())
        np.testing.assert_array_equal(got["b"], tensors["b"].numpy())
        assert got["n"].dtype == np.int64 and got["n"].shape == () and got["n"] == 3


def test_float8_safetensors_load_as_ml_dtypes_arrays(tmp_path, torch):
    # safetensors.numpy has no NumPy name for float8: read by the format's own layout.
    st_torch = pytest.importorskip("safetensors.torch")
    values = torch.tensor([1.0, -2.5, 0.125, 448.0])
    tensors = {"e4m3": values.to(torch.float8_e4m3fn), "e5m2": values.to(torch.float8_e5m2),
               "bf16": values.to(torch.bfloat16).reshape(2, 2), "f32": values}
    path = tmp_path / "f8.safetensors"
    st_torch.save_file(tensors, str(path))
    got = io.load_state_dict(path)
    assert sorted(got) == sorted(tensors)
    expected_dtypes = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
                       "bf16": ml_dtypes.bfloat16, "f32": np.float32}
    for name, tensor in tensors.items():
        assert got[name].dtype == expected_dtypes[name] and got[name].flags.writeable
        np.testing.assert_array_equal(got[name].astype(np.float32), tensor.float().numpy())


def test_bfloat16_safetensors_load_in_a_fresh_process(tmp_path):
    # ml_dtypes installed but not yet imported: the first load must not fail.
    path = tmp_path / "bf16.safetensors"
    io.save_state_dict(path, {"w": np.array([1.5, -3.0], ml_dtypes.bfloat16),
                              "v": np.array([2.0], np.float32)})
    code = ("import sys\n"
            "from bnfast import io\n"
            "assert 'ml_dtypes' not in sys.modules\n"
            f"state = io.load_state_dict({str(path)!r})\n"
            "print(state['w'].dtype, state['w'].tolist(), state['v'].dtype, state['v'].tolist())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": _ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bfloat16", "[1.5,", "-3.0]", "float32", "[2.0]"]


def test_pt_written_by_us_loads_in_torch(tmp_path, rng, torch):
    state = _state(rng, ml_dtypes.bfloat16)
    io.save_state_dict(tmp_path / "m.pt", state)
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert loaded["features.1.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["features.1.weight"].float().numpy(),
                                  state["features.1.weight"].astype(np.float32))


def test_bfloat16_without_ml_dtypes_names_the_extra(tmp_path, rng):
    path = tmp_path / "bf16.safetensors"
    io.save_state_dict(path, {"w": np.ones(2, ml_dtypes.bfloat16)})
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"  # as if not installed
            "from bnfast import io\n"
            f"io.load_state_dict({str(path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": _ROOT})
    assert done.returncode != 0
    assert 'ImportError' in done.stderr and 'pip install "bnfast[safetensors]"' in done.stderr


def test_load_errors(tmp_path, torch):
    with pytest.raises(ValueError, match="suffix '.bin'"):
        io.load_state_dict(tmp_path / "model.bin")
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(TypeError, match="key 'model' holds a dict"):
        io.load_state_dict(tmp_path / "ckpt.pt")
    with pytest.raises(TypeError, match="keys must be strings"):
        io.save_state_dict(tmp_path / "x.npz", {1: np.ones(1)})
    with pytest.raises(TypeError, match="not an array of numbers"):
        io.save_state_dict(tmp_path / "x.npz", {"a": np.array(["s"])})


# -- BatchNorms from a model's state dict -----------------------------------------
def _torch_model(torch):
    """Nested names as torchvision's ResNet has them (layer1.0.bn1, downsample.1)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(6)
            self.downsample = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False),
                                            nn.BatchNorm2d(6, affine=False, momentum=None))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.bn1 = nn.BatchNorm2d(4, eps=1e-3)
            self.layer1 = nn.Sequential(Block())
            self.ln = nn.LayerNorm(6)  # weight and bias only: no BatchNorm
            self.fc_bn = nn.BatchNorm1d(6)

    model = Net()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # statistics that are not the defaults
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-1, 1, generator=gen)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2, generator=gen)
            else:
                buf.fill_(5)
        for p in model.parameters():
            p.uniform_(0.5, 1.5, generator=gen)
    return model


def _cls(prefix):
    return bnfast.BatchNorm1d if prefix == "fc_bn." else bnfast.BatchNorm2d


@pytest.mark.parametrize("suffix", FORMATS)
def test_batch_norm_layers_match_torch_modules(tmp_path, rng, torch, suffix):
    model = _torch_model(torch)
    io.save_state_dict(tmp_path / f"m{suffix}", model.state_dict())
    state = io.load_state_dict(tmp_path / f"m{suffix}")
    layers = io.batch_norm_layers(state, cls=_cls)
    assert sorted(layers) == ["bn1.", "fc_bn.", "layer1.0.bn1.", "layer1.0.downsample.1."]
    assert not layers["layer1.0.downsample.1."].affine
    assert type(layers["fc_bn."]) is bnfast.BatchNorm1d
    for prefix, ours in layers.items():
        theirs = model.get_submodule(prefix[:-1]).eval()
        shape = (4, ours.num_features) + ((5, 5) if prefix != "fc_bn." else ())
        x = make_input(rng, shape, np.float32)
        ours.eps = theirs.eps  # not in a state dict
        assert ours.training  # as a new torch module
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x)).numpy()
        assert_close(ours.eval()(x), expected, np.float32)
        assert int(ours.num_batches_tracked) == 5


def test_written_back_state_dict_loads_into_torch_unchanged(tmp_path, rng, torch):
    model = _torch_model(torch)
    layers = io.batch_norm_layers(model.state_dict(), cls=_cls)  # torch tensors in
    for prefix, m in layers.items():  # a training step changes every buffer
        shape = (8, m.num_features) + ((3, 3) if prefix != "fc_bn." else ())
        m(make_input(rng, shape, np.float32))
    full = io.load_state_dict(_saved(tmp_path, model))
    full.update(io.state_dict(layers))
    io.save_state_dict(tmp_path / "back.pt", full)
    result = model.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    for prefix, m in layers.items():
        for key, value in m.state_dict().items():
            np.testing.assert_array_equal(model.state_dict()[prefix + key].numpy(), value)


def _saved(tmp_path, model):
    path = tmp_path / "model.safetensors"
    io.save_state_dict(path, model.state_dict())
    return path


@pytest.mark.parametrize("stored", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_modules_from_any_stored_dtype(rng, stored, dtype):
    state = _state(rng, stored)
    bn = io.batch_norm_layers(state, dtype=dtype)["features.1."]
    assert bn.dtype == dtype and bn.weight.dtype == dtype
    for key in ("weight", "bias", "running_mean", "running_var"):
        # cast as torch casts (half values widen exactly: equal to the stored ones)
        np.testing.assert_array_equal(getattr(bn, key),
                                      state["features.1." + key].astype(np.float64).astype(dtype))
    assert bn.num_batches_tracked == 12


@pytest.mark.parametrize("dtype_", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_default_dtype_is_the_stored_one(rng, dtype_):
    # Half data keeps float32 parameters by default (the modules' rule); param_dtype=
    # keeps a half checkpoint half when written back, bit for bit.
    state = _state(rng, dtype_)
    bn = bnfast.BatchNorm2d.from_state_dict(state, "features.1.")
    param = np.float32 if np.dtype(dtype_).itemsize == 2 else dtype_
    assert bn.dtype == dtype_ and bn.param_dtype == param and bn.running_var.dtype == param
    back = io.state_dict(io.batch_norm_layers(state, param_dtype=dtype_))
    for key, value in back.items():
        assert value.dtype == state[key].dtype
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_big_endian_arrays_build_modules_and_save(tmp_path, rng, suffix, torch):
    # An .npz keeps big-endian arrays; torch and the modules take native byte order.
    state = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in _state(rng, np.float32).items()}
    bn = io.batch_norm_layers(state)["features.1."]
    assert bn.dtype == np.float32 and bn.running_var.dtype.isnative
    np.testing.assert_array_equal(bn.running_var, state["features.1.running_var"])
    io.save_state_dict(tmp_path / f"be{suffix}", state)
    loaded = io.load_state_dict(tmp_path / f"be{suffix}")
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_inferred_affine_bias_tracking(rng):
    C = 3
    m, v = make_running(rng, C, np.float32)
    w, b = make_params(rng, C, np.float32)
    no_affine = bnfast.BatchNorm2d.from_state_dict({"running_mean": m, "running_var": v})
    assert not no_affine.affine and no_affine.weight is None
    no_bias = bnfast.BatchNorm2d.from_state_dict({"weight": w, "running_mean": m,
                                                  "running_var": v})
    assert no_bias.affine and no_bias.bias is None
    x = make_input(rng, (4, C, 2, 2), np.float32)
    expected = bnfast.testing.reference_batch_norm(x, m, v, w, None).out
    assert_close(no_bias.eval()(x), expected, np.float32, TOL)
    no_stats = bnfast.BatchNorm2d.from_state_dict({"weight": w, "bias": b}, momentum=None)
    assert not no_stats.track_running_stats and no_stats.momentum is None


def test_from_state_dict_errors(rng):
    w = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="no BatchNorm keys .* 'bn.'"):
        bnfast.BatchNorm2d.from_state_dict({"conv.weight": w}, "bn.")
    with pytest.raises(ValueError, match="bias without bn.weight"):
        bnfast.BatchNorm2d.from_state_dict({"bn.bias": w, "bn.running_mean": w,
                                            "bn.running_var": w}, "bn.")
    with pytest.raises(ValueError, match=r"shape \(C,\), got shape \(3, 1\)"):
        bnfast.BatchNorm2d.from_state_dict({"weight": w[:, None]})
    with pytest.raises(RuntimeError, match="size mismatch for running_var"):
        bnfast.BatchNorm2d.from_state_dict({"weight": w, "running_mean": w,
                                            "running_var": np.ones(4, np.float32)})
    with pytest.raises(TypeError, match="pass dtype="):
        bnfast.BatchNorm2d.from_state_dict({"weight": np.ones(3, np.int64)})
