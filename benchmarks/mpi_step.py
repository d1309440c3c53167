"""A SyncBatchNorm training step (forward + backward) over P MPI ranks, vs one process.

Not a pytest-benchmark suite (it needs ``mpiexec``)::

    mpiexec -n 1 python benchmarks/mpi_step.py      # the whole batch on one rank
    mpiexec -n 2 python benchmarks/mpi_step.py      # half the batch on each of 2 ranks

Each rank normalises ``N / P`` samples of an ``(N, C, H, W)`` float32 batch;
the step time is the slowest rank's (ranks meet at a barrier before each
step), min over repeats.  Rank 0 also times plain ``bnfast.BatchNorm2d`` on
the whole batch and prints the bytes each collective moved.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

import bnfast

SHAPE = (32, 64, 28, 28) if len(sys.argv) < 2 else tuple(int(s) for s in sys.argv[1].split("x"))
REPEATS = 30


def best(step, comm):
    times = []
    for _ in range(REPEATS):
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        times.append(comm.allreduce(elapsed, op=MPI.MAX))
    return min(times)


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    N, C = SHAPE[0], SHAPE[1]
    rng = np.random.default_rng(rank)
    local = (N // size,) + SHAPE[1:]
    x = rng.standard_normal(local, dtype=np.float32)
    dy = rng.standard_normal(local, dtype=np.float32)
    sync = bnfast.SyncBatchNorm(C, comm=comm)

    def sync_step():
        sync(x)
        sync.backward(dy)

    t_sync = best(sync_step, comm)
    if rank == 0:
        xs = rng.standard_normal(SHAPE, dtype=np.float32)
        dys = rng.standard_normal(SHAPE, dtype=np.float32)
        plain = bnfast.BatchNorm2d(C)

        def plain_step():
            plain(xs)
            plain.backward(dys)

        t_plain = best(plain_step, MPI.COMM_SELF)
        print(f"{size} rank(s), batch {SHAPE} float32 ({local[0]} samples per rank): "
              f"SyncBatchNorm step {t_sync * 1e3:.2f} ms; one-process BatchNorm2d step on the "
              f"whole batch {t_plain * 1e3:.2f} ms")
        print(f"bytes per forward: Allgather sends {(2 * C + 1) * 8} per rank, receives "
              f"{size * (2 * C + 1) * 8}; per backward: Allreduce of {(2 * C + 1) * 8}")


if __name__ == "__main__":
    main()
