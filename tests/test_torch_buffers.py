"""bnfast.torch's pool of output buffers: a buffer is handed out again only once no tensor,
view, NumPy array or autograd graph uses it; the outputs stay torch's (values, dtype,
strides, in-place ops) whichever memory they are in."""
import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402
from bnfast.torch import _buffers  # noqa: E402
from conftest import run_racing  # noqa: E402

nn = torch.nn
DTYPES = [d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
          if d in bt.DTYPES]
# 64 x 128 x 16 x 16 values: 8 MiB in float32, 4 MiB in half: all pooled.
SHAPE = (64, 128, 16, 16)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _pair(dtype, fmt=torch.contiguous_format):
    """A stock BatchNorm2d and its conversion (own parameters, same values), and an input."""
    assert torch.empty(SHAPE, dtype=dtype).nbytes >= _buffers.MIN_BYTES
    stock = nn.BatchNorm2d(SHAPE[1], dtype=torch.float32 if dtype in (
        torch.float16, torch.bfloat16) else dtype)
    ours = bt.convert(stock, inplace=False)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    return stock, ours, x.contiguous(memory_format=fmt)


@pytest.fixture(autouse=True)
def empty_pool():
    """Each test starts with no free buffer left by others (so the first free one
    of a size is the one it released)."""
    gc.collect()
    bt.empty_cache()


def _reference(stock, x):
    with torch.no_grad():
        return nn.functional.batch_norm(x, None, None, stock.weight, stock.bias, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_buffer_in_use_is_not_handed_out(dtype):
    stock, ours, x = _pair(dtype)
    expected = _reference(stock, x)
    with torch.no_grad():
        first = ours(x)
        second = ours(x)  # first still alive: other memory
        assert first.data_ptr() != second.data_ptr()
        second.fill_(7)
    torch.testing.assert_close(first, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_released_buffer_comes_back(dtype):
    _, ours, x = _pair(dtype)
    with torch.no_grad():
        out = ours(x)
        address = out.data_ptr()
        del out
        gc.collect()
        assert ours(x).data_ptr() == address


@pytest.mark.parametrize("hold", ["view", "numpy", "saved", "storage"])
def test_whatever_holds_the_memory_keeps_it(hold):
    """A torch view, a NumPy view, autograd's saved tensor or the storage alone keep a
    buffer busy: the next call writes other memory, and the held values stay right."""
    stock, ours, x = _pair(torch.float32)
    x.requires_grad_()
    expected = _reference(stock, x.detach())
    out = ours(x)
    address = out.data_ptr()
    if hold == "view":
        kept = out[1:]
    elif hold == "numpy":
        kept = out.detach().numpy()
    elif hold == "storage":
        kept = out.untyped_storage()
    else:  # pow saves its input for backward
        kept = out.pow(2).sum()
    del out
    gc.collect()
    again = ours(x)
    assert again.data_ptr() != address
    again.detach().fill_(-3)
    if hold == "view":
        torch.testing.assert_close(kept, expected[1:], **TOL[torch.float32])
    elif hold == "numpy":
        np.testing.assert_allclose(kept, expected.numpy(), rtol=1e-5, atol=1e-5)
    elif hold == "storage":
        held = torch.empty(0).set_(kept, 0, SHAPE)
        torch.testing.assert_close(held, expected, **TOL[torch.float32])
    else:  # d/dx sum(bn(x)^2) through the saved output, against stock torch
        kept.backward()
        grad = x.grad.clone()
        x.grad = None
        stock(x).pow(2).sum().backward()
        torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pooled_outputs_are_torchs(dtype, fmt):
    """Forward output and grad_input from the pool: torch's values, dtype and strides,
    not views (in-place ops allowed), twice over (the second time in reused memory)."""
    stock, ours, x = _pair(dtype, fmt)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad = grad.contiguous(memory_format=fmt)
    for _ in range(2):
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yo = stock(xs), ours(xo)
        assert yo.dtype == ys.dtype and yo.stride() == ys.stride() and not yo._is_view()
        torch.testing.assert_close(yo, ys, **TOL[dtype])
        ys.backward(grad)
        yo.backward(grad)
        assert xo.grad.stride() == xs.grad.stride() and not xo.grad._is_view()
        torch.testing.assert_close(xo.grad, xs.grad, **TOL[dtype])
        yo.detach().relu_()  # an in-place op on the output
        with torch.no_grad():
            out = ours(x)
        out.add_(1)
        del ys, yo, out, xs, xo


def test_empty_cache_lets_free_buffers_go():
    _, ours, x = _pair(torch.float32)
    with torch.no_grad():
        kept = ours(x)
        ours(x)  # a second buffer, free once the call returns
    gc.collect()
    held, free = bt.pooled_bytes()
    assert free >= kept.nbytes and held >= free + kept.nbytes
    released = bt.empty_cache()
    assert released == free
    assert bt.pooled_bytes() == (held - free, 0)
    address = kept.data_ptr()
    del kept
    gc.collect()
    with torch.no_grad():  # the buffer in use stayed pooled: back when released
        assert ours(x).data_ptr() == address


def test_the_pool_stops_at_its_cap(monkeypatch):
    held, _ = bt.pooled_bytes()
    monkeypatch.setattr(_buffers, "CAP_BYTES", held)
    _, ours, x = _pair(torch.float32)
    with torch.no_grad():
        outs = [ours(x) for _ in range(3)]
    assert bt.pooled_bytes()[0] == held
    expected = outs[0].clone()
    for out in outs[1:]:
        torch.testing.assert_close(out, expected)


def test_threads_never_share_a_buffer():
    """Modules called from several threads at once, switching threads as often as
    Python allows: every output kept alive has memory of its own and the right
    values."""
    stock, ours, x = _pair(torch.float32)
    inputs = [x * (k + 1) for k in range(4)]
    kept = [[] for _ in inputs]

    def work(k):
        with torch.no_grad():
            for i in range(40):
                out = ours(inputs[k])
                if i % 4 == 0:
                    kept[k].append(out)
    run_racing(work, [(k,) for k in range(len(inputs))])
    outs = [out for outs in kept for out in outs]
    assert len({out.data_ptr() for out in outs}) == len(outs)
    for k, outs in enumerate(kept):
        expected = _reference(stock, inputs[k])
        for out in outs:
            torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_a_full_pool_lets_free_buffers_of_other_sizes_go(monkeypatch):
    """At the cap, a new size first drops the free buffers of the others."""
    _, ours, x = _pair(torch.float32)
    with torch.no_grad():
        ours(x)  # one free buffer of x's size
    held, free = bt.pooled_bytes()
    assert free > 0
    monkeypatch.setattr(_buffers, "CAP_BYTES", held)
    y = x[:32].clone()  # another size, which fits once the free buffer went
    with torch.no_grad():
        out = bt.convert(nn.BatchNorm2d(SHAPE[1]))(y)
    assert bt.pooled_bytes() == (held - free + out.nbytes + 64, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_operators_outputs_come_from_the_pool(dtype):
    """torch.ops.bnfast (the road of compile and export) allocates from the pool too:
    a held output is not written again; a released one comes back."""
    stock, _, x = _pair(dtype)
    expected = _reference(stock, x)
    w, b = stock.weight.detach(), stock.bias.detach()

    def op():
        return torch.ops.bnfast.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)[0]
    first = op()
    second = op()
    assert first.data_ptr() != second.data_ptr()
    second.fill_(5)
    torch.testing.assert_close(first, expected, **TOL[dtype])
    address = second.data_ptr()
    del second
    gc.collect()
    assert op().data_ptr() == address
