"""Helpers shared by the SyncBatchNorm tests (in-process threads and real MPI ranks).

``ThreadComm``: P threads that stand in for P ranks, with mpi4py's buffer
collectives (``Allgather``, ``Allreduce``) done through shared memory, merged
in rank order.  ``check_against_single_process`` runs one SyncBatchNorm
training step on a rank's slice and compares it with single-process
BatchNorm on the concatenated batch; it is what every rank runs, threads or
MPI processes alike.
"""
import threading

import numpy as np

import bnfast
from conftest import assert_split_equal, make_input, make_params, with_layout

# Local batch sizes of the example; rank r takes SIZES[r % 4].
SIZES = (3, 5, 1, 7)


class ThreadComm:
    """A communicator of ``size`` threads (one instance per thread, one shared state)."""

    def __init__(self, rank, shared):
        self.rank = rank
        self.shared = shared
        self.calls = []   # the collectives this rank made, with the bytes it sent

    @classmethod
    def group(cls, size):
        shared = {"barrier": threading.Barrier(size, timeout=20), "slots": [None] * size}
        return [cls(r, shared) for r in range(size)]

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.shared["slots"])

    def _exchange(self, send):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = np.array(send, copy=True)
        barrier.wait()
        everything = [s.copy() for s in slots]
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return everything

    def Allgather(self, send, recv):
        self.calls.append(("Allgather", send.nbytes))
        recv[...] = np.stack(self._exchange(send))

    def Allreduce(self, send, recv):
        self.calls.append(("Allreduce", send.nbytes))
        parts = self._exchange(send)
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        recv[...] = total


def run_ranks(size, target):
    """Run ``target(comm)`` on ``size`` threads; return the results in rank order.

    An exception on any rank is returned in its place (the test decides).
    """
    comms = ThreadComm.group(size)
    results = [None] * size

    def main(comm):
        try:
            results[comm.rank] = target(comm)
        except BaseException as exc:  # noqa: B036 - handed to the test
            results[comm.rank] = exc

    threads = [threading.Thread(target=main, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results


def module_class(ndim):
    return {2: bnfast.BatchNorm1d, 3: bnfast.BatchNorm1d, 4: bnfast.BatchNorm2d,
            5: bnfast.BatchNorm3d}[ndim]


def batch(rank, size, dtype, spatial=(3, 2), C=4, sizes=SIZES, seed=7):
    """(whole batch, this rank's slice): every rank builds the same whole batch."""
    rng = np.random.default_rng(seed)
    counts = [sizes[r % len(sizes)] for r in range(size)]
    x = make_input(rng, (sum(counts), C) + tuple(spatial), dtype, loc=3.0)
    dy = make_input(rng, x.shape, dtype, loc=0.2)
    lo = sum(counts[:rank])
    return x, dy, slice(lo, lo + counts[rank])


def check_against_single_process(comm, dtype, layout="contiguous", spatial=(3, 2),
                                 momentum=0.1, sizes=SIZES, steps=2):
    """Train SyncBatchNorm on this rank's slice and BatchNorm on the whole batch; compare.

    Returns this rank's (running_mean, running_var, weight_grad, bias_grad) for the
    caller to compare across ranks.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    C = 4
    rng = np.random.default_rng(11)
    w, b = make_params(rng, C, dtype)
    sync = bnfast.SyncBatchNorm(C, momentum=momentum, comm=comm, dtype=dtype)
    plain = module_class(2 + len(spatial))(C, momentum=momentum, dtype=dtype)
    for m in (sync, plain):
        m.weight[...] = w
        m.bias[...] = b
    for step in range(steps):
        x, dy, mine = batch(rank, size, dtype, spatial, C, sizes, seed=step)
        y = sync(with_layout(x[mine], layout))
        gx = sync.backward(with_layout(dy[mine], layout))
        y_ref = plain(x)
        gx_ref = plain.backward(dy)
        assert y.shape == x[mine].shape and y.dtype == np.dtype(dtype)
        assert_split_equal(y, y_ref[mine], dtype)
        assert_split_equal(gx, gx_ref[mine], dtype)
        assert_split_equal(sync.running_mean, plain.running_mean, dtype)
        assert_split_equal(sync.running_var, plain.running_var, dtype)
        assert sync.num_batches_tracked == plain.num_batches_tracked == step + 1
    return sync.running_mean, sync.running_var, sync.weight_grad, sync.bias_grad, \
        plain.weight_grad, plain.bias_grad
