"""Run a suite: every case, every implementation, check against the reference, then time.

The result is one JSON-ready dict (see :mod:`bnfast.bench.schema`) that the
table, the JSON file and the plot are all made from.
"""
import contextlib
import datetime
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Optional

import bnfast
from bnfast._config import config as build_config

from .busy import neighbours
from .check import TOLERANCE, compare, expected
from .data import Inputs
from .impl_copy import CopyRoofline
from .machine import machine_info, package_version
from .peers import PEERS, load_peers
from .progress import progress
from .schema import KEYS, SCHEMA_VERSION
from .suite import DEFAULT_DTYPES, DEFAULT_SHAPES, MODES, make_cases
from .timing import TimingPolicy, measure

__all__ = ["BenchSettings", "run_benchmark"]

#: A measurement whose median exceeds its fastest sample by this factor is unstable.
UNSTABLE = 1.5

#: Seconds to pause before each measurement, so that the previous
#: implementation's spinning worker threads go to sleep and do not steal cores.
_SETTLE = 0.005


@dataclass
class BenchSettings:
    """Everything that defines a benchmark run (the CLI's options).

    Attributes
    ----------
    shapes, modes, dtypes : sequences
        The suite (see :mod:`bnfast.bench.suite`).
    peers : sequence of str
        Peers to compare with, among ``numpy``, ``torch``, ``onnxruntime``.
    threads : int or None
        One thread count for every implementation; None: each one's default.
    allocate : bool
        Time calls that allocate their outputs instead of writing into
        buffers allocated once.
    policy : TimingPolicy
        Warm-up and repeat rules.
    quick : bool
        Recorded in the JSON only.
    busy : int
        Neighbour processes running bnfast during the measurements (see
        :mod:`bnfast.bench.busy`).
    """

    shapes: tuple = DEFAULT_SHAPES
    modes: tuple = MODES
    dtypes: tuple = DEFAULT_DTYPES
    peers: tuple = PEERS
    threads: Optional[int] = None
    allocate: bool = False
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    quick: bool = False
    busy: int = 0


def run_benchmark(settings, show_progress=True, command=None):
    """Run the suite and return the report dict (the document ``--json`` writes)."""
    machine = machine_info()
    notes = []
    load = machine["load_average"]
    if load and machine["usable_cores"] and load[0] > 0.5 * machine["usable_cores"]:
        notes.append(f"the machine was busy at the start (load average {load[0]:.2f} on "
                     f"{machine['usable_cores']} cores): timings may be noisy")
    cases = make_cases(settings.shapes, settings.modes, settings.dtypes)
    results = []
    with _limit_threads(settings.threads) as note, neighbours(settings.busy) as busy:
        if note:
            notes.append(note)
        impls, missing = load_peers(settings.peers, settings.threads, settings.allocate)
        try:
            threads = {impl.name: impl.effective_threads for impl in impls}
            versions = _versions(impls)
            bar = progress(len(cases) * len(impls), enabled=show_progress)
            try:
                for case_group, inputs in _cases_by_data(cases):
                    for case in case_group:
                        results += _run_case(case, inputs, impls, settings.policy, bar)
                    del inputs
            finally:
                bar.close()
        finally:
            for impl in impls:
                impl.close()

    order = {(c.mode, c.dtype, c.shape): i for i, c in enumerate(cases)}
    rank = {impl.name: i for i, impl in enumerate(impls)}
    results.sort(key=lambda r: (order[(r["mode"], r["dtype"], tuple(r["shape"]))], rank[r["impl"]]))
    for name, why in missing.items():
        notes.append(f"{name}: skipped, {why}")
    _derive(results)
    timed = [r for r in results if r["status"] == "ok"]
    unstable = [r for r in timed if r["median_s"] > UNSTABLE * r["min_s"]]
    if len(unstable) > 0.05 * len(timed):
        notes.append(f"{len(unstable)} of {len(timed)} measurements are unstable (median more "
                     f"than {UNSTABLE:g}x the fastest sample): other work on the machine, "
                     "rerun when idle")
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "machine": machine,
        "versions": versions,
        "build": build_config(),
        "settings": {
            "shapes": [list(s) for s in settings.shapes],
            "modes": list(settings.modes),
            "dtypes": list(settings.dtypes),
            "peers": list(settings.peers),
            "threads": settings.threads,
            "outputs": "allocate" if settings.allocate else "preallocated",
            "quick": settings.quick,
            "repeat": settings.policy.repeat,
            "min_time": settings.policy.min_time,
            "busy": settings.busy,
            "tolerance": dict(TOLERANCE),
        },
        "threads": threads,
        "unavailable": dict(missing),
        "neighbours": busy if settings.busy else None,
        "notes": notes,
        "results": results,
        "summary": _summary(results),
    }


