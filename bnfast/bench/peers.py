"""Which implementations take part: bnfast, the copy roofline, and the optional peers.

A peer that cannot be imported is reported with a note, never an error.
"""
from .base import Unavailable
from .impl_bnfast import Bnfast
from .impl_copy import CopyRoofline

__all__ = ["PEERS", "load_peers", "parse_peers"]

#: Peer name -> (module, class), imported lazily so that torch and
#: onnxruntime load only when the benchmark runs.
PEERS = {
    "numpy": ("impl_numpy", "NumpyPeer"),
    "torch": ("impl_torch", "TorchPeer"),
    "onnxruntime": ("impl_onnxruntime", "OnnxRuntimePeer"),
}


def parse_peers(text):
    """Parse ``"numpy,torch"`` (or ``"all"``, or ``"none"``) into a tuple of peer names."""
    picked = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item in ("", "none"):
            continue
        if item == "all":
            return tuple(PEERS)
        if item in ("ort", "onnx"):
            item = "onnxruntime"
        if item not in PEERS:
            raise ValueError(f"unknown peer {item!r}; choose from {', '.join(PEERS)} (or all, none)")
        if item not in picked:
            picked.append(item)
    return tuple(picked)


def load_peers(names, threads=None, allocate=False):
    """Make bnfast, the roofline and the named peers.

    bnfast is made first, so that its default thread count is read before a
    peer's import can change the OpenMP default.

    Returns
    -------
    impls : list of Implementation
        ``[copy, bnfast, *available peers]``.
    missing : dict of str to str
        Peer name -> why it is unavailable.
    """
    import importlib

    impls = [CopyRoofline(threads, allocate), Bnfast(threads, allocate)]
    missing = {}
    for name in names:
        module_name, class_name = PEERS[name]
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
            impls.append(getattr(module, class_name)(threads, allocate))
        except Unavailable as exc:
            missing[name] = str(exc)
        except Exception as exc:  # a broken install must not stop the benchmark
            missing[name] = f"{name} failed to load: {type(exc).__name__}: {exc}"
    return impls, missing
