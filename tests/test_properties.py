"""Seeded property tests: the properties a fuzz campaign broke (issue 9, section 8).

Each test states one property over generated arguments and would have caught
one of the defects found: the forward against the float64 reference across
dtypes, layouts and options; ``load_state_dict`` all or nothing; ``n_threads``
validated in every entry; torch state dicts of any floating dtype; a forked
child never hangs; and two float32 numerics cases (a constant channel with an
eps below float32's range; values near float32's largest).  Derandomized with
small example counts: the same cases every run, a few seconds in all.
"""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bnfast
from conftest import STAT_TOL, assert_close, reference_batch_norm, with_layout

SEEDED = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                  suppress_health_check=[HealthCheck.too_slow])

FLOATS = (np.float32, np.float64)


def _data(seed, shape, dtype, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    locs = loc + rng.uniform(-3, 3, C).reshape(bshape)
    scales = scale * rng.uniform(0.5, 3, C).reshape(bshape)
    return (rng.standard_normal(shape) * scales + locs).astype(dtype)


# -- forward vs the float64 reference -----------------------------------------------
@st.composite
def forward_cases(draw):
    ndim = draw(st.integers(2, 5))
    training = draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    if training and shape[0] * int(np.prod(shape[2:])) == 1:
        shape = (2,) + shape[1:]  # batch statistics need two values per channel
    return {
        "shape": shape, "training": training, "dtype": draw(st.sampled_from(FLOATS)),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided", "fortran"])),
        "affine": draw(st.sampled_from(["both", "weight", "bias", "none"])),
        "running": draw(st.booleans()) or not training, "addend": draw(st.booleans()),
        "relu": draw(st.booleans()), "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0])),
        "momentum": draw(st.sampled_from([0.1, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SEEDED
@given(forward_cases())
def test_forward_matches_float64_reference(case):
    dtype, shape, training = case["dtype"], case["shape"], case["training"]
    C = shape[1]
    rng = np.random.default_rng(case["seed"])
    x = with_layout(_data(case["seed"], shape, dtype), case["layout"])
    weight = rng.uniform(0.5, 2, C).astype(dtype) if case["affine"] in ("both", "weight") else None
    bias = rng.uniform(-1, 1, C).astype(dtype) if case["affine"] in ("both", "bias") else None
    rm = rng.uniform(-1, 1, C).astype(dtype) if case["running"] else None
    rv = rng.uniform(0.5, 2, C).astype(dtype) if case["running"] else None
    addend = _data(case["seed"] + 1, shape, dtype) if case["addend"] else None
    ref = reference_batch_norm(x, rm, rv, weight, bias, training, case["momentum"], case["eps"],
                               addend, case["relu"])
    y = bnfast.batch_norm(x, rm, rv, weight, bias, training, case["momentum"], case["eps"],
                          addend=addend, relu=case["relu"])
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.out, dtype)
    if rm is not None:
        assert_close(rm, ref.running_mean, dtype, STAT_TOL)
        assert_close(rv, ref.running_var, dtype, STAT_TOL)


# -- load_state_dict: all or nothing -------------------------------------------------
GOOD = ("same", "other_float", "int", "bool", "list", "missing")
BAD_TYPE = ("string", "complex", "object", "ragged")


def _entry(kind, target, rng):
    """A state dict value of ``kind`` for ``target`` (None: leave the key out)."""
    shape, dtype = target.shape, target.dtype
    if kind == "same":
        if dtype.kind == "i":  # num_batches_tracked: a count (negative ones are rejected)
            return rng.integers(0, 9, shape).astype(dtype)
        return rng.uniform(-2, 2, shape).astype(dtype)
    if kind == "other_float":
        other = np.float64 if dtype == np.float32 else np.float32
        return rng.uniform(-2, 2, shape).astype(other)
    if kind == "int":
        return rng.integers(0, 9, shape)
    if kind == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if kind == "list":
        return rng.integers(0, 9, shape).astype(np.float64).tolist()
    if kind == "missing":
        return None
    if kind == "string":
        return np.full(shape, "1.0")
    if kind == "complex":
        return np.ones(shape, np.complex64)
    if kind == "object":
        return np.full(shape, object())
    if kind == "ragged":
        return [[1.0], [1.0, 2.0]]
    if kind == "wrong_shape":
        return np.ones(shape + (2,), dtype)
    raise ValueError(kind)


@SEEDED
@given(kinds=st.lists(st.sampled_from(GOOD + BAD_TYPE + ("wrong_shape",)), min_size=5,
                      max_size=5),
       dtype=st.sampled_from(FLOATS), strict=st.booleans(), unexpected=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
@example(kinds=["same", "string", "same", "same", "same"], dtype=np.float32, strict=True,
         unexpected=False, seed=0)
@example(kinds=["same", "same", "same", "complex", "same"], dtype=np.float64, strict=False,
         unexpected=False, seed=0)
def test_load_state_dict_is_all_or_nothing(kinds, dtype, strict, unexpected, seed):
    rng = np.random.default_rng(seed)
    m = bnfast.BatchNorm2d(3, dtype=dtype)
    m(_data(seed, (4, 3, 2, 2), dtype))  # not the defaults
    before = {k: v.copy() for k, v in m.state_dict().items()}
    state = {}
    for kind, (key, target) in zip(kinds, m.state_dict().items()):
        value = _entry(kind, target, rng)
        if value is not None:
            state[key] = value
    if unexpected:
        state["extra"] = np.zeros(3)
    missing = [k for k, kind in zip(before, kinds) if kind == "missing"
               and k != "num_batches_tracked"]
    if any(kind in BAD_TYPE for kind in kinds):
        expected = TypeError
    elif "wrong_shape" in kinds or (strict and (missing or unexpected)):
        expected = RuntimeError
    else:
        expected = None

    if expected is not None:
        bad_keys = [k for k, kind in zip(before, kinds) if kind in BAD_TYPE]
        with pytest.raises(expected) as info:
            m.load_state_dict(state, strict=strict)
        for key in bad_keys:  # a TypeError names every bad key
            assert repr(key) in str(info.value)
        for key, value in m.state_dict().items():  # nothing written
            np.testing.assert_array_equal(value, before[key], err_msg=key)
            assert value.dtype == before[key].dtype
        return
    result = m.load_state_dict(state, strict=strict)
    assert list(result.missing_keys) == missing
    assert list(result.unexpected_keys) == (["extra"] if unexpected else [])
    for key, value in m.state_dict().items():
        assert value.dtype == before[key].dtype and value.shape == before[key].shape
        cast = "unsafe" if key == "num_batches_tracked" else "same_kind"
        expected_value = (np.asarray(state[key]).astype(value.dtype, casting=cast)
                          if key in state else before[key])
        np.testing.assert_array_equal(value, expected_value, err_msg=key)


# -- n_threads: ValueError or TypeError naming it, in every entry --------------------
THREAD_VALUES = st.one_of(
    st.none(),
    st.integers(-2**70, 2**70),
    st.integers(-70000, 70000),
    st.sampled_from([0, 1, 2, -1, 65536, 65537, -65536, -65537, 2**31 - 1, 2**31, 2**32,
                     2**40, 2**63, -2**40]),
    st.integers(-2**40, 2**40).map(np.int64),
)


def _valid_threads(n):
    return n is None or 1 <= abs(int(n)) <= 65536


def _entries(n_threads):
    """Each public entry that takes n_threads, as a thunk."""
    x = _data(0, (6, 3, 4), np.float64)
    dy = _data(1, x.shape, np.float64)
    y, mean, invstd = bnfast.batch_norm(x, None, None, training=True, return_stats=True)
    return {
        "batch_norm": lambda: bnfast.batch_norm(x, None, None, training=True,
                                                n_threads=n_threads),
        "batch_norm-eval": lambda: bnfast.batch_norm(x, np.zeros(3), np.ones(3),
                                                     n_threads=n_threads),
        "fused_batch_norm": lambda: bnfast.fused_batch_norm(x, None, None, addend=dy,
                                                            training=True, n_threads=n_threads),
        "batch_norm_backward": lambda: bnfast.batch_norm_backward(
            dy, x, None, mean, invstd, n_threads=n_threads),
        "fused_batch_norm_backward": lambda: bnfast.fused_batch_norm_backward(
            dy, x, y, None, mean, invstd, n_threads=n_threads),
        "relu_mask": lambda: bnfast.relu_mask(y, n_threads=n_threads).to_array(),
        "module": lambda: bnfast.BatchNorm1d(3, dtype=np.float64, n_threads=n_threads)(x),
        "fused_module": lambda: bnfast.FusedBatchNorm1d(3, dtype=np.float64,
                                                        n_threads=n_threads)(x, dy),
    }


def _module_with_threads_set_later(n_threads, training):
    m = bnfast.BatchNorm1d(3, dtype=np.float64)
    m.n_threads = n_threads
    return m.train(training)


@SEEDED
@given(THREAD_VALUES)
@example(2**40)
@example(np.int64(2**40))
def test_n_threads_out_of_range_is_value_error(n_threads):
    serial = {name: call() for name, call in _entries(1).items()}
    x = _data(0, (6, 3, 4), np.float64)
    for name, call in _entries(n_threads).items():
        if _valid_threads(n_threads):
            _assert_same(call(), serial[name], name)
        else:
            with pytest.raises(ValueError, match="n_threads"):
                call()
    for training in (True, False):  # set after construction: checked by every call
        m = _module_with_threads_set_later(n_threads, training)
        if _valid_threads(n_threads):
            m(x)
            m.backward(np.ones_like(x))
        else:
            with pytest.raises(ValueError, match="n_threads"):
                m(x)
            assert int(m.num_batches_tracked) == 0


def _assert_same(a, b, name):
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            _assert_same(u, v, name)
    elif a is None:
        assert b is None, name
    else:
        np.testing.assert_array_equal(a, b, err_msg=name)


# -- torch state dicts of any floating dtype ------------------------------------------
TORCH_FLOATS = ("bfloat16", "float16", "float32", "float64")


@SEEDED
@given(source=st.sampled_from(TORCH_FLOATS), target=st.sampled_from(FLOATS),
       affine=st.booleans(), channels=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
@example(source="bfloat16", target=np.float32, affine=True, channels=3, seed=0)
def test_torch_state_dict_of_any_float_dtype_loads_as_torch_loads_it(source, target, affine,
                                                                    channels, seed):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(seed % 2**63)
    src = torch.nn.BatchNorm2d(channels, affine=affine, dtype=getattr(torch, source))
    with torch.no_grad():
        for tensor in src.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 4 - 2)
        src.num_batches_tracked.fill_(seed % 1000)
    state = src.state_dict()
    dst = torch.nn.BatchNorm2d(channels, affine=affine, dtype=getattr(torch, np.dtype(target).name))
    dst.load_state_dict(state)
    m = bnfast.BatchNorm2d(channels, affine=affine, dtype=target)
    result = m.load_state_dict(state)
    assert result == ([], [])
    for key, value in dst.state_dict().items():
        np.testing.assert_array_equal(getattr(m, key), value.numpy(), err_msg=key)
        assert getattr(m, key).dtype == value.numpy().dtype


# -- a forked child never hangs --------------------------------------------------------
_FORK_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    import bnfast
    from bnfast._threads import resolve_threads

    x = np.random.default_rng(0).standard_normal((64, 8, 32, 32)).astype(np.float32)
    m = bnfast.BatchNorm2d(8).eval()
    fm = bnfast.FusedBatchNorm2d(8)

    def calls():
        y = bnfast.batch_norm(x, None, None, training=True, n_threads=2)
        out = [y, m(x), bnfast.batch_norm(x, m.running_mean, m.running_var),
               bnfast.relu_mask(y, n_threads=2).bits]
        z = fm(x)
        out += [z, fm.backward(np.ones_like(x))[0]]
        return out

    if sys.argv[1] == "after":
        expected = calls()  # the parent runs parallel regions first
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = calls()
            threads = resolve_threads(2)
        forked = [w for w in caught if issubclass(w.category, RuntimeWarning)
                  and "forked" in str(w.message)]
        print("child", threads, len(forked), flush=True)
        if sys.argv[1] == "after":
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(a, b)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def _run_forking(when):
    env = dict(os.environ, OMP_NUM_THREADS="2")  # a thread team even on one core
    proc = subprocess.Popen([sys.executable, "-c", _FORK_SCRIPT, when], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung child too
        proc.communicate()
        pytest.fail(f"a child forked {when} bnfast ran multi-threaded hung")
    assert proc.returncode == 0, output
    return output


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.skipif(not bnfast.openmp_enabled(), reason="serial build: nothing to hang")
def test_child_forked_after_a_parallel_region_completes_serially():
    # One thread, one warning (for every call the child made), results unchanged.
    assert "child 1 1" in _run_forking("after")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.skipif(not bnfast.openmp_enabled(), reason="serial build: nothing to hang")
def test_child_forked_before_any_parallel_region_keeps_its_threads():
    assert "child 2 0" in _run_forking("before")


# -- float32 numerics (the numerics branch fixes these) ----------------------------------
@SEEDED
@given(eps=st.floats(min_value=5e-324, max_value=1e-46), value=st.floats(-1e6, 1e6, width=32),
       seed=st.integers(0, 2**32 - 1))
@example(eps=1e-300, value=3.0, seed=0)
def test_float32_constant_channel_with_tiny_eps_gives_the_bias(eps, value, seed):
    rng = np.random.default_rng(seed)
    x = np.full((4, 3, 5), value, np.float32)
    weight = rng.uniform(0.5, 2, 3).astype(np.float32)
    bias = rng.uniform(-1, 1, 3).astype(np.float32)
    y = bnfast.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    np.testing.assert_array_equal(y, np.broadcast_to(bias[:, None], y.shape))


@SEEDED
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e38, 2e38, 3.4e38]))
@example(seed=0, scale=3.4e38)
def test_float32_values_near_the_largest_float_normalise_to_the_rounded_exact_result(seed,
                                                                                      scale):
    # The statistics are right (float64); x - mean must not overflow in float32.
    x = np.random.default_rng(seed).uniform(-scale, scale, (6, 3, 4)).astype(np.float32)
    y = bnfast.batch_norm(x, None, None, training=True)
    assert np.isfinite(y).all()
    assert_close(y, reference_batch_norm(x, training=True).out.astype(np.float32), np.float32)
