"""Tests over several processes: P ranks run in a subprocess under a timeout.

:func:`run_ranks` is the test's side: it runs the ranks' command with this
checkout on ``PYTHONPATH`` and one OpenMP thread a rank (P ranks share the
machine's cores: no thread teams on top), fails on a timeout (a hang fails
instead of stalling the suite) or an exit status, and wants every rank's
``rank r of P: ok`` line.  :func:`spawn_gloo` is the ranks' side for torch:
P processes in one gloo group (a file store, no port) that each run a check.
"""
import datetime
import os
import re
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


def run_ranks(command, ranks):
    """Run ``command`` (an argv list that starts ``ranks`` ranks) and check its ranks."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only, whatever the host's interfaces
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        import pytest  # not in the ranks' processes, which import spawn_gloo from here
        pytest.fail(f"{ranks} ranks did not finish in {TIMEOUT} s (a hang?): {command}\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Ranks share stdout: their lines may run together.
    done = sorted(re.findall(r"rank (\d+) of (\d+): ok", proc.stdout))
    assert done == [(str(r), str(ranks)) for r in range(ranks)], proc.stdout + proc.stderr


def run_script(script, ranks, *args):
    """:func:`run_ranks` of ``python tests/<script> ranks *args`` (a :func:`spawn_gloo` main)."""
    run_ranks([sys.executable, os.path.join(HERE, script), str(ranks), *map(str, args)], ranks)


def _gloo_rank(rank, check, size, store_dir):
    import torch
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        check(rank, size)
        dist.barrier()
        dist.destroy_process_group()
        print(f"rank {rank} of {size}: ok", flush=True)
        sys.stderr.flush()
        # Leave without the interpreter's teardown: gloo's threads sometimes abort a
        # rank there ("terminate called without an active exception", SIGABRT) after
        # all its work is done and checked (seen once in ~10 runs of 3 ranks).
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # the other ranks' collectives time out; spawn reports the failure


def spawn_gloo(check, argv):
    """``argv`` = [P, DIR]: P processes in one gloo group, each running ``check(rank, P)``
    (a module-level function: spawn pickles it by name); a rank that passes prints
    ``rank r of P: ok``."""
    import torch.multiprocessing as mp
    size, store_dir = int(argv[0]), argv[1]
    mp.spawn(_gloo_rank, args=(check, size, store_dir), nprocs=size, join=True)
