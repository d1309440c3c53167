"""Run under ``mpiexec -n P``: SyncBatchNorm over real MPI ranks (tests/test_sync_mpi.py).

Every rank runs the same checks as tests/test_sync.py's threads, on
``MPI.COMM_WORLD`` and on sub-communicators from ``comm.Split``.  A failing
rank prints its traceback and aborts the job, so no rank waits forever.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import bnfast  # noqa: E402
from conftest import assert_close, assert_same  # noqa: E402
from sync_ranks import check_against_single_process  # noqa: E402


def same_on_every_rank(comm, array):
    everyone = comm.allgather(np.asarray(array))
    for other in everyone[1:]:
        assert_same(other, everyone[0])


def training(comm):
    for dtype in (np.float32, np.float64):
        for layout, spatial in [("contiguous", (3, 2)), ("channels_last", (3, 2)),
                                ("contiguous", ()), ("strided", (4,))]:
            rm, rv, gw, gb, gw_ref, gb_ref = check_against_single_process(
                comm, dtype, layout, spatial)
            same_on_every_rank(comm, rm)
            same_on_every_rank(comm, rv)
            assert_close(comm.allreduce(gw.astype(np.float64)), gw_ref, dtype)
            assert_close(comm.allreduce(gb.astype(np.float64)), gb_ref, dtype)
        check_against_single_process(comm, dtype, momentum=None, sizes=(2, 0, 3, 0), steps=3)


def errors(comm):
    m = bnfast.SyncBatchNorm(2, comm=comm)
    x = np.ones((1 if comm.Get_rank() == 0 else 0, 2), np.float32)
    try:
        m(x)
    except ValueError as exc:
        assert "Expected more than 1 value per channel when training" in str(exc)
    else:
        raise AssertionError("a global count of 1 must raise")
    assert m.num_batches_tracked == 0
    y = m(np.ones((0, 2, 3), np.float32))  # a global count of 0
    assert y.shape == (0, 2, 3) and m.num_batches_tracked == 1
    assert_same(m.running_var, np.ones(2, np.float32))


def main():
    world = MPI.COMM_WORLD
    try:
        training(world)
        errors(world)
        if world.Get_size() > 2:  # two sub-communicators: even and odd ranks
            sub = world.Split(world.Get_rank() % 2, world.Get_rank())
            training(sub)
            errors(sub)
            sub.Free()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        world.Abort(1)
    print(f"rank {world.Get_rank()} of {world.Get_size()}: ok", flush=True)


if __name__ == "__main__":
    main()
