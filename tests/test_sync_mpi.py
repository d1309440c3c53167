"""bnfast.SyncBatchNorm over real MPI processes: ``mpiexec -n 2, 3, 4`` (4 oversubscribes
2 cores).  Each run is a subprocess with a timeout, so a hang fails the test
instead of stalling the suite.  mpiexec is the one the ``mpich`` wheel put
beside this Python (the ``mpi`` extra); no system MPI is used.
"""
import os
import sys

import pytest

from ranks import HERE, run_ranks

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sync_batchnorm_over_mpi(ranks):
    assert os.path.exists(MPIEXEC), f"{MPIEXEC} not found: pip install \"bnfast[mpi]\""
    run_ranks([MPIEXEC, "-n", str(ranks), sys.executable, os.path.join(HERE, "mpi_sync_main.py")],
              ranks)