@contextlib.contextmanager
def _limit_threads(n):
    """Limit OpenMP and BLAS thread pools to ``n`` (no-op for None).

    Uses ``threadpoolctl.threadpool_limits`` when installed; each
    implementation also receives ``n`` itself (bnfast ``n_threads``,
    ``torch.set_num_threads``, ONNX Runtime ``intra_op_num_threads``), so
    threadpoolctl only adds the BLAS pools of NumPy & co.

    Yields
    ------
    str or None
        A note when threadpoolctl is missing and the limit is partial.
    """
    if n is None:
        yield None
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "threadpoolctl is not installed: BLAS thread pools are not limited"
        return
    with threadpool_limits(limits=int(n)):
        yield None


def _versions(impls):
    loaded = {impl.name: impl.version for impl in impls}
    return {
        "python": platform.python_version(),
        "numpy": package_version("numpy"),
        "bnfast": bnfast.__version__,
        "torch": loaded.get("torch"),
        "onnxruntime": loaded.get("onnxruntime"),
        "threadpoolctl": package_version("threadpoolctl"),
    }


def _cases_by_data(cases):
    """Group cases by (dtype, shape) so each input set is made once and freed after use."""
    groups = {}
    for case in cases:
        groups.setdefault((case.dtype, case.shape), []).append(case)
    for (dtype, shape), group in groups.items():
        yield group, Inputs(shape, dtype)


def _row(case, impl, status, note=None):
    """A result (keys: :mod:`bnfast.bench.schema`, *Each result*), not timed yet."""
    row = dict.fromkeys(KEYS["Each result"])
    row.update(mode=case.mode, dtype=case.dtype, shape=list(case.shape), impl=impl, status=status,
               note=note, times_s=[], tolerance=TOLERANCE[case.dtype])
    return row


def _run_case(case, inputs, impls, policy, bar):
    skip = case.skip_reason()
    if skip is not None:
        for impl in impls:
            bar.update(case.label, impl.name)
        return [_row(case, impl.name, "skipped", skip) for impl in impls]
    want = None
    rows = []
    for impl in impls:
        bar.update(case.label, impl.name)
        why = impl.unsupported(case)
        if why is not None:
            rows.append(_row(case, impl.name, "unsupported", why))
            continue
        row = _row(case, impl.name, "ok")
        try:
            prepared = impl.prepare(case, inputs)
            row["allocates"] = prepared.allocates
            row["note"] = prepared.note
            if prepared.check is not None:
                if want is None:
                    want = expected(case.mode, inputs)
                checked = compare(prepared.check(), want, case.dtype)
                row["note"] = checked.pop("note", None) or row["note"]
                row.update(checked)
            time.sleep(_SETTLE)
            timing = measure(prepared.run, policy)
            del prepared
        except Exception as exc:  # one failing implementation must not stop the suite
            row.update(status="error", note=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            continue
        row["median_s"] = timing.median
        row["mean_s"] = timing.mean
        row["min_s"] = min(timing.times)
        row["times_s"] = timing.times
        row["number"] = timing.number
        row["bytes_moved"] = (CopyRoofline.bytes_moved(case) if impl.name == "copy"
                              else case.bytes_moved)
        row["gbps"] = row["bytes_moved"] / timing.median / 1e9 if timing.median > 0 else None
        rows.append(row)
    return rows


def _derive(results):
    """Fill fraction_of_copy_bandwidth and bnfast_speedup from each case's copy and bnfast rows."""
    by_case = {}
    for r in results:
        by_case.setdefault((r["mode"], r["dtype"], tuple(r["shape"])), {})[r["impl"]] = r
    for rows in by_case.values():
        copy, ours = rows.get("copy"), rows.get("bnfast")
        for r in rows.values():
            if r["status"] != "ok":
                continue
            if copy is not None and copy["status"] == "ok" and copy["gbps"] and r["gbps"]:
                r["fraction_of_copy_bandwidth"] = r["gbps"] / copy["gbps"]
            if ours is not None and ours["status"] == "ok" and ours["median_s"]:
                r["bnfast_speedup"] = r["median_s"] / ours["median_s"]


def _summary(results):
    """Geometric mean of bnfast's speedup over each peer, per mode (cases where both ran)."""
    logs = {}
    for r in results:
        if r["impl"] in ("bnfast", "copy") or r["bnfast_speedup"] is None:
            continue
        logs.setdefault(r["mode"], {}).setdefault(r["impl"], []).append(
            math.log(r["bnfast_speedup"]))
    return {mode: {peer: {"geomean_speedup": math.exp(sum(v) / len(v)), "cases": len(v)}
                   for peer, v in peers.items()}
            for mode, peers in logs.items()}
