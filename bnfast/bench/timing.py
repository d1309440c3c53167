"""Median- and mean-of-repeats timing with warm-up, in the manner of ``timeit.Timer.autorange``."""
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Timing", "TimingPolicy", "measure"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often to time one implementation of one case.

    Attributes
    ----------
    min_time : float
        Target total seconds of timed samples; the repeat count follows from it.
    min_repeat, max_repeat : int
        Bounds on that repeat count.
    repeat : int or None
        Exact number of samples (overrides the three above).
    min_sample : float
        A sample loops the call until it lasts at least this long (seconds),
        so microsecond calls are not drowned by timer resolution.
    """

    min_time: float = 0.4
    min_repeat: int = 5
    max_repeat: int = 50
    repeat: Optional[int] = None
    min_sample: float = 1e-3


@dataclass
class Timing:
    """Result of :func:`measure`.

    Attributes
    ----------
    median : float
        Median seconds per call.
    mean : float
        Mean seconds per call, stalls included (what a shared machine costs).
    times : list of float
        Seconds per call of every sample.
    number : int
        Calls per sample.
    """

    median: float
    mean: float
    times: list = field(default_factory=list)
    number: int = 1


def measure(fn, policy=TimingPolicy()):
    """Time ``fn()``: warm up, pick calls per sample, return the median and mean per call.

    The first call (warm-up) pays one-off costs: page faults on fresh output
    buffers, lazy initialisation, thread-pool start-up.  The garbage collector
    is off while timing.
    """
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        fn()
        first = clock() - t0
        if first < policy.min_sample:  # the warm-up was cold: calibrate on a warm call
            t0 = clock()
            fn()
            first = clock() - t0
        number = 1 if first >= policy.min_sample else min(
            100_000, math.ceil(policy.min_sample / max(first, 1e-7)))
        if policy.repeat is not None:
            repeat = max(1, int(policy.repeat))
        else:
            wanted = math.ceil(policy.min_time / max(first * number, 1e-9))
            repeat = max(policy.min_repeat, min(policy.max_repeat, wanted))
        times = []
        for _ in range(repeat):
            t0 = clock()
            for _ in range(number):
                fn()
            times.append((clock() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(times), statistics.fmean(times), times, number)
