"""The interface every benchmarked implementation (bnfast, a peer, the copy roofline) follows.

An implementation's module imports its library at the top, so that a missing
library is an ImportError when :func:`bnfast.bench.peers.make` loads it.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from bnfast._threads import resolve_threads

from .suite import MODES

__all__ = ["Prepared", "Implementation", "team_threads"]


def team_threads(threads=None):
    """The thread count bnfast's own runs use: ``threads``, or with None every
    OpenMP thread (``resolve_threads(-1)``).

    Not ``resolve_threads(None)``: that falls back to one thread while the
    kernel preempts this process's threads often, and in a benchmark the peers'
    own thread pools (torch's team spinning after its call) or a neighbour
    caught at start-up would then make a whole session serial -- one team size
    for every call is what a comparison needs.

    >>> from bnfast import _openmp
    >>> team_threads(None) == _openmp.max_threads() if _openmp.openmp_enabled() else True
    True
    >>> team_threads(1)
    1
    """
    return resolve_threads(-1 if threads is None else threads)


@dataclass
class Prepared:
    """One implementation set up for one case.

    Attributes
    ----------
    run : callable
        The timed call, with all inputs and (preallocated) outputs bound.
    check : callable or None
        Runs the operation once from the case's initial state and returns its
        outputs as a dict (the keys of :func:`bnfast.bench.check.expected`);
        None for the copy roofline, which computes nothing to check.
    allocates : bool
        True if ``run`` allocates its output on every call.
    note : str or None
        How it ran, when that needs saying (e.g. the roofline's variant).
    """

    run: Callable[[], object]
    check: Optional[Callable[[], dict]] = None
    allocates: bool = False
    note: Optional[str] = None


class Implementation:
    """Base class: one library's way of running each mode.

    Subclasses set ``name`` (and ``modes`` if not all of
    :data:`~bnfast.bench.suite.MODES`) and implement :meth:`prepare`.

    Parameters
    ----------
    threads : int or None
        Thread count to use; None keeps the library's default.
    allocate : bool
        Let every call allocate its outputs (as user code usually does)
        instead of writing into buffers allocated once.
    """

    name = "?"
    modes: Tuple[str, ...] = MODES
    version: Optional[str] = None  #: version string of the library measured

    def __init__(self, threads=None, allocate=False):
        self.threads = threads
        self.allocate = allocate

    @property
    def effective_threads(self):
        """Threads this implementation runs with (an int, or a description)."""
        return self.threads

    def unsupported(self, case):
        """Why this implementation cannot run ``case``, or None if it can."""
        if case.mode not in self.modes:
            return f"{self.name} is not benchmarked in {case.mode} mode"
        return None

    def prepare(self, case, inputs):
        """Return a :class:`Prepared` for ``case`` on ``inputs``.

        ``inputs`` is a :class:`~bnfast.bench.data.Inputs`.
        """
        raise NotImplementedError

    def close(self):
        """Undo global settings made in ``__init__`` (thread counts)."""
