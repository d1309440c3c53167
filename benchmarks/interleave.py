"""Interleaved timing for the pytest-benchmark suites that report ratios
(``bench_half.py``, ``bench_layouts.py``): the calls of one case timed in turn,
round after round, so that the ratios of one run share the machine's load."""
import itertools
import statistics
import time

#: Rounds: a multiple of the orders of three calls (6) and of four (24).
ROUNDS = 24


def interleaved(calls, rounds=ROUNDS):
    """``{name: [seconds, one per round]}``: each round times every call once, the
    rounds going through every order of the calls in turn (what a call leaves in the
    caches is the next one's weather: each call follows each other one equally often
    when ``rounds`` is a multiple of the orders' count).

    Examples
    --------
    >>> times = interleaved({"a": lambda: None, "b": lambda: None}, rounds=4)
    >>> sorted(times), len(times["a"])
    (['a', 'b'], 4)
    """
    orders = list(itertools.permutations(calls))
    times = {name: [] for name in calls}
    for fn in calls.values():  # warm up: page faults, thread pools
        fn()
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired(times, numerator, denominator):
    """The median over rounds of ``numerator``'s time / ``denominator``'s (both calls
    of a round share that moment's load).

    Examples
    --------
    >>> paired({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 1.0]}, "a", "b")
    4.0
    """
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def ratios(times, numerator, denominator):
    """``(ratio of the minima, paired ratio)`` of ``numerator`` over ``denominator``,
    ``(None, None)`` where either did not run (an optional contender).

    Examples
    --------
    >>> ratios({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 1.0]}, "a", "b")
    (2.0, 4.0)
    >>> ratios({"b": [1.0]}, "torch", "b")
    (None, None)
    """
    if numerator not in times or denominator not in times:
        return None, None
    return (min(times[numerator]) / min(times[denominator]),
            paired(times, numerator, denominator))
