"""``--plot FILE.png``: bnfast's speedup over each peer, bars per shape, one panel per mode."""
import math
import os

from .suite import format_shape

__all__ = ["plot_speedups", "matplotlib_missing"]

_COLORS = {"numpy": "#4c72b0", "torch": "#dd8452", "onnxruntime": "#55a868"}


def matplotlib_missing():
    """None if matplotlib can be imported, else a message saying how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'bnfast[plot]' (or pip install matplotlib)"
    return None


def plot_format_problem(path):
    """None if matplotlib's Agg canvas writes ``path``'s format (its suffix), else why not
    (asked before a run, not after it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix not in formats:
        return (f"format {suffix or '(no suffix)'!r} is not one matplotlib writes; name the "
                f"file with one of {', '.join(sorted(formats))}")
    return None


def plot_speedups(doc, path):
    """Draw the speedup bars of a benchmark document into ``path`` (format from its suffix).

    Uses matplotlib's object API with the Agg canvas, so no GUI backend and
    no pyplot global state are involved.

    Raises
    ------
    RuntimeError
        If matplotlib is not installed.
    """
    missing = matplotlib_missing()
    if missing:
        raise RuntimeError(missing)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    peers = [p for p in doc["threads"] if p not in ("copy", "bnfast")]
    modes = [m for m in doc["settings"]["modes"]]
    multi_dtype = len(doc["settings"]["dtypes"]) > 1
    fig = Figure(figsize=(max(6.0, 1.1 * len(doc["settings"]["shapes"])
                              * len(doc["settings"]["dtypes"])),
                          2.8 * max(1, len(modes))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(modes)), 1, squeeze=False)[:, 0]
    for ax, mode in zip(axes, modes):
        rows = [r for r in doc["results"] if r["mode"] == mode]
        labels = []
        for r in rows:
            label = format_shape(r["shape"]) + (f"\n{r['dtype']}" if multi_dtype else "")
            if label not in labels:
                labels.append(label)
        width = 0.8 / max(1, len(peers))
        for k, peer in enumerate(peers):
            xs, ys = [], []
            for r in rows:
                if r["impl"] == peer and r["bnfast_speedup"]:
                    label = format_shape(r["shape"]) + (f"\n{r['dtype']}" if multi_dtype else "")
                    xs.append(labels.index(label) + (k - (len(peers) - 1) / 2) * width)
                    ys.append(r["bnfast_speedup"])
            if xs:
                ax.bar(xs, ys, width, label=f"vs {peer}", color=_COLORS.get(peer))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{mode}: bnfast speedup (peer time / bnfast time)", fontsize=10)
        ax.set_xlim(-0.5, max(1, len(labels)) - 0.5)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30 if len(labels) > 6 else 0)
        if ax.has_data() and any(r["bnfast_speedup"] for r in rows if r["impl"] in peers):
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(0.5, 0.5, "no peer results", transform=ax.transAxes, ha="center")
        ax.yaxis.set_major_formatter(_times_formatter())
        ax.yaxis.set_minor_formatter(_times_formatter(minor=True))
    fig.suptitle(f"bnfast {doc['versions']['bnfast']} on {doc['machine']['cpu']}", fontsize=11)
    fig.savefig(path, dpi=110)


def _times_formatter(minor=False):
    """Tick labels as ``2x``; minor ticks labelled only at 2, 3 and 5 times a power of 10."""
    from matplotlib.ticker import FuncFormatter

    def label(v, _):
        if not (v > 0 and math.isfinite(v)):
            return ""
        if minor and round(v / 10 ** math.floor(math.log10(v)), 6) not in (2, 3, 5):
            return ""
        return f"{v:g}x"

    return FuncFormatter(label)
