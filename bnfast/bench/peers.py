"""The one registry of implementations, for ``bnfast bench`` and ``benchmarks/`` alike.

bnfast, the copy roofline and the optional peers.  A peer whose library
cannot be imported is reported with a note, never an error.
"""
import importlib

__all__ = ["IMPLEMENTATIONS", "PEERS", "make", "load_peers", "parse_peers"]

#: Name -> (module in this package, class).  Imported on first use, so that
#: torch and onnxruntime load only when a benchmark runs.
IMPLEMENTATIONS = {
    "copy": ("impl_copy", "CopyRoofline"),
    "bnfast": ("impl_bnfast", "Bnfast"),
    "numpy": ("impl_numpy", "NumpyPeer"),
    "torch": ("impl_torch", "TorchPeer"),
    "onnxruntime": ("impl_onnxruntime", "OnnxRuntimePeer"),
}

#: The peers bnfast is compared with (``--peers``).
PEERS = ("numpy", "torch", "onnxruntime")


def make(name, threads=None, allocate=False):
    """The implementation called ``name`` (see :class:`~bnfast.bench.base.Implementation`).

    Raises
    ------
    ImportError
        Its library is not installed (the message says what to install).
    """
    module_name, class_name = IMPLEMENTATIONS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)(threads, allocate)


def parse_peers(text):
    """Parse ``"numpy,torch"`` (or ``"all"``, or ``"none"``) into a tuple of peer names."""
    picked = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item in ("", "none"):
            continue
        if item == "all":
            return PEERS
        if item in ("ort", "onnx"):
            item = "onnxruntime"
        if item not in PEERS:
            raise ValueError(f"unknown peer {item!r}; "
                             f"choose from {', '.join(PEERS)} (or all, none)")
        if item not in picked:
            picked.append(item)
    return tuple(picked)


def load_peers(names, threads=None, allocate=False):
    """Make the roofline, bnfast and the named peers.

    bnfast is made before any peer, so that its default thread count is read
    before a peer's import can change the OpenMP default.

    Returns
    -------
    impls : list of Implementation
        ``[copy, bnfast, *available peers]``.
    missing : dict of str to str
        Peer name -> why it is unavailable.
    """
    impls = [make("copy", threads, allocate), make("bnfast", threads, allocate)]
    missing = {}
    for name in names:
        try:
            impls.append(make(name, threads, allocate))
        except ImportError as exc:
            missing[name] = f"not importable ({exc})"
        except Exception as exc:  # a broken install must not stop the benchmark
            missing[name] = f"failed to load: {type(exc).__name__}: {exc}"
    return impls, missing
