"""bnfast.SyncBatchNorm over real MPI processes: ``mpiexec -n 2, 3, 4`` (4 oversubscribes
2 cores).  Each run is a subprocess with a timeout, so a hang fails the test
instead of stalling the suite.  mpiexec is the one the ``mpich`` wheel put
beside this Python (the ``mpi`` extra); no system MPI is used.
"""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TIMEOUT = 300


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sync_batchnorm_over_mpi(ranks):
    assert os.path.exists(MPIEXEC), f"{MPIEXEC} not found: pip install \"bnfast[mpi]\""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # ranks share 2 cores: no thread teams on top
    try:
        proc = subprocess.run(
            [MPIEXEC, "-n", str(ranks), sys.executable, os.path.join(HERE, "mpi_sync_main.py")],
            capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {ranks} did not finish in {TIMEOUT} s (a hang?):\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Ranks share stdout: their lines may run together.
    done = sorted(re.findall(r"rank (\d+) of (\d+): ok", proc.stdout))
    assert done == [(str(r), str(ranks)) for r in range(ranks)], proc.stdout
