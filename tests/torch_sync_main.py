"""``python tests/torch_sync_main.py P DIR``: bnfast.torch.SyncBatchNorm over P gloo ranks.

Spawns P ranks with ``torch.multiprocessing`` (a file store in DIR, no port),
trains a small conv net three SGD steps on uneven slices of one batch (the
loss is each rank's share of the mean over the whole batch; parameter
gradients summed with ``all_reduce``, as DDP does), and compares with
single-process training of the same net (torch's own BatchNorm) on the
concatenated batch: losses, every gradient, the running buffers and
``num_batches_tracked``; and one step of float16 and bfloat16 input.  Run by
tests/test_torch_sync.py under a timeout.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bnfast.torch  # noqa: E402
from ranks import spawn_gloo  # noqa: E402

SIZES = (3, 5, 1, 7)
# (rtol, atol) against single-process torch on the concatenated batch.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 2e-5)}


def net(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5), torch.nn.BatchNorm1d(5),
    ).to(dtype)


def data(step, size, dtype):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES[r % 4] for r in range(size))
    return (torch.randn(n, 3, 6, 6, generator=g, dtype=dtype) * 2 + 1,
            torch.randn(n, 5, generator=g, dtype=dtype))


def train(model, batches, shares, world=None):
    """Three SGD steps; returns [(loss, grads, buffers)] per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for (x, target), n_total in zip(batches, shares):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).sum() / n_total
        loss.backward()
        loss = loss.detach().clone()
        if world is not None:
            dist.all_reduce(loss)
            for p in model.parameters():
                dist.all_reduce(p.grad)
        history.append((loss, [p.grad.clone() for p in model.parameters()],
                        [b.clone() for b in model.buffers()]))
        opt.step()
    return history


def check(rank, size):
    counts = [SIZES[r % 4] for r in range(size)]
    lo = sum(counts[:rank])
    mine = slice(lo, lo + counts[rank])
    for dtype in (torch.float64, torch.float32):
        for channels_last in (False, True):
            batches = [data(s, size, dtype) for s in range(3)]
            if channels_last:
                batches = [(x.contiguous(memory_format=torch.channels_last), t)
                           for x, t in batches]
            n = batches[0][0].shape[0]
            ref = train(net(dtype), batches, [n] * 3)
            sync_net = bnfast.torch.convert_sync_batchnorm(net(dtype))
            assert sum(isinstance(m, bnfast.torch.SyncBatchNorm)
                       for m in sync_net.modules()) == 3
            got = train(sync_net, [(x[mine], t[mine]) for x, t in batches], [n] * 3,
                        world=True)
            rtol, atol = TOL[dtype]
            for step, ((loss, grads, bufs), (rloss, rgrads, rbufs)) in \
                    enumerate(zip(got, ref)):
                where = f"rank {rank}, {dtype}, channels_last={channels_last}, step {step}"
                torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol, msg=where)
                for g, rg in zip(grads, rgrads):
                    torch.testing.assert_close(g, rg, rtol=rtol, atol=atol, msg=where)
                for b, rb in zip(bufs, rbufs):
                    torch.testing.assert_close(b, rb, rtol=rtol, atol=atol, msg=where)
            # Every rank holds the same running buffers, bit for bit.
            for b in sync_net.buffers():
                if b.is_floating_point():
                    parts = [torch.empty_like(b) for _ in range(size)]
                    dist.all_gather(parts, b)
                    assert all(torch.equal(p, parts[0]) for p in parts), "buffers differ"

    half_data(rank, size, mine)


def half_data(rank, size, mine):
    """float16 and bfloat16 input, float32 parameters (torch's CPU rule): one SyncBatchNorm
    forward and backward against torch's BatchNorm2d in float32 on the concatenated batch
    (its output rounded to the half dtype), within the half dtype's rounding."""
    for half in (torch.float16, torch.bfloat16):
        x, _ = data(0, size, torch.float32)
        x = x.to(half)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(half)
        ref = torch.nn.BatchNorm2d(3)
        sync = bnfast.torch.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
        xr, xs = x.float().requires_grad_(), x[mine].clone().requires_grad_()
        yr, ys = ref(xr), sync(xs)
        yr.backward(grad.float())
        ys.backward(grad[mine])
        for p in sync.parameters():
            dist.all_reduce(p.grad)
        where = f"rank {rank}, {half}"
        tol = dict(rtol=2e-2, atol=2e-2) if half is torch.float16 else dict(rtol=5e-2, atol=5e-2)
        assert ys.dtype is half and xs.grad.dtype is half, where
        torch.testing.assert_close(ys, yr[mine].to(half), **tol, msg=where)
        torch.testing.assert_close(xs.grad, xr.grad[mine].to(half), **tol, msg=where)
        for p, q in zip(sync.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=where)
        for b, c in zip(sync.buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=where)


if __name__ == "__main__":
    spawn_gloo(check, sys.argv[1:])
