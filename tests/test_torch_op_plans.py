"""The plans behind ``torch.ops.bnfast`` (``bnfast.torch._ops._plan_for``).

The operators' calls run plans kept by configuration, as eager modules do.
What a kept plan must not do: outlive a checked configuration (in-place
changes of the vectors are read, not cached), keep large buffers alive,
break under threads, or take a mask's layout from the trace.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfast.torch  # noqa: E402, F401
from bnfast.torch import _ops  # noqa: E402
from conftest import run_racing  # noqa: E402

ops = torch.ops.bnfast
aten = torch.ops.aten
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)], ids=str)
def test_eval_backward_of_one_value_per_channel(shape, dtype):
    # Evaluation has no "more than 1 value per channel" rule (torch's neither).
    x, g = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype, seed=1)
    w = _randn(3, dtype=dtype, seed=2).abs() + 0.5
    rm, rv = _randn(3, dtype=dtype, seed=3), _randn(3, dtype=dtype, seed=4).abs() + 0.5
    out, mean, invstd, _, _ = ops.batch_norm(x, w, None, rm, rv, False, 0.1, 1e-5)
    gx, gw, gb = ops.batch_norm_backward(g, x, w, mean, invstd, False, 1e-5, [True] * 3)
    _, m2, s2 = aten.native_batch_norm(x, w, None, rm, rv, False, 0.1, 1e-5)
    expected = aten.native_batch_norm_backward(g, x, w, rm, rv, m2, s2, False, 1e-5, [True] * 3)
    for mine, theirs in zip((gx, gw, gb), expected):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])
    # ... and fused (no addend): the ReLU gates torch's gradient by the output's sign
    out, mean, invstd, bits, _, _ = ops.fused_batch_norm(x, None, w, None, rm, rv, False, 0.1,
                                                         1e-5)
    gx, gw, gb, _ = ops.fused_batch_norm_backward(g, x, bits, w, mean, invstd, False, 1e-5,
                                                  [True, True, True, False])
    gated = torch.where(out > 0, g, torch.zeros_like(g))
    expected = aten.native_batch_norm_backward(gated, x, w, rm, rv, m2, s2, False, 1e-5,
                                               [True] * 3)
    for mine, theirs in zip((gx, gw, gb), expected):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_channels_as_torch(training):
    # (4, 0, 5): torch returns an empty output; here the kernels' tilings had divided by
    # zero and killed the process.
    x = torch.randn(4, 0, 5, requires_grad=True)
    empty = torch.zeros(0)
    out = ops.batch_norm(x.detach(), None, None, empty, empty + 1, training, 0.1, 1e-5)[0]
    assert out.shape == x.shape
    fused = ops.fused_batch_norm(x.detach(), None, None, None, empty, empty + 1, training, 0.1,
                                 1e-5)
    assert fused[0].shape == x.shape and fused[3].shape == (1,)
    bn = bnfast.torch.convert(torch.nn.BatchNorm1d(0)).train(training)
    y = bn(x)  # (torch's own module raises an IndexError here in training; F does not)
    expected = torch.nn.functional.batch_norm(x, empty, empty + 1, training=training)
    assert y.shape == expected.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex128], ids=str)
def test_saved_statistics_of_other_kinds_are_refused(bad):
    x, g = _randn(4, 3), _randn(4, 3, seed=1)
    _, mean, invstd, _, _ = ops.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(TypeError, match="save_mean"):
        ops.batch_norm_backward(g, x, None, mean.to(bad), invstd, True, 1e-5, [True] * 3)


def test_fused_backward_reads_the_masks_layout_from_the_mask(dtype):
    # torch.compile may run the forward on a channels_last tensor traced as NCHW: the
    # backward then sees the mask written in channels-last order beside an input of
    # any layout.  Here: the same values, handed to the backward contiguous.
    x = _randn(3, 4, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
    a = _randn(3, 4, 5, 6, dtype=dtype, seed=1)
    g = _randn(3, 4, 5, 6, dtype=dtype, seed=2)
    w = _randn(4, dtype=dtype, seed=3)
    out, mean, invstd, bits, _, _ = ops.fused_batch_norm(x, a, w, None, None, None, True, 0.1,
                                                         1e-5)
    assert bits.shape == ((x.numel() + 7) // 8 + 1,) and int(bits[-1]) == 1  # channels-last
    grads = ops.fused_batch_norm_backward(g, x.contiguous(), bits, w, mean, invstd, True, 1e-5,
                                          [True] * 4)
    gated = torch.where(out > 0, g, torch.zeros_like(g))
    _, m2, s2 = aten.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    expected = aten.native_batch_norm_backward(gated, x, w, None, None, m2, s2, True, 1e-5,
                                               [True] * 3)
    for mine, theirs in zip(grads[:3], expected):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])
    torch.testing.assert_close(grads[3], gated, rtol=0, atol=0)
    bad = bits.clone()
    bad[-1] = 7
    with pytest.raises(ValueError, match="relu_bits"):
        ops.fused_batch_norm_backward(g, x, bad, w, mean, invstd, True, 1e-5, [True] * 4)
    with pytest.raises(ValueError, match="relu_bits"):
        ops.fused_batch_norm_backward(g, x, bits[:-1], w, mean, invstd, True, 1e-5, [True] * 4)


def test_kept_plans_read_the_vectors_of_each_call(dtype):
    x = _randn(6, 3, 4, dtype=dtype)
    w, b = _randn(3, dtype=dtype, seed=1), _randn(3, dtype=dtype, seed=2)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    for training in (True, False):
        for _ in range(3):
            with torch.no_grad():
                w.mul_(1.5)  # in place: the same memory, new values
                rv.add_(0.25)
            out, _, _, new_mean, new_var = ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)
            expected = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training,
                                                      0.1, 1e-5)
            torch.testing.assert_close(out, expected, **TOL[dtype])


def test_vectors_carved_from_larger_buffers_are_not_kept():
    # A kept plan holds views of its vectors: of a flat parameter buffer, the whole buffer.
    flat = torch.ones(1 << 16)
    x = _randn(4, 3, 5, dtype=torch.float32)
    out = ops.batch_norm(x, flat[:3], flat[8:11] * 0, None, None, True, 0.1, 1e-5)[0]
    assert not _kept_with_weight_in(flat)
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True),
                               **TOL[torch.float32])
    owned = torch.ones(3)
    ops.batch_norm(x, owned, None, None, None, True, 0.1, 1e-5)
    assert _kept_with_weight_in(owned)


def _kept_with_weight_in(tensor):
    """Whether a kept plan's weight is a view of ``tensor``'s memory."""
    memory = tensor.numpy()
    return any(plan.weight is not None and np.shares_memory(plan.weight, memory)
               for plan in list(_ops._plans.values()))


def test_plans_made_by_many_threads(monkeypatch):
    # Evictions by two threads at once must not drop one key twice (KeyError).
    monkeypatch.setattr(_ops, "_MAX_PLANS", 4)

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(200):
            x = torch.randn(2, 2, 2, generator=g)
            w = torch.randn(2, generator=g)  # new memory: a new plan each call
            out = ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)[0]
            expected = torch.nn.functional.batch_norm(x, None, None, w, training=True)
            torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_racing(work, [(seed,) for seed in range(8)])
    finally:
        torch.set_num_threads(threads_before)
    assert len(_ops._plans) <= 4
