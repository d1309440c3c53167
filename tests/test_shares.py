"""The task hand-out of the parallel regions (``src/bnfast_shares.h``), under real
OpenMP teams.

``tests/c/shares.c`` lets teams of 2 to 130 threads claim 0 to 1000 tasks,
some with one thread starting 100 ms late so that the others steal its share,
and records who claimed each task and when.  Every task must be claimed exactly
once (the kernels' results depend on that, not on who ran what); each thread
takes its own share front to back before it steals, and steals other shares
back to front, so within every share the owners' tasks are a prefix and the
stolen ones the rest.
"""
import numpy as np
import pytest

from conftest import run_c_driver

# The driver's cases: (tasks, threads, the late thread or -1).
CASES = [(1, 2, -1), (7, 3, -1), (100, 2, -1), (1000, 2, 1), (1000, 2, 0), (1000, 8, 3),
         (5, 100, -1), (1000, 130, 70), (64, 64, 63), (0, 4, -1)]
MAX_SHARES = 64  # BNFAST_MAX_SHARES


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Per case, an (tasks, 3) array: claims, claiming thread, its claim number."""
    out = np.frombuffer(run_c_driver(tmp_path_factory.mktemp("shares"), "shares.c",
                                     "-fopenmp"), dtype=np.int32)
    cases, at = [], 0
    for tasks, _, _ in CASES:
        cases.append(out[at:at + 3 * tasks].reshape(tasks, 3))
        at += 3 * tasks
    assert at == out.size
    return cases


def _shares(tasks, threads):
    n = min(threads, MAX_SHARES)
    return [range(tasks * i // n, tasks * (i + 1) // n) for i in range(n)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_every_task_claimed_once(records, case):
    np.testing.assert_array_equal(records[case][:, 0], 1)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_owners_take_the_front_thieves_the_back(records, case):
    tasks, threads, _ = CASES[case]
    rec = records[case]
    shares = _shares(tasks, threads)
    for j, share in enumerate(shares):
        if not share:
            continue
        owned = (rec[share.start:share.stop, 1] % len(shares)) == j
        first_stolen = np.argmin(owned) if not owned.all() else len(owned)
        assert owned[:first_stolen].all() and not owned[first_stolen:].any(), (j, owned)
    for thread in np.unique(rec[:, 1]):
        mine = np.flatnonzero(rec[:, 1] == thread)
        mine = mine[np.argsort(rec[mine, 2])]  # in the order the thread claimed them
        own = _shares(tasks, threads)[thread % len(shares)]
        in_own = np.isin(mine, own)
        assert not (np.diff(in_own.astype(int)) > 0).any(), "stole before its own share was done"
        assert (np.diff(mine[in_own]) == 1).all()
        for share in shares:
            stolen = mine[~in_own & np.isin(mine, share)]
            assert (np.diff(stolen) < 0).all()


@pytest.mark.parametrize("case", [i for i, c in enumerate(CASES) if c[2] >= 0 and c[1] <= 8])
def test_a_late_thread_share_is_stolen(records, case):
    tasks, threads, late = CASES[case]
    rec = records[case]
    share = _shares(tasks, threads)[late]
    assert (rec[share.start:share.stop, 1] != late).any()
