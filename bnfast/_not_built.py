"""The error an import of an unbuilt source tree gives (instead of a circular-import message)."""
import glob
import os


def not_built_error(cause):
    """An ImportError that says what to do when ``bnfast._openmp`` cannot be imported.

    Without a compiled module beside ``__init__.py`` this is a source checkout
    that was never built in place: typically ``python -m bnfast`` run from the
    repository root after ``pip install .``, where the current directory comes
    first on ``sys.path``.  With one present, the build itself is broken (a
    missing OpenMP runtime, another Python): the original error says why.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    compiled = [p for p in glob.glob(os.path.join(here, "_openmp.*"))
                if p.endswith((".so", ".pyd"))]
    if not compiled:
        return ImportError(
            f"bnfast is not built: run `pip install -e .` in the repository to build the "
            f"compiled kernels in place ({here} holds only the sources); or, after "
            "`pip install .`, use the `bnfast` command (or import bnfast from outside the "
            "repository root, where the installed package is found first)."
        )
    return ImportError(f"bnfast's compiled kernels in {here} failed to load: {cause}")
